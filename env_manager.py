"""The one owner of process-global device state: ``TorchaxEnvManager``.

Importing this module imports neither jax nor torchax (ComfyUI imports every
pack at start-up, and importing torchax changes PyTorch process-wide). The
manager starts them on first use, under a lock, and holds:

- the torch/torchax version compat (``apply_torch_compat``);
- the platform (tpu, gpu or cpu) and the validated ``(dp, tp)`` mesh;
- the JAX persistent compilation cache;
- the operator overrides, registered through torchax's public API, with the
  single attention-dispatch function;
- the cache of loaded, sharded components, and ``release()`` to drop it all.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("wan_tpu")

# Environment variables, all namespaced.
ENV_DP = "WAN_TPU_DP"
ENV_TP = "WAN_TPU_TP"
ENV_ATTENTION = "WAN_TPU_ATTENTION"  # auto | splash | xla | cudnn
ENV_SPLASH_MIN_KV_LEN = "WAN_TPU_SPLASH_MIN_KV_LEN"
ENV_COMPILE_CACHE = "WAN_TPU_COMPILE_CACHE"  # set to 0 to disable the persistent cache

# Self-attention whose key/value sequence is at least this long goes to the
# Splash kernel on TPU. Wan's cross-attention has 512 keys and its
# self-attention 30k-76k at 480P/720P, so any value in between separates them;
# below ~10k tokens XLA's fused attention is as fast. This is the only
# threshold in the pack.
SPLASH_MIN_KV_LEN = 10_000

ATTENTION_BACKENDS = ("auto", "splash", "xla", "cudnn")

# torchax 0.0.13 names ATen "Dimname" overloads at import time that torch 2.13
# removed. Each missing overload is aliased to its positional-int sibling,
# which has the same cast policy and decomposition; the named variants are
# never dispatched (Wan uses no named tensors).
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


def resolve_mesh_shape(device_count: int, dp: Any = None, tp: Any = None, environ=None) -> tuple[int, int]:
    """The (dp, tp) mesh shape for ``device_count`` devices.

    ``dp``/``tp`` arguments win over ``WAN_TPU_DP``/``WAN_TPU_TP``; a value of
    None or 0 means "not given". With one axis given the other takes the rest.
    """
    environ = os.environ if environ is None else environ
    if dp in (None, 0, "") and environ.get(ENV_DP):
        dp = environ[ENV_DP]
    if tp in (None, 0, "") and environ.get(ENV_TP):
        tp = environ[ENV_TP]
    given_dp = None if dp in (None, 0, "") else _positive_int("dp", dp)
    given_tp = None if tp in (None, 0, "") else _positive_int("tp", tp)
    if given_dp is None and given_tp is None:
        return default_mesh_shape(device_count)
    if given_dp is not None and given_tp is None:
        if device_count % given_dp:
            raise ValueError(
                f"dp={given_dp} does not divide the {device_count} devices found: "
                f"choose dp among {_divisors(device_count)}"
            )
        return given_dp, device_count // given_dp
    if given_tp is not None and given_dp is None:
        if device_count % given_tp:
            raise ValueError(
                f"tp={given_tp} does not divide the {device_count} devices found: "
                f"choose tp among {_divisors(device_count)}"
            )
        return device_count // given_tp, given_tp
    if given_dp * given_tp != device_count:
        raise ValueError(
            f"dp={given_dp} x tp={given_tp} = {given_dp * given_tp}, but {device_count} devices were found: "
            f"choose dp and tp whose product is {device_count}, e.g. dp={default_mesh_shape(device_count)[0]} "
            f"tp={default_mesh_shape(device_count)[1]}"
        )
    return given_dp, given_tp


def build_mesh(devices, dp=None, tp=None):
    """A ``jax.sharding.Mesh`` with axes ('dp', 'tp') over ``devices``, shape validated."""
    import jax
    from jax.experimental import mesh_utils

    shape = resolve_mesh_shape(len(devices), dp, tp)
    grid = mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, ("dp", "tp"))


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


@dataclass
class _CachedComponent:
    value: Any
    arrays: list  # the device arrays this entry owns, deleted on release


class TorchaxEnvManager:
    """Process-wide owner of jax/torchax, the mesh and the cached components.

    Use ``TorchaxEnvManager.instance()``; nothing heavy happens until a method
    that needs jax is called.
    """

    _instance: "TorchaxEnvManager | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def instance(cls) -> "TorchaxEnvManager":
        if cls._instance is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    def __init__(self):
        self._lock = threading.RLock()
        self._jax = None
        self._torchax = None
        self._env = None
        self._meshes: dict[tuple[int, int], Any] = {}
        self._components: dict[tuple, _CachedComponent] = {}
        self._compile_count = 0
        self._cache_hits = 0
        self._attention_backend = None  # None: read ENV_ATTENTION each time
        self._splash_min_kv_len = None
        self._logged_attention_choices: set = set()
        self._active_mesh = threading.local()
        self._target = threading.local()
        self.compile_cache_dir: str | None = None

    # ----------------------------------------------------------- start-up
    def start(self):
        """Import jax and torchax and set them up, once. Returns the torchax env."""
        if self._env is not None:
            return self._env
        with self._lock:
            if self._env is not None:
                return self._env
            import jax

            apply_torch_compat()
            import torchax

            self._jax = jax
            self._torchax = torchax
            self._setup_compile_cache()
            jax.monitoring.register_event_duration_secs_listener(self._on_jax_duration_event)
            jax.monitoring.register_event_listener(self._on_jax_event)
            env = torchax.default_env()
            self._register_overrides(env)
            self._env = env
            logger.info(
                "JAX %s on %s: %d device(s); torchax %s",
                jax.__version__, self.platform, jax.device_count(), torchax.__version__,
            )
            return env

    @property
    def jax(self):
        self.start()
        return self._jax

    @property
    def env(self):
        return self.start()

    @property
    def platform(self) -> str:
        """'tpu', 'gpu' or 'cpu': the backend of the default JAX devices, or the
        platform set by ``target_platform`` while a program is traced for it."""
        target = getattr(self._target, "platform", None)
        if target is not None:
            return target
        backend = self.jax.default_backend()
        return "gpu" if backend in ("gpu", "cuda", "rocm") else backend

    @contextlib.contextmanager
    def target_platform(self, platform: str):
        """Trace for ``platform`` ('tpu', 'gpu' or 'cpu') instead of the default backend.

        Within this block (this thread only) the attention dispatch chooses as
        it would on ``platform``: how ``benchmarks/tpu_compile.py`` compiles the
        TPU programs, Splash included, on a machine with no TPU."""
        if platform not in ("tpu", "gpu", "cpu"):
            raise ValueError(f"platform={platform!r}: use 'tpu', 'gpu' or 'cpu'")
        previous = getattr(self._target, "platform", None)
        self._target.platform = platform
        try:
            yield platform
        finally:
            self._target.platform = previous

    def _setup_compile_cache(self):
        jax = self._jax
        if os.environ.get(ENV_COMPILE_CACHE, "1") == "0":
            logger.info("JAX persistent compilation cache disabled by %s=0", ENV_COMPILE_CACHE)
            return
        # JAX reads JAX_COMPILATION_CACHE_DIR itself; only fill in our default.
        cache_dir = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if not cache_dir:
            cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jax_cache")
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # Cache every program: the VAE and scheduler pieces compile fast but
        # add up on a cold start.
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        self.compile_cache_dir = cache_dir
        logger.info("JAX persistent compilation cache: %s", cache_dir)

    def _on_jax_duration_event(self, event: str, duration: float, **_):
        # Timed around compile-or-load-from-the-persistent-cache.
        if event == "/jax/core/compile/backend_compile_duration":
            self._compile_count += 1

    def _on_jax_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self._cache_hits += 1

    def compile_count(self) -> int:
        """How many XLA programs this process has compiled (persistent-cache hits excluded)."""
        self.start()
        return self._compile_count - self._cache_hits

    def cache_hit_count(self) -> int:
        """How many programs came from the persistent compilation cache instead."""
        self.start()
        return self._cache_hits

    # --------------------------------------------------------------- mesh
    def mesh(self, dp: Any = None, tp: Any = None):
        """The (dp, tp) mesh over all devices of the default backend, built once per shape."""
        devices = self.jax.devices()
        shape = resolve_mesh_shape(len(devices), dp, tp)
        with self._lock:
            mesh = self._meshes.get(shape)
            if mesh is None:
                mesh = self._meshes[shape] = build_mesh(devices, *shape)
                logger.info(
                    "device mesh dp=%d x tp=%d over %d %s device(s)", shape[0], shape[1], len(devices), self.platform
                )
        return mesh

    @contextlib.contextmanager
    def active_mesh(self, mesh, token_split=None):
        """Make ``mesh`` the one attention shards over while a model is traced.

        Attention traced inside this block is planned attention (see
        ``choose_attention``); outside it nothing goes to Splash.
        ``token_split`` (``sharding.TokenSplit``, the sequence layout): attention's
        output goes back to its tokens split over the devices."""
        previous = (getattr(self._active_mesh, "mesh", None), getattr(self._active_mesh, "token_split", None))
        self._active_mesh.mesh, self._active_mesh.token_split = mesh, token_split
        try:
            yield mesh
        finally:
            self._active_mesh.mesh, self._active_mesh.token_split = previous

    # ---------------------------------------------------------- attention
    def set_attention_backend(self, backend: str | None = None, splash_min_kv_len: int | None = None):
        """Override the attention choice ('auto', 'splash', 'xla', 'cudnn') and the Splash threshold.

        None restores the default (the environment variable, else 'auto'/SPLASH_MIN_KV_LEN).
        """
        if backend is not None and backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is unknown: use one of {ATTENTION_BACKENDS}")
        self._attention_backend = backend
        self._splash_min_kv_len = splash_min_kv_len
        self._logged_attention_choices.clear()

    def attention_settings(self) -> tuple[str, int]:
        backend = self._attention_backend or os.environ.get(ENV_ATTENTION, "auto") or "auto"
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{ENV_ATTENTION}={backend!r} is unknown: use one of {ATTENTION_BACKENDS}")
        min_kv = self._splash_min_kv_len
        if min_kv is None:
            min_kv = int(os.environ.get(ENV_SPLASH_MIN_KV_LEN, SPLASH_MIN_KV_LEN))
        return backend, min_kv

    def choose_attention(self, query_shape, key_shape, planned: bool = True) -> str:
        """'splash', 'cudnn' or 'xla' for q [B, H, Sq, D] and k [B, H, Skv, D].

        ``planned``: the call is attention that was planned for Splash (the
        transformer's, traced under ``active_mesh``). Only planned attention
        goes to Splash: a Mosaic kernel inside ``jit`` needs the ``shard_map``
        that plan gives it, and other long attention (the VAE's mid-block,
        14,400 keys at 720P) would otherwise reach the kernel with no mesh,
        which XLA:TPU refuses to partition.
        """
        backend, min_kv = self.attention_settings()
        kv_len = key_shape[2]
        long_planned = planned and kv_len >= min_kv
        if backend == "auto":
            if self.platform == "tpu" and long_planned:
                choice = "splash"
            elif self.platform == "gpu":
                choice = "cudnn"
            else:
                choice = "xla"
        elif backend == "splash":
            # Forced Splash still leaves short (cross-attention) and unplanned keys to XLA.
            choice = "splash" if long_planned else "xla"
        else:
            choice = backend
        key = (tuple(query_shape), tuple(key_shape), choice)
        if key not in self._logged_attention_choices:
            self._logged_attention_choices.add(key)
            logger.info("attention q%s k%s -> %s", tuple(query_shape), tuple(key_shape), choice)
        return choice

    def attention(self, query, key, value, *, attn_mask=None, is_causal=False, scale=None):
        """The single attention dispatch. jax arrays in torch SDPA layout [B, H, S, D]."""
        split = getattr(self._active_mesh, "token_split", None)
        if split is None:
            return self._attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        # The sequence layout: the projections run on each device's own tokens and attention
        # exchanges heads for tokens with all-to-alls. Without these constraints XLA may instead
        # gather every token to compute a head slice of a projection (4x the bytes at Wan's sizes).
        from jax.sharding import NamedSharding, PartitionSpec

        constrain = self.jax.lax.with_sharding_constraint
        tokens = NamedSharding(self._active_mesh.mesh, PartitionSpec(*split.spec(token_dim=2, ndim=4)))
        query = constrain(query, tokens)
        if key.shape[2] == query.shape[2]:  # self-attention; a cross-attention's text stays whole
            key, value = constrain(key, tokens), constrain(value, tokens)
        out = self._attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return constrain(out, tokens)

    def _attention(self, query, key, value, *, attn_mask=None, is_causal=False, scale=None):
        jax = self.jax
        jnp = jax.numpy
        mesh = getattr(self._active_mesh, "mesh", None)
        if attn_mask is not None or is_causal:
            choice = "xla"
        else:
            choice = self.choose_attention(query.shape, key.shape, planned=mesh is not None)
        if choice == "splash":
            from . import splash_attention as splash

            return splash.splash_attention(query, key, value, mesh=mesh, scale=scale)
        # A CPU measure only: TPU and GPU programs keep XLA's own attention, which their compilers fuse.
        if (choice == "xla" and self.platform == "cpu" and attn_mask is None and not is_causal
                and _score_bytes(query.shape, key.shape) > XLA_SCORE_BLOCK_BYTES):
            return query_chunked_attention(query, key, value, scale=scale)
        # jax.nn.dot_product_attention takes [B, S, H, D].
        # Its bias/mask layout [B, H, Sq, Skv] is torch's.
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
        if attn_mask is not None and attn_mask.dtype != jnp.bool_:
            bias, mask = attn_mask.astype(q.dtype), None
        else:
            bias, mask = None, attn_mask
        implementation = None if choice == "cudnn" else "xla"
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation=implementation
        )
        return jnp.swapaxes(out, 1, 2)

    def _register_overrides(self, env):
        import torch
        from torchax import interop

        manager = self

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            # Inference only: dropout is never active in the Wan components.
            if enable_gqa and key.shape[1] != query.shape[1]:
                repeat = query.shape[1] // key.shape[1]
                key = key.repeat_interleave(repeat, dim=1)
                value = value.repeat_interleave(repeat, dim=1)
            return interop.call_jax(
                lambda q, k, v, m: manager.attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale),
                query, key, value, attn_mask,
            )

        env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
        env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, sdpa)

    # ------------------------------------------------------------- loading
    @contextlib.contextmanager
    def loading(self):
        """Run model loading outside the torchax environment (safetensors and
        ``from_pretrained`` must see plain PyTorch)."""
        env = self._env
        was_enabled = env is not None and env.enabled
        if was_enabled:
            env.disable_torch_modes()
        try:
            yield
        finally:
            if was_enabled:
                env.enable_torch_modes()

    def cached_component(self, key: tuple, build: Callable[[], tuple[Any, list]], replaces: Callable[[tuple], bool] = None):
        """Return the cached value for ``key``, building it once with ``build``.

        ``build`` returns ``(value, device_arrays)``. Entries for which
        ``replaces(other_key)`` is true are released first (switching model_id
        frees the old copy before the new one is loaded). If ``build`` raises,
        nothing is cached and its arrays are left to the garbage collector.
        """
        with self._lock:
            entry = self._components.get(key)
            if entry is not None:
                return entry.value
            if replaces is not None:
                for other in [k for k in self._components if k != key and replaces(k)]:
                    self._drop(other, reason=f"replaced by {key}")
            value, arrays = build()
            self._components[key] = _CachedComponent(value, list(arrays))
            return value

    def set_component_arrays(self, key: tuple, arrays: list) -> None:
        """The device arrays a cached component owns now (e.g. after a LoRA replaced some of its
        weights), so that ``release`` deletes these and not the ones they replaced."""
        with self._lock:
            self._components[key].arrays = list(arrays)

    def cached_keys(self) -> list[tuple]:
        with self._lock:
            return list(self._components)

    def owned_arrays(self) -> list:
        with self._lock:
            return [a for entry in self._components.values() for a in entry.arrays]

    def device_report(self) -> dict:
        """What the page's TPU monitor shows: per device its kind and memory (``memory_stats()``: used and
        total where the backend reports them, None on CPU) and the bytes of the pack's components on it;
        the components; the programs compiled. Never starts jax: before the pack has, it says so."""
        if self._env is None:
            return {"started": False, "platform": None, "devices": [], "components": [], "compiled_programs": 0}
        devices = {}
        for device in self._jax.devices():
            try:
                stats = device.memory_stats() or {}
            except Exception:  # a backend without memory statistics
                stats = {}
            devices[device.id] = {"id": device.id, "kind": device.device_kind, "platform": device.platform,
                                  "used_bytes": stats.get("bytes_in_use"), "total_bytes": stats.get("bytes_limit"),
                                  "pack_bytes": 0}
        components = []
        with self._lock:
            for key, entry in self._components.items():
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
        return {"started": True, "platform": self.platform, "devices": list(devices.values()),
                "components": components, "compiled_programs": self._compile_count - self._cache_hits,
                "compile_cache_hits": self._cache_hits}

    def _drop(self, key, reason: str):
        entry = self._components.pop(key)
        freed = _delete_arrays(entry.arrays)
        logger.info("released %s (%s, %.1f MiB)", key, reason, freed / 2**20)
        return freed

    def release(self) -> dict:
        """Drop every component, compiled function and mesh this pack holds.

        Device arrays are deleted explicitly, so HBM is free even if a caller
        still holds a reference. Returns what was freed, and logs it in one line.
        """
        with self._lock:
            keys = list(self._components)
            freed_bytes = sum(_delete_arrays(self._components[k].arrays) for k in keys)
            self._components.clear()
            meshes = list(self._meshes)
            self._meshes.clear()
            self._logged_attention_choices.clear()
            if self._jax is not None:
                self._jax.clear_caches()
            gc.collect()
        summary = {"components": [k[0] if isinstance(k, tuple) else k for k in keys],
                   "bytes": freed_bytes, "meshes": meshes}
        logger.info(
            "Wan TPU: released %d component(s) %s, %.1f MiB of device memory, %d mesh(es) and compiled functions",
            len(keys), summary["components"], freed_bytes / 2**20, len(meshes),
        )
        return summary


# XLA attention materialises the [B, H, Sq, Skv] fp32 scores. Past this size
# (Wan self-attention off TPU/GPU) the queries go through in chunks instead:
# the same arithmetic per query row, a quarter of the time on a CPU.
XLA_SCORE_BLOCK_BYTES = 32 * 2**20


def _score_bytes(query_shape, key_shape) -> int:
    batch, heads, q_len, _ = query_shape
    return batch * heads * q_len * key_shape[2] * 4


def query_chunked_attention(query, key, value, *, scale=None):
    """softmax(Q K^T * scale) V over query chunks, in torch SDPA layout [B, H, S, D].

    Each chunk's scores stay under ``XLA_SCORE_BLOCK_BYTES``; softmax is per
    query row, so chunking changes memory traffic, not the result.
    """
    import jax
    import jax.numpy as jnp

    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    chunk = max(8, XLA_SCORE_BLOCK_BYTES // (batch * heads * kv_len * 4) // 8 * 8)
    chunks = -(-q_len // chunk)
    padded = jnp.pad(query, ((0, 0), (0, 0), (0, chunks * chunk - q_len), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(batch, heads, chunks, chunk, head_dim), 2, 0)  # [n, B, H, chunk, D]

    def attend(block):  # [B, H, chunk, D] -> [B, H, chunk, Dv]
        scores = jnp.einsum("bhqd,bhkd->bhqk", block, key, preferred_element_type=jnp.float32) * scale
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, value, preferred_element_type=jnp.float32).astype(query.dtype)

    out = jax.lax.map(attend, blocks)  # [n, B, H, chunk, Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, chunks * chunk, value.shape[-1])
    return out[:, :, :q_len]


def _delete_arrays(arrays) -> int:
    freed = 0
    for array in arrays:
        try:
            if not array.is_deleted():
                freed += array.nbytes
                array.delete()
        except Exception:  # an array already donated or freed elsewhere
            pass
    return freed


def release_device_memory() -> dict | None:
    """Release what the pack holds, if it ever started; never starts jax itself."""
    manager = TorchaxEnvManager._instance
    if manager is None or manager._env is None:
        return None
    return manager.release()


def install_comfyui_unload_hook(model_management=None) -> bool:
    """Wrap ComfyUI's ``unload_all_models`` so it also frees this pack's device memory.

    ``POST /free {"unload_models": true}`` (ComfyUI Manager's "Unload Models")
    reaches that function. The wrapper calls the original first, then
    ``release_device_memory``. Installing twice wraps once. Returns whether a
    hook is in place (False outside ComfyUI).
    """
    if model_management is None:
        try:
            import comfy.model_management as model_management
        except ImportError:
            return False
    original = model_management.unload_all_models
    if getattr(original, "_wan_tpu_wrapped", False):
        return True

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            release_device_memory()

    unload_all_models._wan_tpu_wrapped = True
    model_management.unload_all_models = unload_all_models
    return True
