"""DeepCache for HunyuanVideo 1.5: on cached steps only the last double-stream block runs, on the
deep blocks' output kept from the last full step (the original's ``no_cache_block_id`` 53 of 54).

Which steps run in full is the original's rule, decided on the host before the first step: every step
before ``start``, every ``interval``-th step from ``start`` until ``end``, and every step from ``end``
on. A full step is a "record" step (it keeps the cache), a cached step a "reuse" one: two compiled
programs, chosen per step by the host (``sampling.DenoiseRun``).

Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeepCacheSettings:
    """The original's defaults, for 50 steps: full steps 0-10, then every 4th until 45, then all."""

    start: int = 11
    end: int = 45
    interval: int = 4

    def __post_init__(self):
        if self.start < 1:
            raise ValueError(f"deepcache start={self.start}: the first step must run in full; use 1 or more (11)")
        if self.end < self.start:
            raise ValueError(f"deepcache end={self.end} is before start={self.start}: use end >= start (45)")
        if self.interval < 1:
            raise ValueError(f"deepcache interval={self.interval}: use 1 or more (4; 1 caches nothing)")


def full_steps(settings: DeepCacheSettings, num_steps: int) -> list[int]:
    """The steps that run every block: the original's ``no_cache_steps``."""
    chosen = set(range(0, min(settings.start, num_steps)))
    chosen.update(range(settings.start, min(settings.end, num_steps), settings.interval))
    chosen.update(range(settings.end, num_steps))
    return sorted(chosen)


def step_modes(settings: DeepCacheSettings | None, num_steps: int) -> list[str | None]:
    """Per step: None (DeepCache off), else "record" (full, keeps the cache) or "reuse" (cached)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps}: use at least 1 step")
    if settings is None:
        return [None] * num_steps
    full = set(full_steps(settings, num_steps))
    return ["record" if step in full else "reuse" for step in range(num_steps)]
