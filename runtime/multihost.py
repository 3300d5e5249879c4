"""Past one host: one JAX process per host of a TPU slice, all running the same programs over one global mesh.

ComfyUI runs on host 0 (the leader, process 0); every other host runs a follower (``worker.py``). The
leader's ``TorchaxEnvManager.start`` joins JAX's multi-controller runtime (``jax.distributed``) when the
environment asks for it (``WAN_TPU_COORDINATOR``, ``WAN_TPU_NUM_PROCESSES``, ``WAN_TPU_PROCESS_ID``); the
followers join the same runtime and then wait for the leader's calls.

The command channel is the distributed runtime's own key-value store (the coordination service the leader
hosts); nothing else crosses hosts but XLA's collectives. A pipeline stage marked ``@mirrored`` is, on the
leader, published first (its name, the pipeline's constructor arguments and the call's arguments, as JSON
with tensors in base64) under a sequence number; every follower acknowledges it, makes the same pipeline and
runs the same call, so every process traces, compiles and runs the same jitted programs over the one mesh.
Results leave the devices through ``placement.to_host``, a collective every process joins; only the
leader's copy is used.

In lock-step:

- the denoising loop's ``on_step`` is the one point where the leader may stop a run (ComfyUI's Cancel): at
  every step the leader publishes "go" or "stop" and the followers wait for that word, so all stop at the
  same step;
- an exception from the leader's ``on_status`` / ``on_preview`` (ComfyUI raises Cancel there too) is held
  until that next step, or the end of the call, so no process leaves the others inside a collective;
- the followers' outcome of each call (and their compile counts) come back to the leader.

Every wait is bounded. A follower that does not acknowledge a call within ``WAN_TPU_FOLLOWER_TIMEOUT``
seconds (30), or whose heartbeat stops while a call fails, gives the leader a ``FollowerError`` naming the
process, its host and the fix. JAX's recoverable mode is on, so a dead follower does not take ComfyUI down
with it. The leader's ``Leader`` then refuses every further multi-host call; a multi-controller runtime
cannot take a process back (restart the follower and ComfyUI). By default (``WAN_TPU_ON_FOLLOWER_LOSS=local``)
``TorchaxEnvManager`` then goes on alone: it drops everything placed on the global mesh and runs the next
calls on host 0's own devices, mirrored to no one.

Importing this module imports neither jax nor torch.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import importlib
import io
import json
import logging
import os
import socket
import threading
import time
import traceback
from typing import Any, Callable, Mapping

from . import environment

logger = logging.getLogger("wan_tpu")

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_PACKAGE = __name__.rsplit(".", 2)[0]  # the pack's package name (its folder's, as ComfyUI imports it)
PREFIX = "wan_tpu"  # every key this channel writes in the runtime's key-value store
HEARTBEAT_S = 1.0  # how often a follower says it is alive
DEFAULT_FOLLOWER_TIMEOUT_S = 30.0
DEFAULT_JOIN_TIMEOUT_S = 300
ON_FOLLOWER_LOSS = ("local", "refuse")  # the first is the default
CALL_WAIT_S = 1800.0  # the longest a follower waits for the leader's next word inside a call (a compile)
STOP = "stop"
RELEASE = "release"


class FollowerError(RuntimeError):
    """A follower is missing, died or failed: the multi-host runtime cannot run this call."""


class LeaderStopped(RuntimeError):
    """On a follower: the leader stopped the call (Cancel, or its own error) at this point."""


# ------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where the runtime's coordinator is (``HOST:PORT`` on host 0), how many processes, and which this is."""

    coordinator: str
    num_processes: int
    process_id: int = 0
    follower_timeout_s: float = DEFAULT_FOLLOWER_TIMEOUT_S
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S
    on_follower_loss: str = ON_FOLLOWER_LOSS[0]

    def __post_init__(self):
        host, _, port = str(self.coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{environment.COORDINATOR}={self.coordinator!r}: give host 0's address and a free "
                             f"port as HOST:PORT, e.g. 10.130.0.2:8476")
        if not int(self.num_processes) >= 2:
            raise ValueError(f"{environment.NUM_PROCESSES}={self.num_processes}: give the number of hosts (2 or "
                             f"more), or leave it unset to run on this host alone")
        if not 0 <= int(self.process_id) < int(self.num_processes):
            raise ValueError(f"{environment.PROCESS_ID}={self.process_id}: use 0 for ComfyUI's host and 1 to "
                             f"{int(self.num_processes) - 1} for the followers")
        if not self.follower_timeout_s > 0:
            raise ValueError(f"{environment.FOLLOWER_TIMEOUT}={self.follower_timeout_s}: give seconds > 0 (30)")
        if self.on_follower_loss not in ON_FOLLOWER_LOSS:
            raise ValueError(f"{environment.ON_FOLLOWER_LOSS}={self.on_follower_loss!r}: use 'local' (go on with "
                             f"host 0's devices alone after a follower is lost) or 'refuse'")

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @classmethod
    def from_environment(cls, environ: Mapping | None = None) -> "ClusterConfig | None":
        """The configuration the environment asks for, or None (one host) when ``WAN_TPU_NUM_PROCESSES``
        is unset or 1."""
        count = environment.read(environment.NUM_PROCESSES, environ=environ)
        if count in (None, "1"):
            return None
        coordinator = environment.read(environment.COORDINATOR, environ=environ)
        if coordinator is None:
            raise ValueError(f"{environment.NUM_PROCESSES}={count} but {environment.COORDINATOR} is unset: give "
                             f"host 0's address and a free port, e.g. {environment.COORDINATOR}=10.130.0.2:8476")
        return cls(coordinator, _int(environment.NUM_PROCESSES, count),
                   _int(environment.PROCESS_ID, environment.read(environment.PROCESS_ID, "0", environ)),
                   _float(environment.FOLLOWER_TIMEOUT,
                          environment.read(environment.FOLLOWER_TIMEOUT, str(DEFAULT_FOLLOWER_TIMEOUT_S), environ)),
                   _int(environment.JOIN_TIMEOUT,
                        environment.read(environment.JOIN_TIMEOUT, str(DEFAULT_JOIN_TIMEOUT_S), environ)),
                   environment.read(environment.ON_FOLLOWER_LOSS, ON_FOLLOWER_LOSS[0], environ).strip().lower())

    def follower_command(self, process_id: int) -> str:
        """The command that starts follower ``process_id`` (the fix an error gives)."""
        return (f"python {os.path.join(PACK_DIR, 'worker.py')} --coordinator {self.coordinator} "
                f"--num-processes {self.num_processes} --process-id {process_id}")


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a whole number") from None


