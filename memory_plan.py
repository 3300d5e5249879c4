"""HBM plan before loading: will Wan 2.1 fit on these chips at this size?

``plan_memory`` estimates, per device, what the pack will hold at its peak:

- the weights of all three components, exact: the sharding rules of
  ``sharding.py`` applied to the parameter shapes of the diffusers /
  transformers modules built on torch's meta device (nothing is allocated),
  with the dtypes the loaders give them;
- the activations of the largest stage (transformer step, VAE decode or text
  encoding): estimates from closed-form formulas, documented below, times a
  safety factor.

The pack caches all three components together (``TorchaxEnvManager``), so
the peak is all the weights plus the largest stage's activations; the stages
never run at the same time.

``MemoryPlan.check()`` raises ``HBMPlanError`` (a ValueError) that names the
components, the GiB needed and available per device, and what to change.

Importing this module imports neither torch nor jax (ComfyUI imports every
pack at start-up); they are imported on first use.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from . import sharding

logger = logging.getLogger("wan_tpu")

GiB = 2**30
ENV_HBM_GIB = "WAN_TPU_HBM_GIB"
PRECISIONS = ("bf16", "fp32")
COMPONENTS = ("text_encoder", "transformer", "vae")
TEXT_SEQUENCE_LENGTH = 512  # loading.MAX_SEQUENCE_LENGTH: every prompt is padded to it
VAE_CACHE_T = 2  # diffusers' CACHE_T: frames each causal conv keeps from the previous chunk

# ------------------------------------------------------------------ configs
# The published Wan 2.1 T2V diffusers configs (transformer/config.json of
# Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers), keys as WanTransformer3DModel takes them.
_WAN21_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN21_CONFIGS: dict[str, dict] = {
    "1.3B": dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
# The other families' transformers (transformer/config.json): image-to-video takes the first-frame mask and
# latents beside the noise (36 input channels); Wan 2.1 I2V also attends to 257 CLIP tokens (1280 wide).
# Wan 2.2 A14B has two such transformers (experts), both resident.
WAN21_CONFIGS["14B-I2V"] = dict(WAN21_CONFIGS["14B"], in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN21_CONFIGS["A14B"] = dict(WAN21_CONFIGS["14B"])
WAN21_CONFIGS["A14B-I2V"] = dict(WAN21_CONFIGS["14B"], in_channels=36)
# Wan 2.2 TI2V 5B: 48 latent channels (the Wan 2.2 VAE), a timestep per token.
WAN21_CONFIGS["5B"] = dict(_WAN21_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                           out_channels=48)
MODEL_EXPERTS = {"A14B": 2, "A14B-I2V": 2}
CLIP_TOKENS = 257  # ViT-H/14 at 224x224: 16x16 patches and the class token
# Wan 2.1 I2V's image_encoder/config.json (CLIP ViT-H/14 vision tower), keys as CLIPVisionConfig takes them.
CLIP_VIT_H_CONFIG: dict = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
# Repo ids the loader knows, to the configs above.
MODEL_ALIASES = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "1.3B",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "14B",
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": "14B-I2V",
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": "14B-I2V",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "A14B",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": "A14B-I2V",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "5B",
}
# UMT5-XXL encoder (text_encoder/config.json), shared by both sizes.
UMT5_XXL_CONFIG: dict = dict(
    d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# AutoencoderKLWan defaults, which are the Wan 2.1 VAE (vae/config.json).
WAN21_VAE_CONFIG: dict = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
)
# The Wan 2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json): 48 latents, 2x2 patches, 16x in all.
WAN22_VAE_CONFIG: dict = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)


def vae_config_for(transformer_config: Mapping) -> dict:
    """The VAE a transformer works with: the Wan 2.2 VAE for 48 latent channels, else Wan 2.1's."""
    return dict(WAN22_VAE_CONFIG if transformer_config.get("out_channels", 16) == 48 else WAN21_VAE_CONFIG)

# ------------------------------------------------------------------ per-chip HBM
# jax's device_kind strings (as jax/_src/pallas/mosaic/tpu_info.py matches them):
# v6e reports "TPU v6 lite", v5e "TPU v5 lite", v5p "TPU v5", v4 "TPU v4";
# the marketing names ("TPU v6e", "TPU v5e", "TPU v5p") are accepted too.
# Matched case-insensitively as substrings, first match wins, so each "lite"
# entry comes before the bare generation it contains. Values are the nominal
# HBM of one jax device (one chip from v4 on; one core on v2/v3). A device's
# own ``memory_stats()["bytes_limit"]``, when it has one, is preferred: it is
# what XLA can really allocate, a little below the nominal size.
HBM_GIB_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
    ("v6 lite", 32),
    ("v6e", 32),
    ("v5 lite", 16),
    ("v5e", 16),
    ("v5p", 95),
    ("v5", 95),
    ("v4 lite", 8),
    ("v4", 32),
    ("v3", 16),
    ("v2", 8),
)

