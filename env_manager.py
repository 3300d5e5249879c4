"""The one owner of process-global device state: ``TorchaxEnvManager``.

Importing this module imports neither jax nor torchax (ComfyUI imports every
pack at start-up, and importing torchax changes PyTorch process-wide). The
manager starts them on first use, under a lock, and holds one of each part,
each in its own ``runtime`` module:

- start-up (``runtime.startup``): the torch/torchax version compat, the JAX
  persistent compilation cache and the count of programs compiled;
- the validated ``(dp, tp)`` meshes (``runtime.mesh``);
- the trace context (``runtime.trace``): the platform (tpu, gpu or cpu), the
  target platform and active mesh a program is traced under, and ``loading()``;
- the attention policy and the single attention-dispatch function, registered
  through torchax's public API (``runtime.attention``);
- the cache of loaded, sharded components (``runtime.component_cache``), and
  ``release()`` to drop it all;
- past one host (``runtime.multihost``): the joined ``jax.distributed`` runtime, when the environment asks
  for one, and on host 0 the ``Leader`` that mirrors every stage to the followers.

The names the pack used from here before the split stay importable from here.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from typing import Any, Callable

from .runtime import attention as _attention
from .runtime import environment, multihost
from .runtime.attention import (  # noqa: F401 (re-exported)
    ATTENTION_BACKENDS,
    SPLASH_MIN_KV_LEN,
    XLA_SCORE_BLOCK_BYTES,
    query_chunked_attention,
)
from .runtime.component_cache import ComponentCache, device_memory
from .runtime.mesh import MeshCache, build_mesh, default_mesh_shape, resolve_mesh_shape  # noqa: F401
from .runtime.startup import (  # noqa: F401 (re-exported)
    TORCH_DIMNAME_ALIASES,
    CompileCounter,
    apply_torch_compat,
    import_jax_and_torchax,
    setup_compile_cache,
)
from .runtime.trace import TraceContext, backend_platform
from .runtime.trace import loading as _loading

logger = logging.getLogger("wan_tpu")

# The environment variables' names, as they were known here (``runtime.environment`` lists them all).
ENV_DP = environment.DP
ENV_TP = environment.TP
ENV_ATTENTION = environment.ATTENTION  # auto | splash | xla | cudnn
ENV_SPLASH_MIN_KV_LEN = environment.SPLASH_MIN_KV_LEN
ENV_COMPILE_CACHE = environment.COMPILE_CACHE  # set to 0 to disable the persistent cache


class TorchaxEnvManager:
    """Process-wide owner of jax/torchax, the mesh, the attention dispatch and the cached components.

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

    @classmethod
    def existing(cls) -> "TorchaxEnvManager | None":
        """The instance if one was made, without making one."""
        return cls._instance

    def __init__(self):
        self._lock = threading.RLock()
        self._jax = None
        self._torchax = None
        self._env = None
        self._compiles = CompileCounter()
        self._meshes_by_shape = MeshCache(self._lock)
        self._trace = TraceContext()
        self._attention_policy = _attention.AttentionPolicy()
        self._components = ComponentCache(self._lock)
        self._cluster: multihost.Cluster | None = None
        self._alone = False  # a lost follower left this leader on its own devices (``_go_on_alone``)
        self.compile_cache_dir: str | None = None

    # ----------------------------------------------------------- start-up
    def start(self):
        """Import jax and torchax and set them up, once. Returns the torchax env."""
        if self._env is not None:
            return self._env
        with self._lock:
            if self._env is not None:
                return self._env
            jax, torchax = import_jax_and_torchax()
            cluster_config = multihost.ClusterConfig.from_environment()
            if cluster_config is not None:  # before anything touches a device
                self._cluster = multihost.join(jax, cluster_config)
            self._jax, self._torchax = jax, torchax
            self.compile_cache_dir = setup_compile_cache(jax)
            self._compiles.listen(jax)
            env = torchax.default_env()
            _attention.register_sdpa_override(env, self)
            self._env = env
            logger.info(
                "JAX %s on %s: %d device(s); torchax %s",
                jax.__version__, self.platform, jax.device_count(), torchax.__version__,
            )
            return env

    @property
    def cluster(self) -> "multihost.Cluster | None":
        """This process's place in a multi-host runtime (joined by ``start``), or None on one host."""
        return self._cluster

    def leader(self) -> "multihost.Leader | None":
        """The ``Leader`` when this process (host 0) leads followers, else None. Starts jax only when the
        environment asks for several processes."""
        if not self.started and not multihost.requested():
            return None
        self.start()
        leader = self._cluster.leader if self._cluster is not None else None
        if leader is None or self._alone:
            return None
        if leader.broken is not None and self._cluster.config.on_follower_loss == "local":
            self._go_on_alone(leader.broken)
            return None
        return leader

    def _go_on_alone(self, why: str) -> None:
        """After a follower was lost: drop everything placed on the global mesh (its other shards are gone)
        and run from now on over this host's devices only, mirrored to no one."""
        with self._lock:
            if self._alone:
                return
            self._release_here()
            self._alone = True
        logger.warning("multi-host: going on with this host's %d device(s) alone, after: %s",
                       self._jax.local_device_count(), why)

    @property
    def alone(self) -> bool:
        """Whether this leader lost a follower and now runs on its own host's devices only."""
        return self._alone

    def devices(self) -> list:
        """The devices the pack's meshes span: every device of the runtime (all hosts), or this host's once a
        leader goes on alone."""
        if self._cluster is not None:
            self.leader()  # a follower lost since the last call: go on alone before a mesh is built
        jax = self.jax
        return list(jax.local_devices() if self._alone else jax.devices())

    @property
    def started(self) -> bool:
        """Whether jax and torchax were started (``start`` ran)."""
        return self._env is not None

    @property
    def jax(self):
        self.start()
        return self._jax

    @property
    def env(self):
        return self.start()

    def compile_count(self) -> int:
        """How many XLA programs this process has compiled (persistent-cache hits excluded)."""
        self.start()
        return self._compiles.compiled

    def cache_hit_count(self) -> int:
        """How many programs came from the persistent compilation cache instead."""
        self.start()
        return self._compiles.cache_hits

    # ------------------------------------------------------ trace context
    @property
    def platform(self) -> str:
        """'tpu', 'gpu' or 'cpu': the backend of the default JAX devices, or the
        platform set by ``target_platform`` while a program is traced for it."""
        target = self._trace.target
        return target if target is not None else backend_platform(self.jax)

    def target_platform(self, platform: str):
        """Trace for ``platform`` ('tpu', 'gpu' or 'cpu') instead of the default backend.

        Within this block (this thread only) the attention dispatch chooses as
        it would on ``platform``: how ``benchmarks/tpu_compile.py`` compiles the
        TPU programs, Splash included, on a machine with no TPU."""
        return self._trace.target_platform(platform)

    def active_mesh(self, mesh, token_split=None):
        """Make ``mesh`` the one attention shards over while a model is traced.

        Attention traced inside this block is planned attention (see
        ``choose_attention``); outside it nothing goes to Splash.
        ``token_split`` (``sharding.TokenSplit``, the sequence layout): attention's
        output goes back to its tokens split over the devices."""
        return self._trace.active_mesh(mesh, token_split)

    def loading(self):
        """Run model loading outside the torchax environment (safetensors and
        ``from_pretrained`` must see plain PyTorch)."""
        return _loading(self._env)

    # --------------------------------------------------------------- mesh
    def mesh(self, dp: Any = None, tp: Any = None):
        """The (dp, tp) mesh over ``devices()`` (every device of the runtime, all hosts included), built once
        per shape."""
        return self._meshes_by_shape.get(self.devices(), dp, tp, platform=self.platform)

    @property
    def meshes(self) -> dict:
        """The meshes built so far, by (dp, tp) shape (a copy)."""
        with self._lock:
            return dict(self._meshes_by_shape.meshes)

    # ---------------------------------------------------------- attention
    def set_attention_backend(self, backend: str | None = None, splash_min_kv_len: int | None = None):
        """Override the attention choice ('auto', 'splash', 'xla', 'cudnn') and the Splash threshold.

        None restores the default (the environment variable, else 'auto'/SPLASH_MIN_KV_LEN).
        """
        self._attention_policy.set(backend, splash_min_kv_len)

    def attention_settings(self) -> tuple[str, int]:
        return self._attention_policy.settings()

    def choose_attention(self, query_shape, key_shape, planned: bool = True) -> str:
        """'splash', 'cudnn' or 'xla' for q [B, H, Sq, D] and k [B, H, Skv, D].

        ``planned``: the call is attention that was planned for Splash (the
        transformer's, traced under ``active_mesh``). Only planned attention
        goes to Splash: a Mosaic kernel inside ``jit`` needs the ``shard_map``
        that plan gives it, and other long attention (the VAE's mid-block,
        14,400 keys at 720P) would otherwise reach the kernel with no mesh,
        which XLA:TPU refuses to partition.
        """
        return self._attention_policy.choose(query_shape, key_shape, self.platform, planned)

    def attention(self, query, key, value, *, attn_mask=None, is_causal=False, scale=None, key_lengths=None,
                  min_key_len: int = 0):
        """The single attention dispatch. jax arrays in torch SDPA layout [B, H, S, D]; ``key_lengths``:
        a per-row prefix of valid keys (``runtime.attention.dispatch``)."""
        return _attention.dispatch(
            query, key, value, choose=self.choose_attention, platform=self.platform,
            mesh=self._trace.mesh, token_split=self._trace.token_split,
            attn_mask=attn_mask, is_causal=is_causal, scale=scale, key_lengths=key_lengths,
            min_key_len=min_key_len, sparse=self._trace.sparse,
        )

    def sparse_attention(self, pattern, dense_blocks: int = 0):
        """Make the self-attention traced inside this block sparse over ``pattern`` (a static mask, e.g.
        ``models.wan.radial.RadialPattern``), but for the first ``dense_blocks`` transformer blocks: the
        Splash kernel visits only the key blocks the mask attends; XLA's attention takes the mask whole."""
        return self._trace.sparse_attention(pattern, dense_blocks)

    # ---------------------------------------------------- component cache
    def cached_component(self, key: tuple, build: Callable[[], tuple[Any, list]], replaces: Callable[[tuple], bool] = None):
        """Return the cached value for ``key``, building it once with ``build``.

        ``build`` returns ``(value, device_arrays)``. Entries for which
        ``replaces(other_key)`` is true are released first (switching model_id
        frees the old copy before the new one is loaded). If ``build`` raises,
        nothing is cached and its arrays are left to the garbage collector.
        """
        return self._components.get_or_build(key, build, replaces)

    def set_component_arrays(self, key: tuple, arrays: list) -> None:
        """The device arrays a cached component owns now (e.g. after a LoRA replaced some of its
        weights), so that ``release`` deletes these and not the ones they replaced."""
        self._components.set_arrays(key, arrays)

    def cached_keys(self) -> list[tuple]:
        return self._components.keys()

    def owned_arrays(self) -> list:
        return self._components.owned_arrays()

    def device_report(self) -> dict:
        """What the page's TPU monitor shows: per device its kind and memory (``memory_stats()``: used and
        total where the backend reports them, None on CPU) and the bytes of the pack's components on it;
        the components; the programs compiled. Never starts jax: before the pack has, it says so."""
        if not self.started:
            return {"started": False, "platform": None, "devices": [], "components": [], "compiled_programs": 0}
        devices = device_memory(self._jax)
        components = self._components.report(devices)
        return {"started": True, "platform": self.platform, "devices": list(devices.values()),
                "components": components, "compiled_programs": self._compiles.compiled,
                "compile_cache_hits": self._compiles.cache_hits}

    def release(self) -> dict:
        """Drop every component, compiled function and mesh this pack holds, on every host.

        Device arrays are deleted explicitly, so HBM is free even if a caller
        still holds a reference. Returns what was freed, and logs it in one line.
        A leader that lost a follower still frees its own host.
        """
        leader = self._cluster.leader if self._cluster is not None and not self._alone else None
        if leader is not None and leader.broken is None:
            try:
                return leader.broadcast(multihost.RELEASE, self._release_here)
            except multihost.FollowerError as error:
                logger.warning("released this host only: %s", error)
        return self._release_here()

    def _live_bytes_here(self) -> int | None:
        """Bytes of live device arrays on this host's devices (anyone's, not only the pack's), None before
        jax started."""
        if self._jax is None:
            return None
        return sum(shard.data.nbytes for array in self._jax.live_arrays() if not array.is_deleted()
                   for shard in array.addressable_shards)

    def _release_here(self) -> dict:
        with self._lock:
            keys, freed_bytes = self._components.clear()
            meshes = self._meshes_by_shape.clear()
            self._attention_policy.forget_choices()
            if self._jax is not None:
                self._jax.clear_caches()
            gc.collect()
        summary = {"components": [k[0] if isinstance(k, tuple) else k for k in keys],
                   "bytes": freed_bytes, "meshes": meshes, "left_bytes": self._live_bytes_here()}
        logger.info(
            "Wan TPU: released %d component(s) %s, %.1f MiB of device memory, %d mesh(es) and compiled functions",
            len(keys), summary["components"], freed_bytes / 2**20, len(meshes),
        )
        return summary


def release_device_memory() -> dict | None:
    """Release what the pack holds, if it ever started; never starts jax itself."""
    manager = TorchaxEnvManager.existing()
    if manager is None or not manager.started:
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
