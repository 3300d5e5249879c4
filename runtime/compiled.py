"""Programs compiled ahead of time, cached by the shapes they were specialised to, and checked against
the device's memory before they run. Model-agnostic.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .. import memory_plan

logger = logging.getLogger("wan_tpu")


def shape_key(args) -> tuple:
    """Shapes and dtypes of a pytree of arrays: what a compiled program is specialised to."""
    import jax

    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(args))


def compiled_program(cache: dict, key: tuple, jitted, args: tuple, on_status: Callable | None, what: str,
                     fix: str = "Lower the resolution or num_frames, or use more devices.", device=None):
    """``jitted`` compiled ahead of time for ``args``, cached under ``key``, and checked against HBM.

    Compiling before the first run (rather than inside it) lets progress say
    "compiling" and keeps compile time out of the per-step times and the ETA.
    A program already in JAX's persistent cache loads instead of compiling.
    Before it runs, its own ``memory_analysis()`` is checked against ``device``'s
    memory (``memory_plan.check_compiled_memory``): a program that will not fit
    is refused with ``HBMPlanError`` saying how much it needs and ``fix``.
    """
    compiled = cache.get(key)
    if compiled is None:
        if on_status is not None:
            on_status(f"compiling {what} (first run at this size; later runs reuse it)")
        started = time.perf_counter()
        compiled = cache[key] = jitted.lower(*args).compile()
        logger.info("compiled %s in %.1f s", what, time.perf_counter() - started)
    memory_plan.check_compiled_memory(compiled, what[:1].upper() + what[1:], fix, device=device)
    return compiled
