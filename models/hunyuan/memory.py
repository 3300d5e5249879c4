"""HunyuanVideo 1.5's HBM plan for the denoising step, from the configs alone: the transformer's weights
per device under its sharding rules (exact), plus a closed-form estimate of the activations one block
holds at its peak, times a safety factor fitted to the compiled steps (``benchmarks/hunyuan_compile.py``).

Imports torch (the meta module, for the weights' shapes) inside its functions only.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from ...runtime.chips import GiB
from .family import GLYPH_TOKENS, IMAGE_TOKENS, TEXT_TOKENS, HunyuanGeometry

ACTIVATION_SAFETY = 1.1  # fitted to the compiled 720P step on v6e-8 (benchmarks/hunyuan_compile.py)


@dataclass(frozen=True)
class HunyuanPlan:
    weights_bytes: int
    activation_bytes: int
    hbm_bytes: int | None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

    def summary(self) -> str:
        hbm = "" if self.hbm_bytes is None else f" of {self.hbm_bytes / GiB:.1f} GiB"
        return (f"step {self.total_bytes / GiB:.1f} GiB per device{hbm} (weights {self.weights_bytes / GiB:.1f}, "
                f"activations {self.activation_bytes / GiB:.1f})")

    def message(self) -> str:
        return (f"HunyuanVideo 1.5's step needs about {self.total_bytes / GiB:.1f} GiB per device, more than the "
                f"{self.hbm_bytes / GiB:.1f} GiB each has: lower the resolution or num_frames, or use a slice with "
                f"more devices")


@functools.lru_cache(maxsize=8)
def _parameter_shapes(config_json: str) -> dict:
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        module = HunyuanVideo15Transformer3DModel(**config)
    return {name: tuple(tensor.shape) for name, tensor in module.named_parameters()}


def weights_bytes_per_device(config: dict, mesh_shape: dict, itemsize: int = 2, layout: str = "tensor") -> int:
    from ... import sharding
    from .components import TRANSFORMER_LAYOUTS

    shapes = _parameter_shapes(json.dumps(config, sort_keys=True, default=list))
    plan = sharding.plan_shardings(shapes, TRANSFORMER_LAYOUTS[layout], dict(mesh_shape))
    return plan.bytes_per_device(shapes, {name: itemsize for name in shapes}, dict(mesh_shape))


def activation_bytes_per_device(config: dict, mesh_shape: dict, height: int, width: int, frames: int,
                                cfg: bool, itemsize: int = 2) -> int:
    """What the step holds at its peak beside the weights, per device: the video and text streams' residual
    (in and out) whole, and the FFN's hidden layer and one attention-width tensor split over tp; plus
    the four fp32 latent states. XLA fuses the rest away (the compiled 720P step on v6e-8 holds 1.6 GiB
    besides its 4.0 GiB of weights)."""
    dp, tp = mesh_shape.get("dp", 1), mesh_shape.get("tp", 1)
    batch = (2 if cfg else 1) // dp if (2 if cfg else 1) % dp == 0 else (2 if cfg else 1)
    geometry = HunyuanGeometry(int(config.get("out_channels", 32)))
    tokens = geometry.tokens(height, width, frames) + IMAGE_TOKENS + GLYPH_TOKENS + TEXT_TOKENS
    width_ = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = int(width_ * config.get("mlp_ratio", 4.0))
    whole = 2 * width_ * itemsize
    split = (ffn + width_) * itemsize / tp
    latents = 4 * math.prod(geometry.latent_shape(height, width, frames)) * 4
    return int(ACTIVATION_SAFETY * batch * tokens * (whole + split)) + latents


def plan_step(config: dict, mesh_shape: dict, height: int, width: int, frames: int, cfg: bool = True,
              hbm_bytes: int | None = None, layout: str = "tensor") -> HunyuanPlan:
    return HunyuanPlan(weights_bytes_per_device(config, mesh_shape, layout=layout),
                       activation_bytes_per_device(config, mesh_shape, height, width, frames, cfg), hbm_bytes)