def _float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None


def requested(environ: Mapping | None = None) -> bool:
    """Whether the environment asks for several processes (cheap: reads two variables, starts nothing)."""
    return environment.read(environment.NUM_PROCESSES, environ=environ) not in (None, "1")


# ------------------------------------------------------------------ joining
def join(jax, config: ClusterConfig) -> "Cluster":
    """Join ``jax.distributed`` as ``config`` says: before any device use (``TorchaxEnvManager.start``).

    On CPU the cross-process collectives are gloo's. JAX's recoverable mode is on, so a follower that dies
    leaves the leader running (it gets an error, not a crash). Blocks until every process has joined, at
    most ``join_timeout_s`` (then a ``FollowerError`` saying what to start).
    """
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "").strip().lower()
    if platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    started = time.perf_counter()
    try:
        jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                                   process_id=config.process_id, initialization_timeout=int(config.join_timeout_s),
                                   heartbeat_timeout_seconds=max(10, int(config.follower_timeout_s)),
                                   shutdown_timeout_seconds=max(5, int(config.follower_timeout_s)))
    except Exception as error:
        if config.is_leader:
            fix = "start every follower: " + "; ".join(config.follower_command(i)
                                                      for i in range(1, config.num_processes))
        else:
            fix = (f"start ComfyUI on host 0 with {environment.COORDINATOR}={config.coordinator} "
                   f"{environment.NUM_PROCESSES}={config.num_processes}, and check this host reaches it")
        raise FollowerError(
            f"process {config.process_id} of {config.num_processes} could not join the JAX runtime at "
            f"{config.coordinator} within {config.join_timeout_s} s ({environment.JOIN_TIMEOUT}): {fix}. "
            f"JAX said: {str(error).splitlines()[0][:300]}") from error
    from jax._src.distributed import global_state

    cluster = Cluster(config, Channel(global_state.client, config.process_id, config.num_processes))
    logger.info("multi-host: process %d of %d joined %s in %.1f s: %d devices, %d on this host (%s)",
                config.process_id, config.num_processes, config.coordinator, time.perf_counter() - started,
                jax.device_count(), jax.local_device_count(), socket.gethostname())
    return cluster


