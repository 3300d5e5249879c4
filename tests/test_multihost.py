"""Past one host, on this machine: a leader and a follower process on 127.0.0.1 (JAX's CPU multi-process
runtime, gloo collectives, 4 fake devices each) run the tiny Wan model over one 8-device mesh. ``generate``,
the three-node chain and the Full Pipeline node give one 8-device process's frames; a second prompt compiles
nothing on either; Cancel stops both at the same step; Unload frees both; a killed follower gives the leader
a clear error soon, and the next run goes on with the leader's devices alone (``multihost_leader.py`` says
the order). The command channel's protocol is also checked alone, on an in-memory key-value store."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import PACK_DIR, pack_module

multihost = pack_module("runtime.multihost")

VIDEO = dict(height=16, width=16, num_frames=1, num_inference_steps=2, guidance_scale=5.0, flow_shift=3.0)
HUNYUAN_VIDEO = dict(height=32, width=32, num_frames=5, num_inference_steps=2)
HUNYUAN_TILE = 16  # pixels: the 32x32 video decodes as tiles spread over both processes' devices


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(port: int, process_id: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               WAN_TPU_COMPILE_CACHE="0", WAN_TPU_COORDINATOR=f"127.0.0.1:{port}", WAN_TPU_NUM_PROCESSES="2",
               WAN_TPU_PROCESS_ID=str(process_id), WAN_TPU_FOLLOWER_TIMEOUT="10", WAN_TPU_JOIN_TIMEOUT="120",
               PYTHONUNBUFFERED="1")
    return env


def wait_for(path, process, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_two_processes_run_as_one_cancel_and_unload_reach_both_and_a_lost_follower_leaves_the_leader_alone(
        tmp_path, tiny_model_dir, manager):
    port = free_port()
    settings = tmp_path / "settings.json"
    hunyuan_dir = pack_module("tiny_hunyuan").build_tiny_hunyuan(tmp_path / "tiny-hunyuan-t2v")
    settings.write_text(json.dumps({"model": tiny_model_dir, "out": str(tmp_path), "video": VIDEO,
                                    "hunyuan": str(hunyuan_dir), "hunyuan_video": HUNYUAN_VIDEO,
                                    "hunyuan_tile": HUNYUAN_TILE}))
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("leader", "follower")}
    children = []
    try:
        follower = subprocess.Popen(
            [sys.executable, os.path.join(PACK_DIR, "worker.py"), "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", "1"],
            env=process_env(port, 1), stdout=logs["follower"], stderr=subprocess.STDOUT, cwd=tmp_path)
        children.append(follower)
        leader = subprocess.Popen([sys.executable, os.path.join(PACK_DIR, "tests", "multihost_leader.py"),
                                   str(settings)], env=process_env(port, 0), stdout=logs["leader"],
                                  stderr=subprocess.STDOUT, cwd=tmp_path)
        children.append(leader)

        # Meanwhile, here: the same run on one process with 8 devices.
        pipe = pack_module("pipeline").WanTPUPipeline(tiny_model_dir, precision="fp32")
        expected = pipe.generate("a cat", "blurry", seed=0, **VIDEO).numpy()
        expected_hunyuan = pack_module("models.hunyuan.pipeline").HunyuanVideoPipeline(
            hunyuan_dir, precision="fp32", vae_tile_pixels=HUNYUAN_TILE).generate(
            "a cat", "blurry", seed=0, **HUNYUAN_VIDEO).numpy()

        def log_tail(name):
            logs[name].flush()
            return (tmp_path / f"{name}.log").read_text()[-3000:]

        assert wait_for(tmp_path / "at_step", leader, 240), f"the leader never reached step 1:\n{log_tail('leader')}"
        follower.send_signal(signal.SIGKILL)
        follower.wait(timeout=30)
        (tmp_path / "killed").touch()
        leader.wait(timeout=120)
        assert leader.returncode == 0, log_tail("leader")
        report = json.loads((tmp_path / "leader.json").read_text())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
        for log in logs.values():
            log.close()

    assert report.get("done"), report
    assert report["devices"] == [8, 4]
    assert report["previews"] == [[16, 2, 2]] * VIDEO["num_inference_steps"]  # [C, h, w] after each step
    assert expected.shape == (1, 16, 16, 3)
    for run in ("generate", "chain", "full_pipeline", "alone"):  # the three-node chain, the Full Pipeline node
        frames = np.load(tmp_path / f"{run}.npy")
        assert frames.shape == expected.shape, run
        np.testing.assert_allclose(frames, expected, atol=1e-5, rtol=0, err_msg=run)
    # HunyuanVideo 1.5 runs on both too, with the frames of one 8-device process.
    assert report["hunyuan_follower"]["ok"], report["hunyuan_follower"]
    np.testing.assert_allclose(np.load(tmp_path / "hunyuan.npy"), expected_hunyuan, atol=1e-5, rtol=0)
    # The nodes and a second prompt compile nothing, on either process.
    assert report["leader_compiled_second"] == 0 and report["follower_compiled_second"] == 0, report
    # Cancel: the follower stopped at the leader's step.
    cancel = report["cancel"]
    assert cancel["raised"] and cancel["follower"]["stopped"], cancel
    assert "stopped at step 1 of 2" in cancel["follower"]["error"], cancel
    # Unload Models: both processes dropped the same components and hold no device memory after.
    leader_freed, follower_freed = report["release"]["leader"], report["release"]["follower"]["released"]
    assert sorted(leader_freed["components"]) == sorted(follower_freed["components"]) == \
        ["hunyuan_text_encoder", "hunyuan_text_encoder_2", "hunyuan_transformer", "hunyuan_vae"], report["release"]
    assert leader_freed["bytes"] > 0 and follower_freed["bytes"] == leader_freed["bytes"], report["release"]
    # All that stays on a device is torchax's random key (uint32[2]), on each process.
    assert leader_freed["left_bytes"] <= 8 and follower_freed["left_bytes"] <= 8, report["release"]
    # A killed follower: named within 60 s, with the command that restarts it.
    killed = report["killed"]
    assert killed["error"] is not None and killed["after_kill_s"] < 60, killed
    assert "follower process 1 on " + socket.gethostname() in killed["error"]
    assert "worker.py --coordinator 127.0.0.1:%d --num-processes 2 --process-id 1" % port in killed["error"]
    assert "The next run goes on with this host's devices alone" in killed["error"]
    # ...and the next run works on the leader's own 4 devices.
    assert report["alone"] == {"alone": True, "mesh_devices": 4, "leader": False}, report["alone"]


# ---------------------------------------------------------------- the protocol alone
class MemoryStore:
    """A stand-in for the distributed runtime's key-value store, in one process (threads for processes)."""

    def __init__(self):
        self.values, self.changed = {}, threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.changed:
            if key in self.values and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.values[key] = value
            self.changed.notify_all()

    def key_value_try_get(self, key):
        with self.changed:
            if key not in self.values:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.values[key]

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.values[key]

    def key_value_delete(self, key):
        with self.changed:
            for name in [name for name in self.values if name == key or name.startswith(key + "/")]:
                del self.values[name]


