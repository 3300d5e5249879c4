"""Arrays on the mesh: weights placed by sharding rules, the shardings of batches and activations, and
the sequence layout's gathered or whole weights. Model-agnostic.

Imports jax inside its functions only.
"""

from __future__ import annotations

import logging

from .. import sharding
from ..utils import device_errors, torch_to_numpy

logger = logging.getLogger("wan_tpu")


def replicated(mesh):
    """Every device holds the whole array."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, batch: int):
    """Split a batch over dp when dp divides it, else replicate."""
    from jax.sharding import NamedSharding, PartitionSpec

    if batch % mesh.shape["dp"] == 0 and mesh.shape["dp"] > 1:
        return NamedSharding(mesh, PartitionSpec("dp"))
    return NamedSharding(mesh, PartitionSpec())


def to_host(array):
    """A device array's whole value as numpy on this host.

    One that spans other processes' devices (a multi-host mesh, ``runtime.multihost``) and is not whole on
    each is gathered: a collective, which every process runs, as every process runs the same stages."""
    import numpy as np

    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def local_device(mesh):
    """The mesh's first device on this host: the one whose memory a program is checked against (on one
    host, the mesh's first device)."""
    import jax

    here = jax.process_index()
    return next((device for device in mesh.devices.flat if device.process_index == here), mesh.devices.flat[0])


def activation_sharding(mesh, batch: int, layout: str):
    """[batch, tokens, dim]: split over dp like the batch, and in the sequence layout by token too."""
    if layout != "sequence":
        return batch_sharding(mesh, batch)
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*sharding.token_split(dict(mesh.shape), batch).spec()))


def place_weights(manager, module, rules, mesh, component: str):
    """Copy ``module``'s parameters and buffers onto ``mesh`` following ``rules``.

    Each tensor goes straight from host memory to its shards (never whole onto
    one device). The module's own tensors are then moved to the meta device to
    free host memory; it keeps only its structure. Returns (weights, plan).
    """
    jax = manager.jax
    # Tied weights (UMT5's shared embedding) appear under each name, placed once.
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, rules, dict(mesh.shape))
    named = sharding.to_named_shardings(plan, mesh)
    weights, placed = {}, {}
    try:
        with device_errors(f"loading the {component}", "Use a mesh with more devices (tp), or fp32 -> bf16."):
            for name, tensor in state.items():
                if id(tensor) not in placed:
                    placed[id(tensor)] = jax.device_put(torch_to_numpy(tensor), named[name])
                weights[name] = placed[id(tensor)]
    except BaseException:
        for array in placed.values():
            array.delete()
        raise
    module.to("meta")
    unique = {id(a): (n, a) for n, a in weights.items()}.values()
    total = sum(a.nbytes for _, a in unique)
    per_device = plan.bytes_per_device(
        {n: a.shape for n, a in unique}, {n: a.dtype.itemsize for n, a in unique}, dict(mesh.shape)
    )
    logger.info(
        "%s: %d tensors, %.1f MiB in all, %.1f MiB per device on mesh %s",
        component, len(weights), total / 2**20, per_device / 2**20, dict(mesh.shape),
    )
    return weights, plan


def unique_arrays(weights: dict) -> list:
    """The distinct arrays of a weights dict (tied weights appear once)."""
    return list({id(array): array for array in weights.values()}.values())


def gather_split_weights(manager, weights: dict, plan_specs: dict, mesh) -> dict:
    """The sequence layout's weights, inside ``jax.jit``: every split one (but ``sharding.SEQUENCE_KEEP_SPLIT``)
    constrained whole, so XLA gathers each where its layer uses it (FSDP-style), layer by layer."""
    whole = replicated(mesh)
    gathered = sharding.sequence_gathered_weights(plan_specs)
    constrain = manager.jax.lax.with_sharding_constraint
    return {name: constrain(value, whole) if name in gathered else value for name, value in weights.items()}


def whole_weight_copies(manager, weights: dict, plan_specs: dict, mesh) -> tuple[dict, list]:
    """The sequence layout with whole weights: ``weights`` with every weight it would gather per layer
    (``sharding.sequence_gathered_weights``) replaced by a whole copy on every device, made once for a run
    so that no step gathers them. Returns (the weights for the step, the copies: delete them after the run)."""
    whole = replicated(mesh)
    copies = {}
    try:
        for name in sorted(sharding.sequence_gathered_weights(plan_specs)):
            copies[name] = manager.jax.device_put(weights[name], whole)
    except BaseException:
        for array in copies.values():
            array.delete()
        raise
    return {**weights, **copies}, list(copies.values())