class Cluster:
    """This process's place in the runtime: its config, the channel, and (on process 0) the ``Leader``."""

    def __init__(self, config: ClusterConfig, channel: "Channel"):
        self.config, self.channel = config, channel
        self.leader = Leader(config, channel) if config.is_leader else None


# ------------------------------------------------------------------ the channel
class Channel:
    """The key-value store of JAX's distributed runtime as a command channel.

    ``client``: ``jax._src.distributed.global_state.client`` (or a stand-in with ``key_value_set``,
    ``key_value_try_get``, ``blocking_key_value_get`` and ``key_value_delete``). Keys (under ``wan_tpu/``):
    ``host/{pid}`` and ``alive/{pid}`` per follower; per call ``call/{seq}/cmd``, ``ack/{pid}``,
    ``step/{i}``, ``outcome`` (the leader's) and ``result/{pid}`` (each follower's).
    """

    def __init__(self, client, process_id: int, num_processes: int):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes

    @property
    def followers(self) -> list[int]:
        return list(range(1, self.num_processes))

    def set(self, key: str, value: str, overwrite: bool = False) -> None:
        self.client.key_value_set(f"{PREFIX}/{key}", value, allow_overwrite=overwrite)

    def try_get(self, key: str) -> str | None:
        """The value, or None when the key is not there (never waits)."""
        try:
            return self.client.key_value_try_get(f"{PREFIX}/{key}")
        except Exception as error:
            if "NOT_FOUND" in str(error):
                return None
            raise

    def get(self, key: str, timeout_s: float) -> str | None:
        """The value, waiting at most ``timeout_s``; None when it did not come."""
        try:
            return self.client.blocking_key_value_get(f"{PREFIX}/{key}", max(1, int(timeout_s * 1000)))
        except Exception as error:
            if "DEADLINE_EXCEEDED" in str(error) or "timed out" in str(error):
                return None
            raise

    def delete(self, key: str) -> None:
        try:
            self.client.key_value_delete(f"{PREFIX}/{key}")
        except Exception as error:  # already gone
            logger.debug("multi-host: could not delete %s: %s", key, error)

    # -- the followers' presence
    def register(self) -> None:
        """A follower says who it is (its host, for the leader's messages)."""
        self.set(f"host/{self.process_id}", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}),
                 overwrite=True)

    def host_of(self, process_id: int) -> str:
        value = self.try_get(f"host/{process_id}")
        return json.loads(value)["host"] if value else "an unknown host"

    def beat(self, count: int) -> None:
        self.set(f"alive/{self.process_id}", str(count), overwrite=True)

    def silent_followers(self, within_s: float = 2.5 * HEARTBEAT_S) -> list[int]:
        """The followers whose heartbeat did not change within ``within_s``."""
        first = {pid: self.try_get(f"alive/{pid}") for pid in self.followers}
        deadline = time.monotonic() + within_s
        silent = set(first)
        while silent and time.monotonic() < deadline:
            time.sleep(min(0.25, within_s))
            silent = {pid for pid in silent if self.try_get(f"alive/{pid}") == first[pid]}
        return sorted(silent)


