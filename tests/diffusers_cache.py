"""diffusers' own MagCache on a Wan pipeline of one or two experts, for the parity tests: each
transformer gets its own ``MagCacheConfig`` (``enable_cache``), and every transformer call is
recorded as run in full or skipped."""

import contextlib
import logging


def transformers_of(pipe) -> list:
    return [module for module in (pipe.transformer, getattr(pipe, "transformer_2", None)) if module is not None]


@contextlib.contextmanager
def expert_caches(pipe, configs):
    """``configs[i]`` (a ``MagCacheConfig`` or None) on the pipeline's i-th transformer, for the block."""
    cached = []
    try:
        for transformer, config in zip(transformers_of(pipe), configs):
            if config is None:
                continue
            transformer.enable_cache(config)
            cached.append(transformer)
            # diffusers 0.39 caches the list of hooked submodules the first time the transformer runs;
            # hooks added later (MagCache's) then never hear cache_context("cond"/"uncond"), and the two
            # CFG halves share one MagCache state. Drop that stale list, as a fresh pipeline would have.
            transformer._diffusers_hook._child_registries_cache = None
        yield
    finally:
        for transformer in cached:
            transformer.disable_cache()


@contextlib.contextmanager
def block_runs(pipe):
    """A list that gets, per transformer call (of any expert), whether its blocks ran."""
    calls, hooks = [], []
    for transformer in transformers_of(pipe):
        hooks.append(transformer.register_forward_pre_hook(lambda *_: calls.append(False)))
        hooks.append(transformer.blocks[0].attn1.register_forward_hook(lambda *_: calls.__setitem__(-1, True)))
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def per_step(calls: list, cfg: bool) -> list[bool]:
    """Per denoising step, whether the transformer ran (with CFG a step is a cond and an uncond call)."""
    width = 2 if cfg else 1
    return [any(calls[i:i + width]) for i in range(0, len(calls), width)]


@contextlib.contextmanager
def calibration_log():
    """The ratio lists diffusers' ``MagCacheConfig(calibrate=True)`` logs, in the order it logs them
    (per transformer and cache context, as each finishes its steps)."""
    import ast

    results = []

    class Keep(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("MagCache Calibration Results:"):
                results.append(ast.literal_eval(message.split(":", 1)[1].strip()))

    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield results
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
