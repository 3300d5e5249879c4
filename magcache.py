"""MagCache: skip whole transformer evaluations whose output a magnitude ratio predicts.

MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware
Cache", arXiv:2506.09045) reuses the residual of the transformer blocks
(output of the last block minus input of the first) from the last computed
step while the accumulated error of the calibrated magnitude ratios stays
below a threshold. diffusers implements it as hooks
(``diffusers.hooks.MagCacheConfig``, ``transformer.enable_cache``).

Which steps are skipped depends only on the ratios and the settings, never
on the data, so ``skip_schedule`` computes it on the host before the run,
following diffusers' hook step by step (in float32, as its tensors are).
The device then runs one of two compiled programs per step: the full one,
which also returns the residual, or the skip one, which runs the embeddings
and the output projection around the cached residual. The TPU never waits
on a data-dependent branch.

Imports neither torch nor jax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Published calibration for Wan 2.1 T2V (50 UniPC steps), from the MagCache
# authors' Wan 2.1 code: github.com/Zehong-Ma/MagCache,
# MagCache4Wan2.1/magcache_generate.py (`mag_ratios` for T2V-14B and
# T2V-1.3B). Their arrays interleave the cond and uncond passes; diffusers
# uses one array for both CFG halves, so these are the cond entries (every
# other value, starting with the first), 50 per model.
_WAN21_T2V_14B = [
    1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533, 0.99468,
    0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271, 0.99313,
    0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767, 0.98573,
    0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184, 0.96711, 0.96349, 0.95629, 0.94926,
    0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
]
_WAN21_T2V_1_3B = [
    1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511, 0.99535,
    0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396, 0.99388,
    0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849, 0.98758,
    0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593, 0.95086,
    0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
]
# Keyed by the transformer's (num_layers, num_attention_heads): 14B is (40, 40), 1.3B (30, 12).
PUBLISHED_RATIOS = {(40, 40): _WAN21_T2V_14B, (30, 12): _WAN21_T2V_1_3B}


@dataclass(frozen=True)
class MagCacheSettings:
    """diffusers' ``MagCacheConfig`` settings, with its defaults. ``mag_ratios`` None:
    the published Wan 2.1 T2V calibration for the model's size."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple | None = None

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"magcache threshold={self.threshold}: use a value >= 0 (0.06 is MagCache's default)")
        if int(self.max_skip_steps) < 0:
            raise ValueError(f"magcache max_skip_steps={self.max_skip_steps}: use 0 or more (3 is the default)")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(
                f"magcache retention_ratio={self.retention_ratio}: use a fraction in [0, 1] (0.2 is the default)"
            )


def ratios_for(transformer_config: dict, settings: MagCacheSettings) -> np.ndarray:
    """The magnitude ratios for this transformer: the settings' own, else the published ones."""
    if settings.mag_ratios is not None:
        return np.asarray(settings.mag_ratios, np.float32)
    key = (transformer_config.get("num_layers"), transformer_config.get("num_attention_heads"))
    if key not in PUBLISHED_RATIOS:
        raise ValueError(
            f"MagCache has no published magnitude ratios for a Wan transformer with {key[0]} layers and "
            f"{key[1]} heads (Wan 2.1 T2V 14B and 1.3B have them): give mag_ratios from a calibration run, "
            f"or turn MagCache off"
        )
    return np.asarray(PUBLISHED_RATIOS[key], np.float32)


def nearest_interp(ratios: np.ndarray, length: int) -> np.ndarray:
    """diffusers' ``nearest_interp``: resample the ratios to ``length`` steps (float32 grid, round half to even)."""
    ratios = np.asarray(ratios, np.float32)
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    grid = np.arange(length, dtype=np.float32) * np.float32(scale)
    return ratios[np.round(grid).astype(np.int64)]


def skip_schedule(num_steps: int, ratios, settings: MagCacheSettings) -> list[bool]:
    """Per step, True to run the transformer, False to reuse the cached residual.

    Follows diffusers' ``MagCacheHeadHook`` exactly, its float32 accumulators
    included. Step 0 always runs (there is no residual yet).
    """
    ratios = np.asarray(ratios, np.float32)
    if len(ratios) != num_steps:
        ratios = nearest_interp(ratios, num_steps)
    retention_step = int(settings.retention_ratio * num_steps + 0.5)
    accumulated_ratio, accumulated_err, accumulated_steps = np.float32(1.0), np.float32(0.0), 0
    have_residual = False
    compute = []
    for step in range(num_steps):
        run = True
        if step >= retention_step:
            scale = ratios[step] if step < len(ratios) else np.float32(1.0)
            accumulated_ratio = np.float32(accumulated_ratio * scale)
            accumulated_steps += 1
            accumulated_err = np.float32(accumulated_err + abs(np.float32(1.0) - accumulated_ratio))
            if have_residual and accumulated_err <= settings.threshold and accumulated_steps <= settings.max_skip_steps:
                run = False
            else:
                accumulated_ratio, accumulated_err, accumulated_steps = np.float32(1.0), np.float32(0.0), 0
        have_residual = have_residual or run
        compute.append(run)
    return compute