class StandInPipeline:
    """What a follower makes from the leader's spec: records each stage it is asked to run."""

    calls: list = []

    def __init__(self, **spec):
        self.spec = spec

    def denoise(self, embeddings, on_step=None, **kwargs):
        StandInPipeline.calls.append(("denoise", self.spec, embeddings, kwargs))
        for i in range(kwargs["num_inference_steps"] + 1):
            on_step(i, kwargs["num_inference_steps"])
        return "latents"


def channel_pair(timeout_s=2.0):
    store = MemoryStore()
    config = multihost.ClusterConfig("127.0.0.1:1234", 2, 0, follower_timeout_s=timeout_s, join_timeout_s=5)
    leader = multihost.Leader(config, multihost.Channel(store, 0, 2))
    follower = multihost.Follower(multihost.Channel(store, 1, 2), lambda spec: StandInPipeline(**spec),
                                  release=lambda: None, poll_s=0.05)
    return leader, follower


def serve_in_thread(follower):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("rc", follower.serve(idle_limit_s=20)), daemon=True)
    thread.start()
    return thread, outcome


def test_a_call_reaches_the_follower_with_its_arguments_and_steps_in_lock_step():
    torch = pytest.importorskip("torch")
    embeddings = pack_module("pipeline").WanEmbeddings(torch.ones(1, 3, 4), torch.zeros(1, 3, 4), "tiny")
    StandInPipeline.calls = []
    leader, follower = channel_pair()
    thread, outcome = serve_in_thread(follower)
    heard = []
    spec = {"model_id": "/models/tiny", "precision": "fp32", "dp": None, "tp": 2, "layout": "tensor"}

    def local(embeddings, on_step=None, **kwargs):
        for i in range(kwargs["num_inference_steps"] + 1):
            on_step(i, kwargs["num_inference_steps"])
        return "here"

    assert leader.run("denoise", spec, (embeddings,), dict(num_inference_steps=3, seed=7, magcache=None,
                                                          on_step=lambda i, n: heard.append(i)),
                      local, steps=True) == "here"
    assert heard == [0, 1, 2, 3]
    assert leader.last_results == {1: {"ok": True, "compiled": 0}}
    ((name, sent_spec, sent_embeddings, kwargs),) = StandInPipeline.calls
    assert name == "denoise" and sent_spec == spec and kwargs == {"num_inference_steps": 3, "seed": 7,
                                                                  "magcache": None}
    assert torch.equal(sent_embeddings.prompt_embeds, embeddings.prompt_embeds)
    assert sent_embeddings.model_id == "tiny" and type(sent_embeddings) is type(embeddings)
    leader.stop_followers()
    thread.join(10)
    assert outcome == {"rc": 0}


