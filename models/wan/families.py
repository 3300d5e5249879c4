"""The Wan families, each a class: what differs between them is written here as methods, and the
model-agnostic core (``sampling.StepProgram``, ``sampling.DenoiseRun``, ``pipeline.WanTPUPipeline``)
calls those methods without asking which family it runs.

- ``WanTextToVideo``: Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 T2V A14B (two experts).
- ``WanImageToVideo``: the first frame's mask and latents beside the noise, as extra input channels:
  Wan 2.1 I2V 14B (with CLIP image tokens) and Wan 2.2 I2V A14B (two experts, no CLIP).
- ``WanFirstLastFrameToVideo``: Wan 2.1 FLF2V 14B: the same channels, with the last frame given too,
  and both images' CLIP tokens.
- ``WanTextImageToVideo``: Wan 2.2 TI2V 5B: the 48-channel Wan 2.2 VAE, a timestep per token; with an
  image its latents replace the first latent frame.

A family is read from a diffusers folder's ``model_index.json`` and transformer config
(``family_from_model_index``) or from single files' weights (``model_files.family``).

The hooks run in three places: on the host before a run (``video_to_encode``, ``condition_from_latents``,
``step_conditioning``), inside the jitted step (``model_input``: traced, so a family's arithmetic is
part of the one compiled program), and on the host after the last step (``finish``).

Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from .configs import CLIP_TOKENS
from .latents import TEMPORAL_FACTOR, LatentGeometry

# Where a step input lives on the mesh: "replicated" on every device, or "batch" (split over dp like the
# CFG batch of cond and uncond).
REPLICATED, BATCH = "replicated", "batch"


def _numpy_dtype(name: str):
    if name == "bfloat16":  # numpy has no bfloat16; jax's ml_dtypes does, and is always beside jax
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


@dataclass(frozen=True)
class ConditioningInput:
    """One array the step takes beyond the noise: its host value, or only its shape and dtype (for the
    compile command), and where it lives on the mesh."""

    shape: tuple
    dtype: str
    placement: str  # REPLICATED or BATCH
    value: Any = None  # np.ndarray, or None for an abstract input


@dataclass(frozen=True)
class WanFamily:
    """What the core needs to know about a Wan model. ``experts``: transformer subfolders, the first takes
    the high-noise steps; ``boundary_ratio``: the second takes timesteps below it times the training
    timesteps (diffusers' rule)."""

    name: str
    experts: tuple[str, ...] = ("transformer",)
    boundary_ratio: float | None = None
    clip_images: int = 0  # how many images go through the CLIP image encoder into cross-attention

    diffusers_pipeline: ClassVar[str] = "WanPipeline"  # what model_index.json names, in diffusers' format
    expand_timesteps: ClassVar[bool] = False  # model_index.json's flag: a timestep per token (TI2V)
    takes_image: ClassVar[bool] = False  # the start image conditions the video
    image_optional: ClassVar[bool] = False  # ... or the model also runs without one
    takes_end_image: ClassVar[bool] = False  # the last frame is given too

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    @property
    def image_conditioning(self) -> bool:
        return self.takes_image

    @property
    def clip_image_encoder(self) -> bool:
        return self.clip_images > 0

    def expert_for(self, timestep: float, num_train_timesteps: int = 1000) -> int:
        """The index of the expert that denoises at ``timestep``, as diffusers' WanPipeline picks it."""
        if not self.two_experts or timestep >= self.boundary_ratio * num_train_timesteps:
            return 0
        return 1

    # ---------------------------------------------------------------- before the run (host)
    def check_video(self, geometry: LatentGeometry, height, width, num_frames) -> None:
        geometry.check_video(height, width, num_frames)

    def refuse_image(self) -> None:
        """A text-to-video family has no image conditioning: say so, and what to use instead."""
        raise ValueError(f"{self.name} is a text-to-video model: it takes no image. Use an image-to-video model "
                         f"(e.g. Wan-AI/Wan2.2-I2V-A14B-Diffusers), or leave the image out")

    def video_to_encode(self, pixels: np.ndarray, num_frames: int, end_pixels: np.ndarray | None) -> np.ndarray:
        """The clip the VAE encoder takes for the image conditioning: [1, 3, F, H, W]."""
        self.refuse_image()

    def condition_from_latents(self, latents: np.ndarray) -> np.ndarray:
        """The conditioning the step takes, from the encoded clip's normalised latents."""
        self.refuse_image()

    def condition_channels(self, config: dict) -> int:
        """The channels of ``condition_from_latents``'s output for a transformer of this ``config``."""
        return 0

    def step_conditioning(self, condition: np.ndarray | None, image_embeds: np.ndarray | None,
                          sample_shape: tuple, batch: int, context_dtype: str) -> tuple[ConditioningInput, ...] | None:
        """The step's conditioning inputs (host values), from ``condition_from_latents``'s output and the CLIP
        tokens [images, tokens, dim] (None without an image); None when the step takes none."""
        return None

    def abstract_conditioning(self, config: dict, sample_shape: tuple, batch: int, context_dtype: str,
                              clip_tokens: int = CLIP_TOKENS) -> tuple[ConditioningInput, ...] | None:
        """The same inputs' shapes alone, for compiling without a model (``benchmarks/tpu_compile.py``)."""
        condition = embeds = None
        if self.takes_image:
            condition = np.zeros((1, self.condition_channels(config), 1 if self.image_optional else sample_shape[2])
                                 + tuple(sample_shape[3:]), np.float32)
        if self.clip_images:  # FLF2V's position embedding says its images' tokens
            clip_tokens = config.get("pos_embed_seq_len") and config["pos_embed_seq_len"] // self.clip_images or clip_tokens
            embeds = np.zeros((self.clip_images, clip_tokens, config["image_dim"]), np.float32)
        inputs = self.step_conditioning(condition, embeds, sample_shape, batch, context_dtype)
        return None if inputs is None else tuple(replace(input, value=None) for input in inputs)

    # ---------------------------------------------------------------- inside the step (traced)
    def model_input(self, jnp, sample, timestep, conditioning, batch: int, config: dict):
        """(the transformer's input, its timesteps, its CLIP image tokens) for ``sample`` repeated ``batch``
        times. ``conditioning``: the placed arrays of ``step_conditioning``, or None."""
        model_input = jnp.concatenate([sample] * batch) if batch > 1 else sample
        return model_input, jnp.full((batch,), timestep, jnp.float32), None

    def velocity(self, manager, transformer, weights, model_input, timesteps, context, image_embeds, *,
                 record: bool, block_residual, split):
        """The transformer's flow prediction for ``model_input`` (and with ``record``, MagCache's residual too;
        with ``block_residual``, the blocks skipped and it reused). ``transformer``: its component."""
        from ...runtime.torch_bridge import call_transformer

        return call_transformer(manager, transformer.module, weights, transformer.mesh, model_input, timesteps,
                                context, record_residual=record, block_residual=block_residual,
                                image_embeds=image_embeds, split=split)

    # ---------------------------------------------------------------- the step's arrays (shapes only)
    def context_shapes(self, config: dict, batch: int, text_tokens: int, dtype: str) -> tuple:
        """((shape, dtype), ...) of the step's prompt context: Wan's is one array [batch, tokens, text_dim]."""
        return (((batch, text_tokens, config["text_dim"]), dtype),)

    def residual_shapes(self, config: dict, sample_shape: tuple, batch: int):
        """The shape of MagCache's block residual: [batch, tokens, inner_dim]."""
        _, _, frames, height, width = sample_shape
        p_t, p_h, p_w = config["patch_size"]
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        return (batch, tokens, config["num_attention_heads"] * config["attention_head_dim"])

    # ---------------------------------------------------------------- after the run (host)
    def finish(self, latents: np.ndarray, conditioning: tuple | None) -> np.ndarray:
        """The final latents (normalised space), given the host values of the step's conditioning."""
        return latents


@dataclass(frozen=True)
class WanTextToVideo(WanFamily):
    """Text to video: the noise alone."""


@dataclass(frozen=True)
class WanImageToVideo(WanFamily):
    """The first frame given: a 4-channel mask and the VAE latents of the image followed by black frames,
    concatenated to the noise (in_channels 36 = 16 + 4 + 16)."""

    diffusers_pipeline: ClassVar[str] = "WanImageToVideoPipeline"
    takes_image: ClassVar[bool] = True

    def video_to_encode(self, pixels, num_frames, end_pixels):
        # The image, then black frames: diffusers encodes the whole clip, the causal VAE carrying its cache.
        video = np.zeros((1, 3, num_frames) + pixels.shape[-2:], np.float32)
        video[:, :, 0] = pixels
        return video

    def given_frames_mask(self, latents: np.ndarray) -> np.ndarray:
        """[1, 4, T, h, w]: 1 where a latent frame's pixel frame is given. Each latent frame covers 4 pixel
        frames (the first one alone, repeated 4 times): diffusers' ``mask_lat_size``."""
        mask = np.zeros((1, TEMPORAL_FACTOR) + latents.shape[2:], np.float32)
        mask[:, :, 0] = 1.0
        return mask

    def condition_from_latents(self, latents):
        return np.concatenate([self.given_frames_mask(latents), latents], axis=1)

    def condition_channels(self, config):
        return config["in_channels"] - config["out_channels"]

    def step_conditioning(self, condition, image_embeds, sample_shape, batch, context_dtype):
        # The same for cond and uncond: [batch, ...], split over dp like the batch.
        condition = np.repeat(condition, batch, axis=0)
        inputs = [ConditioningInput(condition.shape, "float32", BATCH, condition)]
        if self.clip_images:
            # Each sample's CLIP tokens as [images, tokens, dim] rows, repeated whole per sample: the
            # transformer folds an FLF2V sample's two images back into one sequence of 2 x tokens.
            embeds = np.concatenate([image_embeds] * batch).astype(_numpy_dtype(context_dtype))
            inputs.append(ConditioningInput(embeds.shape, context_dtype, BATCH, embeds))
        return tuple(inputs)

    def model_input(self, jnp, sample, timestep, conditioning, batch, config):
        model_input, timesteps, _ = super().model_input(jnp, sample, timestep, None, batch, config)
        condition, *image_embeds = conditioning
        return (jnp.concatenate([model_input, condition], axis=1), timesteps,
                image_embeds[0] if image_embeds else None)


@dataclass(frozen=True)
class WanFirstLastFrameToVideo(WanImageToVideo):
    """Wan 2.1 FLF2V: the first and the last frame given (diffusers' ``WanImageToVideoPipeline`` with
    ``last_image``); both images go through CLIP, and the transformer adds a position embedding over their
    2 x 257 tokens (its ``pos_embed_seq_len``)."""

    clip_images: int = 2
    takes_end_image: ClassVar[bool] = True

    def check_video(self, geometry, height, width, num_frames):
        super().check_video(geometry, height, width, num_frames)
        if num_frames < 5:
            raise ValueError(f"num_frames={num_frames}: first-last-frame video needs at least 5 frames (a first "
                             f"and a last frame apart), e.g. 81")

    def video_to_encode(self, pixels, num_frames, end_pixels):
        if end_pixels is None:
            raise ValueError(f"{self.name} makes the video between two images: give the end image too")
        video = super().video_to_encode(pixels, num_frames, end_pixels)
        video[:, :, -1] = end_pixels
        return video

    def given_frames_mask(self, latents):
        mask = super().given_frames_mask(latents)
        mask[:, -1, -1] = 1.0  # the last pixel frame is the last of the last latent frame's four
        return mask


@dataclass(frozen=True)
class WanTextImageToVideo(WanFamily):
    """Wan 2.2 TI2V 5B: a timestep per token; with an image, its latents are the first latent frame, whose
    tokens get timestep 0 (diffusers' ``first_frame_mask``). The mask is data, so text-to-video and
    image-to-video share one compiled program."""

    takes_image: ClassVar[bool] = True
    image_optional: ClassVar[bool] = True

    def video_to_encode(self, pixels, num_frames, end_pixels):
        return pixels[:, :, None]  # the image alone becomes the first latent frame

    def condition_from_latents(self, latents):
        return latents  # [1, 48, 1, h, w]

    def condition_channels(self, config):
        return config["out_channels"]

    def step_conditioning(self, condition, image_embeds, sample_shape, batch, context_dtype):
        given = np.zeros(sample_shape, np.float32)
        keep = np.ones((1, 1) + tuple(sample_shape[2:]), np.float32)
        if condition is not None:
            given[:, :, :1] = condition
            keep[:, :, 0] = 0.0
        return (ConditioningInput(given.shape, "float32", REPLICATED, given),
                ConditioningInput(keep.shape, "float32", REPLICATED, keep))

    def model_input(self, jnp, sample, timestep, conditioning, batch, config):
        given, keep = conditioning
        model_input = jnp.concatenate([sample] * batch) if batch > 1 else sample
        model_input = (1 - keep) * given + keep * model_input  # the given frame in place, in each of the batch
        p_t, p_h, p_w = config["patch_size"]
        per_token = (keep[0, 0, ::p_t, ::p_h, ::p_w] * timestep).reshape(-1)
        return model_input, jnp.broadcast_to(per_token, (batch, per_token.shape[0])), None

    def finish(self, latents, conditioning):
        given, keep = (input.value for input in conditioning)
        return (1 - keep) * given + keep * latents  # diffusers puts the image's frame back at the end


WAN21_T2V = WanTextToVideo("Wan 2.1 T2V")
WAN21_I2V = WanImageToVideo("Wan 2.1 I2V", clip_images=1)
WAN21_FLF2V = WanFirstLastFrameToVideo("Wan 2.1 FLF2V")
WAN22_TI2V = WanTextImageToVideo("Wan 2.2 TI2V 5B")


def two_expert_family(image: bool, boundary_ratio: float) -> WanFamily:
    """Wan 2.2 A14B, text- or image-to-video: a high-noise and a low-noise expert."""
    experts = ("transformer", "transformer_2")
    if image:
        return WanImageToVideo("Wan 2.2 I2V A14B", experts, float(boundary_ratio))
    return WanTextToVideo("Wan 2.2 T2V A14B", experts, float(boundary_ratio))


def _present(entry) -> bool:
    # model_index.json lists an absent optional component as [null, null].
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def family_from_model_index(model_index: dict, model_id: str = "the model",
                            transformer_config: dict | None = None) -> WanFamily:
    """The family of a diffusers Wan folder from its ``model_index.json`` (and, to tell FLF2V from I2V,
    its transformer config). Raises ValueError, naming what to use instead, for a pipeline this pack does
    not run (yet)."""
    pipeline_class = model_index.get("_class_name", "WanPipeline")
    two = _present(model_index.get("transformer_2"))
    boundary = model_index.get("boundary_ratio")
    if pipeline_class.startswith("HunyuanVideo15"):
        raise ValueError(f"{model_id} is HunyuanVideo 1.5 ({pipeline_class}): use the 'HunyuanVideo 1.5 ... (TPU)' "
                         f"nodes (category TPU/HunyuanVideo), or models.hunyuan.pipeline.HunyuanVideoPipeline")
    if pipeline_class not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise ValueError(f"{model_id} has pipeline {pipeline_class!r}, not a Wan pipeline: use a Wan T2V or I2V "
                         f"diffusers folder (WanPipeline or WanImageToVideoPipeline)")
    image = pipeline_class == "WanImageToVideoPipeline"
    if model_index.get("expand_timesteps"):
        if two or _present(model_index.get("image_encoder")):
            raise ValueError(f"{model_id} has expanded timesteps (Wan 2.2 TI2V 5B) with two experts or a CLIP "
                             f"image encoder, which no Wan release has: use Wan-AI/Wan2.2-TI2V-5B-Diffusers")
        return WAN22_TI2V
    if two:
        if boundary is None:
            raise ValueError(f"{model_id} has a transformer_2 but no boundary_ratio in model_index.json: "
                             f"its diffusers folder is incomplete")
        if image and _present(model_index.get("image_encoder")):
            raise ValueError(f"{model_id} has two experts and a CLIP image encoder, a combination no Wan release "
                             f"has: use Wan-AI/Wan2.2-I2V-A14B-Diffusers or Wan-AI/Wan2.1-I2V-14B-*-Diffusers")
        return two_expert_family(image, boundary)
    if image:
        if not _present(model_index.get("image_encoder")):
            raise ValueError(f"{model_id} is a one-expert image-to-video model without a CLIP image encoder "
                             f"(image_encoder/): Wan 2.1 I2V needs one; its diffusers folder is incomplete")
        return WAN21_FLF2V if is_first_last_frame(transformer_config or {}) else WAN21_I2V
    return WAN21_T2V


def is_first_last_frame(transformer_config: dict) -> bool:
    """FLF2V's transformer adds a position embedding over two images' CLIP tokens; I2V's has none."""
    return bool(transformer_config.get("pos_embed_seq_len"))


def family_of_config(transformer_config: dict) -> WanFamily:
    """The one-expert family a transformer config implies, for compiling without a model folder (the
    compile command): Wan 2.2's 48 latent channels are TI2V 5B; more input than output channels take an
    image (with CLIP tokens where the config has ``image_dim``). A two-expert model compiles as one expert."""
    if LatentGeometry.from_transformer_config(transformer_config).channels == 48:
        return WAN22_TI2V
    if transformer_config.get("in_channels", 16) == transformer_config.get("out_channels", 16):
        return WAN21_T2V
    if not transformer_config.get("image_dim"):
        return WanImageToVideo("Wan 2.2 I2V A14B (one expert)")
    return WAN21_FLF2V if is_first_last_frame(transformer_config) else WAN21_I2V
