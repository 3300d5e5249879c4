"""The HunyuanVideo 1.5 families (text-to-video and image-to-video) for the model-agnostic core:
the same hooks ``sampling.StepProgram`` and ``sampling.DenoiseRun`` call on a Wan family.

The transformer takes, beside the noise, conditioning latents and a mask as extra channels (zeros for
text-to-video; the image's latents in the first frame for image-to-video), the Qwen2.5-VL and ByT5 prompt
tokens with their masks (the context: four arrays), and 729 SigLIP image tokens (zeros, and masked out,
for text-to-video).

Imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from ..wan.families import BATCH, ConditioningInput

TEXT_TOKENS = 1000  # the Qwen prompt after diffusers' template crop (tokenizer_max_length)
TEMPLATE_CROP = 108  # diffusers' prompt_template_encode_start_idx: the system prompt's tokens, cut off
GLYPH_TOKENS = 256  # ByT5's (tokenizer_2_max_length)
IMAGE_TOKENS = 729  # SigLIP's at 384 px (vision_num_semantic_tokens): text-to-video's zero tokens too


@dataclass(frozen=True)
class HunyuanGeometry:
    """The VAE's latent format (from its config) and the transformer's patching."""

    channels: int = 32
    spatial_factor: int = 16
    temporal_factor: int = 4
    patch: int = 1

    @classmethod
    def from_configs(cls, vae_config: Mapping, transformer_config: Mapping | None = None) -> "HunyuanGeometry":
        patch = int((transformer_config or {}).get("patch_size", 1))
        return cls(int(vae_config.get("latent_channels", 32)), int(vae_config.get("spatial_compression_ratio", 16)),
                   int(vae_config.get("temporal_compression_ratio", 4)), patch)

    @property
    def pixel_multiple(self) -> int:
        return self.spatial_factor * self.patch

    def video_size_error(self, height, width, num_frames) -> str | None:
        multiple, t = self.pixel_multiple, self.temporal_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < multiple or value % multiple):
                lower = max(multiple, int(value) // multiple * multiple) if isinstance(value, (int, np.integer)) else 480
                return (f"{name}={value}: HunyuanVideo 1.5 needs a multiple of {multiple} ({lower} or "
                        f"{lower + multiple}): its VAE downsamples {self.spatial_factor}x")
        if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or num_frames < 1
                                       or (num_frames - 1) % t):
            lower = max(1, (int(num_frames) - 1) // t * t + 1) if isinstance(num_frames, (int, np.integer)) else 121
            return f"num_frames={num_frames}: HunyuanVideo 1.5 needs {t}n+1 frames ({lower} or {lower + t})"
        return None

    def check_video(self, height, width, num_frames) -> None:
        error = self.video_size_error(height, width, num_frames)
        if error:
            raise ValueError(error)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        return (1, self.channels, (num_frames - 1) // self.temporal_factor + 1, height // self.spatial_factor,
                width // self.spatial_factor)

    def video_size(self, latent_shape) -> tuple[int, int, int]:
        frames, height, width = latent_shape[-3:]
        return height * self.spatial_factor, width * self.spatial_factor, (frames - 1) * self.temporal_factor + 1

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        _, _, frames, h, w = self.latent_shape(height, width, num_frames)
        return frames * (h // self.patch) * (w // self.patch)


@dataclass(frozen=True)
class HunyuanVideo15:
    """HunyuanVideo 1.5, text to video. ``image_tokens``: how many SigLIP tokens the transformer takes."""

    name: str = "HunyuanVideo 1.5 T2V"
    image_tokens: int = IMAGE_TOKENS
    experts: tuple[str, ...] = ("transformer",)
    clip_images: int = 0

    diffusers_pipeline: ClassVar[str] = "HunyuanVideo15Pipeline"
    takes_image: ClassVar[bool] = False
    image_optional: ClassVar[bool] = False
    takes_end_image: ClassVar[bool] = False
    two_experts: ClassVar[bool] = False

    def expert_for(self, timestep: float, num_train_timesteps: int = 1000) -> int:
        return 0

    def always_run(self, config: Mapping) -> tuple[int, ...]:
        """The blocks DeepCache runs on a cached step: the last one (the original's ``no_cache_block_id``
        53 of 54)."""
        return (config["num_layers"] - 1,)

    def refuse_image(self) -> None:
        raise ValueError(f"{self.name} is a text-to-video model: it takes no image. Use a HunyuanVideo 1.5 "
                         f"image-to-video folder (e.g. hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_i2v), "
                         f"or leave the image out")

    # ---------------------------------------------------------------- before the run (host)
    def step_conditioning(self, condition, image_embeds, sample_shape, batch, context_dtype):
        return None

    def abstract_conditioning(self, config, sample_shape, batch, context_dtype):
        return None

    # ---------------------------------------------------------------- inside the step (traced)
    def model_input(self, jnp, sample, timestep, conditioning, batch: int, config: Mapping):
        """[noise, conditioning latents, mask] on channels, repeated ``batch`` times; the timesteps; the image
        tokens (text-to-video: zeros)."""
        latents = jnp.concatenate([sample] * batch) if batch > 1 else sample
        condition = jnp.zeros((batch, sample.shape[1] + 1) + sample.shape[2:], sample.dtype)
        embeds = jnp.zeros((batch, self.image_tokens, config["image_embed_dim"]), jnp.float32)
        return jnp.concatenate([latents, condition], axis=1), jnp.full((batch,), timestep, jnp.float32), embeds

    def velocity(self, manager, transformer, weights, model_input, timesteps, context, image_embeds, *,
                 record: bool, block_residual, split):
        """The transformer (``models.hunyuan.transformer.forward``) on the step's arrays; ``record`` /
        ``block_residual``: DeepCache's full step that keeps the cache, and its cached step."""
        from ...runtime.torch_bridge import call_torch_module
        from . import transformer as forward_module

        mode = "record" if record else "reuse" if block_residual is not None else None
        settings = dict(image_tokens_valid=self.takes_image, cache_mode=mode, cached=block_residual,
                        always_run=self.always_run(transformer.config))
        dtype = model_input.dtype
        args = (model_input, timesteps.astype(dtype), *context, image_embeds.astype(dtype))
        with manager.active_mesh(transformer.mesh, split):
            return call_torch_module(manager, transformer.module, weights, forward_module.forward, args, settings)

    def context_shapes(self, config: Mapping, batch: int, text_tokens: int, dtype: str) -> tuple:
        """Qwen's tokens and mask, ByT5's tokens and mask."""
        return (((batch, TEXT_TOKENS, config["text_embed_dim"]), dtype), ((batch, TEXT_TOKENS), "int32"),
                ((batch, GLYPH_TOKENS, config["text_embed_2_dim"]), dtype), ((batch, GLYPH_TOKENS), "int32"))

    def residual_shapes(self, config: Mapping, sample_shape: tuple, batch: int):
        """DeepCache's cache: (video tokens, text tokens) as the last skipped block leaves them."""
        _, _, frames, height, width = sample_shape
        patch = config["patch_size"]
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        video = frames // config["patch_size_t"] * (height // patch) * (width // patch)
        return (((batch, video, dim), (batch, self.image_tokens + GLYPH_TOKENS + TEXT_TOKENS, dim)),)

    # ---------------------------------------------------------------- after the run (host)
    def finish(self, latents: np.ndarray, conditioning) -> np.ndarray:
        return latents


