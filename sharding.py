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
from typing import Mapping

from .models.wan import configs
from .runtime import chips, environment

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
        h_size, w_size = axis_size(h_axes, mesh_shape), axis_size(w_axes, mesh_shape)
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
                elements //= axis_size(axes, mesh_shape)
            total += elements * itemsizes[name]
        return total


def mesh_shape_dict(mesh_shape) -> dict[str, int]:
    """{"dp": ..., "tp": ...} from (dp, tp) or a mapping (a missing axis has 1 device)."""
    if isinstance(mesh_shape, Mapping):
        mesh = {"dp": int(mesh_shape.get("dp", 1)), "tp": int(mesh_shape.get("tp", 1))}
    else:
        dp, tp = mesh_shape
        mesh = {"dp": int(dp), "tp": int(tp)}
    if mesh["dp"] < 1 or mesh["tp"] < 1:
        raise ValueError(f"mesh_shape={mesh_shape!r}: dp and tp need at least 1 device each")
    return mesh


def axis_size(axes, mesh_shape: dict[str, int]) -> int:
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
            if axes is not None and shape[dim] % axis_size(axes, mesh_shape):
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


# ------------------------------------------------------------------ transformer layouts
# How the denoising step splits the transformer's work over a (dp, tp) mesh. The weights are placed by
# TRANSFORMER_RULES in both (every large matrix split over tp), so switching layout reloads nothing.
#   tensor:   every device holds all tokens and its tp share of the heads and FFN columns; each block
#             all-reduces its three sub-layer outputs [B, S, D] over tp (Megatron-style).
#   sequence: every device holds its share of the tokens and gathers each layer's weights whole as it
#             reaches it (FSDP-style); self-attention swaps tokens for heads with all-to-alls around the
#             kernel (Ulysses-style). A CFG pair still splits over dp; one video (no CFG) splits its
#             tokens over dp x tp. Where the HBM plan holds them (memory_plan.WHOLE_WEIGHTS_HBM_SHARE), a run
#             copies those weights whole once instead (runtime.placement.whole_weight_copies) and no step gathers.
LAYOUTS = ("tensor", "sequence")
# cross-attention's context: UMT5 tokens, Wan 2.1 I2V's CLIP tokens
TEXT_TOKENS, IMAGE_TOKENS = configs.TEXT_TOKENS, configs.CLIP_TOKENS
ENV_LAYOUT = environment.LAYOUT  # auto | tensor | sequence


# Split weights the sequence layout leaves split: cross-attention's key and value projections act on the
# 512 text tokens (and Wan 2.1 I2V's 257 image tokens), so computing those keys and values head-split and
# gathering them moves about a tenth of the bytes of gathering the weights.
SEQUENCE_KEEP_SPLIT = (r"blocks\.\d+\.attn2\.(to_k|to_v|add_k_proj|add_v_proj)\.(weight|bias)",)


def sequence_gathered_weights(specs: dict[str, tuple]) -> set[str]:
    """The weights the sequence layout gathers whole where their layer runs: every split one but
    ``SEQUENCE_KEEP_SPLIT``. ``specs``: a ``ShardingPlan``'s name -> spec."""
    return {name for name, spec in specs.items()
            if spec and not any(re.fullmatch(pattern, name) for pattern in SEQUENCE_KEEP_SPLIT)}


def check_layout(layout, given_as: str = "layout") -> str:
    """'auto', 'tensor' or 'sequence'; None or '' means 'auto'. ``given_as`` names where the value came
    from in the error (the argument, or ``ENV_LAYOUT``)."""
    layout = (layout or "auto").strip().lower() if isinstance(layout, str) or layout is None else layout
    if layout not in ("auto",) + LAYOUTS:
        raise ValueError(f"{given_as}={layout!r} is unknown: use one of {('auto',) + LAYOUTS} "
                         f"(the node input 'layout', {ENV_LAYOUT}, or --layout)")
    return layout


def environment_layout(environ: Mapping | None = None) -> str:
    """The layout ``ENV_LAYOUT`` asks for ('auto' when unset), checked."""
    return check_layout(environment.read(ENV_LAYOUT, environ=environ), given_as=ENV_LAYOUT)


@dataclass(frozen=True)
class TokenSplit:
    """The sequence layout's split of the activations [B, S, D]: the batch over ``batch_axes``,
    the tokens over ``token_axes``."""

    batch_axes: tuple
    token_axes: tuple

    def spec(self, token_dim: int = 1, ndim: int = 3) -> tuple:
        """A partition spec (tuple) for an activation with the batch at dim 0 and the tokens at ``token_dim``."""
        entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes  # noqa: E731
        spec = [None] * ndim
        spec[0], spec[token_dim] = entry(self.batch_axes), entry(self.token_axes)
        return tuple(spec)

    def sizes(self, mesh_shape: dict[str, int]) -> tuple[int, int]:
        """(devices the batch splits over, devices the tokens split over) on a ``mesh_shape`` mesh."""
        return axis_size(self.batch_axes, mesh_shape), axis_size(self.token_axes, mesh_shape)


def token_split(mesh_shape: dict[str, int], batch: int) -> TokenSplit:
    """The CFG pair over dp (as in the tensor layout); the tokens over every other axis of size > 1."""
    dp = mesh_shape.get("dp", 1)
    batch_axes = ("dp",) if dp > 1 and batch % dp == 0 else ()
    token_axes = tuple(axis for axis in ("dp", "tp") if axis not in batch_axes and mesh_shape.get(axis, 1) > 1)
    return TokenSplit(batch_axes, token_axes)


