"""The 2D ``(dp, tp)`` device mesh: its shape (arguments, else ``WAN_TPU_DP``/``WAN_TPU_TP``, else the
default rule), its construction, and the meshes built once per shape."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from . import environment

logger = logging.getLogger("wan_tpu")


def default_mesh_shape(device_count: int) -> tuple[int, int]:
    """dp=2 when the device count is even and at least 2; tp takes the rest."""
    if device_count < 1:
        raise ValueError(f"device_count={device_count}: no JAX devices were found")
    if device_count >= 2 and device_count % 2 == 0:
        return 2, device_count // 2
    return 1, device_count


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer: give a positive whole number") from None
    if number < 1:
        raise ValueError(f"{name}={number}: mesh axes need at least 1 device")
    return number


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _one_axis(device_count: int, name: str, given: int) -> int:
    """The other axis when only ``name`` (dp or tp) is given."""
    if device_count % given:
        raise ValueError(
            f"{name}={given} does not divide the {device_count} devices found: "
            f"choose {name} among {_divisors(device_count)}"
        )
    return device_count // given


def resolve_mesh_shape(device_count: int, dp: Any = None, tp: Any = None, environ=None) -> tuple[int, int]:
    """The (dp, tp) mesh shape for ``device_count`` devices.

    ``dp``/``tp`` arguments win over ``WAN_TPU_DP``/``WAN_TPU_TP``; a value of
    None or 0 means "not given". With one axis given the other takes the rest.
    """
    if dp in (None, 0, ""):
        dp = environment.read(environment.DP, environ=environ)
    if tp in (None, 0, ""):
        tp = environment.read(environment.TP, environ=environ)
    given_dp = None if dp in (None, 0, "") else _positive_int("dp", dp)
    given_tp = None if tp in (None, 0, "") else _positive_int("tp", tp)
    if given_dp is None and given_tp is None:
        return default_mesh_shape(device_count)
    if given_tp is None:
        return given_dp, _one_axis(device_count, "dp", given_dp)
    if given_dp is None:
        return _one_axis(device_count, "tp", given_tp), given_tp
    if given_dp * given_tp != device_count:
        default_dp, default_tp = default_mesh_shape(device_count)
        raise ValueError(
            f"dp={given_dp} x tp={given_tp} = {given_dp * given_tp}, but {device_count} devices were found: "
            f"choose dp and tp whose product is {device_count}, e.g. dp={default_dp} tp={default_tp}"
        )
    return given_dp, given_tp


# Which mesh axis crosses the slower links first, as data. ``tp`` carries every layer's collectives (the
# tensor layout's all-reduces, the sequence layout's all-to-alls and weight gathers); ``dp`` carries none inside
# a step (it splits the CFG batch, whose halves meet once per step). So where devices sit in groups joined by
# slower links, ``dp`` is split across the groups first and ``tp`` only for what is left.
AXES_ACROSS_GROUPS = ("dp", "tp")


def group_key(devices) -> str:
    """The device attribute that tells the groups the slower links join: ``slice_index`` on TPU (every chip of
    one slice, all its hosts included, is on the one ICI torus, so a v6e-16 is one group), else
    ``process_index`` (GPU or CPU hosts, joined by the network)."""
    return "slice_index" if all(d.platform == "tpu" for d in devices) else "process_index"


def device_groups(devices) -> list[list]:
    """``devices`` in their groups (``group_key``), in order. A TPU device that names no slice (a deviceless
    topology's) is in slice 0."""
    key = group_key(devices)
    groups: dict = {}
    for device in devices:
        groups.setdefault(getattr(device, key, None) or 0, []).append(device)
    return [groups[index] for index in sorted(groups)]


def split_across_groups(shape: tuple[int, int], group_count: int) -> tuple[int, int]:
    """How many groups each of (dp, tp) spans, ``AXES_ACROSS_GROUPS`` first: e.g. (2, 4) over 2 hosts ->
    (2, 1), tp within each host; (2, 8) over 4 hosts -> (2, 2), tp across 2 of them. It always fits: the
    group count divides dp x tp, so what dp leaves of each prime factor, tp holds."""
    spans = {"dp": 1, "tp": 1}
    sizes = dict(zip(("dp", "tp"), shape))
    left = group_count
    for axis in AXES_ACROSS_GROUPS:
        span = math.gcd(sizes[axis], left)
        spans[axis], left = span, left // span
    return spans["dp"], spans["tp"]


def build_mesh(devices, dp=None, tp=None):
    """A ``jax.sharding.Mesh`` with axes ('dp', 'tp') over ``devices``, shape validated.

    On one group (one host, or one TPU slice of any number of hosts) the devices follow the physical topology
    (``create_device_mesh``). Over several groups (``device_groups``) the mesh is a hybrid one: each group holds
    whole ``tp`` rows where it can, and ``dp`` crosses the slower links first (``split_across_groups``)."""
    import jax
    from jax.experimental import mesh_utils

    devices = list(devices)
    shape = resolve_mesh_shape(len(devices), dp, tp)
    groups = device_groups(devices)
    if len(groups) == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        if len({len(group) for group in groups}) != 1:
            raise ValueError(f"the hosts or slices hold different numbers of devices "
                             f"({[len(group) for group in groups]}): every host must expose all its chips")
        spans = split_across_groups(shape, len(groups))
        within = (shape[0] // spans[0], shape[1] // spans[1])
        if spans[1] > 1:
            logger.warning("device mesh: tp=%d spans %d hosts or slices (dp=%d cannot take them all): every "
                           "layer's collectives cross their slower links", shape[1], spans[1], shape[0])
        grid = mesh_utils.create_hybrid_device_mesh(
            within, spans, devices, process_is_granule=group_key(devices) == "process_index",
            allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, ("dp", "tp"))


class MeshCache:
    """The meshes over one backend's devices, one per ``(dp, tp)`` shape."""

    def __init__(self, lock=None):
        self.lock = lock or threading.RLock()
        self.meshes: dict[tuple[int, int], Any] = {}

    def get(self, devices, dp: Any = None, tp: Any = None, platform: str = ""):
        """The mesh over ``devices`` of the shape ``dp``/``tp`` resolve to, built on first use."""
        shape = resolve_mesh_shape(len(devices), dp, tp)
        with self.lock:
            mesh = self.meshes.get(shape)
            if mesh is None:
                mesh = self.meshes[shape] = build_mesh(devices, *shape)
                logger.info("device mesh dp=%d x tp=%d over %d %s device(s)", shape[0], shape[1], len(devices),
                            platform)
        return mesh

    def clear(self) -> list[tuple[int, int]]:
        """Forget every mesh; returns the shapes there were."""
        with self.lock:
            shapes = list(self.meshes)
            self.meshes.clear()
        return shapes
