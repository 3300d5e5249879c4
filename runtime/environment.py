"""Every environment variable the pack reads, named and read here only.

Modules import the name they need and call ``read`` (or ``flag``), so a newcomer finds all the knobs in
one list, and tests can pass their own mapping as ``environ``.
"""

from __future__ import annotations

import os
from typing import Mapping

# The mesh: ``dp`` x ``tp`` devices (either alone takes the rest).
DP = "WAN_TPU_DP"
TP = "WAN_TPU_TP"
# Attention: auto | splash | xla | cudnn, and the shortest key sequence that takes the Splash kernel.
ATTENTION = "WAN_TPU_ATTENTION"
SPLASH_MIN_KV_LEN = "WAN_TPU_SPLASH_MIN_KV_LEN"
# The persistent compile cache: "0" turns it off; jax's own folder variable places it.
COMPILE_CACHE = "WAN_TPU_COMPILE_CACHE"
JAX_COMPILATION_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
# The denoising step's layout: auto | tensor | sequence.
LAYOUT = "WAN_TPU_LAYOUT"
# HBM per device in GiB, where the device does not say (the HBM plan).
HBM_GIB = "WAN_TPU_HBM_GIB"
# Where MagCache calibrations are saved.
MAGCACHE_DIR = "WAN_TPU_MAGCACHE_DIR"
# Extra folders (os.pathsep-separated) that may hold models, beside ComfyUI's.
MODEL_ROOTS = "WAN_TPU_MODEL_ROOTS"
# Local folders only, never the hub; and huggingface_hub's own switch (only repos already in its cache).
OFFLINE = "WAN_TPU_OFFLINE"
HF_OFFLINE = "HF_HUB_OFFLINE"

# Past one host (``runtime.multihost``): host 0's HOST:PORT for JAX's coordinator, the number of processes (one
# per host), this one's id (0: ComfyUI, the leader), how long the leader waits for a follower's answer (s), and
# how long every process waits for all to join (s).
COORDINATOR = "WAN_TPU_COORDINATOR"
NUM_PROCESSES = "WAN_TPU_NUM_PROCESSES"
PROCESS_ID = "WAN_TPU_PROCESS_ID"
FOLLOWER_TIMEOUT = "WAN_TPU_FOLLOWER_TIMEOUT"
JOIN_TIMEOUT = "WAN_TPU_JOIN_TIMEOUT"
# What ComfyUI does after a follower is lost: "local" (go on with host 0's devices alone) or "refuse".
ON_FOLLOWER_LOSS = "WAN_TPU_ON_FOLLOWER_LOSS"

_TRUE = ("1", "true", "yes", "on")


def read(name: str, default: str | None = None, environ: Mapping | None = None) -> str | None:
    """The variable's value (``default`` when unset or empty)."""
    value = (os.environ if environ is None else environ).get(name)
    return default if value in (None, "") else value


def flag(name: str, environ: Mapping | None = None) -> bool:
    """True when the variable is set to 1, true, yes or on."""
    return (read(name, "", environ) or "").strip().lower() in _TRUE
