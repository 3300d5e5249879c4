"""The one attention dispatch: the policy that picks a kernel, the kernels, and the SDPA override.

- ``AttentionPolicy``: 'splash', 'cudnn' or 'xla' per call, from the backend setting (a setter, else
  ``WAN_TPU_ATTENTION``, else 'auto'), the Splash threshold and the platform.
- ``dispatch``: runs the chosen kernel on jax arrays in torch SDPA layout [B, H, S, D], with the sequence
  layout's sharding constraints around it.
- ``query_chunked_attention``: XLA attention in query chunks, the CPU path for long attention.
- ``register_sdpa_override``: routes torch's ``scaled_dot_product_attention`` to the dispatch, through
  torchax's public API.

Importing this module imports neither jax nor torch.
"""

from __future__ import annotations

import logging

from . import environment

logger = logging.getLogger("wan_tpu")

ATTENTION_BACKENDS = ("auto", "splash", "xla", "cudnn")

# Self-attention whose key/value sequence is at least this long goes to the
# Splash kernel on TPU. Wan's cross-attention has 512 keys and its
# self-attention 30k-76k at 480P/720P, so any value in between separates them;
# below ~10k tokens XLA's fused attention is as fast. This is the only
# threshold in the pack.
SPLASH_MIN_KV_LEN = 10_000

# XLA attention materialises the [B, H, Sq, Skv] fp32 scores. Past this size
# (a video model's self-attention off TPU/GPU) the queries go through in chunks
# instead: the same arithmetic per query row, a quarter of the time on a CPU.
XLA_SCORE_BLOCK_BYTES = 32 * 2**20


class AttentionPolicy:
    """The attention backend and Splash threshold in force, and the choice they make per call."""

    def __init__(self):
        self._backend = None  # None: read WAN_TPU_ATTENTION each time
        self._splash_min_kv_len = None
        self._logged_choices: set = set()

    def set(self, backend: str | None = None, splash_min_kv_len: int | None = None) -> None:
        if backend is not None and backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is unknown: use one of {ATTENTION_BACKENDS}")
        self._backend = backend
        self._splash_min_kv_len = splash_min_kv_len
        self.forget_choices()

    def settings(self, environ=None) -> tuple[str, int]:
        """``(backend, splash_min_kv_len)``: the setter's values, else the environment's, else the defaults."""
        backend = self._backend or environment.read(environment.ATTENTION, "auto", environ)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{environment.ATTENTION}={backend!r} is unknown: use one of {ATTENTION_BACKENDS}")
        min_kv = self._splash_min_kv_len
        if min_kv is None:
            min_kv = int(environment.read(environment.SPLASH_MIN_KV_LEN, SPLASH_MIN_KV_LEN, environ))
        return backend, min_kv

    def choose(self, query_shape, key_shape, platform: str, planned: bool = True) -> str:
        """'splash', 'cudnn' or 'xla' for q [B, H, Sq, D] and k [B, H, Skv, D] traced for ``platform``."""
        backend, min_kv = self.settings()
        long_planned = planned and key_shape[2] >= min_kv
        if backend == "auto":
            if platform == "tpu" and long_planned:
                choice = "splash"
            elif platform == "gpu":
                choice = "cudnn"
            else:
                choice = "xla"
        elif backend == "splash":
            # Forced Splash still leaves short (cross-attention) and unplanned keys to XLA.
            choice = "splash" if long_planned else "xla"
        else:
            choice = backend
        key = (tuple(query_shape), tuple(key_shape), choice)
        if key not in self._logged_choices:
            self._logged_choices.add(key)
            logger.info("attention q%s k%s -> %s", tuple(query_shape), tuple(key_shape), choice)
        return choice

    def forget_choices(self) -> None:
        """Log each choice again the next time it is made."""
        self._logged_choices.clear()


# The sparse kernels, by libtpu's cycle model on v6e (benchmarks/radial_cycles.py), 14B at 720P and 81
# frames. The frame-banded path (splash_attention.FrameBlocks: whole frame pairs unmasked, bands from
# spatial-major keys; 0.418 of the dense call) is chosen wherever it runs. The tile path is the fallback
# (e.g. 848x480's 1590-token frames): 1024 tiles (0.71 of them active) cost 1.27x dense there, 512 tiles
# 1.61x, since a grid step's fixed cost and the mask outweigh the skipped tiles.
SPARSE_BLOCK = 1024


