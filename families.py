"""Wan model families as configuration of the one pipeline core.

A family is read from the model folder's ``model_index.json`` (what diffusers'
own ``WanPipeline`` / ``WanImageToVideoPipeline`` read): which transformer
experts it has, where the denoising switches between them, and what
conditioning it takes. The core (``pipeline.WanTPUPipeline``) runs every
family it supports from this description; there is no copy of the pipeline
per family.

Supported: Wan 2.1 T2V (1.3B, 14B), Wan 2.2 T2V A14B (a high-noise and a
low-noise expert), Wan 2.1 I2V 14B (the image through the VAE encoder and a
CLIP image encoder), Wan 2.2 I2V A14B (two experts, the image through the
VAE encoder only) and Wan 2.2 TI2V 5B (the 48-channel Wan 2.2 VAE, a timestep
per token; text-to-video, or image-to-video given an image).

Imports neither torch nor jax.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanFamily:
    """What the core needs to know about a model folder."""

    name: str
    experts: tuple[str, ...] = ("transformer",)  # transformer subfolders; the first takes the high-noise steps
    boundary_ratio: float | None = None  # the second expert takes timesteps below boundary_ratio * num_train_timesteps
    expand_timesteps: bool = False  # Wan 2.2 TI2V: a timestep per token
    image_conditioning: bool = False  # image-to-video: the first frame is given
    clip_image_encoder: bool = False  # Wan 2.1 I2V: the image also goes through CLIP into cross-attention
    image_optional: bool = False  # Wan 2.2 TI2V 5B: text-to-video, or image-to-video when given an image

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    def expert_for(self, timestep: float, num_train_timesteps: int = 1000) -> int:
        """The index of the expert that denoises at ``timestep``, as diffusers' WanPipeline picks it."""
        if not self.two_experts or timestep >= self.boundary_ratio * num_train_timesteps:
            return 0
        return 1


WAN21_T2V = WanFamily("Wan 2.1 T2V")
WAN21_I2V = WanFamily("Wan 2.1 I2V", image_conditioning=True, clip_image_encoder=True)
WAN22_TI2V = WanFamily("Wan 2.2 TI2V 5B", expand_timesteps=True, image_conditioning=True, image_optional=True)


def _present(entry) -> bool:
    # model_index.json lists an absent optional component as [null, null].
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def family_from_model_index(model_index: dict, model_id: str = "the model") -> WanFamily:
    """The family of a diffusers Wan folder from its ``model_index.json``. Raises ValueError, naming
    what to use instead, for a pipeline this pack does not run (yet)."""
    pipeline_class = model_index.get("_class_name", "WanPipeline")
    two = _present(model_index.get("transformer_2"))
    boundary = model_index.get("boundary_ratio")
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
        name = "Wan 2.2 I2V A14B" if image else "Wan 2.2 T2V A14B"
        return WanFamily(name, ("transformer", "transformer_2"), float(boundary), image_conditioning=image)
    if image:
        if not _present(model_index.get("image_encoder")):
            raise ValueError(f"{model_id} is a one-expert image-to-video model without a CLIP image encoder "
                             f"(image_encoder/): Wan 2.1 I2V needs one; its diffusers folder is incomplete")
        return WAN21_I2V
    return WAN21_T2V