def layer_collective_bytes(config: dict, tokens: int, mesh_shape: dict[str, int], batch: int,
                           itemsize: int = 2) -> dict[str, dict[str, float]]:
    """Per device and per transformer block, the bytes each layout's collectives move through a device's
    links (a ring's traffic: all-reduce 2(n-1)/n of its operand, all-gather and all-to-all (n-1)/n of the
    whole), by kind. An analytic model of the compiled programs (the compile command reports the compiled
    facts): it ignores the small reductions (the tensor layout's q/k RMS norms) and replicated parameters.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    heads = config["num_attention_heads"]
    ffn = config["ffn_dim"]
    tp = mesh_shape.get("tp", 1)
    split = token_split(mesh_shape, batch)
    local_batch = batch // (mesh_shape.get("dp", 1) if split.batch_axes else 1)
    tensor = {}
    if tp > 1:  # three row-parallel outputs [b, S, D] per block
        tensor["all-reduce"] = 3 * 2 * (tp - 1) / tp * local_batch * tokens * dim * itemsize
    n = split.sizes(mesh_shape)[1]
    sequence = {}
    if n > 1:
        shard = local_batch * math.ceil(tokens / n) * dim * itemsize  # one [b, S/n, D] activation
        if heads % n == 0:  # q, k, v to heads and the output back
            sequence["all-to-all"] = 4 * (n - 1) / n * shard
        else:  # heads the split does not divide: the queries stay split, keys and values are gathered
            sequence["all-gather"] = 2 * (n - 1) * shard
        if tp > 1:  # the block's large matrices, gathered whole from their tp shards
            params = 6 * dim * dim + 2 * dim * ffn  # self-attention q, k, v, out; cross-attention q, out; FFN
            # cross-attention's keys and values stay head-split and are gathered: text (and image) tokens
            context = TEXT_TOKENS + (IMAGE_TOKENS if config.get("image_dim") else 0)
            gathered = params + 2 * local_batch * context * dim
            sequence["all-gather"] = sequence.get("all-gather", 0) + (tp - 1) / tp * gathered * itemsize
    return {"tensor": tensor, "sequence": sequence}


def parallel_devices(layout: str, mesh_shape: dict[str, int], batch: int) -> int:
    """How many devices do distinct work in ``layout``: the rest hold copies. The tensor layout splits a
    batch over dp only when dp divides it (one video without CFG runs the same on both dp halves); the
    sequence layout splits such a video's tokens over dp too."""
    dp, tp = mesh_shape.get("dp", 1), mesh_shape.get("tp", 1)
    if layout == "tensor":
        return tp * (dp if batch % dp == 0 else 1)
    split = token_split(mesh_shape, batch)
    return math.prod(split.sizes(mesh_shape))


# Chips (``runtime.chips``, found by jax's device_kind) where "auto" keeps the tensor layout, from
# the compiled programs (benchmarks/tpu_compile.py, 81 frames, CFG): on v5e ("TPU v5 lite") XLA compiles
# the sequence layout's weight gathers into about 3x the bytes it moves on v6e (14B: 1484 all-gathers,
# 68 GiB per device per step, against 601 and 22.7 GiB on v6e), and the step's peak grows to 13.5 GiB at
# 832x480 (tensor 8.9) and 15.0 of the chip's 16 GiB at 1280x720 (tensor 11.1), for a projected step
# within 2% of the tensor layout's. Without CFG the sequence layout would split the work over 8 devices
# instead of 4 (827 against 1157 TFLOP per device at 720P), but it peaks at 15.7 of 16 GiB there: no room
# for the text encoder and VAE beside it, so v5e keeps the tensor layout for both.
TENSOR_LAYOUT_CHIPS = (chips.V5E,)


def choose_layout(config: dict, tokens: int, mesh_shape: dict[str, int], batch: int,
                  device_kind: str | None = None) -> tuple[str, str]:
    """(layout, why): the layout that spreads the work over more devices, and between equals the one whose
    collectives move fewer bytes per step (their FLOPs are then the same, so the step with less traffic
    through the links is the faster). A projection from ``parallel_devices`` and
    ``layer_collective_bytes``; the compile command reports the compiled facts. Ties go to tensor, and so
    do the chips of ``TENSOR_LAYOUT_CHIPS`` (``device_kind``: jax's name for the devices, e.g. "TPU v5 lite")."""
    if chips.chip_for(device_kind) in TENSOR_LAYOUT_CHIPS:
        return "tensor", (f"{device_kind}: the compiled sequence layout gathers about 3x the weight bytes it "
                          f"does on v6e and peaks 35-50% higher, up to 15.7 of 16 GiB for 14B at 1280x720 "
                          f"(sharding.TENSOR_LAYOUT_CHIPS)")
    moved = {name: sum(kinds.values()) for name, kinds in
             layer_collective_bytes(config, tokens, mesh_shape, batch).items()}
    devices = {name: parallel_devices(name, mesh_shape, batch) for name in LAYOUTS}
    choice = min(LAYOUTS, key=lambda name: (-devices[name], moved[name], LAYOUTS.index(name)))
    layers = config.get("num_layers", 1)
    why = (f"{tokens} tokens on mesh {dict(mesh_shape)}, batch {batch}: the tensor layout splits the work "
           f"{devices['tensor']} ways and its collectives move {moved['tensor'] * layers / 2**30:.2f} GiB per "
           f"device per step; the sequence layout {devices['sequence']} ways, "
           f"{moved['sequence'] * layers / 2**30:.2f} GiB")
    return choice, why
