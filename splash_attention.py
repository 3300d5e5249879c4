"""Splash attention: a Pallas flash-attention kernel for TPU, sharded over the (dp, tp) mesh.

``splash_attention(query, key, value, mesh=...)`` takes and returns torch SDPA
layout ``[batch, heads, seq, head_dim]`` (no mask, not causal: Wan's attention).
``TorchaxEnvManager.attention`` calls it for long self-attention on TPU; this
module imports jax at the top and is only ever imported lazily from there.

The kernel (``_flash_kernel``) keeps the tricks of the v6e-tuned original:

- the query is pre-scaled by ``scale * log2(e)``, so the kernel uses ``exp2``;
- K-smoothing: the key mean over the sequence is subtracted first. Every score
  of a query row moves by the same ``q . mean(k)``, so softmax is unchanged
  and the scores stay small;
- fp32 denominator ``l`` and output accumulator in VMEM scratch, in a
  transposed layout (scores are ``[kv, q]``, so the per-query statistics are
  lane vectors).

and adds a fixed softmax bound (``FIXED_BOUND_RECENTER``): where K-smoothing and
Cauchy-Schwarz prove it safe, a query row's reference max is fixed before the
first key, so there is no running max and nothing to rescale, which on v6e is
most of the vector work (the cycle model: 0.45 -> 0.69 of a matmul's rate).
Other (head, query block)s run the online softmax. Block sizes are per chip
(``block_sizes_for``): 3328 queries, 2560 keys, consumed 512 at a time on v6e.

Unlike the original, keys added to pad the sequence to a block multiple are
masked out of the softmax (the original let those zero keys into the
denominator). Block sizes change speed, never numbers.

A block-sparse path (``sparsity=``, e.g. Radial attention's mask from
``models/wan/radial.py``) visits only the (query block, key block) tiles the
static mask attends and masks the rest of a partial tile element by element.

Off TPU the kernel runs in Pallas interpret mode (slow, exact; for tests).
``force_interpret(False)`` lowers the real Mosaic kernel anywhere, e.g. to
export a TPU program from a CPU machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger("wan_tpu")

LOG2_E = math.log2(math.e)
NUM_LANES = 128  # TPU vreg lanes: the last dim of a block is a multiple of this (or the whole dim)
NUM_SUBLANES = 8
# Finite, so masked - masked is 0, never NaN; exp2 of (this - any real score) is 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MESH_AXES = ("dp", "tp")

_NT_DIMS = (((1,), (1,)), ((), ()))  # k [kv, d] . q [q, d]^T -> [kv, q]
_TN_DIMS = (((0,), (0,)), ((), ()))  # v [kv, dv]^T . p [kv, q] -> [dv, q]


# ------------------------------------------------------------------ block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Kernel tile sizes, in tokens. Defaults: v6e's, chosen with libtpu's cycle model.

    ``block_q`` queries and ``block_kv`` keys are resident in VMEM per grid
    step; the keys are consumed ``block_kv_compute`` at a time (bounds the
    ``[block_kv_compute, block_q]`` fp32 score tile). Short sequences clamp
    them (``effective_block_sizes``). ``block_sizes_for`` gives each chip's.
    """

    block_q: int = 3328
    block_kv: int = 2560
    block_kv_compute: int = 512

    def __post_init__(self):
        block_q, block_kv, block_kv_compute = self.block_q, self.block_kv, self.block_kv_compute
        for name, value in (("block_q", block_q), ("block_kv", block_kv), ("block_kv_compute", block_kv_compute)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < NUM_LANES:
                raise ValueError(f"{name}={value!r}: block sizes are whole numbers of at least {NUM_LANES} tokens")
            if value % NUM_LANES:
                raise ValueError(
                    f"{name}={value}: block sizes must be multiples of {NUM_LANES} (the TPU lane width), "
                    f"e.g. {name}={max(NUM_LANES, value // NUM_LANES * NUM_LANES)}"
                )
        if block_kv % block_kv_compute:
            suggestion = block_kv // block_kv_compute * block_kv_compute or block_kv_compute
            raise ValueError(
                f"{block_kv=} is not a multiple of {block_kv_compute=}: the kernel consumes each key block "
                f"in whole compute chunks; use e.g. block_kv={suggestion}"
            )


def _load_chips():
    """``runtime/chips.py``: through the pack, or by path where this file is loaded alone (the benchmarks
    load it by path; chips.py imports only the standard library)."""
    try:
        from .runtime import chips
    except ImportError:  # no parent package
        import importlib.util
        import os
        import sys

        name = "wan_tpu_runtime_chips"
        if name not in sys.modules:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime", "chips.py")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up while the class is built
            spec.loader.exec_module(module)
        chips = sys.modules[name]
    return chips


# Per chip (``runtime.chips``, keyed by jax's device_kind), from benchmarks/tpu_cycles.py. v5e and v5p
# (128x128 MXUs) keep the original's 256-key compute chunk: 512 costs their online softmax 5% (0.81 vs
# 0.85 of a matmul's rate).
_chips = _load_chips()
CHIP_BLOCK_SIZES = {
    _chips.V6E.device_kind: BlockSizes(),
    _chips.V5E.device_kind: BlockSizes(block_q=3328, block_kv=2560, block_kv_compute=256),
    _chips.V5P.device_kind: BlockSizes(block_q=3328, block_kv=2560, block_kv_compute=256),
}


def block_sizes_for(device_kind: str | None) -> BlockSizes:
    """The block sizes for a chip (``device.device_kind``); the v6e defaults for any other."""
    return CHIP_BLOCK_SIZES.get(device_kind or "", BlockSizes())


class EffectiveBlocks(NamedTuple):
    """Block sizes after clamping to one call's sequence lengths."""

    block_q: int
    block_kv: int
    block_kv_compute: int


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _alignment(length: int) -> int:
    # 128 lanes for real sequences; a tiny one (tests) rounds to 8 sublanes
    # instead of being padded 10x. Either way a clamped block is the whole
    # padded sequence, which TPU accepts whatever its size.
    return NUM_LANES if length >= NUM_LANES else NUM_SUBLANES


def _balanced_block(length: int, largest: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that covers ``length`` in as few blocks as ``largest`` would.

    The sequence is padded to a whole number of blocks; equal blocks just over length / count pad least.
    At 848x480 (33,390 tokens) the queries pad to 33,792 in blocks of 3072 instead of 36,608 in 3328."""
    count = -(-length // largest)
    return min(largest, _round_up(-(-length // count), multiple))


def effective_block_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> EffectiveBlocks:
    """Block sizes for one call: no larger than ``block_sizes`` (the VMEM budget), balanced so the padded
    sequence is as short as that allows, whole (8-aligned) for short sequences; block_kv stays a multiple
    of block_kv_compute."""
    block_q = _balanced_block(q_len, block_sizes.block_q, _alignment(q_len))
    block_kv_compute = min(block_sizes.block_kv_compute, _round_up(kv_len, _alignment(kv_len)))
    # Both operands of min are multiples of block_kv_compute (BlockSizes checks block_kv).
    block_kv = _balanced_block(kv_len, block_sizes.block_kv, block_kv_compute)
    return EffectiveBlocks(block_q, block_kv, block_kv_compute)


# ------------------------------------------------------------------ interpret mode
_FORCED_INTERPRET: contextvars.ContextVar = contextvars.ContextVar("wan_tpu_splash_interpret", default=None)


@contextlib.contextmanager
def force_interpret(interpret: bool):
    """Within this block, ``interpret=None`` means ``interpret``.

    ``force_interpret(False)`` lowers the Mosaic TPU kernel on any machine
    (``jax.export`` for TPU from a CPU host). It acts when a function is
    traced: a jitted function already traced keeps its kernel.
    """
    token = _FORCED_INTERPRET.set(bool(interpret))
    try:
        yield
    finally:
        _FORCED_INTERPRET.reset(token)


def resolve_interpret(interpret: bool | None = None) -> bool:
    """The argument if given, else ``force_interpret``'s value, else "not on TPU"."""
    if interpret is not None:
        return bool(interpret)
    forced = _FORCED_INTERPRET.get()
    if forced is not None:
        return forced
    return jax.default_backend() != "tpu"


# ------------------------------------------------------------------ kernel
# The fixed softmax bound. K-smoothing makes every query row's largest score >= 0 (the scores' mean over
# the real keys is q . mean(k - mean(k)) = 0), and Cauchy-Schwarz bounds it above by
# b_i = |q_i| * max_j |k_j|. So with the row's reference m_i = ceil(b_i) - FIXED_BOUND_RECENTER instead of
# the running max, every weight exp2(s - m_i) is at most 2^(RECENTER + 1) (no overflow in fp32 or bf16)
# and the largest is at least 2^(RECENTER - ceil(b_i)), a normal fp32 number while b_i <= FIXED_BOUND_GATE.
# That is the same softmax, exact, with no running max and no rescaling of what came before. A (head,
# query block) whose bound exceeds the gate runs the online softmax instead (decided per grid step).
FIXED_BOUND_RECENTER = 88.0
FIXED_BOUND_GATE = 200.0  # 213 would still be normal (88 - 213 > -126); the rest is rounding margin
# Under a sparse mask a row's largest attended score is no longer >= 0, only >= -b_i (Cauchy-Schwarz), so
# its largest weight is at least 2^(RECENTER - ceil(b_i) - b_i): normal while b_i <= 106.
SPARSE_FIXED_BOUND_GATE = 100.0


def _online_chunk(s, v, m_ref, l_ref, acc_ref, block_q: int):
    """One chunk of online softmax: running max, rescale of the denominator and the accumulator."""
    m_prev = m_ref[0:1, :]  # [1, block_q]
    l_prev = l_ref[0:1, :]  # [1, block_q]
    m_next = jnp.maximum(m_prev, s.max(axis=0, keepdims=True))
    p = jnp.exp2(s - m_next)  # [block_kv_compute, block_q]
    alpha = jnp.exp2(m_prev - m_next)  # [1, block_q] rescales what came before
    l_next = alpha * l_prev + p.sum(axis=0, keepdims=True)
    m_ref[...] = jnp.broadcast_to(m_next, (NUM_SUBLANES, block_q))
    l_ref[...] = jnp.broadcast_to(l_next, (NUM_SUBLANES, block_q))
    # P in the value dtype (bf16 on the MXU for bf16 models), accumulated in fp32.
    pv = lax.dot_general(v, p.astype(v.dtype), _TN_DIMS, preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha + pv  # [head_dim_v, block_q]


def _fixed_chunk(s, v, m_ref, l_ref, acc_ref, block_q: int):
    """One chunk against the fixed bound in ``m_ref``: no max, no rescale; only sums."""
    p = jnp.exp2(s - m_ref[0:1, :])  # [block_kv_compute, block_q], each <= 2^(RECENTER + 1)
    l_ref[0:1, :] += p.sum(axis=0, keepdims=True)
    acc_ref[...] += lax.dot_general(v, p.astype(v.dtype), _TN_DIMS, preferred_element_type=jnp.float32)


def _per_softmax_path(body, paths: tuple[str, ...], fixed):
    """``body(update)`` with the fixed-bound update where ``fixed`` (a scalar), else the online one; one path
    alone is compiled unconditionally, so the cycle model can price it."""
    if paths == ("fixed",):
        body(_fixed_chunk)
    elif paths == ("online",):
        body(_online_chunk)
    else:
        pl.when(fixed)(lambda: body(_fixed_chunk))
        pl.when(jnp.logical_not(fixed))(lambda: body(_online_chunk))


def _flash_kernel(
    fixed_ref,  # [heads, num_q_blocks] int32 in SMEM: 1 where the block runs against the fixed bound
    q_ref,  # [block_q, head_dim]           query tile, pre-scaled by scale * log2(e)
    k_ref,  # [block_kv, head_dim]          key tile, mean-subtracted
    v_ref,  # [block_kv, head_dim_v]        value tile
    m0_ref,  # [1, block_q] fp32            the fixed bound m_i, or MASK_VALUE for online blocks
    o_ref,  # [head_dim_v, block_q]         output tile, transposed (queries on lanes)
    m_ref,  # [8, block_q] fp32 scratch     reference max (log2 units), same on every sublane
    l_ref,  # [8, block_q] fp32 scratch     softmax denominator (row 0 is the fixed path's)
    acc_ref,  # [head_dim_v, block_q] fp32 scratch   unnormalised output
    *,
    kv_len: int,
    num_kv_blocks: int,
    block_kv: int,
    block_kv_compute: int,
    paths: tuple[str, ...],
    row_length=None,
    length_from: int | None = None,
):
    kv_index = pl.program_id(2)
    block_q = q_ref.shape[0]
    fixed = fixed_ref[pl.program_id(0), pl.program_id(1)] == 1

    @pl.when(kv_index == 0)
    def _init():
        m_ref[...] = jnp.broadcast_to(m0_ref[...], m_ref.shape)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # Real keys in the last kv block; padding is only ever at the end of it.
    tail = kv_len - (num_kv_blocks - 1) * block_kv

    def chunks(update):
        q = q_ref[...]  # [block_q, head_dim]
        for chunk in range(block_kv // block_kv_compute):
            start = chunk * block_kv_compute

            def step(start=start, masked=start < tail < start + block_kv_compute):
                k = k_ref[pl.ds(start, block_kv_compute), :]  # [block_kv_compute, head_dim]
                v = v_ref[pl.ds(start, block_kv_compute), :]  # [block_kv_compute, head_dim_v]
                s = lax.dot_general(k, q, _NT_DIMS, preferred_element_type=jnp.float32)  # [block_kv_compute, block_q]
                if masked:  # the chunk holding the last real key: padded keys get no weight
                    position = kv_index * block_kv + start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                    s = jnp.where(position < kv_len, s, MASK_VALUE)
                if row_length is None:
                    update(s, v, m_ref, l_ref, acc_ref, block_q)
                    return

                def with_length_mask():  # keys from row_length on (this row's invalid ones) get no weight
                    position = kv_index * block_kv + start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                    update(jnp.where(position < row_length, s, MASK_VALUE), v, m_ref, l_ref, acc_ref, block_q)

                # Keys before length_from are valid in every row: only chunks reaching past it are masked.
                reaches = kv_index * block_kv + start + block_kv_compute > length_from
                pl.when(reaches)(with_length_mask)
                pl.when(jnp.logical_not(reaches))(lambda: update(s, v, m_ref, l_ref, acc_ref, block_q))

            if start >= tail:
                # Wholly padding in the last kv block, where it is skipped rather
                # than masked; in every other block these keys are real.
                pl.when(kv_index < num_kv_blocks - 1)(step)
            else:
                step()

    # One branch per grid step, never per chunk: each side is a straight run of chunks.
    _per_softmax_path(chunks, paths, fixed)

    @pl.when(kv_index == num_kv_blocks - 1)
    def _finish():
        # l > 0: every query row has a real key scoring its max, whose weight is exp2(0) = 1 online and
        # at least 2^(RECENTER - GATE) against the fixed bound.
        inverse = 1.0 / l_ref[0:1, :]  # [1, block_q]
        o_ref[...] = (acc_ref[...] * inverse).astype(o_ref.dtype)


def fixed_bounds(q, k, block_q: int, lengths=None, gate: float = FIXED_BOUND_GATE):
    """Per query row, the fixed softmax reference; per (head, query block), whether it is safe.

    q: [heads, q_pad, head_dim] pre-scaled, k: [heads, kv_pad, head_dim] mean-subtracted (padding zero).
    ``lengths`` [heads] (optional): each row's valid keys; the bound is taken over those alone.
    ``gate``: the largest bound run against the fixed reference (``SPARSE_FIXED_BOUND_GATE`` under a mask).
    Returns (m0 [heads, 1, q_pad] fp32: ceil(|q_i| max_j |k_j|) - RECENTER where the block is safe, else
    MASK_VALUE, which starts the online softmax; fixed [heads, q_pad // block_q] int32).
    """
    heads, q_pad, _ = q.shape
    q_norm = jnp.sqrt(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1))  # [heads, q_pad]
    k_square = jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1)  # [heads, kv_pad]
    if lengths is not None:
        k_square = jnp.where(jnp.arange(k.shape[1])[None, :] < lengths[:, None], k_square, 0.0)
    k_norm = jnp.sqrt(jnp.max(k_square, axis=-1))  # [heads]
    bound = q_norm * k_norm[:, None]
    safe = jnp.all((bound <= gate).reshape(heads, q_pad // block_q, block_q), axis=-1)
    m0 = jnp.where(jnp.repeat(safe, block_q, axis=1), jnp.ceil(bound) - FIXED_BOUND_RECENTER, MASK_VALUE)
    return m0[:, None, :], safe.astype(jnp.int32)


KERNEL_PATHS = ("fixed", "online")


def softmax_start(q, k, block_q: int, paths: tuple[str, ...], lengths=None, gate: float = FIXED_BOUND_GATE):
    """``fixed_bounds``, or with the online path alone (no bound to compute) every block starting online."""
    if tuple(paths) == ("online",):
        heads, q_pad, _ = q.shape
        return (jnp.full((heads, 1, q_pad), MASK_VALUE, jnp.float32),
                jnp.zeros((heads, q_pad // block_q), jnp.int32))
    return fixed_bounds(q, k, block_q, lengths, gate=gate)
# Mosaic's default scoped VMEM limit is 16 MiB on v5e; its blocks need 16.7 MiB (scores, double-buffered
# tiles, scratch). 32 MiB is twice that and half of v5p's 64 MiB (the rest is left to XLA's fusions).
VMEM_LIMIT_BYTES = 32 * 2**20


def flash_attention(q, k, v, *, kv_len: int, blocks: EffectiveBlocks, interpret: bool,
                     paths: tuple[str, ...] = KERNEL_PATHS, lengths=None, length_from: int = 0):
    """The Pallas call on padded, head-flattened arrays.

    q: [heads, q_pad, head_dim]   pre-scaled by scale * log2(e); q_pad a multiple of block_q
    k: [heads, kv_pad, head_dim]  mean-subtracted; kv_pad a multiple of block_kv
    v: [heads, kv_pad, head_dim_v]
    paths: the bodies compiled. Both (the default) picks per (head, query block) at run time; one alone
    lets the cycle model see that side (it cannot tell a runtime branch's sides apart). ("online",) is
    exact everywhere; ("fixed",) only where ``fixed_bounds`` says safe, so it is for measuring only.
    lengths: [heads] int32 (optional): each row's valid keys are its first ``lengths[h]`` (at least
    ``length_from``, a static floor: only chunks past it pay for the mask). None: every real key counts.
    returns [heads, head_dim_v, q_pad]
    """
    heads, q_pad, head_dim = q.shape
    kv_pad, head_dim_v = v.shape[1], v.shape[2]
    block_q, block_kv, block_kv_compute = blocks
    num_kv_blocks = kv_pad // block_kv
    if tuple(paths) not in (KERNEL_PATHS, ("fixed",), ("online",)):
        raise ValueError(f"paths={paths!r}: give {KERNEL_PATHS}, ('fixed',) or ('online',)")
    m0, fixed = softmax_start(q, k, block_q, paths, lengths=lengths)
    kernel = functools.partial(
        _flash_kernel, kv_len=kv_len, num_kv_blocks=num_kv_blocks, block_kv=block_kv,
        block_kv_compute=block_kv_compute, paths=tuple(paths),
    )
    prefetched = (fixed,)
    if lengths is not None:  # a second scalar prefetch: the row's length, read by the kernel per grid step
        kernel = functools.partial(_with_row_length, kernel=kernel, length_from=int(length_from))
        prefetched = (fixed, lengths.astype(jnp.int32))
    # Keys and values are read once per query block.
    elements = 2 * q_pad * head_dim_v + (q_pad // block_q) * kv_pad * (head_dim + head_dim_v)
    cost = pl.CostEstimate(
        flops=2 * heads * q_pad * kv_pad * (head_dim + head_dim_v),
        transcendentals=heads * q_pad * kv_pad,
        bytes_accessed=q.dtype.itemsize * heads * elements,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetched),
            grid=(heads, q_pad // block_q, num_kv_blocks),  # kv innermost: the reduction axis
            in_specs=[
                pl.BlockSpec((None, block_q, head_dim), lambda h, i, j, *_: (h, i, 0)),
                pl.BlockSpec((None, block_kv, head_dim), lambda h, i, j, *_: (h, j, 0)),
                pl.BlockSpec((None, block_kv, head_dim_v), lambda h, i, j, *_: (h, j, 0)),
                pl.BlockSpec((None, 1, block_q), lambda h, i, j, *_: (h, 0, i)),
            ],
            out_specs=pl.BlockSpec((None, head_dim_v, block_q), lambda h, i, j, *_: (h, 0, i)),
            scratch_shapes=[
                pltpu.VMEM((NUM_SUBLANES, block_q), jnp.float32),
                pltpu.VMEM((NUM_SUBLANES, block_q), jnp.float32),
                pltpu.VMEM((head_dim_v, block_q), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((heads, head_dim_v, q_pad), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
        interpret=interpret,
        name="wan_splash_attention",
    )(*prefetched, q, k, v, m0)


def _with_row_length(fixed_ref, lengths_ref, *refs, kernel, length_from: int):
    kernel(fixed_ref, *refs, row_length=lengths_ref[pl.program_id(0)], length_from=length_from)


# ------------------------------------------------------------------ block-sparse path
# A static mask whose tokens are frames of ``tokens_per_frame`` and whose pairs are a band of the spatial
# index per frame pair: key p attends query q iff |l_q - l_k| <= windows[f_q, f_k] (f = p // tokens_per_frame,
# l = p % tokens_per_frame; a negative window: none). Radial attention (``models/wan/radial.py``) is one.
# The grid visits only the (query block, key block) tiles holding an attended pair, as one flat list per
# head, so a skipped tile costs neither a grid step nor a DMA; a tile that is not whole gets the element
# mask. A sparsity object gives ``num_tokens``, ``tokens_per_frame``, ``windows`` [F, F] and
# ``block_mask(block_q, block_kv)`` -> (active, full) [q blocks, kv blocks] bool.
_ID_BITS = 12  # a step packs its query block, its key block and three flags into one int32 (SMEM is small)
_ID_MASK = (1 << _ID_BITS) - 1
_FIRST_BIT, _LAST_BIT, _PARTIAL_BIT, _ONE_KV_FRAME_BIT = (2 * _ID_BITS + i for i in range(4))
# Tiles the mask keeps whole; partial tiles whose keys lie in one frame (the band mask: 3 vector ops per
# score, the query side folded into row vectors); and the other partial tiles (the general element mask).
TILE_KINDS = ("whole", "band", "partial")


class SparseLayout(NamedTuple):
    """The host-side (numpy) schedule of the block-sparse kernel for one shape and block size."""

    steps: object  # [steps] int32: q block | kv block << 12 | first, last, partial, one-kv-frame flags, bits 24-27
    q_frames: object  # [3 * q blocks] int32: per block its first frame, that token's spatial index, and
    kv_frames: object  # [3 * kv blocks]    the local index where the next frame starts (block size if none)
    windows: object  # [(F + 1)^2] int32: frame-pair windows; frame F is padding (queries: all, keys: none)
    num_frames: int
    whole: bool  # every visited tile is whole and every tile visited: the dense kernel's numbers
    active_share: float


def _frame_descriptors(num_blocks: int, block: int, per_frame: int):
    start = np.arange(num_blocks) * block
    first_frame, offset = start // per_frame, start % per_frame
    split = np.minimum(block, per_frame - offset)
    return np.stack([first_frame, offset, split], axis=1).reshape(-1).astype(np.int32)


@functools.lru_cache(maxsize=32)
def sparse_layout(sparsity, block_q: int, block_kv: int) -> SparseLayout:
    """The visits of ``sparsity``'s active tiles, query block by query block, keys ascending."""
    per_frame, windows = int(sparsity.tokens_per_frame), np.asarray(sparsity.windows, np.int32)
    if block_q > per_frame or block_kv > per_frame:
        raise ValueError(
            f"blocks of {block_q} queries and {block_kv} keys: the sparse kernel's blocks hold at most two "
            f"frames, so they must not exceed a frame's {per_frame} tokens; pass smaller block_sizes"
        )
    active, full = (np.asarray(x, bool) for x in sparsity.block_mask(block_q, block_kv))
    num_q_blocks, num_kv_blocks = active.shape
    if max(num_q_blocks, num_kv_blocks) > _ID_MASK + 1:
        raise ValueError(f"{num_q_blocks} x {num_kv_blocks} blocks: at most {_ID_MASK + 1} per axis; use larger blocks")
    if not active.any(axis=1).all():
        raise ValueError("a query block attends no key: every query needs at least one attended key")
    q_ids, kv_ids = np.nonzero(active)  # row-major: each query block's keys ascending, contiguous
    first = np.r_[True, q_ids[1:] != q_ids[:-1]]
    last = np.r_[q_ids[1:] != q_ids[:-1], True]
    partial = ~full[q_ids, kv_ids]
    kv_frames = _frame_descriptors(num_kv_blocks, block_kv, per_frame)
    one_kv_frame = (kv_frames.reshape(-1, 3)[:, 2] == block_kv)[kv_ids]  # no frame starts inside the key block
    steps = (q_ids | kv_ids << _ID_BITS | first << _FIRST_BIT | last << _LAST_BIT
             | partial << _PARTIAL_BIT | one_kv_frame << _ONE_KV_FRAME_BIT).astype(np.int32)
    frames = windows.shape[0]
    padded = np.full((frames + 1, frames + 1), -1, np.int32)
    padded[:frames, :frames] = windows
    padded[frames, :frames] = per_frame  # padded query rows (dropped) attend whatever is visited: l > 0
    return SparseLayout(
        steps, _frame_descriptors(num_q_blocks, block_q, per_frame), kv_frames, padded.reshape(-1), frames,
        bool(full.all()), float(active.mean()),
    )


def _frame_band(start, block_q: int, block_kv_compute: int, q_desc, kv_desc, window):
    """[block_kv_compute, block_q] bool: the pairs the mask attends among this chunk's keys (from ``start``
    in the key block) and the query block. Each block holds frames f0 and f0 + 1: a pair's window is one
    of four, picked by which side of each block's frame boundary its tokens fall."""
    (q_offset, q_split), (kv_offset, kv_split) = q_desc, kv_desc
    q_local = lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
    q_next = q_local >= q_split
    q_spatial = jnp.where(q_next, q_local - q_split, q_local + q_offset)  # [1, block_q]
    kv_local = start + lax.broadcasted_iota(jnp.int32, (block_kv_compute, 1), 0)
    kv_next = kv_local >= kv_split
    kv_spatial = jnp.where(kv_next, kv_local - kv_split, kv_local + kv_offset)  # [block_kv_compute, 1]
    from_first_q = jnp.where(kv_next, window[0][1], window[0][0])  # [block_kv_compute, 1]
    from_next_q = jnp.where(kv_next, window[1][1], window[1][0])
    limit = jnp.where(q_next, from_next_q, from_first_q)  # [block_kv_compute, block_q]
    return jnp.abs(q_spatial - kv_spatial) <= limit


def _one_frame_band(s, start, block_q: int, q_desc, kv_offset, window):
    """``s`` [block_kv_compute, block_q] with the pairs outside the band masked, where every key of the
    tile is in one frame (spatial index kv_offset + local). |l_q - l_k| <= w is, unsigned,
    (l_q + w - l_k) <= 2w: the query side (l_q + w, 2w; frame f0 or f0 + 1) is two row vectors, so per
    score it is a subtraction, a comparison and the select. A window < 0 (no keys) gets a row of -1,
    which no key index reaches."""
    q_offset, q_split = q_desc
    q_local = lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
    q_next = q_local >= q_split
    q_spatial = jnp.where(q_next, q_local - q_split, q_local + q_offset)  # [1, block_q]
    w = jnp.where(q_next, window[1], window[0])  # [1, block_q]
    reach = jnp.where(w >= 0, q_spatial + w - kv_offset - start, -1)  # [1, block_q]
    width = lax.bitcast_convert_type(2 * jnp.maximum(w, 0), jnp.uint32)
    kv_local = lax.broadcasted_iota(jnp.int32, s.shape, 0)
    inside = lax.bitcast_convert_type(reach - kv_local, jnp.uint32) <= width
    return jnp.where(inside, s, MASK_VALUE)


def _sparse_flash_kernel(
    fixed_ref,  # [heads, num_q_blocks] int32 SMEM: 1 where the block runs against the fixed bound
    steps_ref,  # [steps] int32 SMEM: packed (q block, kv block, first, last, partial)
    q_frames_ref,  # [3 * num_q_blocks] int32 SMEM
    kv_frames_ref,  # [3 * num_kv_blocks] int32 SMEM
    windows_ref,  # [(F + 1)^2] int32 SMEM
    q_ref, k_ref, v_ref, m0_ref, o_ref, m_ref, l_ref, acc_ref,  # as in _flash_kernel
    *,
    kv_len: int,
    num_kv_blocks: int,
    block_kv: int,
    block_kv_compute: int,
    paths: tuple[str, ...],
    num_frames: int,
    tiles: tuple[str, ...] = TILE_KINDS,
    lse_ref=None,
):
    code = steps_ref[pl.program_id(1)]
    q_block = code & _ID_MASK
    kv_block = (code >> _ID_BITS) & _ID_MASK
    first = ((code >> _FIRST_BIT) & 1) == 1
    last = ((code >> _LAST_BIT) & 1) == 1
    partial = ((code >> _PARTIAL_BIT) & 1) == 1
    one_kv_frame = ((code >> _ONE_KV_FRAME_BIT) & 1) == 1
    block_q = q_ref.shape[0]
    fixed = fixed_ref[pl.program_id(0), q_block] == 1

    @pl.when(first)
    def _init():
        m_ref[...] = jnp.broadcast_to(m0_ref[...], m_ref.shape)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    tail = kv_len - (num_kv_blocks - 1) * block_kv

    def band_inputs():
        q_frame, kv_frame = q_frames_ref[3 * q_block], kv_frames_ref[3 * kv_block]
        stride = num_frames + 1
        window = [[windows_ref[(q_frame + dq) * stride + kv_frame + dk] for dk in (0, 1)] for dq in (0, 1)]
        q_desc = (q_frames_ref[3 * q_block + 1], q_frames_ref[3 * q_block + 2])
        kv_desc = (kv_frames_ref[3 * kv_block + 1], kv_frames_ref[3 * kv_block + 2])
        return q_desc, kv_desc, window

    def chunks(update, mask: str):
        q = q_ref[...]  # [block_q, head_dim]
        band = band_inputs() if mask != "whole" else None
        for chunk in range(block_kv // block_kv_compute):
            start = chunk * block_kv_compute

            def step(start=start, masked=start < tail < start + block_kv_compute):
                k = k_ref[pl.ds(start, block_kv_compute), :]
                v = v_ref[pl.ds(start, block_kv_compute), :]
                s = lax.dot_general(k, q, _NT_DIMS, preferred_element_type=jnp.float32)
                if masked:  # the chunk holding the last real key: padded keys get no weight
                    position = kv_block * block_kv + start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                    s = jnp.where(position < kv_len, s, MASK_VALUE)
                if mask == "band":  # the key block is in frame kv_frame: windows from it to f0, f0 + 1
                    q_desc, kv_desc, window = band
                    s = _one_frame_band(s, start, block_q, q_desc, kv_desc[0], (window[0][0], window[1][0]))
                elif mask == "partial":
                    s = jnp.where(_frame_band(start, block_q, block_kv_compute, *band), s, MASK_VALUE)
                update(s, v, m_ref, l_ref, acc_ref, block_q)

            if start >= tail:  # wholly padding in the last kv block
                pl.when(kv_block < num_kv_blocks - 1)(step)
            else:
                step()

    # One branch per grid step: the softmax path, and whether the tile needs the element mask. A body
    # compiled alone (one path, one tile kind) runs unconditionally, so the cycle model can price it.
    for path, update in (("fixed", _fixed_chunk), ("online", _online_chunk)):
        if path not in paths:
            continue
        on_path = True if len(paths) == 1 else fixed if path == "fixed" else jnp.logical_not(fixed)
        kinds = {"whole": ~partial, "band": partial & one_kv_frame, "partial": partial & ~one_kv_frame}
        if "band" not in tiles:  # the general mask takes every partial tile
            kinds["partial"] = partial
        for kind in TILE_KINDS:
            if kind not in tiles:
                continue
            taken = on_path if len(tiles) == 1 else jnp.logical_and(on_path, kinds[kind])
            body = functools.partial(chunks, update, kind)
            if taken is True:
                body()
            else:
                pl.when(taken)(body)

    @pl.when(last)
    def _finish():
        # l > 0: every query row attends a real key (Radial: its own frame and the first).
        inverse = 1.0 / l_ref[0:1, :]
        o_ref[...] = (acc_ref[...] * inverse).astype(o_ref.dtype)
        if lse_ref is not None:  # the softmax's log2-sum-exp2, to merge with another key set's
            lse_ref[...] = m_ref[0:1, :] + jnp.log2(l_ref[0:1, :])


def _with_lse_output(*refs, kernel, prefetched: int):
    # (prefetched..., q, k, v, m0, o, lse, m, l, acc) -> the kernel's order, lse by keyword
    inputs, (o_ref, lse_ref, *scratch) = refs[:prefetched + 4], refs[prefetched + 4:]
    kernel(*inputs, o_ref, *scratch, lse_ref=lse_ref)


def sparse_flash_attention(q, k, v, *, kv_len: int, blocks: EffectiveBlocks, layout: SparseLayout,
                           interpret: bool, paths: tuple[str, ...] = KERNEL_PATHS,
                           tiles: tuple[str, ...] = TILE_KINDS, with_lse: bool = False):
    """``flash_attention`` visiting only ``layout``'s tiles (same arrays in and out, no key lengths).

    tiles: the tile bodies compiled, as ``paths`` are: all (the default) picks per tile from the layout;
    ("partial",) masks every tile with the general mask (exact everywhere, slower); ("band",) with the
    one-frame band mask (exact only where every key block is in one frame); ("whole",) masks none (exact
    only where the layout is whole): one alone is for the cycle model; ("whole", "partial") leaves the
    band mask out. ``with_lse``: also each row's log2-sum-exp2 [heads, 1, q_pad] fp32, and the output in
    fp32 (the frame-banded path merges two calls by it); every query block must then have a step."""
    heads, q_pad, head_dim = q.shape
    kv_pad, head_dim_v = v.shape[1], v.shape[2]
    block_q, block_kv, block_kv_compute = blocks
    num_kv_blocks = kv_pad // block_kv
    if tuple(paths) not in (KERNEL_PATHS, ("fixed",), ("online",)):
        raise ValueError(f"paths={paths!r}: give {KERNEL_PATHS}, ('fixed',) or ('online',)")
    if tuple(tiles) not in (TILE_KINDS, ("whole", "partial"), ("whole",), ("band",), ("partial",)):
        raise ValueError(f"tiles={tiles!r}: give {TILE_KINDS}, ('whole', 'partial') or one of them alone")
    if layout.q_frames.size != 3 * (q_pad // block_q) or layout.kv_frames.size != 3 * num_kv_blocks:
        raise ValueError(f"the sparse layout is for {layout.q_frames.size // 3} x {layout.kv_frames.size // 3} "
                         f"blocks, the arrays have {q_pad // block_q} x {num_kv_blocks}")
    # A whole layout is the dense softmax, whose fixed-bound argument holds as it is.
    m0, fixed = softmax_start(q, k, block_q, paths, gate=FIXED_BOUND_GATE if layout.whole else SPARSE_FIXED_BOUND_GATE)
    kernel = functools.partial(
        _sparse_flash_kernel, kv_len=kv_len, num_kv_blocks=num_kv_blocks, block_kv=block_kv,
        block_kv_compute=block_kv_compute, paths=tuple(paths), num_frames=layout.num_frames, tiles=tuple(tiles),
    )
    steps = layout.steps.size
    prefetched = (fixed, *(jnp.asarray(x, jnp.int32) for x in (layout.steps, layout.q_frames, layout.kv_frames,
                                                             layout.windows)))

    def q_of(t, steps_ref):
        return steps_ref[t] & _ID_MASK

    def kv_of(t, steps_ref):
        return (steps_ref[t] >> _ID_BITS) & _ID_MASK

    elements = 2 * q_pad * head_dim_v + steps * block_kv * (head_dim + head_dim_v)
    cost = pl.CostEstimate(
        flops=2 * heads * steps * block_q * block_kv * (head_dim + head_dim_v),
        transcendentals=heads * steps * block_q * block_kv,
        bytes_accessed=q.dtype.itemsize * heads * elements,
    )
    out_specs = pl.BlockSpec((None, head_dim_v, block_q), lambda h, t, f, s, *_: (h, 0, q_of(t, s)))
    out_shape = jax.ShapeDtypeStruct((heads, head_dim_v, q_pad), q.dtype)
    if with_lse:
        kernel = functools.partial(_with_lse_output, kernel=kernel, prefetched=len(prefetched))
        out_specs = [out_specs, pl.BlockSpec((None, 1, block_q), lambda h, t, f, s, *_: (h, 0, q_of(t, s)))]
        out_shape = (jax.ShapeDtypeStruct((heads, head_dim_v, q_pad), jnp.float32),
                     jax.ShapeDtypeStruct((heads, 1, q_pad), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetched),
            grid=(heads, steps),  # one step per visited tile; a query block's tiles are consecutive
            in_specs=[
                pl.BlockSpec((None, block_q, head_dim), lambda h, t, f, s, *_: (h, q_of(t, s), 0)),
                pl.BlockSpec((None, block_kv, head_dim), lambda h, t, f, s, *_: (h, kv_of(t, s), 0)),
                pl.BlockSpec((None, block_kv, head_dim_v), lambda h, t, f, s, *_: (h, kv_of(t, s), 0)),
                pl.BlockSpec((None, 1, block_q), lambda h, t, f, s, *_: (h, 0, q_of(t, s))),
            ],
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((NUM_SUBLANES, block_q), jnp.float32),
                pltpu.VMEM((NUM_SUBLANES, block_q), jnp.float32),
                pltpu.VMEM((head_dim_v, block_q), jnp.float32),
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
        interpret=interpret,
        name="wan_splash_attention_sparse",
    )(*prefetched, q, k, v, m0)


# ------------------------------------------------------------------ frame-banded sparse path
# The same masks (whole frame pairs, spatial bands, none) run as two kernels whose results merge by their
# log-sum-exps, so that neither pays for tiles the mask mostly skips:
# - whole frame pairs: the block-sparse kernel above on queries padded per frame, each key block one frame,
#   every visited tile whole (no mask), large query blocks;
# - banded pairs: queries and keys re-laid spatial-major. A key chunk holds ``band_chunk`` spatial
#   positions of every frame (frame after frame), and a query block the same ``band_q`` spatial positions
#   [a, a + band_q) of several query frames side by side on the lanes. Every key frame's band of every
#   one of those queries lies in [a - w_max, a + band_q + w_max): one contiguous run of chunks, a few
#   large DMAs, shared by the block's query frames. Each chunk's scores are masked key frame by key frame
#   with a per-lane window (one comparison and one select per score); whole pairs and pairs with no keys
#   have window -1 here.
# Stacking frames keeps the lanes many (the MXU's rate falls below about 512 of them) while the spatial
# range per block, and so the keys computed past each band, stays small.
class FrameBlocks(NamedTuple):
    """The frame-banded path's sizes: the band kernel's spatial positions per query frame in a block (a
    power of two, at least 128); the whole-frame kernel's query block and key chunk (keys per softmax
    update; a frame's key block is the frame); the band kernel's spatial positions per key chunk, and its
    most lanes (query frames x band_q) per block and most key rows per grid step (16384 x 128 bf16 keys and
    values, double-buffered, are 16 MiB of VMEM; under it, 720P at 81 frames takes 12096 rows, a block's
    keys are one step, shared by the next blocks of its spatial range)."""

    band_q: int = 128
    whole_q: int = 4096
    whole_kv_compute: int = 720
    band_chunk: int = 64
    band_lanes: int = 1024
    band_step_rows: int = 16384


# The whole-frame kernel's fp32 score tile, [whole_kv_compute, whole_q], stays under this (the dense
# kernel's 512 x 3328 is 6.5 MiB). At 720P, one 3712-query block per frame against key chunks of 720 (10.2
# MiB; 25 MiB of VMEM in all) costs 1.76 M cycles per head by libtpu's model, against 2.03 M at 400 keys.
FRAME_SCORE_TILE_BYTES = 12 * 2**20
# The dense kernel's cycles per score at 256 queries are 1.6x those at 512 (libtpu's model, v6e): the band
# kernel stacks query frames to at least this many lanes.
BAND_MIN_LANES = 512
# Keys outside their frame (the spatial padding) are this far from every query: no window reaches them.
_FAR = 1 << 30


class FramePlan(NamedTuple):
    """Host-side facts of the frame-banded path for one pattern and ``FrameBlocks`` (numpy, cached)."""

    band_q: int  # spatial positions per query frame in a band block
    band_group: int  # query frames per band block (lanes: band_group * band_q)
    band_frames: int  # query frames padded to a multiple of band_group (the padding attends nothing)
    band_blocks: int  # spatial blocks: a frame's queries padded to band_blocks * band_q
    band_chunk: int  # spatial positions per key chunk (a multiple of 8 dividing band_q)
    band_front: int  # the spatial-major keys' padding before spatial index 0: the widest band
    band_spatial: int  # spatial positions of the spatial-major keys, padding included
    band_chunks_per_step: int
    band_steps: int  # grid steps per block: its chunks cover [a - w_max, a + band_q + w_max)
    band_windows: object  # [groups, F, lanes] int32: per block's lane (query), key frame: the window, or -1
    band_counts: object  # [F] int32: each query frame's banded key frames
    whole_pad: int  # a frame's queries padded to this for the whole-frame kernel (a multiple of whole_q)
    whole_q: int
    whole_kv_compute: int
    whole_layout: SparseLayout  # the whole-frame kernel's tiles: (query block, key frame)


def _largest_divisor(value: int, multiple: int, at_most: int) -> int | None:
    """The largest multiple of ``multiple`` dividing ``value`` that is at most ``at_most``, or None."""
    for candidate in range(min(value, at_most) // multiple * multiple, 0, -multiple):
        if value % candidate == 0:
            return candidate
    return None


def frame_path_refusal(sparsity, frame_blocks: FrameBlocks = FrameBlocks()) -> str | None:
    """Why the frame-banded path cannot run ``sparsity`` (None: it can)."""
    per_frame, windows = int(sparsity.tokens_per_frame), np.asarray(sparsity.windows)
    band_q, chunk = frame_blocks.band_q, frame_blocks.band_chunk
    if per_frame % NUM_SUBLANES:
        return f"a frame's {per_frame} tokens are not a multiple of {NUM_SUBLANES} (a key block is a frame)"
    if frame_blocks.whole_q % NUM_LANES:
        return f"whole_q {frame_blocks.whole_q}: a multiple of {NUM_LANES}"
    if band_q < NUM_LANES or band_q & (band_q - 1) or frame_blocks.band_lanes < band_q:
        return (f"band_q {band_q}: a power of two of at least {NUM_LANES}, at most band_lanes "
                f"{frame_blocks.band_lanes}")
    if chunk % NUM_SUBLANES or band_q % chunk:
        return f"band_chunk {chunk}: a multiple of {NUM_SUBLANES} dividing band_q {band_q}"
    if not (windows >= per_frame).any(axis=1).all():
        return "a query frame pairs wholly with no key frame (the whole-frame kernel gives every row its keys)"
    return None


@functools.lru_cache(maxsize=32)
def frame_plan(sparsity, frame_blocks: FrameBlocks = FrameBlocks()) -> FramePlan:
    refusal = frame_path_refusal(sparsity, frame_blocks)
    if refusal:
        raise ValueError(f"{sparsity}: the frame-banded path cannot run it: {refusal}")
    per_frame, windows = int(sparsity.tokens_per_frame), np.asarray(sparsity.windows, np.int32)
    frames = windows.shape[0]
    whole, band = windows >= per_frame, (windows >= 0) & (windows < per_frame)
    band_q, chunk = frame_blocks.band_q, frame_blocks.band_chunk
    # Query frames per block: at least BAND_MIN_LANES lanes where band_lanes allows; among those, the
    # fewest padded frames, then the most lanes.
    most = max(1, min(frames, frame_blocks.band_lanes // band_q))
    fewest = min(most, max(1, BAND_MIN_LANES // band_q))
    group = min(range(fewest, most + 1), key=lambda g: (-(-frames // g) * g, -g))
    padded_frames = -(-frames // group) * group
    blocks = -(-per_frame // band_q)
    widest = int(windows[band].max()) if band.any() else 0
    chunks = -(-(band_q + 2 * widest) // chunk)  # per block: [a - widest, a + band_q + widest)
    # Chunks per grid step: the most that divide the block's chunks and fit band_step_rows.
    per_step = max((c for c in range(1, chunks + 1)
                    if chunks % c == 0 and c * chunk * frames <= frame_blocks.band_step_rows), default=1)
    # Block a's first chunk starts at padded spatial a * band_q (= spatial a * band_q - widest).
    spatial = (blocks - 1) * band_q + chunks * chunk
    lane_frame = np.arange(padded_frames).reshape(-1, group).repeat(band_q, axis=1)  # [groups, lanes]
    band_windows = np.where(band, windows, -1).astype(np.int32)
    band_windows = np.concatenate([band_windows, np.full((padded_frames - frames, frames), -1, np.int32)])
    lane_windows = np.ascontiguousarray(np.transpose(band_windows[lane_frame], (0, 2, 1)))  # [groups, F, lanes]
    counts = band.sum(axis=1).astype(np.int32)
    # The whole-frame kernel: queries padded per frame to a multiple of 128, then query blocks that divide it.
    whole_q = min(frame_blocks.whole_q, _round_up(per_frame, NUM_LANES))
    whole_pad = _round_up(per_frame, whole_q)
    if whole_pad - per_frame > whole_q // 2:  # one block per frame pads less
        whole_q = whole_pad = _round_up(per_frame, NUM_LANES)
    limit = max(FRAME_SCORE_TILE_BYTES // (4 * whole_q), NUM_SUBLANES)
    compute = _largest_divisor(per_frame, NUM_SUBLANES, min(frame_blocks.whole_kv_compute, limit)) or per_frame
    blocks_per_frame = whole_pad // whole_q
    q_frame = np.repeat(np.arange(frames), blocks_per_frame)
    q_ids, kv_ids = np.nonzero(whole[q_frame])  # per query block its whole key frames, ascending
    first = np.r_[True, q_ids[1:] != q_ids[:-1]]
    last = np.r_[q_ids[1:] != q_ids[:-1], True]
    steps = (q_ids | kv_ids << _ID_BITS | first << _FIRST_BIT | last << _LAST_BIT).astype(np.int32)
    whole_layout = SparseLayout(steps, np.zeros(3 * q_frame.size, np.int32), np.zeros(3 * frames, np.int32),
                                np.zeros(1, np.int32), frames, False, float(whole.mean()))
    for array in (lane_windows, counts):
        array.setflags(write=False)
    return FramePlan(band_q, group, padded_frames, blocks, chunk, widest, spatial, per_step, chunks // per_step,
                     lane_windows, counts, whole_pad, whole_q, compute, whole_layout)


def _frame_pad(x, frames: int, per_frame: int, padded: int):
    """[heads, frames * per_frame, d] -> [heads, frames * padded, d], each frame zero-padded at its end."""
    heads, _, dim = x.shape
    x = _pad_axis(x.reshape(heads, frames, per_frame, dim), padded, 2)
    return x.reshape(heads, frames * padded, dim)


def _frame_unpad(x, frames: int, per_frame: int, padded: int):
    """[heads, c, frames * padded] -> [heads, c, frames * per_frame]: each frame's padded queries dropped."""
    heads, channels, _ = x.shape
    return x.reshape(heads, channels, frames, padded)[:, :, :, :per_frame].reshape(heads, channels, -1)


def spatial_major_keys(x, frames: int, per_frame: int, plan: FramePlan):
    """[heads, frames * per_frame, d] -> [heads, band_spatial * frames, d]: chunks of ``band_chunk`` spatial
    positions (``band_front`` of zero padding first), each holding every frame's keys of that range in
    frame order: row (g * frames + f) * band_chunk + r is frame f's spatial g * band_chunk + r - band_front."""
    heads, _, dim = x.shape
    x = x.reshape(heads, frames, per_frame, dim)
    x = jnp.pad(x, ((0, 0), (0, 0), (plan.band_front, plan.band_spatial - plan.band_front - per_frame), (0, 0)))
    x = x.reshape(heads, frames, plan.band_spatial // plan.band_chunk, plan.band_chunk, dim)
    return jnp.swapaxes(x, 1, 2).reshape(heads, plan.band_spatial * frames, dim)


def spatial_major_queries(x, frames: int, per_frame: int, plan: FramePlan):
    """[heads, frames * per_frame, d] -> [heads, band_blocks * band_frames * band_q, d]: block (a, group)
    is rows [(a * band_frames + group * band_group) * band_q, ...): spatial [a, a + band_q) of the group's
    query frames, one after the other (frames and spatial zero-padded)."""
    heads, _, dim = x.shape
    x = x.reshape(heads, frames, per_frame, dim)
    x = jnp.pad(x, ((0, 0), (0, plan.band_frames - frames), (0, plan.band_blocks * plan.band_q - per_frame),
                    (0, 0)))
    x = x.reshape(heads, plan.band_frames, plan.band_blocks, plan.band_q, dim)
    return jnp.swapaxes(x, 1, 2).reshape(heads, -1, dim)


def _frame_major_outputs(x, frames: int, per_frame: int, plan: FramePlan):
    """``spatial_major_queries``' inverse on the outputs: [heads, c, rows] -> [heads, c, frames * per_frame]."""
    heads, channels, _ = x.shape
    x = x.reshape(heads, channels, plan.band_blocks, plan.band_frames, plan.band_q)
    x = jnp.swapaxes(x, 2, 3)[:, :, :frames].reshape(heads, channels, frames, -1)
    return x[:, :, :, :per_frame].reshape(heads, channels, frames * per_frame)


def _band_kernel(
    fixed_ref,  # [heads, blocks] int32 SMEM
    q_ref,  # [lanes, head_dim]: the block's query frames' spatial [a, a + band_q), spatial-major
    k_ref,  # [1, chunks_per_step * F * chunk, head_dim]: spatial-major keys (``spatial_major_keys``)
    v_ref,  # [1, chunks_per_step * F * chunk, head_dim_v]
    windows_ref,  # [F, lanes] int32: per key frame, each lane's window (-1: none)
    m0_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,  # as _flash_kernel's, and lse [1, lanes] (log2)
    *,
    per_frame: int,
    num_frames: int,
    num_groups: int,
    band_q: int,
    chunk: int,
    chunks_per_step: int,
    num_steps: int,
    front: int,
    paths: tuple[str, ...],
):
    spatial_block, step = pl.program_id(1), pl.program_id(3)
    lanes = q_ref.shape[0]
    fixed = fixed_ref[pl.program_id(0), spatial_block * num_groups + pl.program_id(2)] == 1

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.broadcast_to(m0_ref[...], m_ref.shape)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    first_query = spatial_block * band_q  # the block's first spatial index
    # A lane's spatial index relative to first_query (band_q is a power of two).
    query = lax.broadcasted_iota(jnp.int32, (chunk, lanes), 1) & (band_q - 1)
    row = lax.broadcasted_iota(jnp.int32, (chunk, lanes), 0)
    rows = num_frames * chunk

    def chunks(update):
        q = q_ref[...]
        for index in range(chunks_per_step):  # unrolled: one chunk's softmax overlaps the next one's matmul
            # This chunk's spatial range relative to first_query: [key_first, key_first + chunk).
            key = (step * chunks_per_step + index) * chunk - front + row
            outside = (key + first_query < 0) | (key + first_query >= per_frame)  # the padding
            distance = jnp.where(outside, _FAR, jnp.abs(query - key))  # [chunk, lanes], every key frame's
            k = k_ref[0, index * rows:(index + 1) * rows, :]  # [F * chunk, head_dim]
            v = v_ref[0, index * rows:(index + 1) * rows, :]
            s = lax.dot_general(k, q, _NT_DIMS, preferred_element_type=jnp.float32)  # [F * chunk, lanes]
            s = jnp.concatenate([jnp.where(distance <= windows_ref[f:f + 1, :], s[f * chunk:(f + 1) * chunk],
                                           MASK_VALUE) for f in range(num_frames)], axis=0)
            update(s, v, m_ref, l_ref, acc_ref, lanes)

    _per_softmax_path(chunks, paths, fixed)

    @pl.when(step == num_steps - 1)
    def _finish():
        # A row with no band (its frame pairs wholly or not at all) gets weight 0 in the merge: lse =
        # MASK_VALUE. Online, such a row's max stays MASK_VALUE; against the fixed bound its sum stays 0.
        l_row, m_row = l_ref[0:1, :], m_ref[0:1, :]
        attended = (l_row > 0) & (m_row > 0.5 * MASK_VALUE)
        o_ref[...] = jnp.where(attended, acc_ref[...] / jnp.where(attended, l_row, 1.0), 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(attended, m_row + jnp.log2(jnp.where(attended, l_row, 1.0)), MASK_VALUE)


def band_attention(q, k, v, *, plan: FramePlan, per_frame: int, num_frames: int, interpret: bool,
                   paths: tuple[str, ...] = KERNEL_PATHS):
    """The banded frame pairs. q: [heads, F * per_frame, d] pre-scaled; k, v: [heads, F * per_frame, d]
    smoothed. Returns (o [heads, dv, F * per_frame] fp32, lse [heads, 1, F * per_frame])."""
    heads, _, head_dim = q.shape
    head_dim_v = v.shape[2]
    chunk, per_step, lanes = plan.band_chunk, plan.band_chunks_per_step, plan.band_group * plan.band_q
    num_groups = plan.band_frames // plan.band_group
    q_major = spatial_major_queries(q, num_frames, per_frame, plan)
    q_rows = q_major.shape[1]
    m0, fixed = softmax_start(q_major, k, lanes, paths, gate=SPARSE_FIXED_BOUND_GATE)
    k_major = spatial_major_keys(k, num_frames, per_frame, plan)
    v_major = spatial_major_keys(v, num_frames, per_frame, plan)
    kernel = functools.partial(_band_kernel, per_frame=per_frame, num_frames=num_frames, num_groups=num_groups,
                               band_q=plan.band_q, chunk=chunk, chunks_per_step=per_step,
                               num_steps=plan.band_steps, front=plan.band_front, paths=tuple(paths))
    step_rows = per_step * num_frames * chunk
    scores = q_rows * plan.band_steps * step_rows  # per head
    # With one step per block, the groups of a spatial block (consecutive grid steps) share their keys.
    fetched = plan.band_blocks * plan.band_steps * step_rows * (1 if plan.band_steps == 1 else num_groups)
    cost = pl.CostEstimate(
        flops=2 * heads * scores * (head_dim + head_dim_v), transcendentals=heads * scores,
        bytes_accessed=q.dtype.itemsize * heads * (2 * q_rows * head_dim_v + fetched * (head_dim + head_dim_v)),
    )

    # Element offsets (Mosaic takes them on every axis or none): spatial block a's keys start at chunk
    # a * band_q / chunk, a multiple of 8 rows Mosaic can see (hence the / 8 * 8).
    def key_spec(dim):
        def index(h, a, g, t, *_):
            first_chunk = a * (plan.band_q // chunk) + t * per_step
            return h, first_chunk * (num_frames * chunk // NUM_SUBLANES) * NUM_SUBLANES, 0

        return pl.BlockSpec((pl.Element(1), pl.Element(step_rows), pl.Element(dim)), index)

    def lane_spec(rows):
        return pl.BlockSpec((None, rows, lanes), lambda h, a, g, t, *_: (h, 0, a * num_groups + g))

    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            # Groups inside spatial blocks, so that a spatial block's keys stay; steps innermost (the
            # reduction axis).
            grid=(heads, plan.band_blocks, num_groups, plan.band_steps),
            in_specs=[
                pl.BlockSpec((None, lanes, head_dim), lambda h, a, g, t, *_: (h, a * num_groups + g, 0)),
                key_spec(head_dim),
                key_spec(head_dim_v),
                pl.BlockSpec((None, num_frames, lanes), lambda h, a, g, t, *_: (g, 0, 0)),
                lane_spec(1),
            ],
            out_specs=[lane_spec(head_dim_v), lane_spec(1)],
            scratch_shapes=[
                pltpu.VMEM((NUM_SUBLANES, lanes), jnp.float32),
                pltpu.VMEM((NUM_SUBLANES, lanes), jnp.float32),
                pltpu.VMEM((head_dim_v, lanes), jnp.float32),
            ],
        ),
        out_shape=(jax.ShapeDtypeStruct((heads, head_dim_v, q_rows), jnp.float32),
                   jax.ShapeDtypeStruct((heads, 1, q_rows), jnp.float32)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
        interpret=interpret,
        name="wan_splash_attention_bands",
    )(fixed, q_major, k_major, v_major, jnp.asarray(plan.band_windows), m0)


def frame_sparse_attention(q, k, v, *, sparsity, frame_blocks: FrameBlocks, interpret: bool):
    """``sparsity``'s attention by the two frame kernels. q: [heads, n, d] pre-scaled, k: [heads, n, d]
    smoothed, v: [heads, n, dv], n = frames x tokens per frame. Returns [heads, dv, n] in q's dtype."""
    plan = frame_plan(sparsity, frame_blocks)
    frames, per_frame = int(sparsity.num_frames), int(sparsity.tokens_per_frame)
    whole_q = _frame_pad(q, frames, per_frame, plan.whole_pad)
    blocks = EffectiveBlocks(plan.whole_q, per_frame, plan.whole_kv_compute)
    whole_o, whole_lse = sparse_flash_attention(whole_q, k, v, kv_len=k.shape[1], blocks=blocks,
                                                layout=plan.whole_layout, interpret=interpret, tiles=("whole",),
                                                with_lse=True)
    whole_o = _frame_unpad(whole_o, frames, per_frame, plan.whole_pad)
    whole_lse = _frame_unpad(whole_lse, frames, per_frame, plan.whole_pad)
    if not plan.band_counts.any():
        return whole_o.astype(q.dtype)
    band_o, band_lse = band_attention(q, k, v, plan=plan, per_frame=per_frame, num_frames=frames,
                                      interpret=interpret)
    band_o = _frame_major_outputs(band_o, frames, per_frame, plan)
    band_lse = _frame_major_outputs(band_lse, frames, per_frame, plan)
    # softmax over both key sets: each side's output weighted by its share of the denominator.
    top = jnp.maximum(whole_lse, band_lse)
    whole_weight, band_weight = jnp.exp2(whole_lse - top), jnp.exp2(band_lse - top)
    return ((whole_o * whole_weight + band_o * band_weight) / (whole_weight + band_weight)).astype(q.dtype)


def _pad_axis(x, length: int, axis: int):
    """Zero-pad ``x`` (any shape) at the end of ``axis`` to ``length``."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _attention_local(
    query,  # [batch, heads, q_len, head_dim]
    key,  # [batch, heads, kv_len, head_dim]
    value,  # [batch, heads, kv_len, head_dim_v]
    kv_lengths=None,  # [batch] int32, optional: each batch row's valid keys come first
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool,
    min_kv_len: int = 0,
    sparsity=None,
):
    """Attention on one device's arrays: smoothing, scaling, padding, the kernel.

    Returns [batch, heads, q_len, head_dim_v] in the query's dtype.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_len, head_dim_v = key.shape[2], value.shape[3]
    frames = isinstance(block_sizes, FrameBlocks)
    if frames and sparsity is None:
        raise ValueError(f"block_sizes {block_sizes}: FrameBlocks are for the sparse path (sparsity=) only")
    q = (query.astype(jnp.float32) * (scale * LOG2_E)).astype(query.dtype)
    k32 = key.astype(jnp.float32)
    # Mean over the real keys only, taken before padding (and with lengths, over each row's valid keys).
    if kv_lengths is None:
        mean = k32.mean(axis=2, keepdims=True)
    else:
        valid = (jnp.arange(kv_len)[None, :] < kv_lengths[:, None]).astype(jnp.float32)[:, None, :, None]
        mean = (k32 * valid).sum(axis=2, keepdims=True) / jnp.maximum(valid.sum(axis=2, keepdims=True), 1.0)
    k = (k32 - mean).astype(key.dtype)
    if frames:  # the frame-banded path pads per frame itself
        out = frame_sparse_attention(q.reshape(batch * heads, q_len, head_dim),
                                     k.reshape(batch * heads, kv_len, head_dim),
                                     value.reshape(batch * heads, kv_len, head_dim_v), sparsity=sparsity,
                                     frame_blocks=block_sizes, interpret=interpret)  # [batch*heads, dv, n]
        return jnp.swapaxes(out, 1, 2).reshape(batch, heads, q_len, head_dim_v).astype(query.dtype)
    blocks = effective_block_sizes(block_sizes, q_len, kv_len)
    q_pad, kv_pad = _round_up(q_len, blocks.block_q), _round_up(kv_len, blocks.block_kv)
    q = _pad_axis(q.reshape(batch * heads, q_len, head_dim), q_pad, 1)  # [batch*heads, q_pad, head_dim]
    k = _pad_axis(k.reshape(batch * heads, kv_len, head_dim), kv_pad, 1)  # [batch*heads, kv_pad, head_dim]
    v = _pad_axis(value.reshape(batch * heads, kv_len, head_dim_v), kv_pad, 1)  # [batch*heads, kv_pad, head_dim_v]
    rows = None if kv_lengths is None else jnp.repeat(kv_lengths.astype(jnp.int32), heads)  # [batch*heads]
    layout = None if sparsity is None else sparse_layout(sparsity, blocks.block_q, blocks.block_kv)
    if layout is not None and not layout.whole:
        out = sparse_flash_attention(q, k, v, kv_len=kv_len, blocks=blocks, layout=layout, interpret=interpret)
    else:  # dense, or a mask that keeps every pair (e.g. a video of two frames): today's kernel
        out = flash_attention(q, k, v, kv_len=kv_len, blocks=blocks, interpret=interpret, lengths=rows,
                              length_from=min_kv_len)  # [batch*heads, dv, q_pad]
    out = jnp.swapaxes(out[:, :, :q_len], 1, 2)  # padded query rows dropped
    return out.reshape(batch, heads, q_len, head_dim_v).astype(query.dtype)


def reference_attention(
    query,  # [batch, heads, q_len, head_dim]
    key,  # [batch, heads, kv_len, head_dim]
    value,  # [batch, heads, kv_len, head_dim_v]
    scale: float | None = None,
    kv_lengths=None,  # [batch], optional: keys from kv_lengths[b] on get no weight
):
    """Plain fp32 softmax(Q K^T * scale) V -> [batch, heads, q_len, head_dim_v] float32."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    highest = lax.Precision.HIGHEST  # TPU would otherwise multiply fp32 in bf16 passes
    q, k, v = (x.astype(jnp.float32) for x in (query, key, value))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=highest) * scale
    if kv_lengths is not None:
        valid = jnp.arange(key.shape[2])[None, :] < jnp.asarray(kv_lengths)[:, None]  # [batch, kv_len]
        scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v, precision=highest)


# ------------------------------------------------------------------ sharding
@dataclasses.dataclass(frozen=True)
class AttentionShardingPlan:
    """Which mesh axes split the batch, the heads and the query sequence.

    Keys and values are split like the query on batch and heads and are whole
    (replicated) along the sequence, so each device's attention is complete.
    """

    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]
    seq_axes: tuple[str, ...]
    seq_shards: int  # devices along the query sequence; q is padded to a multiple of it
    reason: str
    fallback: bool = False  # the heads could not be split over every free axis

    @property
    def q_spec(self):
        return P(_axes_entry(self.batch_axes), _axes_entry(self.head_axes), _axes_entry(self.seq_axes), None)

    @property
    def kv_spec(self):
        return P(_axes_entry(self.batch_axes), _axes_entry(self.head_axes), None, None)


def _axes_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def plan_sharding(query_shape, key_shape, mesh_shape) -> AttentionShardingPlan:
    """The split of one attention call over a ('dp', 'tp') mesh.

    - batch over dp when dp divides it; the heads over the axes left
      (tp, or dp x tp for batch 1);
    - short keys (kv_len < q_len: cross-attention): the query sequence over
      those axes instead, keys and values replicated (they are small);
    - heads that the axes left do not divide (Wan 1.3B's 12 heads on tp=8):
      heads over the largest combination of those axes that divides them
      (tp preferred, it already splits the head projections), the query
      sequence over the rest. 12 heads on (2, 4) with batch 1: heads over tp,
      sequence over dp; on (1, 8): sequence over tp. No device idles and
      none repeats another's work; the query is padded to a multiple of the
      sequence split.
    """
    batch, heads, q_len = query_shape[0], query_shape[1], query_shape[2]
    kv_len = key_shape[2]
    sizes = {axis: int(size) for axis, size in dict(mesh_shape).items()}
    unknown = sorted(axis for axis in sizes if axis not in MESH_AXES)
    if unknown:
        raise ValueError(
            f"mesh axes {tuple(sizes)}: splash_attention shards over a ('dp', 'tp') mesh; "
            "build it with env_manager.build_mesh"
        )
    dp = sizes.get("dp", 1)
    batch_axes = ("dp",) if dp > 1 and batch % dp == 0 else ()
    free = tuple(axis for axis in MESH_AXES if axis not in batch_axes and sizes.get(axis, 1) > 1)
    size = lambda axes: math.prod(sizes[axis] for axis in axes)  # noqa: E731
    if kv_len < q_len:
        head_axes = ()
        reason = f"short keys ({kv_len} < {q_len} queries): query sequence split, keys replicated"
    else:
        combos = [c for r in range(len(free), 0, -1) for c in itertools.combinations(free, r)]
        combos.sort(key=lambda c: (-size(c), "tp" not in c))
        head_axes = next((c for c in combos if heads % size(c) == 0), ())
        reason = "heads split" if head_axes == free else (
            f"{heads} heads do not divide {'x'.join(free)}={size(free)} devices: heads over "
            f"{'x'.join(head_axes) or 'no axis'}, query sequence over the rest"
        )
    seq_axes = tuple(axis for axis in free if axis not in head_axes)
    fallback = kv_len >= q_len and head_axes != free
    return AttentionShardingPlan(batch_axes, head_axes, seq_axes, size(seq_axes), reason, fallback)


logged_plans: set = set()


def _log_plan_once(plan: AttentionShardingPlan, query_shape, key_shape, mesh_shape):
    key = (tuple(query_shape), tuple(key_shape), tuple(dict(mesh_shape).items()))
    if key in logged_plans:
        return
    logged_plans.add(key)
    level = logging.WARNING if plan.fallback else logging.INFO
    logger.log(
        level, "splash attention q%s k%s on mesh %s: %s (q %s, k/v %s)",
        tuple(query_shape), tuple(key_shape), dict(mesh_shape), plan.reason, plan.q_spec, plan.kv_spec,
    )


def _match_explicit_mesh(x, mesh, spec):
    """``x`` resharded to ``spec`` on a mesh with Explicit axes (e.g. ``jax.make_mesh``'s default),
    where shard_map wants the input's sharding type to equal its in_spec; unchanged on an Auto
    mesh (``env_manager.build_mesh``), where shard_map reshards by itself."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ())):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return x


def _shard_map(fn, mesh, in_specs, out_specs):
    # jax.shard_map where it exists (jax >= 0.6); the experimental one before.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ------------------------------------------------------------------ entry point
def splash_attention(
    query,  # [batch, heads, q_len, head_dim]
    key,  # [batch, heads, kv_len, head_dim]
    value,  # [batch, heads, kv_len, head_dim_v]
    *,
    mesh=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    scale: float | None = None,
    kv_lengths=None,
    min_kv_len: int = 0,
    sparsity=None,
):
    """softmax(Q K^T * scale) V with the Pallas kernel -> [batch, heads, q_len, head_dim_v], query's dtype.

    ``kv_lengths`` [batch] int32 (optional, traced): only each batch row's first ``kv_lengths[b]`` keys
    count (HunyuanVideo's prompts, packed valid tokens first); ``min_kv_len`` (static): a length every row
    has, so the chunks before it skip the mask.

    ``mesh``: a ('dp', 'tp') mesh to shard over (``plan_sharding``), or None
    for one device. Works inside ``jax.jit`` on sharded inputs.
    ``block_sizes``: None means the chip's (``block_sizes_for``); with ``sparsity``, ``FrameBlocks`` runs
    the frame-banded path (``frame_path_refusal`` says where it cannot).
    ``scale``: None means 1/sqrt(head_dim). ``interpret``: None means
    interpret mode except on TPU (see ``force_interpret``).
    ``sparsity``: a static mask over self-attention's tokens (e.g. ``models.wan.radial.RadialPattern``):
    only the key blocks it attends are visited (see the block-sparse path). Not with ``kv_lengths``, nor
    with a plan that splits the query sequence (each shard would need its own mask).
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"query {query.shape}, key {key.shape}, value {value.shape}: "
            "splash_attention takes 4-D [batch, heads, seq, head_dim] arrays (torch SDPA layout)"
        )
    if key.shape[:2] != query.shape[:2] or value.shape[:3] != key.shape[:3] or key.shape[3] != query.shape[3]:
        raise ValueError(
            f"query {query.shape}, key {key.shape}, value {value.shape}: batch and heads must match, key and value "
            "share a length and query and key a head_dim (repeat key/value heads for grouped-query attention)"
        )
    if block_sizes is None:
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        block_sizes = block_sizes_for(getattr(device, "device_kind", None))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if sparsity is not None:
        if kv_lengths is not None:
            raise ValueError("sparsity with kv_lengths: a sparse mask is for self-attention over the video's tokens")
        if query.shape[2] != sparsity.num_tokens or key.shape[2] != sparsity.num_tokens:
            raise ValueError(f"query {query.shape}, key {key.shape}: the sparse mask {sparsity} is for "
                             f"self-attention over its {sparsity.num_tokens} tokens")
    local = functools.partial(
        _attention_local, scale=scale, block_sizes=block_sizes, interpret=resolve_interpret(interpret),
        min_kv_len=int(min_kv_len), sparsity=sparsity,
    )
    lengths = () if kv_lengths is None else (jnp.asarray(kv_lengths, jnp.int32),)
    if mesh is None or mesh.size == 1:
        return local(query, key, value, *lengths)
    plan = plan_sharding(query.shape, key.shape, mesh.shape)
    _log_plan_once(plan, query.shape, key.shape, mesh.shape)
    if sparsity is not None and plan.seq_axes:
        raise ValueError(f"sparsity with the query sequence split over {plan.seq_axes} ({plan.reason}): "
                         "the sparse path needs every device's whole sequence; use a mesh whose axes split "
                         "the batch and heads")
    q_len = query.shape[2]
    query = _pad_axis(query, _round_up(q_len, plan.seq_shards), 2)  # padded rows are dropped below
    specs = (plan.q_spec, plan.kv_spec, plan.kv_spec) + ((P(_axes_entry(plan.batch_axes)),) if lengths else ())
    arrays = (query, key, value, *lengths)
    arrays = tuple(_match_explicit_mesh(x, mesh, spec) for x, spec in zip(arrays, specs))
    out = _shard_map(local, mesh, specs, plan.q_spec)(*arrays)
    if out.shape[2] == q_len:
        return out
    # An explicit mesh cannot slice unevenly along a split axis: gather the sequence first.
    return _match_explicit_mesh(out, mesh, plan.kv_spec)[:, :, :q_len]