# ------------------------------------------------------------------ safety factors
# The activation formulas count the tensors a stage holds at its peak; XLA
# adds padding to (8, 128) tiles, layout copies (e.g. [B, S, H, D] <-> [B, H, S, D]
# around the attention kernel), collective buffers and scratch we do not model.
TRANSFORMER_ACTIVATION_SAFETY = 1.1  # fitted to the compiled step (see transformer_activation_bytes)
# The sequence layout gathers each block's large matrices whole where the block runs. XLA starts the next
# block's gathers while the current one computes, so two blocks' gathered weights are live at the peak.
# On v5e ("TPU v5 lite") its schedule holds more: the compiled sequence steps there peak 3.3-5.7 GiB above
# v6e's for 14B (0.56 GiB a block) and 0.3-0.7 GiB for 1.3B (0.08 GiB a block), about 8 blocks' worth.
SEQUENCE_GATHERED_BLOCKS = 2
SEQUENCE_GATHERED_BLOCKS_BY_CHIP = (("v5 lite", 8), ("v5e", 8))  # jax device_kind substrings
# One video without CFG in the tensor layout runs the same on both dp halves. XLA spreads part of that
# work over the two (the compiled steps gather over dp twice per block), so their activations are
# 0.6-1.0x the CFG step's (1.3B 0.6, 14B 1.0-1.1 on (2, 4) meshes); the plan takes this share.
TENSOR_REPEATED_BATCH_SHARE = 0.7
# Whole weights: the sequence layout can instead copy the weights it gathers whole onto every device once per
# run (freed when the run ends), so that no step gathers them. Planned where the run's peak with the copies
# stays within this share of HBM: every 1.3B run, 14B on v5p; never 14B on a 32-GiB v6e (22 GiB of copies).
WHOLE_WEIGHTS_HBM_SHARE = 0.8
VAE_ACTIVATION_SAFETY = 1.7  # fitted to the compiled chunk programs: 14B/any at 1280x720 on v6e-8, 24.0 GiB peak
# Split over space: per device, the whole's share times this (halos, the cache passed in and out, pieces
# XLA keeps whole). Fitted to the compiled chunk programs, 14B/any at 1280x720 on v6e-8 split 8 ways:
# 4.79 GiB peak per device (0.47 GiB of it the replicated weights).
VAE_SPLIT_OVERHEAD = 1.44
# per device by libtpu (VAE weights 0.5 GiB included); layout padding of the 96-channel convs and
# XLA temporaries beyond the live set this formula counts
TEXT_ENCODER_ACTIVATION_SAFETY = 1.5


class HBMPlanError(ValueError):
    """The plan says the model will not fit in the devices' HBM at this size."""


# ------------------------------------------------------------------ weights
def _config_key(config: Mapping) -> str:
    return json.dumps(config, sort_keys=True, default=list)


def _clean_config(config: Mapping) -> dict:
    # config.json files carry "_class_name", "_diffusers_version", "architectures", ...
    return {k: v for k, v in config.items() if not k.startswith("_")}


