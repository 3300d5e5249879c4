"""The pack inside a real ComfyUI: nodes listed, an API workflow makes an MP4, /free frees HBM.

Runs only when COMFYUI_DIR points at a ComfyUI checkout whose Python
(COMFYUI_PYTHON, default COMFYUI_DIR/.venv/bin/python) has this pack's
requirements. The server listens on 127.0.0.1 only.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import PACK_DIR

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (with this pack's requirements) to run"
)
OUR_NODES = {"Wan21TextEncoder", "Wan21TPUSampler", "Wan21TPUVAEDecoder", "Wan21TPUPipeline", "Wan21TPUUnload",
             "Wan21TPULoRA", "WanTPUImageToVideo", "WanTPUModelFiles", "WanTPUSamplerSettings"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url, payload=None, timeout=10):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
        return json.loads(body) if body else None


COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", os.path.join(os.path.abspath(COMFYUI_DIR or "."), ".venv", "bin",
                                                                  "python"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """A ComfyUI with live previews on (ComfyUI's default is --preview-method none)."""
    with running_comfyui(tmp_path_factory.mktemp("comfyui"), tiny_model_dir, ["--preview-method", "auto"]) as info:
        yield info


@contextlib.contextmanager
def running_comfyui(work, tiny_model_dir, extra_args=()):
    comfy_dir = os.path.abspath(COMFYUI_DIR)
    python = COMFYUI_PYTHON
    # Linked under the name users clone it as. (A checkout folder named "main"
    # would shadow ComfyUI's own main module.)
    link = os.path.join(comfy_dir, "custom_nodes", "ComfyUI-Wan-TPU")
    created_link = not os.path.lexists(link)
    if created_link:
        os.symlink(PACK_DIR, link)
    elif os.path.realpath(link) != os.path.realpath(PACK_DIR):
        pytest.fail(f"{link} exists and is not this checkout: remove it to run this test")
    # LoRAs for the examples' placeholder names go into a loras folder of our own, added as a user would.
    (work / "loras").mkdir()
    (work / "extra_model_paths.yaml").write_text(f"wan_tpu_test:\n    base_path: {work}\n    loras: loras\n")
    port = _free_port()
    log_path = work / "server.log"
    # The tiny model lives in pytest's temporary folder: allow it as a model root, as a server owner would.
    env = dict(os.environ, JAX_PLATFORMS="cpu", WAN_TPU_COMPILE_CACHE="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               WAN_TPU_MODEL_ROOTS=os.path.dirname(str(tiny_model_dir)))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--output-directory", str(work / "output"), "--extra-model-paths-config",
             str(work / "extra_model_paths.yaml"), *extra_args],
            cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "log": log_path, "output": work / "output", "loras": work / "loras"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if created_link:
            os.unlink(link)


def test_our_nodes_are_listed(server):
    info = _get(server["url"] + "/object_info", timeout=60)
    assert OUR_NODES <= set(info)
    assert info["Wan21TPUSampler"]["category"] == "TPU/Wan2.1"
    assert info["Wan21TPUSampler"]["display_name"] == "Wan 2.1 TPU Sampler"
    # The settings node, and the Sampler's and Full Pipeline's input for it, last (after every saved link).
    assert info["WanTPUSamplerSettings"]["output"] == ["WAN_TPU_SETTINGS"]
    assert info["WanTPUSamplerSettings"]["display_name"] == "Wan TPU Sampler Settings"
    for node in ("Wan21TPUSampler", "Wan21TPUPipeline"):
        optional = info[node]["input"]["optional"]
        assert list(optional)[-1] == "settings" and optional["settings"][0] == "WAN_TPU_SETTINGS"


def test_examples_are_served_as_workflow_templates(server):
    templates = _get(server["url"] + "/api/workflow_templates")
    assert sorted(templates["ComfyUI-Wan-TPU"]) == ["wan21_tpu_480p", "wan21_tpu_4step_lora", "wan21_tpu_720p",
                                                    "wan21_tpu_full_pipeline", "wan22_tpu_i2v_a14b_720p",
                                                    "wan22_tpu_t2v_a14b_4step_lora", "wan22_tpu_t2v_a14b_720p"]
    workflow = _get(server["url"] + "/api/workflow_templates/ComfyUI-Wan-TPU/wan21_tpu_720p.json")
    info = _get(server["url"] + "/object_info", timeout=60)
    assert {node["type"] for node in workflow["nodes"]} <= set(info)  # core nodes included


def tiny_480p_workflow(tiny_model_dir, steps: int, **inputs) -> dict:
    """The 480P API example on the tiny model at 256x256, 17 frames and ``steps`` steps."""
    with open(os.path.join(PACK_DIR, "examples", "api", "wan21_tpu_480p_api.json")) as handle:
        workflow = json.load(handle)
    return _load_queue_script().override_inputs(workflow, model_id=str(tiny_model_dir), height=256, width=256,
                                                num_frames=17, num_inference_steps=steps, **inputs)


def test_api_example_makes_an_mp4_and_free_releases_the_device(server, tiny_model_dir):
    queue = _load_queue_script()
    workflow = tiny_480p_workflow(tiny_model_dir, 2)
    files = queue.queue_and_wait(server["url"], workflow, timeout=900)
    videos = [server["output"] / path for path in files if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 0 for video in videos)

    _get(server["url"] + "/free", {"unload_models": True})
    deadline = time.monotonic() + 60
    pattern = re.compile(r"Wan TPU: released 3 component\(s\) .*MiB of device memory")
    while not pattern.search(server["log"].read_text()):
        assert time.monotonic() < deadline, server["log"].read_text()[-3000:]
        time.sleep(1)


@pytest.mark.parametrize("example, tiny_family", [("wan22_tpu_i2v_a14b_720p", "TINY_I2V_A14B"),
                                                   ("wan22_tpu_t2v_a14b_720p", "TINY_A14B"),
                                                   ("wan22_tpu_t2v_a14b_4step_lora", "TINY_A14B")])
def test_the_wan22_api_examples_make_an_mp4(server, tiny_model_dir, example, tiny_family):
    """The Wan 2.2 examples as shipped (core Load Image with ComfyUI's own example.png, Create Video, Save Video)
    on a tiny model of their family, built beside the tiny Wan 2.1 model (under the allowed root)."""
    from conftest import pack_module

    tiny_wan = pack_module("tiny_wan")
    folder = os.path.join(os.path.dirname(str(tiny_model_dir)), example)
    if not os.path.isdir(folder):
        tiny_wan.build_tiny_wan(folder, getattr(tiny_wan, tiny_family))
    with open(os.path.join(PACK_DIR, "examples", "api", f"{example}_api.json")) as handle:
        workflow = json.load(handle)
    _write_example_loras(workflow, folder, server["loras"])
    queue = _load_queue_script()
    steps = workflow["2"]["inputs"]["num_inference_steps"] if "lora" in workflow["2"]["inputs"] else 2
    queue.override_inputs(workflow, model_id=example, height=256, width=256, num_frames=17, num_inference_steps=steps)
    files = queue.queue_and_wait(server["url"], workflow, timeout=900)
    videos = [server["output"] / path for path in files if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 0 for video in videos)


def _write_example_loras(workflow, model_folder, loras_folder):
    """Random LoRAs for the tiny model under the names the example's LoRA nodes pick, each for its expert."""
    from conftest import pack_module
    from test_lora import write_random_lora

    loading = pack_module("loading")
    for node in workflow.values():
        if node["class_type"] != "Wan21TPULoRA":
            continue
        expert = "transformer_2" if node["inputs"].get("expert") == "low_noise" else "transformer"
        module = loading.load_transformer(loading.resolve_model_source(model_folder), "fp32", expert)
        write_random_lora(loras_folder / node["inputs"]["lora_name"], "comfyui", module, rank=4, alpha=2.0)


def _load_queue_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("queue_workflow", os.path.join(PACK_DIR, "examples", "queue_workflow.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_api_prompt_with_the_original_packs_input_names_runs(server, tiny_model_dir):
    """An API prompt as written for the original pack (its input names, no inputs this pack added)."""
    from original_interface import ORIGINAL_INPUTS

    tiny = os.path.basename(str(tiny_model_dir))  # a name under an allowed root, as users give it
    prompt = {
        "1": {"class_type": "Wan21TextEncoder",
              "inputs": {"prompt": "a cat", "negative_prompt": "blurry", "model_id": tiny}},
        "2": {"class_type": "Wan21TPUSampler",
              "inputs": {"prompt_embeds": ["1", 0], "negative_prompt_embeds": ["1", 1], "height": 256, "width": 256,
                         "num_frames": 17, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 42,
                         "model_id": tiny, "flow_shift": 5.0}},
        "3": {"class_type": "Wan21TPUVAEDecoder", "inputs": {"latents": ["2", 0], "model_id": tiny, "fps": 16}},
        "4": {"class_type": "CreateVideo", "inputs": {"images": ["3", 0], "fps": 16.0}},
        "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": "video/original_api",
                                                    "format": "auto", "codec": "auto"}},
    }
    for node in prompt.values():  # exactly the original's names, nothing of ours
        if node["class_type"] in ORIGINAL_INPUTS:
            names = ORIGINAL_INPUTS[node["class_type"]]
            assert set(node["inputs"]) <= set(names["required"] + names["optional"])
    files = _load_queue_script().queue_and_wait(server["url"], prompt, timeout=900)
    videos = [server["output"] / path for path in files if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 0 for video in videos)


def test_a_model_folder_outside_the_roots_is_refused_without_naming_it(server, tmp_path):
    outside = tmp_path / "secret-models"
    outside.mkdir()
    prompt = {
        "1": {"class_type": "Wan21TPUPipeline",
              "inputs": {"prompt": "a cat", "negative_prompt": "", "height": 256, "width": 256, "num_frames": 17,
                         "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 1, "model_id": str(outside / "..")}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 16.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/refused",
                                                    "format": "auto", "codec": "auto"}},
    }
    request = urllib.request.Request(server["url"] + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("the prompt was accepted")
    except urllib.error.HTTPError as error:
        body = error.read().decode()
    assert "model_id" in body and "WAN_TPU_MODEL_ROOTS" in body
    assert str(tmp_path) not in body.replace(str(outside / ".."), "")


# Run under ComfyUI's Python (it has aiohttp): listen on the websocket as the page does, queue the prompt for
# this client, count the preview images that arrive while it runs, print the counts when it has executed.
_PREVIEW_LISTENER = r"""
import asyncio, json, sys, uuid
import aiohttp

async def main(url, path, timeout):
    client = uuid.uuid4().hex
    counts = {"previews": 0, "progress": 0}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}/ws?clientId={client}") as ws:
            with open(path) as handle:
                prompt = json.load(handle)
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client}) as answer:
                prompt_id = (await answer.json())["prompt_id"]
            while True:
                message = await asyncio.wait_for(ws.receive(), timeout)
                if message.type == aiohttp.WSMsgType.BINARY:
                    if int.from_bytes(message.data[:4], "big") in (1, 2, 4):  # ComfyUI's preview image events
                        counts["previews"] += 1
                elif message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if event["type"] == "progress" and data.get("prompt_id") == prompt_id:
                        counts["progress"] += 1
                    if event["type"] == "execution_error":
                        raise SystemExit(json.dumps(data)[:2000])
                    if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
                else:
                    raise SystemExit(f"websocket closed: {message}")
    print(json.dumps(counts))

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def _previews_while_sampling(url, tiny_model_dir, tmp_path, steps=3) -> dict:
    # A seed no other test runs: ComfyUI would reuse a cached result, and sample (and preview) nothing.
    workflow = tiny_480p_workflow(tiny_model_dir, steps, seed=31)
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(workflow))
    done = subprocess.run([COMFYUI_PYTHON, "-c", _PREVIEW_LISTENER, url, str(path), "600"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_previews_arrive_over_the_websocket_while_sampling(server, tiny_model_dir, tmp_path):
    counts = _previews_while_sampling(server["url"], tiny_model_dir, tmp_path, steps=3)
    assert counts["previews"] >= 3, counts  # one per denoising step


def test_no_previews_are_sent_with_preview_method_none(tmp_path_factory, tiny_model_dir, tmp_path):
    with running_comfyui(tmp_path_factory.mktemp("comfyui-no-previews"), tiny_model_dir,
                         ["--preview-method", "none"]) as other:
        counts = _previews_while_sampling(other["url"], tiny_model_dir, tmp_path, steps=3)
    assert counts["previews"] == 0 and counts["progress"] >= 3, counts  # progress still, previews not


def test_the_monitor_route_and_its_page_extension(server, tiny_model_dir):
    """After a run the route lists the 8 devices and the components; the page loads the monitor's script."""
    _one_step_run(server, tiny_model_dir)
    report = _get(server["url"] + "/wan_tpu/devices")
    assert report["started"] and len(report["devices"]) == 8 and report["compiled_programs"] > 0
    assert {"text_encoder", "transformer", "vae"} <= {c["kind"] for c in report["components"]}
    assert "/extensions/ComfyUI-Wan-TPU/wan_tpu_monitor.js" in _get(server["url"] + "/extensions")


def _one_step_run(server, tiny_model_dir):
    _load_queue_script().queue_and_wait(server["url"], tiny_480p_workflow(tiny_model_dir, 1), timeout=900)


# A real browser (Debian's chromium, driven by playwright from COMFYUI_BROWSER_PYTHON, default the
# .harness-venv that ../shared/tools/setup_comfyui.sh makes): the page shows the monitor panel.
BROWSER_PYTHON = os.environ.get("COMFYUI_BROWSER_PYTHON",
                                os.path.join(os.path.abspath(COMFYUI_DIR or "."), ".harness-venv", "bin", "python"))
# Each browser script starts with this: headless chromium (the flags this machine needs) on the page argv[1].
_BROWSER_OPEN = r"""
import json, sys
from playwright.sync_api import sync_playwright

playwright = sync_playwright().start()
browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
page = browser.new_page(viewport={"width": 1400, "height": 900})
page.goto(sys.argv[1])
"""
_BROWSER_CHECK = _BROWSER_OPEN + r"""
panel = page.locator("#wan-tpu-monitor")
panel.wait_for(timeout=120000)
page.wait_for_function("document.querySelector('#wan-tpu-monitor').innerText.includes('compiled programs')",
                       timeout=60000)
page.screenshot(path=sys.argv[2])
print(panel.inner_text())
browser.close()
playwright.stop()
"""


@pytest.mark.skipif(not (os.path.exists(BROWSER_PYTHON) and os.path.exists("/usr/bin/chromium")),
                    reason="needs chromium and playwright (COMFYUI_BROWSER_PYTHON)")
def test_a_browser_sees_the_monitor_in_the_page(server, tiny_model_dir, tmp_path):
    if not _get(server["url"] + "/wan_tpu/devices")["started"]:
        _one_step_run(server, tiny_model_dir)  # so the panel has devices to show
    shot = tmp_path / "monitor.png"
    done = subprocess.run([BROWSER_PYTHON, "-c", _BROWSER_CHECK, server["url"], str(shot)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Wan TPU monitor" in done.stdout and "cpu 0 cpu" in done.stdout and "holds: " in done.stdout
    assert shot.stat().st_size > 0


_BROWSER_PREVIEW = _BROWSER_OPEN + r"""
with open(sys.argv[2]) as handle:
    workflow = json.load(handle)
page.wait_for_function("window.app && window.app.graph", timeout=120000)
page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
page.get_by_role("button", name="Run").first.click()  # the Run button, as a user presses it
# The sampler (node 2) gets preview images while it samples: the page keeps them per node.
page.wait_for_function(
    "(() => { const app = window.app; const images = (app.nodePreviewImages || {})['2'];"
    " const node = app.graph.getNodeById(2); return (images && images.length > 0) ||"
    " (node && node.imgs && node.imgs.length > 0); })()", timeout=600000, polling=200)
page.screenshot(path=sys.argv[3])
print("preview seen under the sampler")
browser.close()
playwright.stop()
"""


@pytest.mark.skipif(not (os.path.exists(BROWSER_PYTHON) and os.path.exists("/usr/bin/chromium")),
                    reason="needs chromium and playwright (COMFYUI_BROWSER_PYTHON)")
def test_a_browser_sees_the_preview_under_the_sampler_after_run(server, tiny_model_dir, tmp_path):
    with open(os.path.join(PACK_DIR, "examples", "wan21_tpu_480p.json")) as handle:
        workflow = json.load(handle)
    for node in workflow["nodes"]:  # the UI example, on the tiny model and a small size
        values = node.get("widgets_values") or []
        node["widgets_values"] = [str(tiny_model_dir) if v == "Wan-AI/Wan2.1-T2V-14B-Diffusers" else v for v in values]
        if node["type"] == "Wan21TPUSampler":
            node["widgets_values"][:6] = [256, 256, 17, 6, 5.0, 77]  # a seed no other test runs
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    shot = tmp_path / "preview.png"
    done = subprocess.run([BROWSER_PYTHON, "-c", _BROWSER_PREVIEW, server["url"], str(path), str(shot)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert shot.stat().st_size > 0