def test_cancel_on_the_leader_stops_the_follower_at_the_same_step():
    StandInPipeline.calls = []
    leader, follower = channel_pair()
    thread, _ = serve_in_thread(follower)

    class Cancelled(Exception):
        pass

    def on_step(i, total):
        if i == 2:
            raise Cancelled("the user pressed Cancel")

    def local(embeddings, on_step=None, **kwargs):
        for i in range(kwargs["num_inference_steps"] + 1):
            on_step(i, kwargs["num_inference_steps"])

    with pytest.raises(Cancelled):
        leader.run("denoise", {}, ("embeds",), dict(num_inference_steps=5, on_step=on_step), local, steps=True)
    assert leader.last_results[1]["stopped"] and "step 2 of 5" in leader.last_results[1]["error"]
    assert leader.broken is None  # both stopped together: the next call runs
    leader.run("denoise", {}, ("embeds",), dict(num_inference_steps=1), local, steps=True)
    assert leader.last_results[1]["ok"]
    leader.stop_followers()
    thread.join(10)


def test_a_cancel_raised_in_on_status_waits_for_the_next_step():
    leader, follower = channel_pair()
    thread, _ = serve_in_thread(follower)
    steps_run = []

    def local(embeddings, on_step=None, on_status=None, **kwargs):
        on_status("compiling")  # raises on the leader: held, so both still reach step 0 together
        for i in range(3):
            steps_run.append(i)
            on_step(i, 2)

    def on_status(text):
        raise KeyboardInterrupt("Cancel while compiling")

    with pytest.raises(KeyboardInterrupt):
        leader.run("denoise", {}, ("embeds",), dict(num_inference_steps=2, on_status=on_status), local, steps=True)
    assert steps_run == [0] and leader.last_results[1]["stopped"]
    leader.stop_followers()
    thread.join(10)


def test_a_missing_follower_is_named_with_the_fix_and_later_calls_are_refused_at_once():
    leader, _ = channel_pair(timeout_s=0.5)  # a follower registered, then stopped serving
    leader.channel.client.key_value_set("wan_tpu/host/1", json.dumps({"host": "tpu-vm-1", "pid": 1}))
    started = time.monotonic()
    with pytest.raises(multihost.FollowerError, match="follower process 1 on tpu-vm-1 did not take the call 'decode'"
                                                      " within 0.5 s") as error:
        leader.run("decode", {}, (), {}, lambda: pytest.fail("ran without the follower"))
    assert time.monotonic() - started < 5
    assert "worker.py --coordinator 127.0.0.1:1234 --num-processes 2 --process-id 1" in str(error.value)
    assert "The next run goes on with this host's devices alone (WAN_TPU_ON_FOLLOWER_LOSS=refuse" in str(error.value)
    started = time.monotonic()
    with pytest.raises(multihost.FollowerError, match="refused the call 'encode'"):
        leader.run("encode", {}, (), {}, lambda: None)
    assert time.monotonic() - started < 0.5


