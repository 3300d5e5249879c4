"""The cache of loaded, sharded components: one entry per key, with the device arrays it owns, which
releasing it deletes (so HBM is free even while a caller still holds a reference)."""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("wan_tpu")


@dataclass
class CachedComponent:
    value: Any
    arrays: list  # the device arrays this entry owns, deleted on release


def delete_arrays(arrays) -> int:
    """Delete each device array not deleted yet; returns the bytes freed."""
    freed = 0
    for array in arrays:
        try:
            if not array.is_deleted():
                freed += array.nbytes
                array.delete()
        except Exception:  # an array already donated or freed elsewhere
            pass
    return freed


def device_memory(jax) -> dict:
    """Per device id: its kind, platform and memory (``memory_stats()``: used and total where the backend
    reports them, None on CPU), with ``pack_bytes`` 0 for ``ComponentCache.report`` to fill in."""
    devices = {}
    for device in jax.local_devices():  # only this host's report memory (the same list on one host)
        try:
            stats = device.memory_stats() or {}
        except Exception:  # a backend without memory statistics
            stats = {}
        devices[device.id] = {"id": device.id, "kind": device.device_kind, "platform": device.platform,
                              "used_bytes": stats.get("bytes_in_use"), "total_bytes": stats.get("bytes_limit"),
                              "pack_bytes": 0}
    return devices


class ComponentCache:
    """Components by key, each built once; ``replaces`` frees the entries a new one supersedes first."""

    def __init__(self, lock=None):
        self.lock = lock or threading.RLock()
        self._entries: dict[tuple, CachedComponent] = {}

    def get_or_build(self, key: tuple, build: Callable[[], tuple[Any, list]],
                     replaces: Callable[[tuple], bool] = None):
        """The cached value for ``key``, built once with ``build`` (which returns ``(value, device_arrays)``).

        If ``build`` raises, nothing is cached and its arrays are left to the garbage collector."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry.value
            if replaces is not None:
                for other in [k for k in self._entries if k != key and replaces(k)]:
                    self.drop(other, reason=f"replaced by {key}")
            value, arrays = build()
            self._entries[key] = CachedComponent(value, list(arrays))
            return value

    def set_arrays(self, key: tuple, arrays: list) -> None:
        with self.lock:
            self._entries[key].arrays = list(arrays)

    def keys(self) -> list[tuple]:
        with self.lock:
            return list(self._entries)

    def owned_arrays(self) -> list:
        with self.lock:
            return [a for entry in self._entries.values() for a in entry.arrays]

    def drop(self, key, reason: str) -> int:
        """Release one entry, deleting its arrays; returns the bytes freed."""
        with self.lock:
            entry = self._entries.pop(key)
        freed = delete_arrays(entry.arrays)
        logger.info("released %s (%s, %.1f MiB)", key, reason, freed / 2**20)
        return freed

    def clear(self) -> tuple[list, int]:
        """Release every entry; returns the keys there were and the bytes freed."""
        with self.lock:
            keys = list(self._entries)
            freed = sum(delete_arrays(self._entries[k].arrays) for k in keys)
            self._entries.clear()
        return keys, freed

    def report(self, devices: dict) -> list[dict]:
        """Per component its kind, model folder name and bytes held; adds each one's shards to ``devices``'
        ``pack_bytes`` (from ``device_memory``)."""
        components = []
        with self.lock:
            for key, entry in self._entries.items():
                held = 0
                for array in entry.arrays:
                    if array.is_deleted():
                        continue
                    held += array.nbytes
                    shard_bytes = math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
                    for device in array.sharding.device_set:
                        if device.id in devices:
                            devices[device.id]["pack_bytes"] += shard_bytes
                kind, model = (key[0], key[1]) if isinstance(key, tuple) and len(key) > 1 else (str(key), "")
                # The model's folder name only: the page is open to whoever reaches the server.
                components.append({"kind": kind, "model": os.path.basename(str(model).rstrip("/")), "bytes": held})
        return components
