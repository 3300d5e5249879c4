"""What the stages hand each other: prompt embeddings and an image-to-video model's image conditioning,
and the checks that they fit the model they are given to.

Imports numpy and PIL only (torch tensors are passed through, not made here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("wan_tpu")


@dataclass(frozen=True)
class WanEmbeddings:
    """UMT5 embeddings of a prompt pair: [1, 512, text_dim] float32 CPU tensors.

    Padding positions are zero, as diffusers' ``encode_prompt`` leaves them.
    """

    prompt_embeds: Any
    negative_prompt_embeds: Any
    model_id: str

    @property
    def text_dim(self) -> int:
        return int(self.prompt_embeds.shape[-1])


@dataclass(frozen=True)
class WanImageConditioning:
    """An image-to-video model's conditioning on its given frames, made by ``WanTPUPipeline.encode_image``.

    ``condition`` (CPU tensor, float32): what the family's step takes beside the noise
    (``family.condition_from_latents``): for Wan I2V and FLF2V [1, 20, T, h, w], the given-frames mask (4
    channels) and the normalised VAE latents of the clip (16); for TI2V the first latent frame [1, 48, 1, h, w].
    ``image_embeds``: the CLIP tokens [images, n, clip_dim] (CPU) of the families that take them, else None.
    The video size it was made for is kept, so a sampler of another size is told.
    """

    condition: Any
    image_embeds: Any
    model_id: str
    height: int
    width: int
    num_frames: int


def check_embeddings(embeddings: WanEmbeddings, config: dict, model: str) -> None:
    if embeddings.text_dim != config["text_dim"]:
        raise ValueError(
            f"the embeddings have width {embeddings.text_dim} (from {embeddings.model_id!r}) but {model} expects "
            f"{config['text_dim']}: encode the prompt with the same model's Text Encoder")


def check_image_conditioning(image, family, config: dict, model: str, height: int, width: int,
                             num_frames: int) -> None:
    """Refuse, naming the fix, an image where the model takes none, none where it needs one, or one made for
    another size or model."""
    if image is None:
        if family.takes_image and not family.image_optional:
            raise ValueError(f"{model} is {family.name}, an image-to-video model: give it the start image "
                             f"(connect a 'Wan TPU Image to Video' node's output to the sampler's image, "
                             f"or --image on the command line)")
        return
    if not isinstance(image, WanImageConditioning):
        raise ValueError(f"image={type(image).__name__}: give the output of encode_image (the 'Wan TPU Image "
                         f"to Video' node), not a raw image")
    if not family.takes_image:
        raise ValueError(f"{model} is {family.name}, a text-to-video model: it takes no image. Disconnect the "
                         f"image, or use an image-to-video model")
    made, wanted = (image.width, image.height, image.num_frames), (width, height, num_frames)
    if made != wanted:
        raise ValueError(f"the image conditioning was made for {made[0]}x{made[1]}, {made[2]} frames, but this "
                         f"run is {width}x{height}, {num_frames} frames: give both the same width, height and "
                         f"frames")
    channels = family.condition_channels(config)
    if image.condition.shape[1] != channels:
        raise ValueError(f"the image conditioning has {image.condition.shape[1]} channels but {model} takes "
                         f"{channels}: encode the image with the same model")
    images = 0 if image.image_embeds is None else image.image_embeds.shape[0]
    if images != family.clip_images or (images and image.image_embeds.shape[-1] != config.get("image_dim")):
        raise ValueError(f"the image conditioning came from {image.model_id!r}, whose image encoding does not "
                         f"fit {model} ({family.name}): encode the image with the same model")


def as_pil_image(image, what: str = "image"):
    """A PIL RGB image from a PIL image or an array [H, W, 3] / [1, H, W, 3] in [0, 1] (ComfyUI's IMAGE).

    Both diffusers processors (the VAE's resize, CLIP's resize and crop) then see what a diffusers user
    gives them; an array is rounded to 8 bits, which is what an image file holds.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, np.float32)
    if array.ndim == 4 and array.shape[0] >= 1:
        if array.shape[0] > 1:
            logger.info("the %s batch has %d images: the first is used", what, array.shape[0])
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"{what} of shape {tuple(array.shape)}: give an RGB image [height, width, 3] "
                         f"(ComfyUI's IMAGE, e.g. from Load Image)")
    return Image.fromarray(np.round(np.clip(array[..., :3], 0.0, 1.0) * 255).astype(np.uint8))