def test_a_follower_that_fails_a_call_the_leader_finished_is_reported():
    class Failing(StandInPipeline):
        def decode(self, latents):
            raise FileNotFoundError("/models/tiny/vae is not on this host")

    store = MemoryStore()
    leader = multihost.Leader(multihost.ClusterConfig("h:1", 2, 0, follower_timeout_s=2, join_timeout_s=5),
                              multihost.Channel(store, 0, 2))
    follower = multihost.Follower(multihost.Channel(store, 1, 2), lambda spec: Failing(**spec), lambda: None,
                                  poll_s=0.05)
    thread, _ = serve_in_thread(follower)
    with pytest.raises(multihost.FollowerError, match="failed the call 'decode' the leader finished: "
                                                      "FileNotFoundError: /models/tiny/vae is not on this host"):
        leader.run("decode", {}, ("latents",), {}, lambda latents: "frames")
    assert "Traceback" in leader.last_results[1]["traceback"]
    leader.broken = None
    leader.stop_followers()
    thread.join(10)


def test_arguments_cross_as_json_and_come_back_equal():
    torch = pytest.importorskip("torch")
    from PIL import Image

    lora = pack_module("lora").LoraSpec("/loras/style.safetensors", 0.5, "high_noise")
    magcache = pack_module("magcache").MagCacheSettings(mag_ratios=(1.0, 0.9))
    picture = Image.new("RGB", (4, 2), (10, 20, 30))
    value = {"loras": (lora,), "magcache": magcache, "seed": 3, "image": torch.arange(6.0).reshape(1, 2, 3),
             "bf16": torch.ones(2, dtype=torch.bfloat16), "array": np.arange(4, dtype=np.int16), "pil": picture,
             "path": None}
    back = multihost.decode(json.loads(json.dumps(multihost.encode(value))))
    assert back["loras"] == (lora,) and back["magcache"] == magcache and back["seed"] == 3
    assert torch.equal(back["image"], value["image"]) and back["bf16"].dtype == torch.bfloat16
    assert back["array"].dtype == np.int16 and back["array"].tolist() == [0, 1, 2, 3]
    assert back["pil"].size == (4, 2) and back["pil"].getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(TypeError, match="cannot cross hosts"):
        multihost.encode({"callback": print})