def sparse_block_sizes(splash, pattern, chip_blocks):
    """The sparse kernel's sizes for ``pattern``: ``FrameBlocks`` where the frame-banded path runs it, else
    the block-sparse tiles: square, at most ``SPARSE_BLOCK`` and a frame's tokens (a tile holds at most two
    frames), in whole lanes; None when a frame is under one lane (128 tokens): no tile fits (the pattern may
    still drop whole frames there, so the caller keeps the mask)."""
    if splash.frame_path_refusal(pattern) is None:
        return splash.FrameBlocks()
    block = min(SPARSE_BLOCK, pattern.tokens_per_frame // splash.NUM_LANES * splash.NUM_LANES)
    if block < splash.NUM_LANES:
        return None
    compute = min(chip_blocks.block_kv_compute, block)
    while block % compute:
        compute -= splash.NUM_LANES
    return splash.BlockSizes(block, block, compute)


MAX_WHOLE_MASK_TOKENS = 16384  # a whole [tokens, tokens] mask of 256 MiB; past it only the kernel can go


def whole_token_mask(pattern, platform: str):
    """``pattern``'s [tokens, tokens] bool mask, for XLA's attention (CPU tests, or a chip without the kernel)."""
    if pattern.num_tokens > MAX_WHOLE_MASK_TOKENS:
        raise ValueError(f"sparse attention over {pattern.num_tokens} tokens on {platform}: only the TPU's Splash "
                         f"kernel runs it without a whole [tokens, tokens] mask (here over "
                         f"{MAX_WHOLE_MASK_TOKENS}); use attention='dense' here")
    from ..models.wan.radial import token_mask  # the one sparse pattern there is so far

    return token_mask(pattern)


def dispatch(query, key, value, *, choose, platform: str, mesh=None, token_split=None,
             attn_mask=None, is_causal=False, scale=None, key_lengths=None, min_key_len: int = 0, sparse=None):
    """Attention on jax arrays in torch SDPA layout [B, H, S, D].

    ``key_lengths`` [B] (optional): only each batch row's first ``key_lengths[b]`` keys count (a prefix
    mask, which Splash takes as data: HunyuanVideo's packed prompts); ``min_key_len``: a static length
    every row has.

    ``choose(query_shape, key_shape, planned)`` names the kernel; ``mesh`` is the active mesh (attention
    under it is planned), ``token_split`` the sequence layout's split of the tokens (``sharding.TokenSplit``):
    attention's output goes back to its tokens split over the devices. ``sparse``: the trace's sparse
    self-attention (``runtime.trace.SparseSelfAttention``), or None.
    """
    pattern = None
    if sparse is not None and attn_mask is None and not is_causal and key_lengths is None:
        pattern = sparse.mask_for(query.shape[2], key.shape[2])
    run = dict(choose=choose, platform=platform, mesh=mesh, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
               key_lengths=key_lengths, min_key_len=min_key_len, pattern=pattern)
    if token_split is None:
        return _attend(query, key, value, **run)
    # The sequence layout: the projections run on each device's own tokens and attention
    # exchanges heads for tokens with all-to-alls. Without these constraints XLA may instead
    # gather every token to compute a head slice of a projection (4x the bytes at Wan's sizes).
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    constrain = jax.lax.with_sharding_constraint
    tokens = NamedSharding(mesh, PartitionSpec(*token_split.spec(token_dim=2, ndim=4)))
    query = constrain(query, tokens)
    if key.shape[2] == query.shape[2]:  # self-attention; a cross-attention's text stays whole
        key, value = constrain(key, tokens), constrain(value, tokens)
    return constrain(_attend(query, key, value, **run), tokens)


def _attend(query, key, value, *, choose, platform, mesh, attn_mask, is_causal, scale, key_lengths=None,
            min_key_len=0, pattern=None):
    import jax
    import jax.numpy as jnp

    if attn_mask is not None or is_causal:
        choice = "xla"
    else:
        choice = choose(query.shape, key.shape, planned=mesh is not None)
    blocks = None
    if choice == "splash" and pattern is not None:
        from .. import splash_attention as splash

        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        blocks = sparse_block_sizes(splash, pattern, splash.block_sizes_for(getattr(device, "device_kind", None)))
        if blocks is None:  # frames under a lane: no tile fits the kernel; XLA takes the whole mask
            choice = "xla"
    if choice == "splash":
        from .. import splash_attention as splash

        return splash.splash_attention(query, key, value, mesh=mesh, scale=scale, kv_lengths=key_lengths,
                                       min_kv_len=min_key_len, sparsity=pattern, block_sizes=blocks)
    if pattern is not None:  # XLA's attention takes the sparse mask whole: the same numbers, none of the saving
        attn_mask = jnp.asarray(whole_token_mask(pattern, platform))[None, None]
    # A CPU measure only: TPU and GPU programs keep XLA's own attention, which their compilers fuse.
    if (choice == "xla" and platform == "cpu" and attn_mask is None and not is_causal
            and score_bytes(query.shape, key.shape) > XLA_SCORE_BLOCK_BYTES):
        return query_chunked_attention(query, key, value, scale=scale, key_lengths=key_lengths)
    if key_lengths is not None:  # [B, 1, 1, Skv]: broadcast over heads and queries, never materialised whole
        attn_mask = (jnp.arange(key.shape[2])[None, :] < key_lengths[:, None])[:, None, None, :]
    # jax.nn.dot_product_attention takes [B, S, H, D].
    # Its bias/mask layout [B, H, Sq, Skv] is torch's.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    if attn_mask is not None and attn_mask.dtype != jnp.bool_:
        bias, mask = attn_mask.astype(q.dtype), None
    else:
        bias, mask = None, attn_mask
    implementation = None if choice == "cudnn" else "xla"
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation=implementation
    )
    return jnp.swapaxes(out, 1, 2)


