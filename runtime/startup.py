"""Starting jax and torchax once: the torch/torchax compat, the persistent compile cache, and the count of
programs compiled.

``TorchaxEnvManager.start`` calls these in order; nothing here runs at import (importing this module
imports neither jax nor torch).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import environment

logger = logging.getLogger("wan_tpu")

# torchax 0.0.13 names ATen "Dimname" overloads at import time that torch 2.13
# removed. Each missing overload is aliased to its positional-int sibling,
# which has the same cast policy and decomposition; the named variants are
# never dispatched (the models run here use no named tensors).
TORCH_DIMNAME_ALIASES: dict[tuple[str, str], str] = {
    ("prod", "dim_Dimname"): "dim_int",
    ("all", "dimname"): "dim",
    ("all", "dimname_out"): "out",
    ("index_add", "dimname"): "default",
    ("index_copy", "dimname"): "default",
    ("index_copy_", "dimname"): "default",
    ("index_fill", "Dimname_Scalar"): "int_Scalar",
    ("index_fill", "Dimname_Tensor"): "int_Tensor",
    ("index_fill_", "Dimname_Scalar"): "int_Scalar",
    ("index_fill_", "Dimname_Tensor"): "int_Tensor",
    ("unbind", "Dimname"): "int",
    ("norm", "names_ScalarOpt_dim"): "ScalarOpt_dim",
    ("norm", "names_ScalarOpt_dim_dtype"): "ScalarOpt_dim_dtype",
    ("norm", "names_dtype_out"): "dtype_out",
    ("norm", "names_out"): "out",
    ("std", "correction_names"): "correction",
    ("std", "correction_names_out"): "correction_out",
    ("std", "names_dim"): "dim",
    ("std", "names_out"): "out",
    ("std_mean", "correction_names"): "correction",
    ("std_mean", "names_dim"): "dim",
}


def apply_torch_compat(aten_namespace: Any = None) -> list[str]:
    """Alias the ATen overloads torchax expects but this torch lacks.

    Must run before torchax is imported. Returns the aliases it added ("op.overload");
    on a torch that still has every overload it adds none and changes nothing.
    """
    if aten_namespace is None:
        import torch

        aten_namespace = torch.ops.aten
    added = []
    for (op_name, overload), sibling in TORCH_DIMNAME_ALIASES.items():
        packet = getattr(aten_namespace, op_name, None)
        if packet is None or overload in packet.overloads():
            continue
        setattr(packet, overload, getattr(packet, sibling))
        added.append(f"{op_name}.{overload}")
    if added:
        logger.debug("aliased %d ATen overloads missing from this torch: %s", len(added), added)
    return added


def import_jax_and_torchax():
    """``(jax, torchax)``, torchax imported after the compat aliases it needs."""
    import jax

    apply_torch_compat()
    import torchax

    return jax, torchax


def setup_compile_cache(jax, environ=None) -> str | None:
    """Turn on JAX's persistent compilation cache for every program; returns its folder, or None when
    ``WAN_TPU_COMPILE_CACHE=0`` turns it off."""
    if environment.read(environment.COMPILE_CACHE, "1", environ) == "0":
        logger.info("JAX persistent compilation cache disabled by %s=0", environment.COMPILE_CACHE)
        return None
    # JAX reads JAX_COMPILATION_CACHE_DIR itself; only fill in our default.
    cache_dir = jax.config.jax_compilation_cache_dir or environment.read(environment.JAX_COMPILATION_CACHE_DIR,
                                                                         environ=environ)
    if not cache_dir:
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jax_cache")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: the VAE and scheduler pieces compile fast but
    # add up on a cold start.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    logger.info("JAX persistent compilation cache: %s", cache_dir)
    return cache_dir


class CompileCounter:
    """Counts, from jax's monitoring events, the programs compiled and those the persistent cache gave."""

    def __init__(self):
        self.backend_compiles = 0  # compile-or-load-from-the-persistent-cache
        self.cache_hits = 0

    def listen(self, jax) -> None:
        jax.monitoring.register_event_duration_secs_listener(self.on_duration_event)
        jax.monitoring.register_event_listener(self.on_event)

    def on_duration_event(self, event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.backend_compiles += 1

    def on_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    @property
    def compiled(self) -> int:
        """Programs compiled, persistent-cache hits excluded."""
        return self.backend_compiles - self.cache_hits