def test_the_environment_says_when_and_where_to_join():
    config = multihost.ClusterConfig.from_environment
    assert config({}) is None and config({"WAN_TPU_NUM_PROCESSES": "1"}) is None
    joined = config({"WAN_TPU_NUM_PROCESSES": "4", "WAN_TPU_COORDINATOR": "10.0.0.2:8476", "WAN_TPU_PROCESS_ID": "3"})
    assert (joined.coordinator, joined.num_processes, joined.process_id, joined.is_leader) == ("10.0.0.2:8476", 4, 3,
                                                                                                False)
    with pytest.raises(ValueError, match="WAN_TPU_COORDINATOR is unset"):
        config({"WAN_TPU_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="WAN_TPU_PROCESS_ID=2: use 0 for ComfyUI's host and 1 to 1"):
        config({"WAN_TPU_NUM_PROCESSES": "2", "WAN_TPU_COORDINATOR": "h:1", "WAN_TPU_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="HOST:PORT"):
        config({"WAN_TPU_NUM_PROCESSES": "2", "WAN_TPU_COORDINATOR": "just-a-host"})
    assert joined.on_follower_loss == "local"
    assert config({"WAN_TPU_NUM_PROCESSES": "2", "WAN_TPU_COORDINATOR": "h:1",
                   "WAN_TPU_ON_FOLLOWER_LOSS": "Refuse"}).on_follower_loss == "refuse"
    with pytest.raises(ValueError, match="WAN_TPU_ON_FOLLOWER_LOSS='wait': use 'local'"):
        config({"WAN_TPU_NUM_PROCESSES": "2", "WAN_TPU_COORDINATOR": "h:1", "WAN_TPU_ON_FOLLOWER_LOSS": "wait"})


def test_a_follower_that_never_gets_ready_is_named_within_the_join_timeout():
    store = MemoryStore()
    leader = multihost.Leader(multihost.ClusterConfig("h:1", 3, 0, follower_timeout_s=1, join_timeout_s=1),
                              multihost.Channel(store, 0, 3))
    store.key_value_set("wan_tpu/host/1", json.dumps({"host": "tpu-vm-1", "pid": 1}))  # 1 is ready, 2 is not
    started = time.monotonic()
    with pytest.raises(multihost.FollowerError, match="follower process 2 on an unknown host joined but did not get "
                                                      "ready within 1 s"):
        leader.run("encode", {}, (), {}, lambda: pytest.fail("ran without the follower"))
    assert time.monotonic() - started < 5


def test_unload_reaches_the_follower():
    store = MemoryStore()
    released = []
    leader = multihost.Leader(multihost.ClusterConfig("h:1", 2, 0, follower_timeout_s=2, join_timeout_s=5),
                              multihost.Channel(store, 0, 2))
    follower = multihost.Follower(multihost.Channel(store, 1, 2), lambda spec: StandInPipeline(**spec),
                                  release=lambda: released.append("follower"), poll_s=0.05)
    thread, _ = serve_in_thread(follower)
    assert leader.broadcast(multihost.RELEASE, lambda: released.append("leader") or "freed") == "freed"
    assert sorted(released) == ["follower", "leader"] and leader.last_results[1]["ok"]
    leader.stop_followers()
    thread.join(10)
    assert not thread.is_alive()


# ---------------------------------------------------------------- the mesh over hosts
class FakeDevice:
    def __init__(self, id, process_index, platform="cpu", slice_index=None):
        self.id, self.process_index, self.platform, self.device_kind = id, process_index, platform, platform
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"d{self.id}@p{self.process_index}"


def hosts(count, per_host, **kwargs):
    return [FakeDevice(h * per_host + i, h, **kwargs) for h in range(count) for i in range(per_host)]


def test_the_mesh_keeps_tp_on_one_host_and_splits_dp_across_hosts_first(caplog):
    mesh = pack_module("runtime.mesh")
    pytest.importorskip("jax")
    # Processes listed interleaved, as a runtime may: the mesh still keeps each tp row on one host.
    interleaved = sorted(hosts(2, 4), key=lambda d: (d.id % 4, d.process_index))
    grid = mesh.build_mesh(interleaved, 2, 4).devices
    assert [{d.process_index for d in row} for row in grid] == [{0}, {1}]
    # 4 hosts of 2 over (2, 4): dp takes 2 hosts, tp must span the other 2, and says so.
    with caplog.at_level("WARNING", logger="wan_tpu"):
        grid = mesh.build_mesh(hosts(4, 2), 2, 4).devices
    assert [sorted({d.process_index for d in row}) for row in grid] == [[0, 1], [2, 3]]
    assert "tp=4 spans 2 hosts or slices" in caplog.text
    assert mesh.split_across_groups((2, 8), 4) == (2, 2) and mesh.split_across_groups((1, 8), 2) == (1, 2)
    # One TPU slice of several hosts is one ICI torus: one group, whatever its hosts.
    assert len(mesh.device_groups(hosts(4, 4, platform="tpu", slice_index=0))) == 1
    assert len(mesh.device_groups(hosts(4, 4, platform="tpu"))) == 1  # a deviceless topology's: no slice_index
    assert len(mesh.device_groups(hosts(2, 4, platform="tpu", slice_index=0)[:4]
                                  + [FakeDevice(9, 1, "tpu", 1)] * 4)) == 2  # two slices: DCN between
    with pytest.raises(ValueError, match="different numbers of devices"):
        mesh.build_mesh(hosts(2, 4)[:6], 2, 3)


def test_after_a_lost_follower_the_manager_goes_on_alone_or_refuses_as_the_environment_says():
    env_manager = pack_module("env_manager")

    class StandInJax:  # this host's 4 devices of 8; nothing is really started
        def devices(self):
            return hosts(2, 4)

        def local_devices(self):
            return hosts(2, 4)[:4]

        def local_device_count(self):
            return 4

        def clear_caches(self):
            pass

        def live_arrays(self):
            return []

    def broken_manager(on_follower_loss):
        manager = env_manager.TorchaxEnvManager()  # not the process's instance
        manager._env, manager._jax = object(), StandInJax()
        config = multihost.ClusterConfig("h:1", 2, 0, on_follower_loss=on_follower_loss)
        manager._cluster = multihost.Cluster(config, multihost.Channel(MemoryStore(), 0, 2))
        manager._cluster.leader.broken = "multi-host: follower process 1 on tpu-vm-1 stopped"
        return manager

    alone = broken_manager("local")
    assert alone.leader() is None and alone.alone  # stages now run here, mirrored to no one
    assert [d.id for d in alone.devices()] == [0, 1, 2, 3]
    assert alone.release()["components"] == []  # releases this host only, asking no follower
    refusing = broken_manager("refuse")
    leader = refusing.leader()
    assert leader is not None and not refusing.alone and len(refusing.devices()) == 8
    with pytest.raises(multihost.FollowerError, match="tpu-vm-1 stopped \\(refused the call 'generate'\\)"):
        leader.run("generate", {}, (), {}, lambda: None)
