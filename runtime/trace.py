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

    @contextlib.contextmanager
    def active_mesh(self, mesh, token_split=None):
        previous = (self.mesh, self.token_split)
        self._active.mesh, self._active.token_split = mesh, token_split
        try:
            yield mesh
        finally:
            self._active.mesh, self._active.token_split = previous


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
