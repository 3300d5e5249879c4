"""An image-to-video model's image conditioning, made on the device as diffusers'
``WanImageToVideoPipeline`` makes it: the given frames resized by diffusers' own processors, the clip the
family asks for through the VAE encoder, and (for the families that take them) the images through CLIP.

Imports torch and diffusers inside its functions only.
"""

from __future__ import annotations

import numpy as np

from ...runtime.placement import local_device, replicated, to_host
from ...utils import device_errors
from .conditioning import WanImageConditioning, as_pil_image
from .latents import normalise


def encode_image(components, image, end_image, height: int, width: int, num_frames: int,
                 on_status=None) -> WanImageConditioning:
    """``WanTPUPipeline.encode_image`` for ``components`` (``models.wan.components.WanComponents``)."""
    import torch

    family = components.family
    check_images_wanted(components, family, end_image)
    geometry = components.geometry
    family.check_video(geometry, height, width, num_frames)
    pictures = [as_pil_image(image)] + ([as_pil_image(end_image, "end image")] if end_image is not None else [])
    components.memory_plan(height, width, num_frames, guidance_scale=1.0)
    components.announce_loading(on_status, "vae")
    vae = components.vae()
    if on_status is not None:
        on_status("encoding the image")
    with components.timer("encode_image"):
        pixels = [pixels_for_vae(components, picture, height, width) for picture in pictures]
        video = family.video_to_encode(pixels[0], num_frames, pixels[1] if len(pixels) > 1 else None)
        means = vae.encoder.encode(vae.weights, video, on_status, device=local_device(vae.mesh))
        condition = family.condition_from_latents(normalise(means, vae.latents_mean, vae.latents_std))
        image_embeds = clip_tokens(components, pictures, on_status) if family.clip_images else None
    return WanImageConditioning(torch.from_numpy(condition), image_embeds, components.source.model_id,
                                int(height), int(width), int(num_frames))


def check_images_wanted(components, family, end_image) -> None:
    """Refuse, naming the fix, an image for a text-to-video model and an end image where none is taken
    (or none where one is needed)."""
    model = repr(components.source.model_id)
    if not family.takes_image:
        raise ValueError(f"{model} is {family.name}, a text-to-video model: it takes no image. Use an "
                         f"image-to-video model (e.g. Wan-AI/Wan2.2-I2V-A14B-Diffusers), or leave the image out")
    if end_image is not None and not family.takes_end_image:
        raise ValueError(f"{model} is {family.name}, which starts from one image: disconnect the end image, "
                         f"or use a first-last-frame model (Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers)")
    if end_image is None and family.takes_end_image:
        raise ValueError(f"{model} is {family.name}, which makes the video between two images: connect the "
                         f"end image too")


def pixels_for_vae(components, picture, height: int, width: int) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1]: diffusers' own resize for the VAE."""
    import torch
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=components.geometry.spatial_factor)
    return processor.preprocess(picture, height=height, width=width).to(torch.float32).numpy()


def clip_tokens(components, pictures: list, on_status):
    """The CLIP tokens [images, n, clip_dim] (CPU tensor) of the given images, in one batch."""
    import torch

    components.announce_loading(on_status, "image_encoder")
    clip = components.image_encoder()
    pixel_values = clip.processor(images=pictures, return_tensors="np")["pixel_values"].astype(np.float32)
    pixel_values = components.manager.jax.device_put(pixel_values, replicated(clip.mesh))
    with device_errors("the image encoder", "Use a mesh with more devices."), components.matmul_precision():
        return torch.from_numpy(to_host(clip.encode_fn(clip.weights, pixel_values)).copy())
