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

Two experts (Wan 2.2 A14B): each expert is its own MagCache run over its own
steps, as diffusers does with ``enable_cache`` on ``transformer`` and on
``transformer_2``: the run's ratios (one curve over all steps) are split at
the switch, each expert keeps its first ``retention_ratio`` of its steps in
full, and the low-noise expert's first step always runs (it has no residual).

Where the ratios come from, first found first: the settings' own
``mag_ratios``; a calibration saved for this model (``save_calibration``,
made by a run with ``magcache_calibrate``); the published ones for the
model's family and architecture (``PUBLISHED``). A calibration run computes
every step in full and records MagCache's ratio, the mean over tokens of
``|r_t| / |r_(t-1)|`` (norms of the blocks' residual over channels, of the
conditional half), exactly as diffusers' ``MagCacheConfig(calibrate=True)``
logs it, with 1.0 at step 0 and at each expert's first step.

Imports neither torch nor jax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .runtime import environment

logger = logging.getLogger("wan_tpu")

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
# The same authors' code for the other families, read the same way (the cond entries of
# ``[1.0] * 2 + mag_ratios``): MagCache4Wan2.1/magcache_generate.py for Wan 2.1 I2V 14B (its
# 480P and 720P checkpoints, 40 steps) and MagCache4Wan2.2/magcache_generate.py for Wan 2.2
# T2V A14B and I2V A14B (40 steps, one curve over both experts; the dip at the expert switch
# is the low-noise expert's first step, which always runs here) and TI2V 5B (50 steps; its
# text-to-video and image-to-video runs have a curve each). maxdiffusion ships the same arrays
# (src/maxdiffusion/configs/base_wan_i2v_14b.yml, base_wan_27b.yml, base_wan_i2v_27b.yml).
_WAN21_I2V_480P = [
    1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383, 0.98857, 0.99065, 0.98845,
    0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721, 0.98571, 0.98543, 0.98157, 0.98411, 0.97952,
    0.98149, 0.9774, 0.97825, 0.97355, 0.97085, 0.97056, 0.96588, 0.96113, 0.9567, 0.94961, 0.93973, 0.93217,
    0.91878, 0.90955, 0.92617,
]
_WAN21_I2V_720P = [
    1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124, 0.99102, 0.99215, 0.99515,
    0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101, 0.98599, 0.98845, 0.98848, 0.98862, 0.98718,
    0.98497, 0.98264, 0.98389, 0.97938, 0.97535, 0.97498, 0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397,
    0.91636, 0.89088, 0.8679,
]
_WAN22_T2V_A14B = [
    1.0, 1.00124, 0.99822, 0.99696, 0.99703, 0.9966, 0.99602, 0.99578, 0.99484, 0.99633, 0.99659, 0.99534, 0.99584,
    0.99681, 0.99563, 0.9944, 0.99594, 0.99466, 0.99453, 0.99389, 0.99391, 0.99354, 0.99283, 0.99268, 0.99057,
    0.99125, 0.65523, 0.98808, 0.98765, 0.9851, 0.98311, 0.9805, 0.97776, 0.97278, 0.96731, 0.95857, 0.94385,
    0.92118, 0.88108, 0.80263,
]
_WAN22_I2V_A14B = [
    1.0, 0.99191, 0.99356, 0.99326, 0.99251, 0.99393, 0.9943, 0.99276, 0.99389, 0.99274, 0.99316, 0.99379, 0.99268,
    0.99222, 0.99175, 0.91076, 0.98931, 0.99087, 0.98852, 0.98895, 0.98806, 0.9871, 0.98613, 0.98434, 0.983,
    0.98185, 0.98131, 0.9783, 0.97619, 0.97264, 0.97088, 0.96568, 0.96045, 0.95322, 0.94579, 0.93297, 0.91699,
    0.89174, 0.8541, 0.79823,
]
_WAN22_TI2V_5B_T2V = [
    1.0, 0.99505, 0.99441, 0.99558, 0.99499, 0.99534, 0.99468, 0.99463, 0.9946, 0.99408, 0.9945, 0.99409, 0.99403,
    0.99382, 0.99349, 0.99377, 0.9933, 0.99303, 0.99217, 0.992, 0.99201, 0.99133, 0.99112, 0.99155, 0.98958,
    0.98959, 0.98838, 0.98826, 0.9883, 0.98711, 0.98562, 0.98511, 0.98414, 0.98284, 0.98104, 0.97981, 0.97849,
    0.97557, 0.97398, 0.97171, 0.96917, 0.96511, 0.96263, 0.95839, 0.95483, 0.94942, 0.9468, 0.94583, 0.94843,
    0.96949,
]
_WAN22_TI2V_5B_I2V = [
    1.0, 0.99512, 0.99559, 0.99595, 0.99512, 0.99546, 0.99543, 0.99496, 0.99504, 0.99444, 0.99481, 0.99435, 0.9943,
    0.99411, 0.99373, 0.99413, 0.99363, 0.99335, 0.99244, 0.99229, 0.99239, 0.99163, 0.99149, 0.99191, 0.9898,
    0.9899, 0.98849, 0.98846, 0.98861, 0.9874, 0.98588, 0.98539, 0.98444, 0.9831, 0.98119, 0.98001, 0.97862,
    0.97555, 0.97392, 0.97152, 0.96871, 0.96435, 0.96129, 0.95639, 0.95176, 0.94446, 0.93972, 0.93575, 0.93537,
    0.96655,
]


