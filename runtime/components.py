"""What a loaded component is on the device: its torch module (structure only, on the meta device), its
weights as sharded jax arrays, their sharding plan and mesh, and what its compiled programs are cached by.
Model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..sharding import ShardingPlan


@dataclass
class TextEncoderComponent:
    tokenizer: Any
    module: Any
    weights: dict
    plan: ShardingPlan
    mesh: Any
    encode_fn: Callable
    text_dim: int


@dataclass
class TransformerComponent:
    module: Any
    weights: dict
    plan: ShardingPlan
    mesh: Any
    config: dict
    scheduler_config: dict
    dtype: Any
    device_loras: Any = None  # lora.DeviceLoras, made on the first LoRA: applies and undoes LoRAs in place
    step_fns: dict = field(default_factory=dict)  # sampling.StepKind -> sampling.StepProgram
    compiled_steps: dict = field(default_factory=dict)  # (StepKind, shapes, whole weights) -> compiled executable


@dataclass
class VAEComponent:
    module: Any
    weights: dict
    plan: ShardingPlan
    mesh: Any
    decoder: Any  # sampling.vae_chunks.VAEChunkDecoder
    latents_mean: np.ndarray  # [16]
    latents_std: np.ndarray  # [16]
    encoder: Any = None  # sampling.vae_chunks.VAEChunkEncoder  # image-to-video only


@dataclass
class ImageEncoderComponent:
    """Wan 2.1 I2V's CLIP vision tower and its (host) image processor."""

    processor: Any
    module: Any
    weights: dict
    plan: ShardingPlan
    mesh: Any
    encode_fn: Callable
