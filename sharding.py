"""Sharding rules as data: regex -> partition spec, per Wan component.

A rule's spec names mesh axes per tensor dimension, as in
``jax.sharding.PartitionSpec``: ``("tp", None)`` splits dim 0 over ``tp``;
``(("dp", "tp"), None)`` splits it over both axes at once; ``()`` replicates.

The first matching rule wins. Every parameter should match a rule, replicated
ones included, so ``ShardingPlan.unmatched`` (parameters no rule matched, which
are replicated) flags a model these tables were not written for. A dimension
that the mesh does not divide is replicated instead, and listed in
``ShardingPlan.indivisible``: the plan works on every mesh, (1, 1) included.

This module imports jax only inside ``to_named_shardings``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

logger = logging.getLogger("wan_tpu")

AxisSpec = "str | tuple[str, ...] | None"

# WanTransformer3DModel. Projections into the heads and the FFN's first layer
# are split on their output dim over tp; the projections back to the model
# width on their input dim, so each block needs one all-reduce per sub-layer.
TRANSFORMER_RULES: tuple[tuple[str, tuple], ...] = (
    (r"blocks\.\d+\.attn[12]\.to_(q|k|v)\.weight", ("tp", None)),
    (r"blocks\.\d+\.attn[12]\.to_(q|k|v)\.bias", ("tp",)),
    (r"blocks\.\d+\.attn[12]\.to_out\.0\.weight", (None, "tp")),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.weight", ("tp", None)),
    (r"blocks\.\d+\.ffn\.net\.0\.proj\.bias", ("tp",)),
    (r"blocks\.\d+\.ffn\.net\.2\.weight", (None, "tp")),
    # Wan 2.1 I2V: the image tokens' key and value projections, split like to_k / to_v.
    (r"blocks\.\d+\.attn2\.add_(k|v)_proj\.weight", ("tp", None)),
    (r"blocks\.\d+\.attn2\.add_(k|v)_proj\.bias", ("tp",)),
    (r"blocks\.\d+\.attn2\.norm_added_k\.weight", ()),
    # Replicated: small or needed whole by every device.
    (r"blocks\.\d+\.attn[12]\.to_out\.0\.bias", ()),
    (r"blocks\.\d+\.attn[12]\.norm_(q|k)\.weight", ()),
    (r"blocks\.\d+\.ffn\.net\.2\.bias", ()),
    (r"blocks\.\d+\.norm2\.(weight|bias)", ()),
    (r"blocks\.\d+\.scale_shift_table", ()),
    (r"scale_shift_table", ()),
    (r"patch_embedding\.(weight|bias)", ()),
    (r"condition_embedder\..*", ()),
    (r"proj_out\.(weight|bias)", ()),
    (r"rope\.freqs_(cos|sin)", ()),
)

# UMT5EncoderModel: split over both mesh axes (dp x tp devices), since the
# encoder runs once per prompt and its 5.7B parameters dominate its memory.
TEXT_ENCODER_RULES: tuple[tuple[str, tuple], ...] = (
    (r"shared\.weight", (("dp", "tp"), None)),
    (r"encoder\.embed_tokens\.weight", (("dp", "tp"), None)),
    (r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|k|v)\.weight", (("dp", "tp"), None)),
    (r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.o\.weight", (None, ("dp", "tp"))),
    (r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wi(_0|_1)?\.weight", (("dp", "tp"), None)),
    (r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo\.weight", (None, ("dp", "tp"))),
    (r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", ()),
    (r"encoder\.block\.\d+\.layer\.\d+\.layer_norm\.weight", ()),
    (r"encoder\.final_layer_norm\.weight", ()),
)

# AutoencoderKLWan: weights replicated (~0.5 GB). Its activations are what is
# large, and those are split over space instead (``spatial_split``): XLA's SPMD
# partitioner exchanges the convolutions' halos between neighbouring devices.
VAE_RULES: tuple[tuple[str, tuple], ...] = ((r".*", ()),)

_SPATIAL_OPTIONS = ((None, ("dp", "tp")), (("dp", "tp"), None), ("tp", "dp"), ("dp", "tp"),
                    (None, "tp"), ("tp", None), (None, "dp"), ("dp", None))


def spatial_split(mesh_shape: dict[str, int], height: int, width: int) -> tuple:
    """(axes for height, axes for width, devices) splitting a video's [..., height, width] over as many of the
    mesh's devices as divide it; (None, None, 1) when none do. ``height``/``width`` are the latent's: every
    larger feature map of the VAE is a multiple of them, so one choice serves the whole network.

    Width over every device first (1280x720 and 832x480 latents split 8 ways on any 8-device mesh), then
    height and width over the two axes (848x480: 60 rows over tp=4, 106 columns over dp=2)."""
    best, best_devices = (None, None), 1
    for h_axes, w_axes in _SPATIAL_OPTIONS:
        h_size, w_size = _axis_size(h_axes, mesh_shape), _axis_size(w_axes, mesh_shape)
        if h_size * w_size > best_devices and height % h_size == 0 and width % w_size == 0:
            best, best_devices = (h_axes, w_axes), h_size * w_size
    return best + (best_devices,)

# CLIPVisionModel (Wan 2.1 I2V's image encoder, ViT-H/14): split like the transformer's blocks over tp.
# transformers 4 names its parameters "vision_model.<...>", transformers 5 "<...>".
_CLIP = r"(?:vision_model\.)?"
# It runs once per image; splitting keeps its 0.6B fp32 parameters off every device whole.
IMAGE_ENCODER_RULES: tuple[tuple[str, tuple], ...] = (
    (_CLIP + r"encoder\.layers\.\d+\.self_attn\.(q|k|v)_proj\.weight", ("tp", None)),
    (_CLIP + r"encoder\.layers\.\d+\.self_attn\.(q|k|v)_proj\.bias", ("tp",)),
    (_CLIP + r"encoder\.layers\.\d+\.self_attn\.out_proj\.weight", (None, "tp")),
    (_CLIP + r"encoder\.layers\.\d+\.mlp\.fc1\.weight", ("tp", None)),
    (_CLIP + r"encoder\.layers\.\d+\.mlp\.fc1\.bias", ("tp",)),
    (_CLIP + r"encoder\.layers\.\d+\.mlp\.fc2\.weight", (None, "tp")),
    (_CLIP + r"encoder\.layers\.\d+\.self_attn\.out_proj\.bias", ()),
    (_CLIP + r"encoder\.layers\.\d+\.mlp\.fc2\.bias", ()),
    (_CLIP + r"encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)", ()),
    (_CLIP + r"embeddings\..*", ()),
    (_CLIP + r"(pre_layrnorm|post_layernorm)\.(weight|bias)", ()),
)

RULES = {"transformer": TRANSFORMER_RULES, "text_encoder": TEXT_ENCODER_RULES, "vae": VAE_RULES,
         "image_encoder": IMAGE_ENCODER_RULES}


@dataclass
class ShardingPlan:
    """Per-parameter partition specs (tuples of axis names) and what fell back to replication."""

    specs: dict[str, tuple] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    indivisible: list[str] = field(default_factory=list)

    def bytes_per_device(self, shapes: dict[str, tuple], itemsizes: dict[str, int], mesh_shape: dict[str, int]) -> int:
        """Bytes each device holds for these parameters under this plan."""
        total = 0
        for name, shape in shapes.items():
            elements = math.prod(shape)
            for axes in self.specs.get(name, ()):
                elements //= _axis_size(axes, mesh_shape)
            total += elements * itemsizes[name]
        return total


def _axis_size(axes, mesh_shape: dict[str, int]) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh_shape[axes]
    return math.prod(mesh_shape[a] for a in axes)


def plan_shardings(shapes: dict[str, tuple], rules, mesh_shape: dict[str, int]) -> ShardingPlan:
    """Apply ``rules`` to parameter ``shapes`` on a mesh of ``mesh_shape`` ({'dp': 2, 'tp': 4})."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    plan = ShardingPlan()
    for name, shape in shapes.items():
        spec = None
        for pattern, rule_spec in compiled:
            if pattern.fullmatch(name):
                spec = rule_spec
                break
        if spec is None:
            plan.unmatched.append(name)
            spec = ()
        if len(spec) > len(shape):
            raise ValueError(f"sharding rule {spec} for {name!r} has more dims than its shape {tuple(shape)}")
        fitted = []
        for dim, axes in enumerate(spec):
            if axes is not None and shape[dim] % _axis_size(axes, mesh_shape):
                plan.indivisible.append(f"{name}[{dim}]={shape[dim]} over {axes}")
                axes = None
            fitted.append(axes)
        plan.specs[name] = tuple(fitted) if any(axes is not None for axes in fitted) else ()
    if plan.unmatched:
        logger.warning("no sharding rule matched %d parameter(s), replicated: %s", len(plan.unmatched), plan.unmatched)
    if plan.indivisible:
        logger.info("replicated %d dim(s) the mesh does not divide: %s", len(plan.indivisible), plan.indivisible[:8])
    return plan


def to_named_shardings(plan: ShardingPlan, mesh) -> dict:
    """The plan's specs as ``jax.sharding.NamedSharding`` on ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    return {name: NamedSharding(mesh, PartitionSpec(*spec)) for name, spec in plan.specs.items()}
