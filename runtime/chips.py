"""The TPU chips the pack knows, in one table: what jax calls each, its HBM, and its published speeds.

Every module that keys on a chip asks this table: the HBM plan (``hbm_bytes``), the layout rule
(``sharding.choose_layout``), Splash's block sizes (``splash_attention.block_sizes_for``) and the
benchmarks (``benchmarks/tpu_compile.py``, ``benchmarks/tpu_cycles.py``).

jax's ``device_kind`` strings are as jax/_src/pallas/mosaic/tpu_info.py matches them: v6e reports
"TPU v6 lite", v5e "TPU v5 lite", v5p "TPU v5", v4 "TPU v4"; the marketing names ("TPU v6e", "TPU v5e",
"TPU v5p") are accepted too. ``chip_for`` matches a chip's ``needles`` case-insensitively as substrings,
chips in table order, so each "lite" chip comes before the bare generation its name contains.

Imports nothing beyond the standard library (``splash_attention.py`` loads it by path where that file is
loaded alone).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    """One TPU generation.

    ``hbm_gib`` is the nominal HBM of one jax device (one chip from v4 on; one core on v2/v3). A device's
    own ``memory_stats()["bytes_limit"]``, where it has one, is what XLA can really allocate, a little
    below it. ``peak_flops`` (bf16 FLOP/s per chip) and ``ici_gbps`` (inter-chip interconnect per chip,
    Gbit/s, all links together) are Google Cloud's published figures (cloud.google.com/tpu/docs/v5e,
    /v6e, /v5p, /v4), None where the pack has none.
    """

    name: str  # Google Cloud's name, as in a slice name ("v6e" of "v6e-8")
    device_kind: str  # what jax reports as ``device.device_kind``
    needles: tuple[str, ...]  # lower-case substrings of a device_kind that name this chip
    hbm_gib: float
    peak_flops: float | None = None
    ici_gbps: float | None = None
    cores_per_chip: int = 1  # the "-N" of a slice name counts cores (v4, v5p) or chips (v5e, v6e)
    three_d: bool = False  # topology names are AxBxC (v4, v5p) or AxB (v5e, v6e)

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GiB)


V6E = Chip("v6e", "TPU v6 lite", ("v6 lite", "v6e"), 32, peak_flops=918e12, ici_gbps=3584)
V5E = Chip("v5e", "TPU v5 lite", ("v5 lite", "v5e"), 16, peak_flops=197e12, ici_gbps=1600)
V5P = Chip("v5p", "TPU v5", ("v5p", "v5"), 95, peak_flops=459e12, ici_gbps=4800, cores_per_chip=2, three_d=True)
V4I = Chip("v4i", "TPU v4 lite", ("v4 lite",), 8)
V4 = Chip("v4", "TPU v4", ("v4",), 32, peak_flops=275e12, ici_gbps=2400, cores_per_chip=2, three_d=True)
V3 = Chip("v3", "TPU v3", ("v3",), 16, cores_per_chip=2)
V2 = Chip("v2", "TPU v2", ("v2",), 8, cores_per_chip=2)

CHIPS: tuple[Chip, ...] = (V6E, V5E, V5P, V4I, V4, V3, V2)  # in matching order
BY_NAME: dict[str, Chip] = {chip.name: chip for chip in CHIPS}


def chip_for(device_kind: str | None) -> Chip | None:
    """The chip a jax ``device_kind`` (e.g. "TPU v6 lite") names, or None (a CPU, a GPU, an unknown TPU)."""
    kind = (device_kind or "").lower()
    for chip in CHIPS:
        if any(needle in kind for needle in chip.needles):
            return chip
    return None


def hbm_bytes(device_kind: str | None) -> int | None:
    """Nominal HBM bytes of one device of ``device_kind``, or None if unknown."""
    chip = chip_for(device_kind)
    return None if chip is None else chip.hbm_bytes
