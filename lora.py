"""LoRA for the Wan transformers (every family's; each expert of Wan 2.2 A14B), fused into their sharded
weights on the device.

``read_lora`` turns a LoRA file into ``{parameter name: (down, up)}`` with diffusers'
own conversion: ``WanLoraLoaderMixin.lora_state_dict`` (ComfyUI/kohya
``diffusion_model.`` keys and musubi-tuner ``lora_unet_`` keys, alpha folded in),
then the steps of ``PeftAdapterMixin.load_lora_adapter``: the ``transformer.``
prefix, ``convert_unet_state_dict_to_peft``, and the ``LoraConfig`` diffusers
would build (from the file's ``lora_adapter_metadata``, else ``get_peft_kwargs``),
whose scaling (``lora_alpha / r`` per module, ``rank_pattern``/``alpha_pattern``
matched as PEFT matches them) is folded into ``up``. So ``W + s * up @ down`` is
what diffusers' ``fuse_lora(lora_scale=s)`` gives. PEFT itself is not needed.

``DeviceLoras`` applies a list of ``LoraSpec`` to the transformer's jax arrays:
each targeted weight becomes ``W_base + sum_i s_i * up_i @ down_i`` in a jitted
program whose output keeps the base array's sharding (each device computes its
own shard). The first time a weight is changed its base is copied to host
memory, so another LoRA, another strength or none restores the base bit-exactly
without reading the model again. Nothing is donated: each replaced array is
deleted once its successor is computed, so the device holds one extra weight at
a time. Ranks are padded to buckets of 64, so
switching between LoRAs of similar rank compiles nothing.

Numerics, as PEFT merges on CPU: the factors are rounded to the weight's dtype
(PEFT keeps them in the model's dtype), multiplied in float32, scaled, cast to
the weight's dtype once and added in that dtype. In fp32 this equals diffusers
to float32 rounding; in bf16 to the last bit except where two roundings of the
same value differ.

What diffusers' conversion does not do (diffusers 0.39), and so neither do we:

- ComfyUI/kohya keys are recognised only with the ``diffusion_model.`` prefix and
  the original Wan module names (``self_attn.q``, ``cross_attn.o``, ``ffn.0``);
  keys without a prefix or in diffusers' names under that prefix are refused.
- ``.diff`` keys (full weight differences, as in some distilled "LoRAs") are
  dropped, except ``head.head.diff``, and so are ``dora_scale`` keys (the LoRA
  is then applied as a plain LoRA); we log a warning naming them. PEFT DoRA
  (``lora_magnitude_vector``) is refused here.
- musubi-tuner files must have every block 0..N-1 with all of self_attn q/k/v/o,
  cross_attn q/k/v/o, ffn_0 and ffn_2 and an ``alpha`` for each, and nothing
  else (no text encoder, time or head layers); a LoRA trained on fewer modules
  fails diffusers' converter and is refused here with its message.
- ``text_encoder.`` keys are ignored (WanPipeline loads LoRA into the transformer
  only); kohya ``lora_te_`` keys beside ``lora_unet_`` ones fail the musubi converter.
- PEFT files are read only under the ``transformer.`` prefix (as diffusers saves
  them); PEFT alpha comes only from ``lora_adapter_metadata``, ``.alpha`` keys
  beside ``lora_A``/``lora_B`` are refused (diffusers refuses them too).
- Without metadata diffusers sets ``lora_alpha`` to the rank of the first
  module; in a file whose modules have different ranks, the others are scaled
  by that rank over theirs. We reproduce that, to equal diffusers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import loading, sharding
from .runtime import paths

logger = logging.getLogger("wan_tpu")

RANK_BUCKET = 64  # stacked ranks are padded up to a multiple of this, so similar LoRAs share one program
LORA_FOLDER_FIX = "put the LoRA file in ComfyUI/models/loras (or a folder extra_model_paths.yaml adds for loras)"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TRANSFORMER_PARAMETER = [re.compile(pattern) for pattern, _ in sharding.TRANSFORMER_RULES]
_READ_CACHE_SIZE = 4  # LoRA files kept in host memory (a rank-32 LoRA of Wan 14B is ~0.6 GB as float32)


# Which transformer a LoRA goes into. Wan 2.2 A14B's step-distillation and style LoRAs ship as a
# pair, one file per expert; Wan 2.1 and TI2V 5B have one transformer, so only "both" fits them.
EXPERTS = ("both", "high_noise", "low_noise")
EXPERT_INDEX = {"high_noise": 0, "low_noise": 1}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file, the strength it is applied at (diffusers' ``lora_scale``) and the expert it goes into."""

    path: str
    strength: float = 1.0
    expert: str = "both"

    def __post_init__(self):
        if self.expert not in EXPERTS:
            raise ValueError(f"LoRA expert={self.expert!r}: use one of {', '.join(EXPERTS)} (high_noise and "
                             f"low_noise are Wan 2.2 A14B's two transformers)")
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"LoRA path={self.path!r} is empty: give a .safetensors file")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            raise ValueError(f"LoRA strength={self.strength!r} is not a number: give e.g. 1.0") from None
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength={self.strength!r} is not finite: give e.g. 1.0")
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "strength", strength)