@dataclass(frozen=True)
class PublishedRatios:
    """One published calibration and the models it is for."""

    name: str
    family: str  # families.WanFamily.name
    shape: tuple[int, int]  # the transformer's (num_layers, num_attention_heads)
    ratios: list
    with_image: bool | None = None  # TI2V 5B: a curve for text-to-video, one for image-to-video; None: either
    min_pixels: int = 0  # Wan 2.1 I2V: the 720P checkpoint's curve from this many pixels per frame, else 480P's
    max_pixels: int | None = None

    def fits(self, family: str, shape: tuple, pixels: int, with_image: bool) -> bool:
        return (family == self.family and tuple(shape) == self.shape and pixels >= self.min_pixels
                and (self.max_pixels is None or pixels < self.max_pixels)
                and self.with_image in (None, with_image))


I2V_720P_PIXELS = 640_000  # between 832x480 (0.40 M) and 1280x720 (0.92 M)
PUBLISHED = [
    PublishedRatios("Wan 2.1 T2V 14B", "Wan 2.1 T2V", (40, 40), _WAN21_T2V_14B),
    PublishedRatios("Wan 2.1 T2V 1.3B", "Wan 2.1 T2V", (30, 12), _WAN21_T2V_1_3B),
    PublishedRatios("Wan 2.1 I2V 14B 480P", "Wan 2.1 I2V", (40, 40), _WAN21_I2V_480P, max_pixels=I2V_720P_PIXELS),
    PublishedRatios("Wan 2.1 I2V 14B 720P", "Wan 2.1 I2V", (40, 40), _WAN21_I2V_720P, min_pixels=I2V_720P_PIXELS),
    PublishedRatios("Wan 2.2 T2V A14B", "Wan 2.2 T2V A14B", (40, 40), _WAN22_T2V_A14B),
    PublishedRatios("Wan 2.2 I2V A14B", "Wan 2.2 I2V A14B", (40, 40), _WAN22_I2V_A14B),
    PublishedRatios("Wan 2.2 TI2V 5B, text to video", "Wan 2.2 TI2V 5B", (30, 24), _WAN22_TI2V_5B_T2V, with_image=False),
    PublishedRatios("Wan 2.2 TI2V 5B, image to video", "Wan 2.2 TI2V 5B", (30, 24), _WAN22_TI2V_5B_I2V, with_image=True),
]


def published_ratios(family: str, transformer_config: dict, height: int, width: int,
                     with_image: bool) -> PublishedRatios | None:
    """The published calibration for this family, transformer shape and video, or None."""
    shape = (transformer_config.get("num_layers"), transformer_config.get("num_attention_heads"))
    return next((entry for entry in PUBLISHED if entry.fits(family, shape, height * width, with_image)), None)


@dataclass(frozen=True)
class MagCacheSettings:
    """diffusers' ``MagCacheConfig`` settings, with its defaults. ``mag_ratios`` None: a saved
    calibration for the model, else the published one for its family and size."""

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


@dataclass(frozen=True)
class RatioSource:
    """Which model a run's ratios are for: the key of its saved calibration and what picks a published one."""

    model: str  # the model's location: a repo id, or a folder's real path
    family: str
    transformer_config: dict
    height: int
    width: int
    with_image: bool

    @property
    def shown(self) -> str:
        return os.path.basename(self.model.rstrip("/")) or self.model


def ratios_for(source: RatioSource, settings: MagCacheSettings) -> tuple[np.ndarray, str]:
    """The magnitude ratios for a run and where they came from: the settings' own, else a saved
    calibration, else the published ones. Raises ValueError, naming the fix, when there are none."""
    if settings.mag_ratios is not None:
        return np.asarray(settings.mag_ratios, np.float32), "given"
    saved = load_calibration(source)
    if saved is not None:
        return saved, f"calibrated ({calibration_path(source)})"
    entry = published_ratios(source.family, source.transformer_config, source.height, source.width,
                             source.with_image)
    if entry is not None:
        return np.asarray(entry.ratios, np.float32), f"published for {entry.name}"
    config = source.transformer_config
    raise ValueError(
        f"MagCache has no published magnitude ratios for {source.family} with {config.get('num_layers')} layers and "
        f"{config.get('num_attention_heads')} heads, and none are calibrated for {source.shown!r}: run it once "
        f"with magcache_calibrate on (the Sampler's input, or --magcache-calibrate), then MagCache uses the "
        f"recorded ratios; or give mag_ratios, or turn MagCache off"
    )


def nearest_interp(ratios: np.ndarray, length: int) -> np.ndarray:
    """diffusers' ``nearest_interp``: resample the ratios to ``length`` steps (float32 grid, round half to even)."""
    ratios = np.asarray(ratios, np.float32)
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    grid = np.arange(length, dtype=np.float32) * np.float32(scale)
    return ratios[np.round(grid).astype(np.int64)]