class Heartbeat:
    """A follower's daemon thread writing a counter every ``HEARTBEAT_S``, so the leader can tell it is alive
    while it is busy (the main thread may be inside a long XLA program)."""

    def __init__(self, channel: Channel):
        self.channel, self._stop = channel, threading.Event()
        self.thread = threading.Thread(target=self._run, name="wan_tpu-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.channel.beat(0)
        self.thread.start()
        return self

    def _run(self) -> None:
        count = 0
        while not self._stop.wait(HEARTBEAT_S):
            count += 1
            try:
                self.channel.beat(count)
            except Exception as error:  # the coordinator (the leader) is gone: the main loop will see it too
                logger.warning("multi-host: heartbeat stopped: %s", str(error).splitlines()[0][:200])
                return

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------ arguments as JSON
def encode(value) -> Any:
    """``value`` as JSON-able data: tensors and arrays as base64, tuples kept, the pack's dataclasses by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [encode(item) for item in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"multi-host: dict keys must be text to cross hosts (got {list(value)[:3]})")
        return {"__dict__": {key: encode(item) for key, item in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        module = cls.__module__
        if not module.startswith(PACK_PACKAGE + "."):
            raise TypeError(f"multi-host: {cls.__qualname__} from {module} cannot cross hosts (only the pack's "
                            f"own dataclasses can)")
        fields = {field.name: encode(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return {"__dataclass__": f"{module[len(PACK_PACKAGE) + 1:]}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    kind = type(value).__module__.split(".")[0]
    if kind == "torch":
        import torch

        buffer = io.BytesIO()
        torch.save(value.detach().cpu().contiguous(), buffer)
        return {"__tensor__": base64.b64encode(buffer.getvalue()).decode("ascii")}
    if kind == "numpy":
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        return {"__ndarray__": base64.b64encode(buffer.getvalue()).decode("ascii")}
    if kind == "PIL":
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"__png__": base64.b64encode(buffer.getvalue()).decode("ascii")}
    raise TypeError(f"multi-host: a {type(value).__qualname__} cannot cross hosts: give text, numbers, "
                    f"tensors, arrays, images or the pack's dataclasses")


def decode(data) -> Any:
    """The inverse of ``encode``."""
    if isinstance(data, list):
        return [decode(item) for item in data]
    if not isinstance(data, dict):
        return data
    if "__tuple__" in data:
        return tuple(decode(item) for item in data["__tuple__"])
    if "__dict__" in data:
        return {key: decode(item) for key, item in data["__dict__"].items()}
    if "__dataclass__" in data:
        module_name, _, name = data["__dataclass__"].partition(":")
        cls = getattr(importlib.import_module(f"{PACK_PACKAGE}.{module_name}"), name)
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"multi-host: {data['__dataclass__']} is not a dataclass")
        return cls(**{key: decode(item) for key, item in data["fields"].items()})
    if "__tensor__" in data:
        import torch

        return torch.load(io.BytesIO(base64.b64decode(data["__tensor__"])), weights_only=True)
    if "__ndarray__" in data:
        import numpy as np

        return np.load(io.BytesIO(base64.b64decode(data["__ndarray__"])), allow_pickle=False)
    if "__png__" in data:
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(data["__png__"]))).copy()
    raise TypeError(f"multi-host: unknown encoded value with keys {sorted(data)}")


# ------------------------------------------------------------------ the leader
_CALLBACKS = ("on_step", "on_status", "on_preview")  # the leader's alone; never sent


class Leader:
    """Process 0's side: publishes each call, keeps the followers in step, and collects their outcomes."""

    def __init__(self, config: ClusterConfig, channel: Channel):
        self.config, self.channel = config, channel
        self.seq = 0
        self.ready = False  # every follower said it is in its loop (before the first call)
        self.broken: str | None = None  # set once a follower is lost: every later call is refused with it
        self.last_results: dict[int, dict] = {}  # the last call's outcome from each follower
        self._lock = threading.RLock()  # one call at a time crosses hosts
        self._local = threading.local()

    @property
    def inside_call(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def run(self, name: str, spec: dict | None, args: tuple, kwargs: dict, local: Callable, steps: bool = False):
        """Publish ``name`` (with the pipeline's ``spec`` and the call's arguments), run ``local(*args,
        **kwargs)`` here, and return its result once every follower has run it too.

        ``steps``: the call takes ``on_step`` (the denoising loop), which becomes the lock-step gate."""
        if self.inside_call:  # generate's own encode / denoise / decode: the followers run them inside theirs
            return local(*args, **kwargs)
        with self._lock:
            self._refuse_if_broken(name)
            self._wait_ready()
            self.seq += 1
            seq = self.seq
            sent = {key: value for key, value in kwargs.items() if key not in _CALLBACKS}
            command = json.dumps({"name": name, "pipeline": encode(spec), "args": encode(tuple(args)),
                                  "kwargs": encode(sent), "steps": steps,
                                  "preview": kwargs.get("on_preview") is not None})
            self.channel.set(f"call/{seq}/cmd", command)
            self._wait_acks(seq, name)
            held = _HeldError()
            kwargs = dict(kwargs)
            for key in ("on_status", "on_preview"):
                if kwargs.get(key) is not None:
                    kwargs[key] = held.wrap(kwargs[key])
            if steps:
                kwargs["on_step"] = self._step_gate(seq, kwargs.get("on_step"), held)
            self._local.depth = 1
            try:
                result = local(*args, **kwargs)
                held.raise_if_any()
            except BaseException as error:
                self.channel.set(f"call/{seq}/outcome", json.dumps({"ok": False, "error": _describe(error)}))
                self._after_failure(seq, name, error)
                raise
            finally:
                self._local.depth = 0
            self.channel.set(f"call/{seq}/outcome", json.dumps({"ok": True}))
            self._collect(seq, name, self.config.follower_timeout_s, require=True)
            self.channel.delete(f"call/{seq}")
            return result

    def broadcast(self, name: str, local: Callable[[], Any]):
        """A call with no pipeline (``release``, ``stop``): published, run here, run by every follower."""
        return self.run(name, None, (), {}, local)

    # -- the steps
    def _step_gate(self, seq: int, on_step, held: "_HeldError"):
        def gate(i: int, total: int) -> None:
            try:
                held.raise_if_any()
                if on_step is not None:
                    on_step(i, total)
            except BaseException:
                self.channel.set(f"call/{seq}/step/{i}", STOP)
                raise
            self.channel.set(f"call/{seq}/step/{i}", "go")

        return gate

    # -- the followers' answers
    def _wait_ready(self) -> None:
        """Before the first call: every follower has registered (it is in its loop, its imports done), waiting
        at most ``join_timeout_s``."""
        if self.ready:
            return
        deadline = time.monotonic() + self.config.join_timeout_s
        late = [pid for pid in self.channel.followers
                if self.channel.get(f"host/{pid}", max(0.001, deadline - time.monotonic())) is None]
        if late:
            self._break(f"{self._describe_followers(late)} joined but did not get ready within "
                        f"{self.config.join_timeout_s} s ({environment.JOIN_TIMEOUT}); see its log")
        self.ready = True

    def _wait_acks(self, seq: int, name: str) -> None:
        deadline = time.monotonic() + self.config.follower_timeout_s
        missing = []
        for pid in self.channel.followers:
            if self.channel.get(f"call/{seq}/ack/{pid}", max(0.001, deadline - time.monotonic())) is None:
                missing.append(pid)
        if missing:
            self._break(f"{self._describe_followers(missing)} did not take the call {name!r} within "
                        f"{self.config.follower_timeout_s:g} s ({environment.FOLLOWER_TIMEOUT})")

    def _collect(self, seq: int, name: str, timeout_s: float, require: bool) -> dict[int, dict]:
        """Each follower's outcome of call ``seq``; a follower that gives none within ``timeout_s`` breaks the
        runtime (when ``require``)."""
        deadline = time.monotonic() + timeout_s
        results, missing = {}, []
        for pid in self.channel.followers:
            value = self.channel.get(f"call/{seq}/result/{pid}", max(0.001, deadline - time.monotonic()))
            if value is None:
                missing.append(pid)
            else:
                results[pid] = json.loads(value)
        self.last_results = results
        failed = {pid: r for pid, r in results.items() if not r.get("ok") and not r.get("stopped")}
        if missing and require:
            self._break(f"{self._describe_followers(missing)} did not finish the call {name!r} within "
                        f"{timeout_s:g} s of the leader ({environment.FOLLOWER_TIMEOUT}); it may be stuck")
        if failed and require:
            pid, result = next(iter(failed.items()))
            self._break(f"{self._describe_followers([pid])} failed the call {name!r} the leader finished: "
                        f"{result.get('error')}")
        return results

    def _after_failure(self, seq: int, name: str, error: BaseException) -> None:
        """The leader's call failed: if a follower died, say so (``FollowerError``, from ``error``); if one
        failed differently, log it; if one does not answer, the runtime is broken."""
        results = self._collect(seq, name, min(1.0, self.config.follower_timeout_s), require=False)
        if len(results) < len(self.channel.followers):  # someone is late: dead, or still inside the call
            silent = self.channel.silent_followers()
            if silent:
                self._break(f"{self._describe_followers(silent)} stopped (no heartbeat) during the call "
                            f"{name!r}", cause=error)
            results = self._collect(seq, name, self.config.follower_timeout_s, require=False)
        missing = [pid for pid in self.channel.followers if pid not in results]
        if missing:
            self._break(f"{self._describe_followers(missing)} did not finish the call {name!r} within "
                        f"{self.config.follower_timeout_s:g} s after the leader stopped with "
                        f"{_describe(error)}; it may be stuck in a collective", cause=error)
        for pid, result in results.items():
            if not result.get("ok") and not result.get("stopped"):
                logger.warning("multi-host: process %d failed the call %r too: %s", pid, name, result.get("error"))
        self.channel.delete(f"call/{seq}")

    def _describe_followers(self, pids: list[int]) -> str:
        return " and ".join(f"follower process {pid} on {self.channel.host_of(pid)}" for pid in pids)

    def _break(self, what: str, cause: BaseException | None = None) -> None:
        restart = ("restart the follower(s) (" + "; ".join(self.config.follower_command(pid)
                                                          for pid in self.channel.followers)
                   + "), then restart ComfyUI: a JAX multi-process runtime cannot take a process back")
        if self.config.on_follower_loss == "local":
            message = (f"multi-host: {what}. The next run goes on with this host's devices alone "
                       f"({environment.ON_FOLLOWER_LOSS}=refuse refuses instead). To use every host again, "
                       f"{restart}.")
        else:
            message = (f"multi-host: {what}. To run again, {restart}. Or unset {environment.NUM_PROCESSES} and "
                       f"restart ComfyUI to run on this host's devices alone.")
        self.broken = message
        logger.error(message)
        raise FollowerError(message) from cause

    def _refuse_if_broken(self, name: str) -> None:
        if self.broken is not None:
            raise FollowerError(f"{self.broken} (refused the call {name!r})")

    def stop_followers(self) -> None:
        """Tell every follower to exit its loop (at the leader's exit); waits for their answer, bounded."""
        if self.broken is None:
            with contextlib.suppress(FollowerError):
                self.broadcast(STOP, lambda: None)


class _HeldError:
    """An exception raised by one of the leader's own callbacks, held until the next point where every process
    can stop together (the step gate, or the end of the call)."""

    def __init__(self):
        self.error: BaseException | None = None

    def wrap(self, callback):
        @functools.wraps(callback)
        def held(*args, **kwargs):
            if self.error is None:
                try:
                    return callback(*args, **kwargs)
                except BaseException as error:
                    self.error = error
            return None

        return held

    def raise_if_any(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"


# ------------------------------------------------------------------ the stages
def mirrored(steps: bool = False):
    """Mark a pipeline stage that every process must run: on the leader of a multi-host runtime it is
    published to the followers first (``Leader.run``); anywhere else it runs as it is.

    The pipeline says how a follower makes the same one through ``multihost_spec()`` (its constructor's
    arguments) and where the manager is (``self.manager``). ``steps``: the stage takes ``on_step``."""
    def decorate(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            leader = _leader_of(self.manager)
            if leader is None:
                return method(self, *args, **kwargs)
            return leader.run(method.__name__, self.multihost_spec(), args, kwargs,
                              functools.partial(method, self), steps=steps)

        return call

    return decorate


def _leader_of(manager):
    """The manager's ``Leader`` when this process leads followers, else None (never starts jax for a
    single-host run)."""
    leader = getattr(manager, "leader", None)
    return leader() if callable(leader) else None


# ------------------------------------------------------------------ the follower
class Follower:
    """A follower's loop: take call after call from the leader, run it, report, until told to stop."""

    def __init__(self, channel: Channel, make_pipeline: Callable[[dict], Any], release: Callable[[], Any],
                 compile_count: Callable[[], int] = lambda: 0, poll_s: float = 1.0):
        self.channel, self.make_pipeline, self.release = channel, make_pipeline, release
        self.compile_count, self.poll_s = compile_count, poll_s
        self.seq = 0
        self.heartbeat = Heartbeat(channel)

    def serve(self, idle_limit_s: float | None = None) -> int:
        """Run calls until the leader says stop (returns 0). ``idle_limit_s``: give up after this long with
        no call (returns 1); None waits for the leader as long as it lives."""
        self.channel.register()
        self.heartbeat.start()
        logger.info("multi-host: follower process %d ready; waiting for the leader's calls",
                    self.channel.process_id)
        idle_since = time.monotonic()
        try:
            while True:
                seq = self.seq + 1
                command = self.channel.get(f"call/{seq}/cmd", self.poll_s)
                if command is None:
                    if idle_limit_s is not None and time.monotonic() - idle_since > idle_limit_s:
                        logger.error("multi-host: no call from the leader in %.0f s; exiting", idle_limit_s)
                        return 1
                    continue
                self.seq = seq
                self.channel.set(f"call/{seq}/ack/{self.channel.process_id}", "1")
                call = json.loads(command)
                result = self.run(seq, call)
                result["compiled"] = self.compile_count()
                self.channel.set(f"call/{seq}/result/{self.channel.process_id}", json.dumps(result))
                idle_since = time.monotonic()
                if call["name"] == STOP:
                    logger.info("multi-host: the leader said stop")
                    return 0
        finally:
            self.heartbeat.stop()

    def run(self, seq: int, call: dict) -> dict:
        """One call, as the leader made it; its outcome as JSON-able data."""
        name = call["name"]
        started = time.perf_counter()
        released = None
        try:
            if name == STOP:
                pass
            elif name == RELEASE:
                released = self.release()
            else:
                pipeline = self.make_pipeline(decode(call["pipeline"]))
                kwargs = decode(call["kwargs"])
                if call.get("steps"):
                    kwargs["on_step"] = self._step_gate(seq)
                if call.get("preview"):  # the leader's preview fetches a frame: a collective, so here too
                    kwargs["on_preview"] = lambda frame: None
                getattr(pipeline, name)(*decode(call["args"]), **kwargs)
        except LeaderStopped as stopped:
            logger.info("multi-host: call %d (%s) stopped with the leader: %s", seq, name, stopped)
            return {"ok": False, "stopped": True, "error": str(stopped)}
        except Exception as error:
            logger.error("multi-host: call %d (%s) failed here: %s", seq, name, _describe(error))
            return {"ok": False, "error": _describe(error), "traceback": traceback.format_exc()[-4000:]}
        logger.info("multi-host: call %d (%s) done in %.1f s", seq, name, time.perf_counter() - started)
        if name == RELEASE and isinstance(released, dict):  # what this host freed, for the leader to see
            return {"ok": True, "released": json.loads(json.dumps(released, default=str))}
        return {"ok": True}

    def _step_gate(self, seq: int):
        """The follower's ``on_step``: wait for the leader's word on this step (bounded); "stop" stops here."""
        def gate(i: int, total: int) -> None:
            deadline = time.monotonic() + CALL_WAIT_S
            while time.monotonic() < deadline:
                word = self.channel.get(f"call/{seq}/step/{i}", self.poll_s)
                if word == STOP:
                    raise LeaderStopped(f"the leader stopped at step {i} of {total}")
                if word is not None:
                    return
                outcome = self.channel.try_get(f"call/{seq}/outcome")
                if outcome is not None:  # the leader ended the call without reaching this step
                    raise LeaderStopped(f"the leader ended the call before step {i}: "
                                        f"{json.loads(outcome).get('error')}")
            raise LeaderStopped(f"no word from the leader on step {i} in {CALL_WAIT_S:.0f} s")

        return gate


def serve(manager=None, idle_limit_s: float | None = None) -> int:
    """A follower process's whole life after ``TorchaxEnvManager.start`` joined the runtime: ``Follower.serve``
    with the pack's pipelines. Returns the exit status."""
    from ..env_manager import TorchaxEnvManager

    manager = manager or TorchaxEnvManager.instance()
    manager.start()
    cluster = manager.cluster
    if cluster is None or cluster.config.is_leader:
        raise ValueError(f"a follower needs {environment.NUM_PROCESSES} >= 2 and {environment.PROCESS_ID} >= 1 "
                         f"(got {cluster.config if cluster else 'one host'})")

    from ..models.hunyuan.pipeline import HunyuanVideoPipeline
    from ..pipeline import WanTPUPipeline

    # What the first call would import: done now, while the leader is still starting, not inside its call.
    importlib.import_module("diffusers.pipelines.wan.pipeline_wan")
    importlib.import_module("transformers")
    families = {"wan": WanTPUPipeline, "hunyuan": HunyuanVideoPipeline}  # a spec's "family" (Wan's names none)

    def make_pipeline(spec: dict):
        spec = dict(spec)
        return families[spec.pop("family", "wan")](manager=manager, **spec)

    follower = Follower(cluster.channel, make_pipeline, manager.release, manager.compile_count)
    return follower.serve(idle_limit_s)