def score_bytes(query_shape, key_shape) -> int:
    """The bytes of the fp32 [B, H, Sq, Skv] scores XLA attention materialises."""
    batch, heads, q_len, _ = query_shape
    return batch * heads * q_len * key_shape[2] * 4


def query_chunked_attention(query, key, value, *, scale=None, key_lengths=None):
    """softmax(Q K^T * scale) V over query chunks, in torch SDPA layout [B, H, S, D].

    Each chunk's scores stay under ``XLA_SCORE_BLOCK_BYTES``; softmax is per
    query row, so chunking changes memory traffic, not the result. ``key_lengths`` [B]: only each
    row's first keys count.
    """
    import jax
    import jax.numpy as jnp

    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    chunk = max(8, XLA_SCORE_BLOCK_BYTES // (batch * heads * kv_len * 4) // 8 * 8)
    chunks = -(-q_len // chunk)
    padded = jnp.pad(query, ((0, 0), (0, 0), (0, chunks * chunk - q_len), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(batch, heads, chunks, chunk, head_dim), 2, 0)  # [n, B, H, chunk, D]

    def attend(block):  # [B, H, chunk, D] -> [B, H, chunk, Dv]
        scores = jnp.einsum("bhqd,bhkd->bhqk", block, key, preferred_element_type=jnp.float32) * scale
        if key_lengths is not None:
            valid = jnp.arange(kv_len)[None, :] < key_lengths[:, None]
            scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, value, preferred_element_type=jnp.float32).astype(query.dtype)

    out = jax.lax.map(attend, blocks)  # [n, B, H, chunk, Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, chunks * chunk, value.shape[-1])
    return out[:, :, :q_len]


def register_sdpa_override(env, dispatcher) -> None:
    """Route torch's scaled_dot_product_attention, in torchax ``env``, to ``dispatcher.attention``
    (looked up at each call), which takes jax arrays."""
    import torch
    from torchax import interop

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # Inference only: dropout is never active in the models run here.
        if enable_gqa and key.shape[1] != query.shape[1]:
            repeat = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        return interop.call_jax(
            lambda q, k, v, m: dispatcher.attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale),
            query, key, value, attn_mask,
        )

    env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
    env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, sdpa)
