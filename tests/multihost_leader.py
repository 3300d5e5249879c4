"""The leader of ``test_multihost.py``'s two-process runtime: process 0, as the pack runs inside ComfyUI.

Run by the test with the environment of a leader (``WAN_TPU_COORDINATOR``, ``WAN_TPU_NUM_PROCESSES=2``,
4 CPU devices); ``argv[1]``: a JSON file of settings; writes what it saw to ``<out>/leader.json`` and the
frames of each run to ``<out>/<run>.npy``. In order:

1. ``generate``, with a live preview;
2. the three-node chain (Text Encoder, Sampler, VAE Decoder), then the Full Pipeline node, then a
   ``generate`` of another prompt and seed: none of them may compile anything, here or on the follower;
3. a run cancelled at step 1: the follower must stop at the same step;
4. HunyuanVideo 1.5's ``generate`` (the tiny model: another family; its VAE decode in tiles spread over
   both processes' devices);
5. "Unload Models" (``release``): both processes free everything;
6. a run during which the test kills the follower (at step 1 this writes ``at_step``, then waits for
   ``killed``): it must fail with a ``FollowerError`` naming the follower, soon;
7. one more ``generate``: it runs on this process's 4 devices alone.
"""

import json
import logging
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pack_loader import pack_module  # noqa: E402


class Cancelled(Exception):
    """What ComfyUI's Cancel raises from a node's progress callback."""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import numpy as np
    import torch

    with open(sys.argv[1]) as file:
        settings = json.load(file)
    out, model, video = settings["out"], settings["model"], settings["video"]
    report: dict = {}

    def save() -> None:
        with open(os.path.join(out, "leader.json.part"), "w") as file:
            json.dump(report, file)
        os.replace(os.path.join(out, "leader.json.part"), os.path.join(out, "leader.json"))

    def keep(name: str, frames) -> None:
        np.save(os.path.join(out, f"{name}.npy"), frames.numpy())

    manager = pack_module("env_manager").TorchaxEnvManager.instance()
    multihost = pack_module("runtime.multihost")
    nodes = pack_module("nodes")
    pipe = pack_module("pipeline").WanTPUPipeline(model, precision="fp32")
    leader = manager.leader()
    report["devices"] = [manager.jax.device_count(), manager.jax.local_device_count()]

    started = time.perf_counter()
    previews = []
    keep("generate", pipe.generate("a cat", "blurry", seed=0, on_preview=lambda frame: previews.append(frame.shape),
                                   **video))
    report["first_s"] = time.perf_counter() - started
    report["previews"] = [list(shape) for shape in previews]
    report["follower_compiled_first"] = leader.last_results[1]["compiled"]
    save()

    compiled = manager.compile_count()
    started = time.perf_counter()
    v = video
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        positive, negative = nodes.Wan21TextEncoder().encode("a cat", "blurry", model, precision="fp32")
        latent, _ = nodes.Wan21TPUSampler().sample(positive, negative, v["height"], v["width"], v["num_frames"],
                                                   v["num_inference_steps"], v["guidance_scale"], 0, model,
                                                   v["flow_shift"], precision="fp32")
        keep("chain", nodes.Wan21TPUVAEDecoder().decode(latent, model, 16, precision="fp32")[0])
        keep("full_pipeline", nodes.Wan21TPUPipeline().generate(
            "a cat", "blurry", v["height"], v["width"], v["num_frames"], v["num_inference_steps"],
            v["guidance_scale"], 0, model, 16, v["flow_shift"], precision="fp32")[0])
    pipe.generate("a dog", "", seed=1, **video)
    report["nodes_and_second_s"] = time.perf_counter() - started
    report["leader_compiled_second"] = manager.compile_count() - compiled
    report["follower_compiled_second"] = leader.last_results[1]["compiled"] - report["follower_compiled_first"]
    save()

    def cancel_at_step_1(i: int, total: int) -> None:
        if i == 1:
            raise Cancelled("the user pressed Cancel")

    try:
        pipe.generate("a cat", "blurry", seed=0, on_step=cancel_at_step_1, **video)
        report["cancel"] = {"raised": False}
    except Cancelled:
        report["cancel"] = {"raised": True, "follower": leader.last_results[1]}
    save()

    hunyuan = pack_module("models.hunyuan.pipeline").HunyuanVideoPipeline(
        settings["hunyuan"], precision="fp32", vae_tile_pixels=settings["hunyuan_tile"])
    keep("hunyuan", hunyuan.generate("a cat", "blurry", seed=0, **settings["hunyuan_video"]))
    report["hunyuan_follower"] = leader.last_results[1]
    save()

    freed = manager.release()
    report["release"] = {"leader": freed, "follower": leader.last_results[1]}
    save()

    def wait_for_the_kill(i: int, total: int) -> None:
        if i == 1:
            open(os.path.join(out, "at_step"), "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(out, "killed")) and time.monotonic() < deadline:
                time.sleep(0.05)

    started = time.perf_counter()
    try:
        pipe.generate("a cat", "blurry", seed=0, on_step=wait_for_the_kill, **dict(video, num_inference_steps=3))
        report["killed"] = {"error": None}
    except multihost.FollowerError as error:
        report["killed"] = {"error": str(error), "s": time.perf_counter() - started,
                            "after_kill_s": time.time() - os.path.getmtime(os.path.join(out, "killed"))}
    save()

    keep("alone", pipe.generate("a cat", "blurry", seed=0, **video))
    report["alone"] = {"alone": manager.alone, "mesh_devices": int(pipe.mesh.devices.size),
                       "leader": manager.leader() is not None}
    report["done"] = True
    save()


if __name__ == "__main__":
    main()