# ------------------------------------------------------------------ paths
def check_safetensors(path: str) -> None:
    """Raise ValueError unless ``path`` names a .safetensors file (pickles are never loaded)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".safetensors":
        return
    kind = "a pickle file, which this pack never loads" if suffix in _PICKLE_SUFFIXES else "not a safetensors file"
    raise ValueError(
        f"LoRA {os.path.basename(os.fspath(path))!r} is {kind}: use a .safetensors LoRA "
        f"(most are published as .safetensors; convert others with safetensors.torch.save_file)"
    )


def _lora_roots() -> list[tuple[str, str]]:
    import folder_paths  # ComfyUI's module; only called inside ComfyUI

    try:
        roots = list(folder_paths.get_folder_paths("loras"))
    except Exception:  # a ComfyUI without a "loras" folder type
        roots = []
    return paths.real_roots(roots)


def resolve_lora_path(name: str) -> str:
    """The real path of the LoRA file ``name`` names. Raises ValueError saying what to do.

    Inside ComfyUI (``folder_paths`` importable) ``name`` comes from whoever can reach
    the server: only files under ComfyUI's ``loras`` folders are accepted, as a name
    ``folder_paths.get_full_path("loras", name)`` finds or a path whose real location
    (symlinks followed) lies under one of those folders; ``~`` and ``..`` are refused,
    and an error names no path outside the folders (``runtime.paths.confined_path``).
    Outside ComfyUI any existing file.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"lora={name!r} is empty: give the name of a .safetensors LoRA file")
    if "\0" in name:
        raise ValueError(f"lora={name!r} has a NUL character: give the name of a .safetensors LoRA file")
    check_safetensors(name)
    if not loading.in_comfyui():
        path = os.path.expanduser(name)
        if os.path.isfile(path):
            return os.path.abspath(path)
        raise ValueError(f"lora={name!r}: no such file (looked for {os.path.abspath(path)}): give a LoRA file's path")
    roots = _lora_roots()
    no_roots = "none (ComfyUI has no models/loras folder)"

    def comfyui_finds():
        import folder_paths

        try:
            found = folder_paths.get_full_path("loras", name)
        except Exception:
            found = None
        return [found] if found else []

    real = paths.confined_path(name, roots, "file", "lora", "LoRA file name", no_roots, LORA_FOLDER_FIX,
                               folders="the LoRA folders", lookup=comfyui_finds)
    if real is not None:
        return real
    # A path relative to the server's working directory, if it lies inside the folders anyway.
    real = os.path.realpath(name)
    if os.path.isfile(real) and paths.inside_any(real, roots):
        return real
    allowed = ", ".join(given for given, _ in roots) or no_roots
    raise ValueError(f"lora={name!r}: no such LoRA file under the LoRA folders ({allowed}): {LORA_FOLDER_FIX}")