@dataclass(frozen=True)
class HunyuanVideo15ImageToVideo(HunyuanVideo15):
    """The first frame given: its VAE latents in the first latent frame of the conditioning channels, a mask
    of 1 there, and its SigLIP tokens attended with the text."""

    name: str = "HunyuanVideo 1.5 I2V"
    diffusers_pipeline: ClassVar[str] = "HunyuanVideo15ImageToVideoPipeline"
    takes_image: ClassVar[bool] = True

    def refuse_image(self) -> None:
        return None

    def condition_from_latents(self, image_latents: np.ndarray, latent_frames: int) -> np.ndarray:
        """[1, C + 1, T, h, w]: the image's latents in frame 0 (zeros after), then the mask."""
        _, channels, _, height, width = image_latents.shape
        condition = np.zeros((1, channels + 1, latent_frames, height, width), np.float32)
        condition[:, :channels, 0] = image_latents[:, :, 0]
        condition[:, channels, 0] = 1.0
        return condition

    def step_conditioning(self, condition, image_embeds, sample_shape, batch, context_dtype):
        condition = np.repeat(condition, batch, axis=0)
        embeds = np.repeat(image_embeds.astype(np.float32), batch, axis=0)
        return (ConditioningInput(condition.shape, "float32", BATCH, condition),
                ConditioningInput(embeds.shape, "float32", BATCH, embeds))

    def abstract_conditioning(self, config, sample_shape, batch, context_dtype):
        _, channels, frames, height, width = sample_shape
        return (ConditioningInput((batch, channels + 1, frames, height, width), "float32", BATCH),
                ConditioningInput((batch, self.image_tokens, config["image_embed_dim"]), "float32", BATCH))

    def model_input(self, jnp, sample, timestep, conditioning, batch, config):
        condition, embeds = conditioning
        latents = jnp.concatenate([sample] * batch) if batch > 1 else sample
        return jnp.concatenate([latents, condition], axis=1), jnp.full((batch,), timestep, jnp.float32), embeds


def family_from_model_index(model_index: Mapping, image_encoder_config: Mapping | None,
                            model_id: str = "the model") -> HunyuanVideo15:
    """The family of a HunyuanVideo 1.5 diffusers folder; image-to-video's token count from SigLIP's config."""
    name = model_index.get("_class_name")
    if name == HunyuanVideo15.diffusers_pipeline:
        return HunyuanVideo15()
    if name == HunyuanVideo15ImageToVideo.diffusers_pipeline:
        if not image_encoder_config:
            raise ValueError(f"{model_id} is HunyuanVideo 1.5 image-to-video without image_encoder/: its diffusers "
                             f"folder is incomplete")
        tokens = (image_encoder_config["image_size"] // image_encoder_config["patch_size"]) ** 2
        return HunyuanVideo15ImageToVideo(image_tokens=tokens)
    raise ValueError(f"{model_id} has pipeline {name!r}: not a HunyuanVideo 1.5 folder")


def is_hunyuan_pipeline(model_index: Mapping) -> bool:
    return model_index.get("_class_name") in (HunyuanVideo15.diffusers_pipeline,
                                              HunyuanVideo15ImageToVideo.diffusers_pipeline)
