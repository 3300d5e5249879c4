"""Closed-form estimates of the activations each Wan stage holds per device at its peak (estimates, not
measurements): one denoising step, the VAE decode and the prompt's encoding. The HBM plan
(``memory_plan``) adds them to the weights.

The formulas count the tensors a stage holds at its peak; XLA adds padding to (8, 128) tiles, layout
copies (e.g. [B, S, H, D] <-> [B, H, S, D] around the attention kernel), collective buffers and scratch
they do not model: each stage's safety factor below is fitted to the compiled programs
(``benchmarks/tpu_compile.py``). Sizes come from ``latents.LatentGeometry``, so every family's VAE counts.

Imports neither torch nor jax until a function needs them (``whole_copies_bytes`` builds the meta module).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

from ... import sharding
from ...runtime import chips
from . import configs, modules
from .latents import LatentGeometry

logger = logging.getLogger("wan_tpu")

TEXT_TOKENS = configs.TEXT_TOKENS  # every prompt is padded to it
VAE_CACHE_T = 2  # diffusers' CACHE_T: frames each causal conv keeps from the previous chunk

# ------------------------------------------------------------------ safety factors
TRANSFORMER_ACTIVATION_SAFETY = 1.1  # fitted to the compiled step (see transformer_activation_bytes)
# The sequence layout gathers each block's large matrices whole where the block runs. XLA starts the next
# block's gathers while the current one computes, so two blocks' gathered weights are live at the peak.
# On v5e ("TPU v5 lite") its schedule holds more: the compiled sequence steps there peak 3.3-5.7 GiB above
# v6e's for 14B (0.56 GiB a block) and 0.3-0.7 GiB for 1.3B (0.08 GiB a block), about 8 blocks' worth.
SEQUENCE_GATHERED_BLOCKS = 2
SEQUENCE_GATHERED_BLOCKS_BY_CHIP = {chips.V5E.name: 8}  # runtime.chips names
# One video without CFG in the tensor layout runs the same on both dp halves. XLA spreads part of that
# work over the two (the compiled steps gather over dp twice per block), so their activations are
# 0.6-1.0x the CFG step's (1.3B 0.6, 14B 1.0-1.1 on (2, 4) meshes); the plan takes this share.
TENSOR_REPEATED_BATCH_SHARE = 0.7
VAE_ACTIVATION_SAFETY = 1.7  # fitted to the compiled chunk programs: 14B/any at 1280x720 on v6e-8, 24.0 GiB peak
# Split over space: per device, the whole's share times this (halos, the cache passed in and out, pieces
# XLA keeps whole). Fitted to the compiled chunk programs, 14B/any at 1280x720 on v6e-8 split 8 ways:
# 4.79 GiB peak per device (0.47 GiB of it the replicated weights).
VAE_SPLIT_OVERHEAD = 1.44
# per device by libtpu (VAE weights 0.5 GiB included); layout padding of the 96-channel convs and
# XLA temporaries beyond the live set this formula counts
TEXT_ENCODER_ACTIVATION_SAFETY = 1.5


def _split(size: int, parts: int) -> int:
    # A dimension the mesh does not divide is replicated (sharding.plan_shardings).
    return size // parts if size % parts == 0 else size


def _local_batch(batch: int, dp: int) -> int:
    # runtime.placement.batch_sharding: the batch is split over dp when dp divides it.
    return batch // dp if dp > 1 and batch % dp == 0 else batch


def _itemsize(precision: str) -> int:
    return 2 if precision == "bf16" else 4


# ------------------------------------------------------------------ the denoising step
def transformer_tokens(config: Mapping, height: int, width: int, num_frames: int) -> int:
    """Sequence length of one video (``LatentGeometry.tokens`` of the transformer's VAE): latent frames x
    (H / spatial / p_h) x (W / spatial / p_w)."""
    return LatentGeometry.from_transformer_config(config).tokens(height, width, num_frames)


def whole_copies_bytes(config: Mapping, mesh_shape, precision: str = "bf16") -> int:
    """Bytes of whole copies of the transformer weights the sequence layout gathers
    (``sharding.sequence_gathered_weights``): what each device holds beside its shards when the run keeps
    them whole instead of gathering them every step."""
    mesh = sharding.mesh_shape_dict(mesh_shape)
    shapes, itemsizes = modules.abstract_weights("transformer", config, precision)
    plan = sharding.plan_shardings(shapes, sharding.TRANSFORMER_RULES, mesh)
    gathered = sharding.sequence_gathered_weights(plan.specs)
    return sum(math.prod(shapes[name]) * itemsizes[name] for name in gathered)


def _tensor_share(config: Mapping, mesh: dict, tokens: int, cfg: bool) -> tuple[int, int, int, int, int]:
    """(B, S, D_t, F_t, gathered bytes) per device in the tensor layout: the batch over dp where it divides,
    every token, the heads (where tp divides them) and the FFN columns over tp; nothing gathered."""
    width_d = config["num_attention_heads"] * config["attention_head_dim"]
    width_t = width_d // mesh["tp"] if config["num_attention_heads"] % mesh["tp"] == 0 else width_d
    return _local_batch(2 if cfg else 1, mesh["dp"]), tokens, width_t, _split(config["ffn_dim"], mesh["tp"]), 0


def _sequence_share(config: Mapping, mesh: dict, tokens: int, cfg: bool, precision: str,
                    device_kind: str | None, whole_weights: bool) -> tuple[int, int, int, int, int]:
    """(B, S, D_t, F_t, gathered bytes) per device in the sequence layout: the batch and ceil(S / n) tokens
    of ``sharding.token_split``, the heads and FFN columns whole per token (between the all-to-alls q, k
    and v are [S, D / n], the same bytes), beside ``SEQUENCE_GATHERED_BLOCKS`` blocks' gathered weights (by
    chip), or with ``whole_weights`` their whole copies (``whole_copies_bytes``)."""
    width_d = config["num_attention_heads"] * config["attention_head_dim"]
    split = sharding.token_split(mesh, 2 if cfg else 1)
    batch_devices, token_devices = split.sizes(mesh)
    gathered = 0
    if whole_weights:
        gathered = whole_copies_bytes(config, mesh, precision)
    elif mesh["tp"] > 1 or split.token_axes:
        chip = chips.chip_for(device_kind)
        blocks = SEQUENCE_GATHERED_BLOCKS_BY_CHIP.get(chip.name if chip else None, SEQUENCE_GATHERED_BLOCKS)
        gathered = blocks * (6 * width_d * width_d + 2 * width_d * config["ffn_dim"]) * _itemsize(precision)
    return (2 if cfg else 1) // batch_devices, math.ceil(tokens / token_devices), width_d, config["ffn_dim"], gathered


def _per_token_bytes(width_d: int, width_t: int, ffn_t: int, a: int) -> int:
    """The larger of one token's live set in the norms and in a sub-layer.

    the norms:   D * (a + 8)  the residual (a); diffusers runs the norms, the modulation and the gated
                              residual add in fp32: the upcast residual and the fp32 normalised,
                              modulated result (4 each)
    a sub-layer: D * 2a + max(attention, FFN)  the residual and the normalised input (a each), then
        attention:  D_t * 6a  q, k, v; q and k after RoPE; the output. A flash kernel (Splash on TPU) is
                              assumed: no S x S scores;
        FFN:        F_t * a   the up-projection's output (XLA fuses its GELU into the down-projection's input)
    """
    norms = width_d * (a + 8)
    attention = width_t * 6 * a
    ffn = ffn_t * a
    return max(norms, width_d * 2 * a + max(attention, ffn))


def _fixed_bytes(config: Mapping, height: int, width: int, num_frames: int, batch: int, tokens: int,
                 width_t: int, a: int) -> int:
    """What does not grow with the layers: the RoPE tables (S * head_dim * 2 * 4 bytes), the text context
    and its projection (B * 512 * (text_dim + D) * a), the cross-attention keys and values
    (2 * B * 512 * D_t * a), and the scheduler state (six fp32 latents, replicated) with the model's input
    and output (B latents in a, fp32). A latent: the model's input channels at the VAE's latent size."""
    width_d = config["num_attention_heads"] * config["attention_head_dim"]
    _, _, frames, latent_h, latent_w = LatentGeometry.from_transformer_config(config).latent_shape(
        height, width, num_frames)
    latent = config.get("in_channels", 16) * frames * latent_h * latent_w
    return (
        tokens * config["attention_head_dim"] * 2 * 4
        + batch * TEXT_TOKENS * (config.get("text_dim", 4096) + width_d) * a
        + 2 * batch * TEXT_TOKENS * width_t * a
        + 6 * latent * 4 + batch * latent * (a + 4)
    )


def transformer_activation_bytes(config: Mapping, mesh_shape, height: int, width: int, num_frames: int,
                                 precision: str = "bf16", cfg: bool = True, layout: str = "tensor",
                                 device_kind: str | None = None, whole_weights: bool = False) -> int:
    """Estimated peak activation bytes per device of one denoising step (an estimate, not a measurement).

    Layers run one after another and XLA frees each layer's temporaries, so the peak is one sub-layer's
    live set:

      step = safety * (B * S * per_token + fixed) + gathered

    B = local batch, S tokens, D = heads x head_dim (the residual width, whole on every device: the
    row-parallel projections end in an all-reduce), D_t and F_t the heads' and FFN's width per token,
    a = 2 (bf16) or 4 (fp32). ``layout`` (``sharding.LAYOUTS``; "auto" is resolved by the caller) says
    how B, S, D_t and F_t split and what is gathered (``_tensor_share``, ``_sequence_share``);
    ``per_token`` is ``_per_token_bytes``, ``fixed`` ``_fixed_bytes``. In the tensor layout one video
    without CFG on dp > 1 counts ``TENSOR_REPEATED_BATCH_SHARE`` of its token term.

    Checked against the compiler (``benchmarks/tpu_compile.py``, libtpu 0.0.42.1): 1.3B and 14B at
    848x480, 832x480 and 1280x720 on v5e-8, v6e-8 and v5p-8, with and without CFG, in both layouts (72
    compiled steps), the plan's step peak is 0.79-1.21x the compiled one; tests/test_memory_plan.py holds
    it within 25% of those compiled peaks.
    """
    if layout not in sharding.LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {sharding.LAYOUTS} (resolve 'auto' first)")
    a = _itemsize(precision)
    mesh = sharding.mesh_shape_dict(mesh_shape)
    tokens = transformer_tokens(config, height, width, num_frames)
    if layout == "sequence":
        share = _sequence_share(config, mesh, tokens, cfg, precision, device_kind, whole_weights)
    else:
        share = _tensor_share(config, mesh, tokens, cfg)
    batch, tokens, width_t, ffn_t, gathered = share
    width_d = config["num_attention_heads"] * config["attention_head_dim"]
    token_term = batch * tokens * _per_token_bytes(width_d, width_t, ffn_t, a)
    if layout == "tensor" and not cfg and mesh["dp"] > 1:
        token_term *= TENSOR_REPEATED_BATCH_SHARE
    fixed = _fixed_bytes(config, height, width, num_frames, batch, tokens, width_t, a)
    return int(TRANSFORMER_ACTIVATION_SAFETY * (token_term + fixed) + gathered)


# ------------------------------------------------------------------ the VAE decode
def vae_decode_activation_bytes(vae_config: Mapping, height: int, width: int, num_frames: int,
                                mesh_shape: Mapping | None = None) -> int:
    """Estimated peak activation bytes per device of the VAE decode (an estimate, not a measurement).

    The VAE runs in fp32 (4 bytes), its frames split over space across as many of the mesh's devices as
    divide the latent (``sharding.spatial_split``; ``mesh_shape`` None: one device): each device holds its
    strip of every feature map, plus the halo rows XLA exchanges (``VAE_SPLIT_OVERHEAD``). Wan's VAE decodes
    causally one latent frame at a time (4 output frames; the first gives 1). Every 3-wide causal conv
    keeps its input's last 2 frames for the next chunk (the "feature cache"), so all those caches are live
    at once, the largest at full resolution. With dims = base_dim * [m[-1]] + m[::-1] (m = dim_mult;
    96 x [4, 4, 4, 2, 1]), up-block i runs (num_res_blocks + 1) residual blocks at 1/2^(n-1-i) of the
    output size on f_i frames (1, 2, 4, 4) and, but for the last, upsamples (2D, or 3D doubling the
    frames) to dims[i+1] // 2 channels:

      caches   = sum over causal convs of 2 frames * channels * h_i * w_i
                 (conv_in, mid block, each residual conv, 3D upsamplers' time conv, conv_out)
      working  = max over stages of
                 residual stage: 4.5 * f_i * dims[i+1] * h_i * w_i
                   (input, shortcut, conv input with the 2 cached frames (1.5x), output)
                 upsample stage: f_i * c * h_i * w_i + f'_i * (c + c // 2) * 4 * h_i * w_i
                   (input, nearest-upsampled input, conv output)
      video    = 2 * 3 * 4 * H * W  (one chunk's frames and their [0, 1] copy; earlier
                 chunks' frames are already on the host)

      decode = safety * 4 bytes * (caches + working + video)

    For the Wan 2.1 VAE that is ~2400 + ~1700 elements per output pixel (caches + working) plus the video:
    at 720P (1280x720, 81 frames) 16.9 GB before the factor, at 480P (832x480) 7.3 GB, with the whole
    video; the pipeline decodes one latent frame per compiled call (``sampling.vae_chunks.VAEChunkDecoder``), so only
    one chunk's frames count. The safety factor is fitted to libtpu's compiled chunk programs at 1280x720
    on v6e-8 (24.0 GiB peak per device; the plan gives 24.5), and the split's overhead to the same programs
    split 8 ways over space (4.79 GiB).
    """
    dim = vae_config.get("decoder_base_dim") or vae_config.get("base_dim", 96)
    mult = list(vae_config.get("dim_mult", [1, 2, 4, 4]))
    res_blocks = vae_config.get("num_res_blocks", 2)
    temporal_up = list(vae_config.get("temperal_downsample", [False, True, True]))[::-1]
    z_dim = vae_config.get("z_dim", 16)
    if vae_config.get("is_residual") or vae_config.get("patch_size"):
        logger.info("VAE estimate assumes the Wan 2.1 VAE layout; this config differs (is_residual/patch_size)")
    dims = [dim * u for u in [mult[-1]] + mult[::-1]]
    levels = len(mult)
    pixels = height * width

    def area(i):  # h_i * w_i of up-block i (and of the mid block for i = 0)
        return pixels / 4 ** (levels - 1 - i)

    cache = VAE_CACHE_T * (z_dim + 4 * dims[0]) * area(0)  # conv_in and the mid block's 2 residual blocks
    working = 4.5 * dims[0] * area(0)
    frames = 1
    for i in range(levels):
        in_dim = dims[i] // 2 if i > 0 else dims[i]
        out_dim = dims[i + 1]
        convs = [in_dim] + [out_dim] * (2 * (res_blocks + 1) - 1)
        cache += VAE_CACHE_T * sum(convs) * area(i)
        working = max(working, 4.5 * frames * out_dim * area(i))
        if i != levels - 1:  # upsampler
            up_frames = frames * (2 if temporal_up[i] else 1)
            if temporal_up[i]:
                cache += VAE_CACHE_T * out_dim * area(i)  # the 3D upsampler's time conv
            working = max(working, frames * out_dim * area(i) + up_frames * (out_dim + out_dim // 2) * 4 * area(i))
            frames = up_frames
    cache += VAE_CACHE_T * dims[-1] * pixels  # conv_out
    video = 2 * 3 * 4 * pixels  # the pipeline decodes chunk by chunk (VAEChunkDecoder)
    whole = VAE_ACTIVATION_SAFETY * 4 * (cache + working + video)
    _, _, _, latent_h, latent_w = LatentGeometry.from_vae_config(vae_config).latent_shape(height, width, num_frames)
    devices = sharding.spatial_split(dict(mesh_shape or {"dp": 1, "tp": 1}), latent_h, latent_w)[2]
    return int(whole if devices == 1 else whole / devices * VAE_SPLIT_OVERHEAD)


# ------------------------------------------------------------------ the text encoder
def text_encoder_activation_bytes(te_config: Mapping, mesh_shape=(1, 1)) -> int:
    """Estimated peak activation bytes per device of encoding the prompt pair (an estimate).

    Batch 2 (prompt, negative prompt) x 512 tokens, B = 2 / dp per device (the
    pair is split over dp); the heads and the FFN width are split over all
    n = dp x tp devices (``sharding.TEXT_ENCODER_RULES``). Per token 6 fp32
    model-width tensors and 3 of the FFN width; the attention scores, position
    bias and probabilities in fp32 (UMT5's relative bias rules out a flash kernel):

      encode = safety * (B * L * (6 * d_model + 3 * d_ff / n) * 4 + B * heads / n * L^2 * 3 * 4)

    Checked against the compiler on v6e-8 (2, 4): 0.12 GiB of temporaries, as
    this gives (``benchmarks/tpu_compile.py``).
    """
    length = TEXT_TOKENS
    mesh = sharding.mesh_shape_dict(mesh_shape)
    devices = mesh["dp"] * mesh["tp"]
    batch = _local_batch(2, mesh["dp"])
    d_model, d_ff, heads = te_config["d_model"], te_config["d_ff"], te_config["num_heads"]
    total = (batch * length * (6 * d_model + 3 * _split(d_ff, devices)) * 4
             + batch * _split(heads, devices) * length**2 * 3 * 4)
    return int(TEXT_ENCODER_ACTIVATION_SAFETY * total)