# ------------------------------------------------------------------ reading
def read_lora(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{transformer parameter name: (down [rank, in] float32, up [out, rank] float32)}`` of a LoRA file.

    ``name`` is as in ``module.named_parameters()`` ("blocks.0.attn1.to_q.weight"); a
    ``lora_B.bias`` (kohya ``diff_b``) targets the ``.bias`` with ``down`` = [[1]].
    Every scaling diffusers applies (alpha / rank, PEFT's ``lora_alpha / r``) is in
    ``up``, so ``W + s * (up @ down).reshape(W.shape)`` equals diffusers'
    ``fuse_lora(lora_scale=s)``. Cached per (real path, mtime, size); the arrays are
    read-only. Raises ValueError for a file that is not a LoRA of a Wan transformer.
    """
    return dict(_read_lora_cached(*_file_key(path)))


read_lora.cache_clear = lambda: _read_lora_cached.cache_clear()


def _file_key(path) -> tuple[str, int, int]:
    """(real path, mtime_ns, size) of a .safetensors LoRA file; ValueError if it is not one."""
    check_safetensors(path)
    real = os.path.realpath(os.fspath(path))
    try:
        stat = os.stat(real)
    except OSError:
        raise ValueError(f"LoRA file {os.fspath(path)!r} does not exist: give an existing .safetensors file") from None
    return real, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=_READ_CACHE_SIZE)
def _read_lora_cached(real: str, mtime_ns: int, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import safetensors
    import safetensors.torch

    shown = os.path.basename(real)
    try:
        state_dict = safetensors.torch.load_file(real, device="cpu")
        with safetensors.safe_open(real, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"LoRA {shown!r} is not a readable safetensors file ({error}): use a .safetensors LoRA") from None
    try:
        metadata = json.loads(header["lora_adapter_metadata"]) if header.get("lora_adapter_metadata") else None
    except ValueError:
        raise ValueError(f"LoRA {shown!r} has a lora_adapter_metadata header that is not JSON: use another copy") from None
    started = time.perf_counter()
    factors = convert_lora_state_dict(state_dict, metadata, shown)
    logger.info(
        "LoRA %s: %d weights, rank %s, read in %.2f s", shown, len(factors),
        sorted({down.shape[0] for down, _ in factors.values()}), time.perf_counter() - started,
    )
    return factors


def _not_wan(shown: str, keys, reason: str) -> ValueError:
    first = ", ".join(sorted(keys)[:4])
    return ValueError(
        f"LoRA {shown!r} is not a LoRA for a Wan 2.1 transformer ({reason}; its first keys: {first}): "
        f"use a Wan 2.1 LoRA in ComfyUI (diffusion_model.*), musubi-tuner (lora_unet_*) or diffusers (transformer.*) format"
    )


def _pattern_key(patterns, module_name: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first pattern matching a dotted suffix of the name.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


def _peft_state_dict(state_dict: dict, shown: str) -> dict:
    """The transformer's factors in PEFT's names (``<module>.lora_A.weight``, ...): diffusers'
    ``WanLoraLoaderMixin.lora_state_dict``, then ``load_lora_adapter``'s prefix and PEFT conversion."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    keys = list(state_dict)
    if not keys:
        raise ValueError(f"LoRA {shown!r} has no tensors: use a Wan 2.1 LoRA file")
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(dict(state_dict))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError, RuntimeError) as error:
        reason = f"diffusers' Wan converter refused it: {type(error).__name__} {error}"[:300]
        if any(key.startswith("lora_unet_") for key in keys):
            reason += " (musubi-tuner files need every block's self_attn, cross_attn and ffn layers, each with alpha)"
        raise _not_wan(shown, keys, reason) from None
    ignored = [key for key in keys if key.endswith((".diff", ".dora_scale")) and not key.endswith("head.head.diff")]
    if ignored:
        logger.warning(
            "LoRA %s: diffusers' Wan conversion ignores %d full-weight diff / DoRA key(s) (%s); "
            "the rest is applied, as in diffusers", shown, len(ignored), ", ".join(ignored[:3]),
        )
    if not all("lora" in key for key in converted):
        odd = [key for key in converted if "lora" not in key]
        raise _not_wan(shown, odd, "it has keys that are not LoRA factors")
    converted = {k.removeprefix("transformer."): v for k, v in converted.items() if k.startswith("transformer.")}
    if not converted:
        raise _not_wan(shown, keys, "it has no transformer keys")
    if "lora_A" not in next(iter(converted)):
        converted = convert_unet_state_dict_to_peft(converted)
    if any("lora_magnitude_vector" in key for key in converted):
        raise ValueError(f"LoRA {shown!r} is a DoRA, which this pack cannot fuse: use a plain LoRA")
    return converted


def _lora_config(converted: dict, metadata: dict | None, shown: str) -> dict:
    """The LoraConfig diffusers builds (peft_utils._create_lora_config), without PEFT: from the file's
    metadata, else ``get_peft_kwargs``."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    ranks = {f"^{k}": v.shape[1] for k, v in converted.items() if "lora_B" in k and v.ndim > 1}
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items() if k.startswith("transformer.")}
    if not config:  # (diffusers fails on metadata with no transformer entries; we read it as none)
        config = get_peft_kwargs(ranks, network_alpha_dict=None, peft_state_dict=converted)
    if config.get("use_dora"):
        raise ValueError(f"LoRA {shown!r} is a DoRA, which this pack cannot fuse: use a plain LoRA")
    return config


def _as_numpy(tensor) -> np.ndarray:
    import torch

    return tensor.detach().to(torch.float32).cpu().numpy()


def _module_factors(converted: dict, module: str, config: dict, shown: str) -> dict:
    """``{parameter name: (down, up)}`` of one module, its PEFT scaling (``lora_alpha / r``, or / sqrt(r)
    with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` matched as PEFT matches them) folded into ``up``."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    down_t, up_t = converted.get(f"{module}.lora_A.weight"), converted.get(f"{module}.lora_B.weight")
    if down_t is None or up_t is None:
        raise _not_wan(shown, [module], f"{module} has only one of lora_A/lora_B")
    key = _pattern_key(rank_pattern, module)
    module_r = rank_pattern[key] if key is not None else r
    key = _pattern_key(alpha_pattern, module)
    module_alpha = alpha_pattern[key] if key is not None else alpha
    if down_t.shape[0] != module_r or up_t.shape[1] != module_r:
        raise ValueError(
            f"LoRA {shown!r}: {module} has rank {down_t.shape[0]}, but its config says r={module_r}: "
            f"the file is inconsistent; use another copy of the LoRA"
        )
    scaling = module_alpha / (math.sqrt(module_r) if bool(config.get("use_rslora", False)) else module_r)
    if any(size != 1 for size in up_t.shape[2:]):
        raise ValueError(f"LoRA {shown!r}: {module} is a convolution LoRA with a kernel in lora_B, which is not supported")
    down = _as_numpy(down_t).reshape(down_t.shape[0], -1)  # [r, in] (a conv's kernel flattened)
    up = _as_numpy(up_t).reshape(up_t.shape[0], up_t.shape[1])  # [out, r]
    factors = {f"{module}.weight": (down, up * np.float32(scaling))}
    bias = converted.get(f"{module}.lora_B.bias")
    if bias is not None:  # PEFT's lora_bias: the base bias gets scaling * lora_B.bias
        factors[f"{module}.bias"] = (np.ones((1, 1), np.float32), _as_numpy(bias).reshape(-1, 1) * np.float32(scaling))
    return factors


def convert_lora_state_dict(state_dict: dict, metadata: dict | None, shown: str = "LoRA") -> dict:
    """``read_lora`` on a loaded state dict (torch tensors) and its ``lora_adapter_metadata``: diffusers'
    conversion (``_peft_state_dict``), the LoraConfig it would build (``_lora_config``), then each module's
    scaled factors (``_module_factors``), checked against the transformer's parameters."""
    converted = _peft_state_dict(state_dict, shown)
    config = _lora_config(converted, metadata, shown)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in sorted({key.split(".lora")[0] for key in converted}):
        factors.update(_module_factors(converted, module, config, shown))
    strangers = [name for name in factors if not any(p.fullmatch(name) for p in _TRANSFORMER_PARAMETER)]
    if strangers:
        raise ValueError(
            f"LoRA {shown!r} targets {len(strangers)} parameter(s) that a Wan 2.1 transformer does not have "
            f"({', '.join(strangers[:4])}): use a LoRA made for Wan 2.1"
        )
    for down, up in factors.values():
        down.flags.writeable = False
        up.flags.writeable = False
    return factors


# ------------------------------------------------------------------ device
def rank_bucket(rank: int) -> int:
    """The padded rank a stacked rank compiles at: the next multiple of RANK_BUCKET, at least RANK_BUCKET."""
    return max(RANK_BUCKET, -(-rank // RANK_BUCKET) * RANK_BUCKET)


class DeviceLoras:
    """Applies a list of ``LoraSpec`` to the sharded transformer weights on the device, exactly restorable.

    One instance per loaded transformer (its host copies are of that transformer's
    weights). ``apply`` updates the weights dict in place and returns it.
    """

    def __init__(self, manager, mesh):
        self.manager = manager
        self.mesh = mesh
        self._lock = threading.Lock()
        self._base: dict[str, np.ndarray] = {}  # name -> host copy of the base weight
        self._current: dict[str, object] = {}  # name -> the array this instance put in the weights dict
        self._changed: set[str] = set()  # names whose current array is not the base
        self._state: tuple = ()  # the applied ((real path, mtime, size, strength), ...)

    @property
    def host_bytes(self) -> int:
        """Host memory the base copies cost: the full (unsharded) bytes of every weight ever changed."""
        return sum(array.nbytes for array in self._base.values())

    @property
    def state(self) -> tuple:
        """The LoRAs applied now: ((real path, mtime_ns, size, strength), ...), () for none."""
        return self._state

    def live_arrays(self) -> list:
        """The device arrays this instance put in the weights dict (to delete on release)."""
        return [array for array in self._current.values() if not array.is_deleted()]

    def apply(self, weights: dict, loras: list[LoraSpec]) -> dict:
        """``weights`` (name -> jax array) with each targeted weight = base + sum_i s_i * up_i @ down_i.

        Updates ``weights`` in place and returns it. Arrays it replaces are deleted
        (the base is kept on the host), so keep only this dict. Weights no LoRA in
        ``loras`` targets any more go back to their base, bit-exactly; ``[]`` restores
        all. The same list again does nothing. Raises ValueError before changing
        anything if a LoRA does not fit this transformer.
        """
        loras = [spec if isinstance(spec, LoraSpec) else LoraSpec(*spec) for spec in loras]
        with self._lock:
            self._check_ownership(weights)
            active = [spec for spec in loras if spec.strength != 0.0]
            if self.applied(active):
                return weights
            state = tuple((*_file_key(spec.path), spec.strength) for spec in active)
            started = time.perf_counter()
            plan = self.check(weights, active)
            restore = sorted(self._changed - set(plan))
            try:
                for name, parts in plan.items():
                    self._replace(weights, name, self._updated(weights[name], name, parts))
                for name in restore:
                    self._replace(weights, name, self._restored(weights[name], name))
            except BaseException:
                self._state = None  # partly applied: the next apply redoes every weight it targets
                raise
            self._state = state
            logger.info(
                "LoRA: %s on %d weights, %d restored, in %.2f s; host copies of base weights: %.1f MiB",
                ", ".join(f"{os.path.basename(spec.path)} x{spec.strength:g}" for spec in active) or "none",
                len(plan), len(restore), time.perf_counter() - started,
                self.host_bytes / 2**20,
            )
            return weights

    def applied(self, loras: list[LoraSpec]) -> bool:
        """Whether ``loras`` are what is applied now (``apply`` would then do nothing)."""
        return tuple((*_file_key(spec.path), spec.strength) for spec in loras if spec.strength != 0.0) == self._state

    def check(self, weights: dict, loras: list[LoraSpec]) -> dict[str, list]:
        """Read ``loras`` and check each fits ``weights``, changing nothing; returns the update plan
        (name -> [(down, up, strength), ...]). Raises ValueError naming the LoRA that does not fit."""
        return self._plan(weights, [(spec, read_lora(spec.path)) for spec in loras if spec.strength != 0.0])

    # ---------------------------------------------------------- internals
    def _check_ownership(self, weights: dict) -> None:
        for name, array in self._current.items():
            if weights.get(name) is not array:
                raise ValueError(
                    f"weights[{name!r}] is not the array this DeviceLoras left there: the transformer was "
                    f"reloaded or its weights changed elsewhere; make a new DeviceLoras for each loaded transformer"
                )

    def _plan(self, weights: dict, files) -> dict[str, list]:
        """name -> [(down, up, strength), ...], every target checked against ``weights``."""
        plan: dict[str, list] = {}
        for spec, factors in files:
            shown = os.path.basename(spec.path)
            missing = [name for name in factors if name not in weights]
            if missing:
                raise ValueError(
                    f"LoRA {shown!r} targets {len(missing)} parameter(s) this transformer does not have "
                    f"({', '.join(missing[:4])}): it was made for another Wan model (e.g. image-to-video)"
                )
            for name, (down, up) in factors.items():
                shape = tuple(weights[name].shape)
                if up.shape[0] != shape[0] or up.shape[0] * down.shape[1] != math.prod(shape):
                    raise ValueError(
                        f"LoRA {shown!r}: {name} is {up.shape[0]}x{down.shape[1]} in the LoRA but {shape} in the "
                        f"model: it was made for another model size (e.g. Wan 1.3B vs 14B)"
                    )
                plan.setdefault(name, []).append((down, up, spec.strength))
        return plan

    def _replace(self, weights: dict, name: str, new) -> None:
        old = weights[name]
        shared = any(other is old for key, other in weights.items() if key != name)
        weights[name] = new
        self._current[name] = new
        if not shared and not old.is_deleted():
            old.delete()  # the base lives on the host now; free the device copy at once

    def _base_on_device(self, array, name: str):
        """The base weight of ``name`` as a device array with ``array``'s sharding."""
        jax = self.manager.jax
        if name not in self._base:
            base = np.array(array, copy=True)  # a copy: on CPU a jax array's buffer may be viewed, not copied
            base.flags.writeable = False
            self._base[name] = base
        if name not in self._changed:
            return array
        return jax.device_put(self._base[name], array.sharding)

    def _restored(self, array, name: str):
        restored = self._base_on_device(array, name)
        self._changed.discard(name)
        return restored

    def _updated(self, array, name: str, parts: list):
        jax = self.manager.jax
        from jax.sharding import NamedSharding, PartitionSpec

        base = self._base_on_device(array, name)
        rank = sum(down.shape[0] for down, _, _ in parts)
        bucket = rank_bucket(rank)
        downs, ups, scales = [], [], []
        for down, up, strength in parts:
            downs.append(down)
            ups.append(up)
            scales.append(np.full(down.shape[0], strength, np.float32))
        pad = bucket - rank
        down = np.concatenate(downs + [np.zeros((pad, downs[0].shape[1]), np.float32)], axis=0)  # [bucket, in]
        up = np.concatenate(ups + [np.zeros((ups[0].shape[0], pad), np.float32)], axis=1)  # [out, bucket]
        scale = np.concatenate(scales + [np.zeros(pad, np.float32)])  # [bucket]
        out_sharding = array.sharding
        if isinstance(out_sharding, NamedSharding):
            spec = tuple(out_sharding.spec) + (None,) * (array.ndim - len(out_sharding.spec))
            mesh = out_sharding.mesh
            up_sharding = NamedSharding(mesh, PartitionSpec(spec[0], None))
            down_sharding = NamedSharding(mesh, PartitionSpec(None, spec[1]) if array.ndim == 2 else PartitionSpec())
            scale_sharding = NamedSharding(mesh, PartitionSpec())
        elif out_sharding.is_fully_replicated:
            up_sharding = down_sharding = scale_sharding = out_sharding
        else:
            up_sharding = down_sharding = scale_sharding = NamedSharding(self.mesh, PartitionSpec())
        program = _program(jax, out_sharding)
        updated = program(
            base,
            jax.device_put(down, down_sharding),
            jax.device_put(up, up_sharding),
            jax.device_put(scale, scale_sharding),
        )
        self._changed.add(name)
        return updated


_PROGRAMS: dict = {}  # out sharding -> jitted update, shared by every DeviceLoras (a reloaded transformer reuses them)
_PROGRAMS_LOCK = threading.Lock()


def _program(jax, out_sharding):
    """The jitted update for weights of ``out_sharding``; jax specialises it per shape, dtype and rank bucket."""
    with _PROGRAMS_LOCK:
        program = _PROGRAMS.get(out_sharding)
        if program is None:
            jnp = jax.numpy

            def update(base, down, up, scale):
                # base: [out, ...] the weight; down: [bucket, in] f32; up: [out, bucket] f32; scale: [bucket] f32
                if base.dtype != jnp.float32:  # PEFT holds the factors in the model's dtype
                    down = down.astype(base.dtype).astype(jnp.float32)
                    up = up.astype(base.dtype).astype(jnp.float32)
                delta = jnp.matmul(up * scale[None, :], down, precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)  # [out, in]
                return base + delta.reshape(base.shape).astype(base.dtype)

            program = _PROGRAMS[out_sharding] = jax.jit(update, out_shardings=out_sharding)
        return program
