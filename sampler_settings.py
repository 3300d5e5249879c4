"""The Sampler's and Full Pipeline's advanced settings, as one value: what the 'Wan TPU Sampler Settings'
node outputs, its checks, and how it replaces the nodes' own advanced widgets.

Precedence: a connected settings node supplies every value it holds; the receiving node's widgets of
the same names are then ignored, and ComfyUI's check before the run does not check them either
(``unchecked_when_connected``). Not connected, the node's widgets apply as before (saved workflows
and API prompts without the link run unchanged).

ComfyUI-free, and imports neither jax nor torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

from .models.wan.radial import DENSE_BLOCKS, DENSE_STEPS

logger = logging.getLogger("wan_tpu")

NODE_NAME = "Wan TPU Sampler Settings"


@dataclass(frozen=True)
class SamplerSettings:
    """The advanced inputs of the Sampler and Full Pipeline, under their node input names, with their
    defaults. Bad values raise ``ValueError`` naming the value and the fix."""

    sampler: str = "unipc"
    timesteps: str = ""
    guidance_scale_2: float = -1.0
    magcache: bool = False
    magcache_threshold: float = 0.06
    magcache_max_skip_steps: int = 3
    magcache_retention_ratio: float = 0.2
    magcache_calibrate: bool = False
    layout: str = "auto"
    precision: str = "bf16"
    dp: int = 0
    tp: int = 0
    attention: str = "dense"
    radial_dense_steps: int = DENSE_STEPS
    radial_dense_blocks: int = DENSE_BLOCKS

    def __post_init__(self):
        from .models.wan.modules import PRECISIONS
        from .magcache import MagCacheSettings
        from .sampling.step_program import radial_steps
        from .scheduler import SAMPLERS, parse_timesteps
        from .sharding import check_layout

        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        if parse_timesteps(self.timesteps) and self.sampler != "euler":
            raise ValueError(f"timesteps={self.timesteps!r} need sampler='euler' (UniPC spaces its own): "
                             "choose euler or clear timesteps")
        second = _number("guidance_scale_2", self.guidance_scale_2)
        if not (second == -1 or 0 <= second <= 100):
            raise ValueError(f"guidance_scale_2={self.guidance_scale_2}: use -1 (the same as guidance_scale) "
                             "or a value between 0 and 100")
        for name in ("magcache", "magcache_calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: use true or false")
        for name in ("magcache_max_skip_steps", "dp", "tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) and not (
                    isinstance(value, float) and value.is_integer()):
                raise ValueError(f"{name}={value!r}: use a whole number")
        MagCacheSettings(_number("magcache_threshold", self.magcache_threshold),  # its own range checks
                         int(self.magcache_max_skip_steps),
                         _number("magcache_retention_ratio", self.magcache_retention_ratio))
        check_layout(self.layout)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for name in ("dp", "tp"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: use 0 for automatic or a positive mesh size")
        radial_steps(self.attention, 0, self.radial_dense_steps, self.radial_dense_blocks)  # the core's checks

    def as_inputs(self) -> dict:
        """The values under the receiving node's input names."""
        return asdict(self)


NAMES = tuple(field.name for field in fields(SamplerSettings))


def check_inputs(**inputs) -> str | bool:
    """``VALIDATE_INPUTS`` for the settings node: True, or the first error as text."""
    try:
        SamplerSettings(**{name: value for name, value in inputs.items() if value is not None})
    except (TypeError, ValueError) as error:
        return str(error)
    return True


# The 'settings' default of the Sampler's and Full Pipeline's VALIDATE_INPUTS. ComfyUI's check before the run
# passes an input linked from another node as None (its value does not exist yet) and leaves an unconnected
# optional input out, so this default means "not connected".
NOT_CONNECTED = object()


def unchecked_when_connected(settings, **widgets) -> dict:
    """For the receiving node's ``VALIDATE_INPUTS``: its ``widgets`` (by input name) with those a connected
    settings node replaces set to None, so that values which will not be used do not block the run (the
    settings node checks its own; the run checks its timesteps against num_inference_steps). Not
    connected (``settings`` is ``NOT_CONNECTED``): ``widgets`` unchanged."""
    if settings is NOT_CONNECTED:
        return dict(widgets)
    return {name: None if name in NAMES else value for name, value in widgets.items()}


def apply(widgets: dict, settings) -> dict:
    """The receiving node's inputs (``widgets``, by input name) with a connected settings node's values in
    place of its advanced widgets; ``settings`` None (not connected): ``widgets`` unchanged."""
    if settings is None:
        return dict(widgets)
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings is a {type(settings).__name__}: connect the output of '{NODE_NAME}' "
                         "or leave the input unconnected")
    values = settings.as_inputs()
    ignored = {name: widgets[name] for name, value in values.items() if name in widgets and widgets[name] != value}
    if ignored:
        logger.info("%s connected: its values replace the node's widgets %s", NODE_NAME,
                    ", ".join(f"{name}={value!r} -> {values[name]!r}" for name, value in ignored.items()))
    return {**widgets, **values}


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: use a number")
    return float(value)