def resampled(ratios, length: int) -> np.ndarray:
    """The ratios as float32, one per step of a ``length``-step run (``nearest_interp`` when they differ)."""
    ratios = np.asarray(ratios, np.float32)
    return ratios if len(ratios) == length else nearest_interp(ratios, length)


def skip_schedule(num_steps: int, ratios, settings: MagCacheSettings) -> list[bool]:
    """Per step, True to run the transformer, False to reuse the cached residual.

    Follows diffusers' ``MagCacheHeadHook`` exactly, its float32 accumulators
    included. Step 0 always runs (there is no residual yet).
    """
    ratios = resampled(ratios, num_steps)
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


def run_schedule(expert_of_step, ratios, settings: MagCacheSettings) -> list[bool]:
    """``skip_schedule`` over a run whose steps go to one or two experts (``expert_of_step``, 0 then 1):
    the run's ratios are resampled to its length and split at the switch, and each expert's steps are
    scheduled as their own MagCache run, as diffusers does with a ``MagCacheConfig`` per transformer."""
    total = len(expert_of_step)
    ratios = resampled(ratios, total)
    compute, start = [], 0
    while start < total:
        stop = start
        while stop < total and expert_of_step[stop] == expert_of_step[start]:
            stop += 1
        compute += skip_schedule(stop - start, ratios[start:stop], settings)
        start = stop
    return compute


def expert_ratio_slices(expert_of_step, ratios) -> list[list[float]]:
    """The run's ratios cut per expert, for diffusers' ``MagCacheConfig`` of each transformer."""
    ratios = resampled(ratios, len(expert_of_step))
    return [[float(r) for r, e in zip(ratios, expert_of_step) if e == expert]
            for expert in dict.fromkeys(expert_of_step)]


# ------------------------------------------------------------ calibration
ENV_CALIBRATION_DIR = environment.MAGCACHE_DIR
CALIBRATION_FOLDER = "wan_tpu_magcache"  # under ComfyUI's user folder


def calibration_dir() -> str:
    """Where calibrations are saved: ``WAN_TPU_MAGCACHE_DIR``, else ComfyUI's user folder (``user/`` by
    default) inside ComfyUI, else ``~/.cache/wan_tpu/magcache``."""
    folder = environment.read(environment.MAGCACHE_DIR)
    if folder:
        return os.path.abspath(os.path.expanduser(folder))
    try:
        import folder_paths  # ComfyUI's module; absent when the pack runs alone

        return os.path.join(folder_paths.get_user_directory(), CALIBRATION_FOLDER)
    except (ImportError, AttributeError):
        return os.path.join(os.path.expanduser("~"), ".cache", "wan_tpu", "magcache")


def calibration_path(source: RatioSource) -> str:
    """The file of ``source``'s calibration: a name made from the model's, never a path it gives."""
    key = json.dumps([source.model, source.with_image])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.shown)[:64].strip("._") or "model"
    suffix = "-i2v" if source.with_image else ""
    return os.path.join(calibration_dir(), f"{stem}{suffix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")


def load_calibration(source: RatioSource) -> np.ndarray | None:
    """The saved ratios for ``source``, or None. A damaged file is refused with its path and the fix."""
    path = calibration_path(source)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            ratios = np.asarray(json.load(file)["mag_ratios"], np.float32)
        if ratios.ndim != 1 or len(ratios) < 2 or not np.all(np.isfinite(ratios)) or not np.all(ratios > 0):
            raise ValueError("not a list of positive ratios")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the MagCache calibration {path} cannot be used ({error}): delete it and run "
                         f"magcache_calibrate again") from None
    return ratios


def save_calibration(source: RatioSource, ratios, run: dict) -> str:
    """Save ``ratios`` (one per step) as ``source``'s calibration, with what the run was; returns the path.
    Written whole or not at all (a temporary file, then renamed)."""
    path = calibration_path(source)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"model": source.model, "family": source.family, "with_image": source.with_image,
              "mag_ratios": [float(r) for r in ratios], **run}
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    logger.info("MagCache: calibrated %d ratios for %s, saved to %s", len(ratios), source.shown, path)
    return path


def step_modes(ratio_source: Callable[[], RatioSource], magcache: MagCacheSettings | None, calibrate: bool,
               expert_of_step: list) -> list:
    """Per step, which program runs: None (plain), or with MagCache "record" (a full step that keeps the
    blocks' residual) or "reuse" (the blocks skipped). Decided on the host, before anything runs. A
    calibration records on every step. ``ratio_source()``: what the ratios are looked up by (asked only
    when MagCache runs)."""
    if calibrate:
        if magcache is not None:
            logger.info("MagCache: calibrating, so every step runs in full")
        return ["record"] * len(expert_of_step)
    if magcache is None:
        return [None] * len(expert_of_step)
    ratios, origin = ratios_for(ratio_source(), magcache)
    logger.info("MagCache ratios: %s", origin)
    return ["record" if run else "reuse" for run in run_schedule(expert_of_step, ratios, magcache)]
