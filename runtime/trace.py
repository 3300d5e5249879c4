"""The trace context: what a program is being traced for, per thread.

- the target platform (``target_platform``: trace TPU programs on a machine with none);
- the active mesh and token split the model's attention shards over (``active_mesh``);
- ``loading``: plain PyTorch, outside the torchax environment, while weights are read.
"""

from __future__ import annotations

import contextlib
import threading

PLATFORMS = ("tpu", "gpu", "cpu")


def backend_platform(jax) -> str:
    """'tpu', 'gpu' or 'cpu': the backend of the default JAX devices."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


class TraceContext:
    """Per-thread target platform and active mesh; each block restores what was there before."""

    def __init__(self):
        self._target = threading.local()
        self._active = threading.local()

    @property
    def target(self) -> str | None:
        """The platform set by ``target_platform`` in this thread, or None."""
        return getattr(self._target, "platform", None)

    @property
    def mesh(self):
        """The mesh of the enclosing ``active_mesh`` block in this thread, or None."""
        return getattr(self._active, "mesh", None)

    @property
    def token_split(self):
        """The token split of the enclosing ``active_mesh`` block in this thread, or None."""
        return getattr(self._active, "token_split", None)

    @contextlib.contextmanager
    def target_platform(self, platform: str):
        if platform not in PLATFORMS:
            raise ValueError(f"platform={platform!r}: use 'tpu', 'gpu' or 'cpu'")
        previous = self.target
        self._target.platform = platform
        try:
            yield platform
        finally:
            self._target.platform = previous

    @property
    def sparse(self) -> "SparseSelfAttention | None":
        """The sparse self-attention of the enclosing ``sparse_attention`` block in this thread, or None."""
        return getattr(self._active, "sparse", None)

    @contextlib.contextmanager
    def sparse_attention(self, pattern, dense_blocks: int = 0):
        """Within the block, self-attention over ``pattern``'s tokens is sparse (``pattern``: a static mask
        such as ``models.wan.radial.RadialPattern``), except in the first ``dense_blocks`` transformer
        blocks: the self-attention calls are counted in trace order, one per block."""
        previous = self.sparse
        self._active.sparse = SparseSelfAttention(pattern, int(dense_blocks))
        try:
            yield self._active.sparse
        finally:
            self._active.sparse = previous

    @contextlib.contextmanager
    def active_mesh(self, mesh, token_split=None):
        previous = (self.mesh, self.token_split)
        self._active.mesh, self._active.token_split = mesh, token_split
        try:
            yield mesh
        finally:
            self._active.mesh, self._active.token_split = previous


class SparseSelfAttention:
    """A traced step's sparse self-attention: the mask, how many blocks stay dense, and the blocks seen."""

    def __init__(self, pattern, dense_blocks: int):
        self.pattern, self.dense_blocks, self.blocks_seen = pattern, dense_blocks, 0

    def mask_for(self, query_len: int, key_len: int):
        """The pattern for this attention call, or None (dense): a self-attention over the pattern's tokens
        counts as the next transformer block's; anything else (cross-attention) is left dense."""
        if not query_len == key_len == self.pattern.num_tokens:
            return None
        block, self.blocks_seen = self.blocks_seen, self.blocks_seen + 1
        return None if block < self.dense_blocks else self.pattern


@contextlib.contextmanager
def loading(env):
    """Disable the torchax environment ``env`` (None: nothing started) for the block, if it is enabled."""
    was_enabled = env is not None and env.enabled
    if was_enabled:
        env.disable_torch_modes()
    try:
        yield
    finally:
        if was_enabled:
            env.enable_torch_modes()
