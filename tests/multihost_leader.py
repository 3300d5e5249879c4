"""The leader of ``test_multihost.py``'s two-process runtime: process 0, as the pack runs inside ComfyUI.

Run by the test with the environment of a leader (``WAN_TPU_COORDINATOR``, ``WAN_TPU_NUM_PROCESSES=2``,
4 CPU devices); ``argv[1]``: a JSON file of settings; writes what it saw to ``<out>/leader.json`` and the
frames to ``<out>/frames.npy``. In order:

1. a generate with a live preview (the frames the test compares with one 8-device process);
2. a generate of another prompt and seed (it must compile nothing, here or on the follower);
3. a generate during which the test kills the follower (at step 1 this writes ``at_step``, then waits for
   ``killed``): it must fail with a ``FollowerError`` naming the follower, soon;
4. one more generate: refused at once with the same message.
"""

import json
import logging
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pack_loader import pack_module  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with open(sys.argv[1]) as file:
        settings = json.load(file)
    out = settings["out"]
    video = settings["video"]
    report: dict = {}

    def save() -> None:
        with open(os.path.join(out, "leader.json.part"), "w") as file:
            json.dump(report, file)
        os.replace(os.path.join(out, "leader.json.part"), os.path.join(out, "leader.json"))

    manager = pack_module("env_manager").TorchaxEnvManager.instance()
    multihost = pack_module("runtime.multihost")
    pipe = pack_module("pipeline").WanTPUPipeline(settings["model"], precision="fp32")
    leader = manager.leader()
    report["devices"] = [manager.jax.device_count(), manager.jax.local_device_count()]

    started = time.perf_counter()
    previews = []
    frames = pipe.generate("a cat", "blurry", seed=0, on_preview=lambda frame: previews.append(frame.shape), **video)
    report["first_s"] = time.perf_counter() - started
    report["previews"] = [list(shape) for shape in previews]
    report["follower_compiled_first"] = leader.last_results[1]["compiled"]
    import numpy as np

    np.save(os.path.join(out, "frames.npy"), frames.numpy())
    save()

    compiled = manager.compile_count()
    started = time.perf_counter()
    pipe.generate("a dog", "", seed=1, **video)
    report["second_s"] = time.perf_counter() - started
    report["leader_compiled_second"] = manager.compile_count() - compiled
    report["follower_compiled_second"] = leader.last_results[1]["compiled"] - report["follower_compiled_first"]
    save()

    def on_step(i: int, total: int) -> None:
        if i == 1:
            open(os.path.join(out, "at_step"), "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(out, "killed")) and time.monotonic() < deadline:
                time.sleep(0.05)

    for attempt in ("killed", "refused"):
        started = time.perf_counter()
        try:
            pipe.generate("a cat", "blurry", seed=0, on_step=on_step, **dict(video, num_inference_steps=3))
            report[attempt] = {"error": None}
        except multihost.FollowerError as error:
            killed_at = os.path.getmtime(os.path.join(out, "killed")) if attempt == "killed" else None
            report[attempt] = {"error": str(error), "s": time.perf_counter() - started,
                               "after_kill_s": None if killed_at is None else time.time() - killed_at}
        save()
    report["done"] = True
    save()


if __name__ == "__main__":
    main()