def meta_module(component: str, config: Mapping, precision: str = "bf16"):
    """``component`` as ``loading.load_*`` gives it, built on torch's meta device (nothing allocated).

    Same classes, same config keys and the dtypes the loaders give: diffusers
    keeps the transformer's ``_keep_in_fp32_modules`` in fp32, transformers
    keeps UMT5's ``_keep_in_fp32_modules_strict`` in fp32 for bf16, the VAE is
    fp32. Non-persistent buffers (the transformer's RoPE tables) keep the
    dtype they are built in, as the loaders cast only what the checkpoint holds.
    ``benchmarks/tpu_compile.py`` traces the production programs with it.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    config = _clean_config(config)
    with torch.device("meta"):
        if component == "transformer":
            from diffusers import WanTransformer3DModel

            if isinstance(config.get("patch_size"), list):
                config["patch_size"] = tuple(config["patch_size"])
            keys = _init_keys(WanTransformer3DModel)
            module = WanTransformer3DModel(**{k: v for k, v in config.items() if k in keys})
        elif component == "text_encoder":
            from transformers import UMT5Config, UMT5EncoderModel

            module = UMT5EncoderModel(UMT5Config.from_dict(config))
        elif component == "vae":
            from diffusers import AutoencoderKLWan

            keys = _init_keys(AutoencoderKLWan)
            module = AutoencoderKLWan(**{k: v for k, v in config.items() if k in keys})
        elif component == "image_encoder":  # Wan 2.1 I2V's CLIP vision tower
            from transformers import CLIPVisionConfig, CLIPVisionModel

            module = CLIPVisionModel(CLIPVisionConfig(**config))
        else:
            raise ValueError(f"component={component!r}: use one of {COMPONENTS + ('image_encoder',)}")
    target, keep_fp32 = _load_dtype(component, module, precision)
    persistent = set(module.state_dict())
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    cast = set()
    for name, tensor in tensors:
        if name in persistent and tensor.is_floating_point() and id(tensor) not in cast:
            cast.add(id(tensor))
            dtype = torch.float32 if any(m in name.split(".") for m in keep_fp32) else target
            tensor.data = tensor.data.to(dtype)
    module.eval()
    return module


@functools.lru_cache(maxsize=16)
def _abstract_tensors(component: str, config_key: str, precision: str) -> tuple[tuple[str, tuple, int, int, bool], ...]:
    """(name, shape, itemsize, identity, is_parameter) of every parameter and buffer, as the loader would hold them.

    From ``meta_module``: shapes and dtypes only. ``identity`` groups tied
    weights (UMT5's shared embedding), which the pack places once.
    """
    module = meta_module(component, json.loads(config_key), precision)
    parameters = {id(p) for p in module.parameters()}
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return tuple((name, tuple(tensor.shape), tensor.dtype.itemsize, id(tensor), id(tensor) in parameters)
                 for name, tensor in tensors)


def _init_keys(cls) -> set:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _load_dtype(component: str, module, precision: str):
    """(dtype, modules kept in fp32) as ``loading.load_*`` gives them."""
    import torch

    if component in ("vae", "image_encoder"):
        return torch.float32, ()  # loading.load_vae / load_image_encoder: always fp32
    target = torch.bfloat16 if precision == "bf16" else torch.float32
    if component == "transformer":
        # diffusers keeps _keep_in_fp32_modules in fp32 whatever torch_dtype asks
        # (matched against the dotted name's parts).
        return target, tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    # transformers upcasts _keep_in_fp32_modules only for fp16 (UMT5's "wo" stays
    # bf16 here); its _keep_in_fp32_modules_strict also for bf16.
    strict = getattr(module, "_keep_in_fp32_modules_strict", None) or ()
    return target, tuple(strict) if precision == "bf16" else ()


def abstract_weights(component: str, config: Mapping, precision: str = "bf16") -> tuple[dict, dict]:
    """({name: shape}, {name: itemsize}) of the distinct tensors ``component`` places.

    Tied weights appear once, as in ``pipeline.place_weights``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    unique = {}
    for name, shape, itemsize, identity, _ in _abstract_tensors(component, _config_key(config), precision):
        unique[identity] = (name, shape, itemsize)  # the last name of a tied tensor, as place_weights keeps it
    shapes = {name: shape for name, shape, _ in unique.values()}
    itemsizes = {name: itemsize for name, _, itemsize in unique.values()}
    return shapes, itemsizes


def parameter_count(component: str, config: Mapping) -> int:
    """Parameters of ``component`` (tied weights counted once; buffers not counted)."""
    unique = {identity: shape for _, shape, _, identity, is_parameter
              in _abstract_tensors(component, _config_key(config), "fp32") if is_parameter}
    return sum(math.prod(shape) for shape in unique.values())


def whole_copies_bytes(config: Mapping, mesh_shape, precision: str = "bf16") -> int:
    """Bytes of whole copies of the transformer weights the sequence layout gathers
    (``sharding.sequence_gathered_weights``): what each device holds beside its shards when the run keeps
    them whole instead of gathering them every step."""
    mesh = _mesh_dict(mesh_shape)
    shapes, itemsizes = abstract_weights("transformer", config, precision)
    plan = sharding.plan_shardings(shapes, sharding.TRANSFORMER_RULES, mesh)
    gathered = sharding.sequence_gathered_weights(plan.specs)
    return sum(math.prod(shapes[name]) * itemsizes[name] for name in gathered)


def weights_bytes_per_device(component: str, config: Mapping, mesh_shape, precision: str = "bf16") -> int:
    """Bytes of ``component``'s weights on each device of a ``mesh_shape`` mesh, by ``sharding.RULES``."""
    mesh = _mesh_dict(mesh_shape)
    shapes, itemsizes = abstract_weights(component, config, precision)
    plan = sharding.plan_shardings(shapes, sharding.RULES[component], mesh)
    return plan.bytes_per_device(shapes, itemsizes, mesh)


# ------------------------------------------------------------------ activations
def _mesh_dict(mesh_shape) -> dict[str, int]:
    if isinstance(mesh_shape, Mapping):
        mesh = {"dp": int(mesh_shape.get("dp", 1)), "tp": int(mesh_shape.get("tp", 1))}
    else:
        dp, tp = mesh_shape
        mesh = {"dp": int(dp), "tp": int(tp)}
    if mesh["dp"] < 1 or mesh["tp"] < 1:
        raise ValueError(f"mesh_shape={mesh_shape!r}: dp and tp need at least 1 device each")
    return mesh


def _split(size: int, parts: int) -> int:
    # A dimension the mesh does not divide is replicated (sharding.plan_shardings).
    return size // parts if size % parts == 0 else size


def _local_batch(batch: int, dp: int) -> int:
    # pipeline._batch_sharding: the batch is split over dp when dp divides it.
    return batch // dp if dp > 1 and batch % dp == 0 else batch


def transformer_tokens(config: Mapping, height: int, width: int, num_frames: int) -> int:
    """Sequence length of one video: latent frames x (H/8/p_h) x (W/8/p_w) (H/16, W/16 for the Wan 2.2 VAE);
    (F-1)/4+1 latent frames."""
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    latent_frames = (num_frames - 1) // 4 + 1
    # 48 latent channels are the Wan 2.2 VAE's (TI2V 5B), which downsamples 16x; every other Wan VAE 8x.
    spatial = 16 if config.get("out_channels", 16) == 48 else 8
    return (latent_frames // p_t) * (height // spatial // p_h) * (width // spatial // p_w)


def transformer_activation_bytes(config: Mapping, mesh_shape, height: int, width: int, num_frames: int,
                                 precision: str = "bf16", cfg: bool = True, layout: str = "tensor",
                                 device_kind: str | None = None, whole_weights: bool = False) -> int:
    """Estimated peak activation bytes per device of one denoising step (an estimate, not a measurement).

    B = local batch (2 with CFG, split over dp when dp divides it), S tokens,
    D = heads x head_dim (the residual width, whole on every device: the
    row-parallel projections end in an all-reduce), D_t = D / tp when tp
    divides the heads (else the attention runs on all heads), F_t = ffn / tp,
    a = 2 (bf16) or 4 (fp32). Layers run one after another and XLA frees each
    layer's temporaries, so the peak is one sub-layer's live set, the larger of:

      the norms, per token:   D * (a + 8)
          the residual (a); diffusers runs the norms, the modulation and the
          gated residual add in fp32: the upcast residual and the fp32
          normalised, modulated result (4 each)
      a sub-layer, per token: D * 2a + max(attention, FFN)
          the residual and the normalised input (a each), then
          attention:  D_t * 6a   q, k, v; q and k after RoPE; the output. A
                      flash kernel (Splash on TPU) is assumed: no S x S scores;
          FFN:        F_t * a    the up-projection's output (XLA fuses its
                                 GELU into the down-projection's input)

      step = safety * (B * S * per_token + fixed)

    ``fixed``: RoPE tables (S * head_dim * 2 * 4 bytes), the text context and
    its projection (B * 512 * (text_dim + D) * a), the cross-attention keys and
    values (2 * B * 512 * D_t * a), and the scheduler state (six fp32 latents,
    replicated) with the model's input and output (B latents in a, fp32).

    ``layout`` (``sharding.LAYOUTS``): in the sequence layout ("auto" is
    resolved by the caller) each device holds its share of the tokens,
    ``sharding.token_split``: B and S above become the local batch and
    ceil(S / n); the heads and FFN columns are whole per token (D_t = D,
    F_t = F; between the all-to-alls q, k and v are [S, D / n], the same
    bytes), and ``SEQUENCE_GATHERED_BLOCKS`` blocks' gathered weights (by
    ``device_kind``) are live beside them; with ``whole_weights``, their
    whole copies instead (``whole_copies_bytes``). In the tensor layout one video
    without CFG on dp > 1 counts ``TENSOR_REPEATED_BATCH_SHARE`` of its
    token term.

    Checked against the compiler (``benchmarks/tpu_compile.py``, libtpu
    0.0.42.1): 1.3B and 14B at 848x480, 832x480 and 1280x720 on v5e-8, v6e-8
    and v5p-8, with and without CFG, in both layouts (72 compiled steps), the
    plan's step peak is 0.79-1.21x the compiled one; tests/test_memory_plan.py
    holds it within 25% of those compiled peaks.
    """
    if layout not in sharding.LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {sharding.LAYOUTS} (resolve 'auto' first)")
    a = 2 if precision == "bf16" else 4
    mesh = _mesh_dict(mesh_shape)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    width_d = heads * head_dim
    tokens = transformer_tokens(config, height, width, num_frames)
    gathered = 0
    if layout == "sequence":
        split = sharding.token_split(mesh, 2 if cfg else 1)
        batch_devices, token_devices = split.sizes(mesh)
        batch = (2 if cfg else 1) // batch_devices
        tokens = math.ceil(tokens / token_devices)
        width_t, ffn_t = width_d, config["ffn_dim"]
        if whole_weights:
            gathered = whole_copies_bytes(config, mesh, precision)
        elif mesh["tp"] > 1 or split.token_axes:
            kind = (device_kind or "").lower()
            blocks = next((count for needle, count in SEQUENCE_GATHERED_BLOCKS_BY_CHIP if needle in kind),
                          SEQUENCE_GATHERED_BLOCKS)
            gathered = blocks * (6 * width_d * width_d + 2 * width_d * ffn_t) * a
    else:
        batch = _local_batch(2 if cfg else 1, mesh["dp"])
        width_t = width_d // mesh["tp"] if heads % mesh["tp"] == 0 else width_d
        ffn_t = _split(config["ffn_dim"], mesh["tp"])

    norms = width_d * (a + 8)
    attention = width_t * 6 * a
    ffn = ffn_t * a
    per_token = max(norms, width_d * 2 * a + max(attention, ffn))
    token_term = batch * tokens * per_token
    if layout == "tensor" and not cfg and mesh["dp"] > 1:
        token_term *= TENSOR_REPEATED_BATCH_SHARE

    latent = config.get("in_channels", 16) * ((num_frames - 1) // 4 + 1) * (height // 8) * (width // 8)
    fixed = (
        tokens * head_dim * 2 * 4
        + batch * TEXT_SEQUENCE_LENGTH * (config.get("text_dim", 4096) + width_d) * a
        + 2 * batch * TEXT_SEQUENCE_LENGTH * width_t * a
        + 6 * latent * 4 + batch * latent * (a + 4)
    )
    return int(TRANSFORMER_ACTIVATION_SAFETY * (token_term + fixed) + gathered)


def vae_decode_activation_bytes(vae_config: Mapping, height: int, width: int, num_frames: int,
                                mesh_shape: Mapping | None = None) -> int:
    """Estimated peak activation bytes per device of the VAE decode (an estimate, not a measurement).

    The VAE runs in fp32 (4 bytes), its frames split over space across as many of the mesh's devices as
    divide the latent (``sharding.spatial_split``; ``mesh_shape`` None: one device): each device holds its
    strip of every feature map, plus the halo rows XLA exchanges (``VAE_SPLIT_OVERHEAD``). Wan's VAE decodes causally one latent frame
    at a time (4 output frames; the first gives 1). Every 3-wide causal conv
    keeps its input's last 2 frames for the next chunk (the "feature cache"),
    so all those caches are live at once, the largest at full resolution.
    With dims = base_dim * [m[-1]] + m[::-1] (m = dim_mult; 96 x [4, 4, 4, 2, 1]),
    up-block i runs (num_res_blocks + 1) residual blocks at 1/2^(n-1-i) of the
    output size on f_i frames (1, 2, 4, 4) and, but for the last, upsamples
    (2D, or 3D doubling the frames) to dims[i+1] // 2 channels:

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

    For the Wan 2.1 VAE that is ~2400 + ~1700 elements per output pixel
    (caches + working) plus the video: at 720P (1280x720, 81 frames) 16.9 GB
    before the factor, at 480P (832x480) 7.3 GB, with the whole video; the
    pipeline now decodes one latent frame per compiled call
    (``pipeline.VAEChunkDecoder``), so only one chunk's frames count. The
    safety factor is fitted to libtpu's compiled chunk programs at 1280x720
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
    spatial = vae_config.get("scale_factor_spatial", 8)
    devices = sharding.spatial_split(dict(mesh_shape or {"dp": 1, "tp": 1}), height // spatial, width // spatial)[2]
    return int(whole if devices == 1 else whole / devices * VAE_SPLIT_OVERHEAD)


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
    length = TEXT_SEQUENCE_LENGTH
    mesh = _mesh_dict(mesh_shape)
    devices = mesh["dp"] * mesh["tp"]
    batch = _local_batch(2, mesh["dp"])
    d_model, d_ff, heads = te_config["d_model"], te_config["d_ff"], te_config["num_heads"]
    total = (batch * length * (6 * d_model + 3 * _split(d_ff, devices)) * 4
             + batch * _split(heads, devices) * length**2 * 3 * 4)
    return int(TEXT_ENCODER_ACTIVATION_SAFETY * total)


# ------------------------------------------------------------------ HBM per chip
def hbm_from_device_kind(device_kind: str) -> int | None:
    """Nominal HBM bytes of one device of ``device_kind`` (e.g. "TPU v6 lite"), or None if unknown."""
    kind = (device_kind or "").lower()
    for needle, gib in HBM_GIB_BY_DEVICE_KIND:
        if needle in kind:
            return int(gib * GiB)
    return None


def hbm_bytes_per_device(device=None, device_kind: str | None = None, hbm_bytes: int | None = None,
                         environ: Mapping | None = None) -> tuple[int | None, str]:
    """(HBM bytes of one device, where that number came from).

    In order: the ``hbm_bytes`` argument; ``WAN_TPU_HBM_GIB``; the device's
    ``memory_stats()["bytes_limit"]``; the table, by ``device_kind`` or the
    device's kind. With neither a device nor a kind, jax's first device is
    asked. (None, "unknown") when nothing says (e.g. a CPU).
    """
    environ = os.environ if environ is None else environ
    if hbm_bytes is not None:
        if hbm_bytes <= 0:
            raise ValueError(f"hbm_bytes={hbm_bytes}: give the HBM of one device in bytes, e.g. {32 * GiB}")
        return int(hbm_bytes), "given"
    if environ.get(ENV_HBM_GIB):
        try:
            gib = float(environ[ENV_HBM_GIB])
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise ValueError(f"{ENV_HBM_GIB}={environ[ENV_HBM_GIB]!r}: give the HBM of one device in GiB, e.g. 32")
        return int(gib * GiB), ENV_HBM_GIB
    if device is None and device_kind is None:
        import jax

        device = jax.devices()[0]
    if device is not None:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # backends without memory stats raise or return None
            stats = {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats"
        device_kind = device_kind or getattr(device, "device_kind", None)
    found = hbm_from_device_kind(device_kind)
    if found is None:
        return None, "unknown"
    return found, f"{device_kind} (table)"


# ------------------------------------------------------------------ the plan
def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


_LABELS = {"text_encoder": "text encoder", "transformer": "transformer", "vae": "VAE"}
_STAGES = {"transformer": "transformer step", "vae": "VAE decode", "text_encoder": "text encoding"}


@dataclass
class MemoryPlan:
    """Per-device bytes of a Wan 2.1 run. All ``*_bytes`` are per device.

    Peak = all three components' weights (the pack keeps them cached together)
    + the activations of the largest stage (they run one at a time).
    """

    model: str
    mesh_shape: tuple[int, int]
    height: int
    width: int
    num_frames: int
    precision: str
    cfg: bool
    text_encoder_weights_bytes: int
    transformer_weights_bytes: int
    vae_weights_bytes: int
    transformer_activation_bytes: int
    vae_activation_bytes: int
    text_encoder_activation_bytes: int
    hbm_bytes: int | None  # per device; None when unknown (then ``fits`` is True and nothing is checked)
    hbm_source: str = "unknown"
    suggestions: list[str] = field(default_factory=list)
    # Wan 2.2 A14B keeps a second (low-noise) transformer expert resident beside the first.
    second_expert_weights_bytes: int = 0
    layout: str = "tensor"  # the denoising step's (sharding.LAYOUTS)
    # The sequence layout's gathered weights held whole for the run (counted in the step's activations).
    whole_weights: bool = False

    @property
    def weights_bytes(self) -> int:
        return (self.text_encoder_weights_bytes + self.transformer_weights_bytes + self.vae_weights_bytes
                + self.second_expert_weights_bytes)

    @property
    def weights_by_component(self) -> dict[str, int]:
        return {c: getattr(self, f"{c}_weights_bytes") for c in COMPONENTS}

    @property
    def activations_by_stage(self) -> dict[str, int]:
        return {c: getattr(self, f"{c}_activation_bytes") for c in COMPONENTS}

    @property
    def peak_stage(self) -> str:
        """The component whose stage has the largest activations."""
        stages = self.activations_by_stage
        return max(stages, key=stages.get)

    @property
    def activation_bytes(self) -> int:
        return max(self.activations_by_stage.values())

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    def stage_peak_bytes(self, component: str) -> int:
        """Per-device bytes of ``component``'s stage alone: its weights + its activations.

        What that stage's compiled program holds at its peak (its arguments are
        the component's weights), so this is the figure to test against
        ``memory_analysis()`` (``benchmarks/tpu_compile.py``)."""
        if component not in COMPONENTS:
            raise ValueError(f"component={component!r}: use one of {COMPONENTS}")
        return self.weights_by_component[component] + self.activations_by_stage[component]

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.peak_bytes <= self.hbm_bytes

    def _describe(self) -> str:
        dp, tp = self.mesh_shape
        return (f"Wan {self.model} at {self.width}x{self.height}, {self.num_frames} frames "
                f"({self.precision}, {'CFG' if self.cfg else 'no CFG'}) on mesh dp={dp} x tp={tp}, "
                f"{self.layout} layout{' with whole weights' if self.whole_weights else ''}")

    def summary(self) -> str:
        """One line: per-device weights, activations, peak and HBM, in GiB."""
        weights = ", ".join(f"{_LABELS[c]} {_gib(b)}" for c, b in self.weights_by_component.items())
        if self.second_expert_weights_bytes:
            weights += f", low-noise transformer {_gib(self.second_expert_weights_bytes)}"
        hbm = f"{_gib(self.hbm_bytes)} ({self.hbm_source})" if self.hbm_bytes is not None else "unknown"
        verdict = "unchecked" if self.hbm_bytes is None else ("fits" if self.fits else "does NOT fit")
        return (f"{self._describe()}: per device weights {_gib(self.weights_bytes)} ({weights}) + "
                f"{_STAGES[self.peak_stage]} activations ~{_gib(self.activation_bytes)} = "
                f"~{_gib(self.peak_bytes)} of {hbm}: {verdict}")

    def check(self) -> "MemoryPlan":
        """Raise ``HBMPlanError`` if the plan does not fit; return self otherwise."""
        if self.hbm_bytes is None:
            logger.info("HBM per device unknown: not checked. %s", self.summary())
            return self
        if self.fits:
            logger.info("%s", self.summary())
            return self
        parts = sorted(
            [(f"{_LABELS[c]} weights", b) for c, b in self.weights_by_component.items()]
            + [(f"{_STAGES[self.peak_stage]} activations (estimate)", self.activation_bytes)],
            key=lambda item: -item[1],
        )
        too_big = [name for name, size in parts if size > self.hbm_bytes]
        alone = f" More than one device holds on its own: the {' and the '.join(too_big)}." if too_big else ""
        fixes = self.suggestions or ["use more chips, a lower resolution or fewer frames"]
        raise HBMPlanError(
            f"{self._describe()} needs ~{_gib(self.peak_bytes)} of HBM per device, but each device has "
            f"{_gib(self.hbm_bytes)} ({self.hbm_source}): "
            + ", ".join(f"{name} {_gib(size)}" for name, size in parts)
            + f".{alone} To fit: " + "; or ".join(fixes) + "."
            + (f" (Activations are estimates; {ENV_HBM_GIB} sets the HBM per device the plan assumes.)"
               if self.weights_bytes <= self.hbm_bytes else "")
        )


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes of a compiled program, from its own ``memory_analysis()``:
    {"argument", "output", "temp", "alias", "peak"}; None where the backend reports nothing.

    ``peak`` is the compiler's ``peak_memory_in_bytes`` where it reports one,
    else argument + output + temp - alias."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # backends without the analysis
        return None
    if stats is None:
        return None
    out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    out["peak"] = reported if reported > 0 else out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def check_compiled_memory(compiled, what: str, fix: str, device=None, hbm_bytes: int | None = None,
                          environ: Mapping | None = None) -> dict | None:
    """Refuse (``HBMPlanError``) to run ``compiled`` when its own memory analysis does not fit one device.

    The compiler's figures are facts where the plan's activations are
    estimates, so this runs after compiling and before the first execution.
    The program's arguments (weights, state) are already on the device; what
    it adds is its peak minus its arguments, which must fit in what is free:
    the device's ``bytes_limit - bytes_in_use`` where it reports memory stats,
    else its HBM (``hbm_bytes_per_device``) minus the arguments. Unknown HBM
    (a CPU) is not checked. Returns the program's bytes (``compiled_memory``).
    """
    facts = compiled_memory(compiled)
    if facts is None:
        return None
    limit, source = hbm_bytes_per_device(device, hbm_bytes=hbm_bytes, environ=environ)
    if limit is None:
        return facts
    in_use = None
    if device is not None and hbm_bytes is None:
        try:
            in_use = (device.memory_stats() or {}).get("bytes_in_use")
        except Exception:  # backends without memory stats
            in_use = None
    extra = facts["peak"] - facts["argument"]
    free = limit - (in_use if in_use is not None else facts["argument"])
    if extra > free:
        held = f"{_gib(in_use)} in use" if in_use is not None else f"its arguments {_gib(facts['argument'])}"
        raise HBMPlanError(
            f"{what} needs {_gib(facts['peak'])} per device at its peak by the compiler's count (arguments "
            f"{_gib(facts['argument'])}, temporaries {_gib(facts['temp'])}, outputs {_gib(facts['output'])}), "
            f"{_gib(extra)} more than its arguments, but each device has {_gib(limit)} ({source}) with {held}, "
            f"leaving {_gib(max(free, 0))}. {fix}"
        )
    return facts


def resolve_model(model: str | Mapping) -> tuple[str, dict]:
    """(label, transformer config) from "14B", "1.3B", a known repo id, or a config dict."""
    if isinstance(model, Mapping):
        config = _clean_config(model)
        for name, known in WAN21_CONFIGS.items():
            if all(config.get(k) == known[k] for k in ("num_attention_heads", "ffn_dim", "num_layers")) and \
                    config.get("in_channels", 16) == known.get("in_channels", 16):
                return name, config
        return f"{config['num_attention_heads']}x{config['attention_head_dim']}x{config['num_layers']}", config
    name = MODEL_ALIASES.get(model, model)
    if name not in WAN21_CONFIGS:
        raise ValueError(
            f"model={model!r}: use one of {sorted(WAN21_CONFIGS)}, a known repo id, or a transformer config dict"
        )
    return name, dict(WAN21_CONFIGS[name])


def _check_video(height: int, width: int, num_frames: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 16:
            raise ValueError(f"{name}={value}: Wan needs a positive multiple of 16")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames}: Wan needs 4n+1 frames")


def resolve_layout(layout: str | None, config: Mapping, mesh, height: int, width: int, num_frames: int,
                   cfg: bool, device_kind: str | None = None) -> tuple[str, str | None]:
    """(layout, why) of a run's step: ``layout``, or for "auto" (and None) the cost model's choice for this
    model, size, mesh and chip (``sharding.choose_layout``, and its reason; None when not "auto"). The one
    rule the HBM plan, the pipeline (``WanTPUPipeline.step_layout``) and the compile command share."""
    layout = sharding.check_layout(layout)
    if layout != "auto":
        return layout, None
    tokens = transformer_tokens(config, height, width, num_frames)
    return sharding.choose_layout(dict(config), tokens, _mesh_dict(mesh), 2 if cfg else 1, device_kind)


def _plan(label, config, te_config, vae_config, mesh, height, width, num_frames, precision, cfg,
          hbm, hbm_source, layout="tensor", device_kind=None) -> MemoryPlan:
    layout = resolve_layout(layout, config, mesh, height, width, num_frames, cfg, device_kind)[0]
    return MemoryPlan(
        model=label, mesh_shape=(mesh["dp"], mesh["tp"]), height=height, width=width, num_frames=num_frames,
        precision=precision, cfg=cfg, layout=layout,
        text_encoder_weights_bytes=weights_bytes_per_device("text_encoder", te_config, mesh, precision),
        transformer_weights_bytes=weights_bytes_per_device("transformer", config, mesh, precision),
        vae_weights_bytes=weights_bytes_per_device("vae", vae_config, mesh, "fp32"),
        transformer_activation_bytes=transformer_activation_bytes(
            config, mesh, height, width, num_frames, precision, cfg, layout, device_kind
        ),
        vae_activation_bytes=vae_decode_activation_bytes(vae_config, height, width, num_frames, mesh),
        text_encoder_activation_bytes=text_encoder_activation_bytes(te_config, mesh),
        hbm_bytes=hbm, hbm_source=hbm_source,
    )


# Meshes tried when suggesting more chips: dp (1 or 2) x a power of 2 on tp.
_CANDIDATE_MESHES = sorted(
    ((dp, tp) for dp in (1, 2) for tp in (1, 2, 4, 8, 16, 32)), key=lambda mesh: (mesh[0] * mesh[1], -mesh[0])
)


def _suggestions(plan: MemoryPlan, config, te_config, vae_config, args: dict) -> list[str]:
    """What would make ``plan`` fit, each with the per-device GiB it would need."""
    hbm = plan.hbm_bytes
    mesh = {"dp": plan.mesh_shape[0], "tp": plan.mesh_shape[1]}

    def replan(mesh=mesh, label=plan.model, transformer=config, **changes):
        return _plan(label, transformer, te_config, vae_config, mesh, **dict(args, **changes))

    def smallest_mesh(**changes):
        # The fewest devices that fit; at equal counts dp=2 first (CFG's batch of 2 splits over dp).
        for dp, tp in _CANDIDATE_MESHES:
            if dp * tp > plan.mesh_shape[0] * plan.mesh_shape[1]:
                bigger = replan({"dp": dp, "tp": tp}, **changes)
                if bigger.peak_bytes <= hbm:
                    return dp, tp, bigger
        return None

    # Smaller videos than this one, largest first.
    candidates = ((480, 832, plan.num_frames), (plan.height, plan.width, 33), (480, 832, 33))
    smaller_sizes = [(h, w, f) for h, w, f in candidates if h * w * f < plan.height * plan.width * plan.num_frames]
    out = []
    found = smallest_mesh()
    if found:
        dp, tp, bigger = found
        out.append(f"use more chips: a mesh of {dp * tp} devices (dp={dp} x tp={tp}; WAN_TPU_DP/WAN_TPU_TP) "
                   f"needs ~{_gib(bigger.peak_bytes)} per device")
    else:
        for h, w, f in smaller_sizes:
            if replan(height=h, width=w, num_frames=f).peak_bytes <= hbm:
                break  # a smaller video alone fits: said below
            found = smallest_mesh(height=h, width=w, num_frames=f)
            if found:
                dp, tp, bigger = found
                out.append(f"use more chips and a smaller video: {dp * tp} devices (dp={dp} x tp={tp}) at {w}x{h}, "
                           f"{f} frames needs ~{_gib(bigger.peak_bytes)} per device")
                break
    if plan.precision == "fp32":
        out.append(f"use precision bf16 instead of fp32 (~{_gib(replan(precision='bf16').peak_bytes)} per device)")
    if plan.activation_bytes > 0.2 * plan.peak_bytes:
        # The VAE decodes 4 frames at a time: its activations barely depend on num_frames.
        growth = "height x width" if plan.peak_stage == "vae" else "height x width x frames"
        stage = f"the {_STAGES[plan.peak_stage]} activations, ~{_gib(plan.activation_bytes)} here, grow with {growth}"
        for h, w, f in smaller_sizes:
            smaller = replan(height=h, width=w, num_frames=f)
            if smaller.peak_bytes <= hbm:
                what = "the resolution" if plan.peak_stage == "vae" else "the resolution or num_frames"
                out.append(f"lower {what} ({w}x{h}, {f} frames needs "
                           f"~{_gib(smaller.peak_bytes)}; {stage})")
                break
        else:
            out.append(f"lower the resolution{'' if plan.peak_stage == 'vae' else ' or num_frames'} ({stage})")
    if plan.model == "14B":
        small_model = dict(label="1.3B", transformer=dict(WAN21_CONFIGS["1.3B"]))
        small = replan(**small_model)
        if small.peak_bytes <= hbm:
            out.append(f"use the 1.3B model (~{_gib(small.peak_bytes)} per device on this mesh)")
        elif found := smallest_mesh(**small_model):
            dp, tp, bigger = found
            out.append(f"use the 1.3B model on {dp * tp} devices (dp={dp} x tp={tp}): "
                       f"~{_gib(bigger.peak_bytes)} per device")
    return out


def _plan_whole_weights(plan: MemoryPlan, config: Mapping, mesh: dict, device_kind: str | None,
                        forced: bool = False) -> None:
    """Keep the sequence layout's gathered weights whole for the run where the peak with them stays within
    ``WHOLE_WEIGHTS_HBM_SHARE`` of a known HBM (one expert only: two would double the copies), or ``forced``."""
    whole = transformer_activation_bytes(config, mesh, plan.height, plan.width, plan.num_frames, plan.precision,
                                         plan.cfg, "sequence", device_kind, whole_weights=True)
    gathering = plan.transformer_activation_bytes
    plan.transformer_activation_bytes = whole
    if forced or (plan.hbm_bytes and plan.peak_bytes <= WHOLE_WEIGHTS_HBM_SHARE * plan.hbm_bytes):
        plan.whole_weights = True
    else:
        plan.transformer_activation_bytes = gathering


def plan_memory(model: str | Mapping = "14B", mesh_shape=(2, 4), height: int = 720, width: int = 1280,
                num_frames: int = 81, precision: str = "bf16", cfg: bool = True, *,
                text_encoder_config: Mapping | None = None, vae_config: Mapping | None = None,
                hbm_bytes: int | None = None, device_kind: str | None = None, device=None,
                environ: Mapping | None = None, experts: int | None = None,
                layout: str | None = None, whole_weights: bool | None = None) -> MemoryPlan:
    """The per-device HBM plan of a Wan 2.1 run, from configs alone (nothing is loaded).

    ``model``: "14B", "1.3B", a known repo id, or a transformer config dict
    (transformer/config.json); ``text_encoder_config``/``vae_config`` default
    to UMT5-XXL and the Wan 2.1 VAE. ``mesh_shape``: (dp, tp) or {"dp", "tp"}.
    HBM per device: ``hbm_bytes``, else ``WAN_TPU_HBM_GIB``, else ``device``
    (or jax's first device when no ``device_kind`` is given), else the table
    by ``device_kind``. Call ``.check()`` on the result to refuse early.
    ``experts``: 2 for Wan 2.2 A14B, whose two transformers are both resident (default: 2 for "A14B" and
    "A14B-I2V", else 1). ``layout``: the denoising step's, "tensor", "sequence", or "auto" (or None) for the
    one the pipeline will choose on these devices (``device_kind``, else ``device``'s). ``whole_weights``: in the
    sequence layout, hold the gathered weights whole for the run (True), never (False), or where they fit
    within ``WHOLE_WEIGHTS_HBM_SHARE`` of a known HBM (None, what the pipeline does).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    _check_video(height, width, num_frames)
    label, config = resolve_model(model)
    te_config = _clean_config(text_encoder_config or UMT5_XXL_CONFIG)
    vae_config = _clean_config(vae_config or vae_config_for(config))
    mesh = _mesh_dict(mesh_shape)
    hbm, source = hbm_bytes_per_device(device, device_kind, hbm_bytes, environ)
    kind = device_kind or getattr(device, "device_kind", None)
    args = dict(height=height, width=width, num_frames=num_frames, precision=precision, cfg=bool(cfg),
                hbm=hbm, hbm_source=source, layout=layout, device_kind=kind)
    plan = _plan(label, config, te_config, vae_config, mesh, **args)
    experts = MODEL_EXPERTS.get(label, 1) if experts is None else int(experts)
    plan.second_expert_weights_bytes = plan.transformer_weights_bytes * (experts - 1)
    if plan.layout == "sequence" and experts == 1 and mesh["tp"] > 1 and whole_weights is not False:
        _plan_whole_weights(plan, config, mesh, kind, forced=bool(whole_weights))
    if not plan.fits:
        plan.suggestions = _suggestions(plan, config, te_config, vae_config, args)
    logger.debug("%s", plan.summary())
    return plan
