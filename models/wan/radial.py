"""Radial attention's static mask for Wan's self-attention (opt-in; it changes the video).

Radial Attention (mit-han-lab/radial-attention, "Radial Attention: O(n log n) Sparse Attention with
Energy Decay for Long Video Generation") keeps, for a query in latent frame i and a key in frame j:

- every key of frames at temporal distance |i - j| <= 1, and every key of the first frame (the sink);
- further away, a band of the flattened spatial index, |l - k| <= window, where the window halves each
  time the distance doubles: distances in [2^(r-1), 2^r) get 2^bitlen(tokens_per_frame) / 2^r, times
  ``decay_factor``, never below ``min_window`` (the reference's 128, its block size);
- where that undecayed window would drop below ``min_window``, only every ``stride``-th distance keeps
  its frame (stride = min_window / undecayed window): temporal subsampling instead of a thinner band.

Wan's tokens are frames x height x width after patching (patch (1, 2, 2) on latents 4x smaller in
time, 8x in space), so token p is frame p // tokens_per_frame, spatial index p % tokens_per_frame.

The token rule is the definition here: the kernel visits every block holding an attended pair and masks
the rest of a partial block element by element, so block sizes change speed, never numbers. (The
reference instead keeps or drops whole 128-blocks by a density heuristic.)

Pure numpy, no jax: the masks are built on the host when the step is traced, cached per video shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import numpy as np

logger = logging.getLogger("wan_tpu")

# The reference's Wan 2.1 T2V settings at the default video length (scripts/wan_t2v_inference.sh):
# the first 12 of the steps and the first transformer block stay dense; windows scaled by 0.2.
DENSE_STEPS = 12
DENSE_BLOCKS = 1
DECAY_FACTOR = 0.2
MIN_WINDOW = 128  # the reference's threshold (its kernel's block size): no band is thinner

NO_KEYS = -1  # a frame pair with no attended keys (dropped by the temporal subsampling)

VAE_TEMPORAL, VAE_SPATIAL, PATCH = 4, 8, (1, 2, 2)


def video_tokens(height: int, width: int, num_frames: int) -> tuple[int, int]:
    """(latent frames, tokens per frame) of Wan's self-attention for a video of ``num_frames`` pixel frames."""
    frames = ((num_frames - 1) // VAE_TEMPORAL + 1) // PATCH[0]
    per_frame = (height // (VAE_SPATIAL * PATCH[1])) * (width // (VAE_SPATIAL * PATCH[2]))
    return frames, per_frame


def uses_dense(step_index: int, block_index: int, dense_steps: int = DENSE_STEPS,
               dense_blocks: int = DENSE_BLOCKS) -> bool:
    """Whether a denoising step's transformer block runs dense attention (the first steps and blocks do)."""
    return step_index < dense_steps or block_index < dense_blocks


def frame_window(distance: int, tokens_per_frame: int, decay_factor: float = DECAY_FACTOR,
                 min_window: int = MIN_WINDOW) -> int:
    """The spatial band |l - k| <= window for two frames ``distance`` apart (not the sink frame).

    ``tokens_per_frame`` means the whole frame; ``NO_KEYS`` none."""
    if distance <= 1:
        return tokens_per_frame
    band = int(distance).bit_length()
    undecayed = 2 ** int(tokens_per_frame).bit_length() / 2**band
    if undecayed < min_window:
        stride = int(min_window / undecayed)
        if distance % stride:
            return NO_KEYS
    # The reference compares |l - k| with a float window; for whole token distances that is its floor.
    window = max(math.floor(undecayed * decay_factor), min_window)
    return min(window, tokens_per_frame)


@dataclasses.dataclass(frozen=True)
class RadialPattern:
    """Radial attention over ``num_frames`` latent frames of ``tokens_per_frame`` tokens (hashable: cache key)."""

    num_frames: int
    tokens_per_frame: int
    decay_factor: float = DECAY_FACTOR
    min_window: int = MIN_WINDOW

    def __post_init__(self):
        if self.num_frames < 1 or self.tokens_per_frame < 1:
            raise ValueError(f"{self}: a video has at least one frame of at least one token")

    @classmethod
    def for_video(cls, height: int, width: int, num_frames: int, **kwargs) -> "RadialPattern":
        return cls(*video_tokens(height, width, num_frames), **kwargs)

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def windows(self) -> np.ndarray:
        """[query frame, key frame] int32: the band half-width, ``tokens_per_frame`` (all) or ``NO_KEYS``."""
        return frame_windows(self)

    def block_mask(self, block_q: int, block_kv: int) -> "BlockMask":
        return block_mask(self, block_q, block_kv)


@functools.lru_cache(maxsize=64)
def frame_windows(pattern: RadialPattern) -> np.ndarray:
    frames = np.arange(pattern.num_frames)
    table = np.array([[frame_window(abs(int(i) - int(j)), pattern.tokens_per_frame, pattern.decay_factor,
                                    pattern.min_window) for j in frames] for i in frames], np.int32)
    table[:, 0] = pattern.tokens_per_frame  # the first frame is attended from everywhere
    table.setflags(write=False)
    return table


def token_mask(pattern: RadialPattern) -> np.ndarray:
    """[query token, key token] bool: the rule on every pair (n^2 memory: small shapes, tests)."""
    per_frame, frames = pattern.tokens_per_frame, pattern.num_frames
    spatial = np.arange(per_frame)
    distance = np.abs(spatial[:, None] - spatial[None, :])  # the same for every frame pair
    bands = {int(w): distance <= w for w in np.unique(frame_windows(pattern))}
    tiles = [[bands[int(w)] for w in row] for row in frame_windows(pattern)]
    return np.block(tiles) if frames > 1 else tiles[0][0].copy()


class BlockMask(NamedTuple):
    """Which (query block, key block) tiles hold attended pairs, and which hold nothing else."""

    active: np.ndarray  # [q blocks, kv blocks] bool: some pair attended, so the kernel visits it
    full: np.ndarray  # [q blocks, kv blocks] bool: every (real) pair attended, so no element mask

    @property
    def active_share(self) -> float:
        return float(self.active.mean())

    def kv_blocks(self) -> list[np.ndarray]:
        """Per query block, the key blocks to visit, ascending (int32)."""
        return [np.flatnonzero(row).astype(np.int32) for row in self.active]


def _segments(length: int, block: int, per_frame: int):
    """The token axis cut at block and frame boundaries: (block, frame, first and last spatial index)."""
    cuts = np.union1d(np.arange(0, length, block), np.arange(0, length, per_frame))
    ends = np.append(cuts[1:], length) - 1
    frame = cuts // per_frame
    return cuts // block, frame, cuts - frame * per_frame, ends - frame * per_frame


@functools.lru_cache(maxsize=64)
def block_mask(pattern: RadialPattern, block_q: int, block_kv: int) -> BlockMask:
    """The tiles of the token mask for blocks of ``block_q`` queries and ``block_kv`` keys (the last ones
    ragged, as the kernel pads them). Exact: built from frame-and-block segments, never the n^2 mask."""
    n, per_frame = pattern.num_tokens, pattern.tokens_per_frame
    q_block, q_frame, q_first, q_last = _segments(n, block_q, per_frame)
    k_block, k_frame, k_first, k_last = _segments(n, block_kv, per_frame)
    window = frame_windows(pattern)[q_frame[:, None], k_frame[None, :]]  # [q segments, k segments]
    # Two spatial intervals: the nearest pair is `gap` apart, the furthest `span`.
    gap = np.maximum(0, np.maximum(k_first[None, :] - q_last[:, None], q_first[:, None] - k_last[None, :]))
    span = np.maximum(q_last[:, None] - k_first[None, :], k_last[None, :] - q_first[:, None])
    some = gap <= window  # NO_KEYS is below every gap
    every = span <= window
    q_starts = np.flatnonzero(np.diff(q_block, prepend=-1))
    k_starts = np.flatnonzero(np.diff(k_block, prepend=-1))
    active = np.logical_or.reduceat(np.logical_or.reduceat(some, q_starts, axis=0), k_starts, axis=1)
    full = np.logical_and.reduceat(np.logical_and.reduceat(every, q_starts, axis=0), k_starts, axis=1)
    for array in (active, full):
        array.setflags(write=False)
    logger.debug("radial mask %s, blocks %d x %d: %.3f of the tiles active, %.3f whole",
                 pattern, block_q, block_kv, active.mean(), full.mean())
    return BlockMask(active, full)


def active_share(pattern: RadialPattern, block_q: int, block_kv: int) -> float:
    """The share of (query block, key block) tiles the kernel visits."""
    return block_mask(pattern, block_q, block_kv).active_share


def token_share(pattern: RadialPattern) -> float:
    """The share of (query, key) pairs attended: the floor any block size can reach. O(frames^2 x tokens)."""
    per_frame = pattern.tokens_per_frame
    spatial = np.arange(per_frame)
    total = 0
    for window in np.unique(frame_windows(pattern)):
        if window < 0:
            continue
        pairs = int((np.minimum(spatial + window, per_frame - 1) - np.maximum(spatial - window, 0) + 1).sum())
        total += pairs * int((frame_windows(pattern) == window).sum())
    return total / float(pattern.num_tokens) ** 2
