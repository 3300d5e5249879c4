"""LoRAs fused into the cached transformer experts' weights on the device, for a run (``lora.py`` reads,
converts and checks the files; this puts them into the right expert and keeps the cache's accounting).
"""

from __future__ import annotations

import os
from typing import Callable

from ..runtime.placement import unique_arrays
from ..utils import device_errors


def apply_loras(components, loras=(), on_status: Callable[[str], None] | None = None) -> None:
    """Fuse ``loras`` (``lora.LoraSpec``s) into ``components``' (``models.wan.components.WanComponents``)
    cached transformers' weights on the device.

    Each LoRA goes into the expert its ``expert`` names: "both" (every transformer), or a two-expert
    model's "high_noise" (``transformer``) or "low_noise" (``transformer_2``) one. The weights change in
    place and keep their shapes and shardings, so nothing recompiles; the bases of changed weights are
    kept on the host, per expert, so another list (or none) restores them exactly without reading the
    model again. Every LoRA is checked against its expert before any weight changes. The manager's release
    then frees the new arrays.
    """
    from ..lora import EXPERT_INDEX, DeviceLoras, LoraSpec

    loras = [spec if isinstance(spec, LoraSpec) else LoraSpec(*spec) for spec in (loras or ())]
    family = components.family
    for spec in loras:
        if spec.expert != "both" and not family.two_experts:
            raise ValueError(f"LoRA {os.path.basename(spec.path)!r} is for the {spec.expert} expert, but "
                             f"{components.source.model_id!r} ({family.name}) has one transformer: set its expert "
                             f"to 'both'")
    experts = components.experts(on_status)
    wanted = [[spec for spec in loras if spec.expert == "both" or EXPERT_INDEX[spec.expert] == index]
              for index in range(len(experts))]
    for transformer, specs in zip(experts, wanted):
        if transformer.device_loras is None and specs:
            transformer.device_loras = DeviceLoras(components.manager, transformer.mesh)
    for transformer, specs in zip(experts, wanted):  # every LoRA read and checked before any weight changes
        if transformer.device_loras is not None and not transformer.device_loras.applied(specs):
            transformer.device_loras.check(transformer.weights, specs)
    if on_status is not None and loras:
        on_status(f"applying {len(loras)} LoRA(s)")
    for name, transformer, specs in zip(family.experts, experts, wanted):
        if transformer.device_loras is None:
            continue
        before = transformer.device_loras.state
        with device_errors("applying the LoRA", "Use fewer or lower-rank LoRAs, or more devices."):
            transformer.device_loras.apply(transformer.weights, specs)
        if transformer.device_loras.state != before:
            components.manager.set_component_arrays(components.component_key(name),
                                                    unique_arrays(transformer.weights))
