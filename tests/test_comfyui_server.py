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
    assert info["HunyuanVideo15TPUSampler"]["category"] == "TPU/HunyuanVideo"
    assert info["HunyuanVideo15TPUSampler"]["display_name"] == "HunyuanVideo 1.5 TPU Sampler"
    # The settings node, and the Sampler's and Full Pipeline's input for it, last (after every saved link).
    assert info["WanTPUSamplerSettings"]["output"] == ["WAN_TPU_SETTINGS"]
    assert info["WanTPUSamplerSettings"]["display_name"] == "Wan TPU Sampler Settings"
    for node in ("Wan21TPUSampler", "Wan21TPUPipeline"):
        optional = info[node]["input"]["optional"]
        assert list(optional)[-1] == "settings" and optional["settings"][0] == "WAN_TPU_SETTINGS"


def test_examples_are_served_as_workflow_templates(server):
    templates = _get(server["url"] + "/api/workflow_templates")
    assert sorted(templates["ComfyUI-Wan-TPU"]) == ["hunyuan15_tpu_i2v_720p", "hunyuan15_tpu_t2v_720p",
                                                    "wan21_tpu_480p", "wan21_tpu_4step_lora", "wan21_tpu_720p",
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


# The Run button in a real browser, for the original pack's workflow and each of our UI examples: the page loads
# the workflow, the widgets are edited by name as a user would (the tiny model, 256x256, 17 frames, 2 steps, a
# seed of the test's own), Run is pressed, and the script waits for the prompt's history entry. It prints what the
# page loaded, what it sent to /prompt and how the run ended, as JSON.
_BROWSER_RUN = _BROWSER_OPEN + r"""
import time
with open(sys.argv[2]) as handle:
    job = json.load(handle)
page.wait_for_function("window.app && window.app.graph", timeout=120000)
page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", job["workflow"])
NODES = "(window.app.graph.nodes || window.app.graph._nodes)"
loaded = page.evaluate("() => " + NODES + ".map(node => ({id: node.id, type: node.type,"
                       " widgets: Object.fromEntries((node.widgets || []).map(w => [w.name, w.value]))}))")
edited = page.evaluate("(edits) => { const done = []; for (const node of " + NODES + ") {"
                       " for (const widget of node.widgets || []) { let value = undefined;"
                       " if (Object.hasOwn(edits.by_name, widget.name)) value = edits.by_name[widget.name];"
                       " if (widget.name === 'model_id' && Object.hasOwn(edits.model_ids, String(widget.value)))"
                       " value = edits.model_ids[widget.value];"
                       " if (value !== undefined) { widget.value = value; done.push(node.id + '.' + widget.name); } } }"
                       " return done; }", job["edits"])
with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                          timeout=60000) as answer:
    page.get_by_role("button", name="Run").first.click()  # the Run button, as a user presses it
response = answer.value
report = {"loaded": loaded, "edited": edited, "sent": response.request.post_data_json.get("prompt"),
          "answer": response.status}
entry = None
if response.status == 200:
    prompt_id = response.json()["prompt_id"]
    deadline = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < deadline:
        entry = page.evaluate("async (id) => (await (await fetch('/api/history/' + id)).json())[id] || null",
                              prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("completed") or status.get("status_str") == "error":
            break
        time.sleep(2)
    page.wait_for_timeout(2000)  # let the page draw the outputs it was sent
    report["videos_in_page"] = page.evaluate("() => document.querySelectorAll('video').length")
else:
    report["refusal"] = response.text()[:3000]
report["entry"] = entry
page.screenshot(path=sys.argv[3])
print(json.dumps(report))
browser.close()
playwright.stop()
"""

ORIGINAL_MODEL_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
# Our examples' model ids -> the tiny model of the family, built beside the tiny Wan 2.1 model (the folder names the
# Wan 2.2 API example test uses, so one session builds each once).
_TINY_FAMILIES = {"Wan-AI/Wan2.2-I2V-A14B-Diffusers": ("wan22_tpu_i2v_a14b_720p", "TINY_I2V_A14B"),
                  "Wan-AI/Wan2.2-T2V-A14B-Diffusers": ("wan22_tpu_t2v_a14b_720p", "TINY_A14B"),
                  "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v": ("hunyuan15_t2v", "TINY_T2V"),
                  "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_i2v": ("hunyuan15_i2v", "TINY_I2V")}
MODEL_PREFIXES = ("Wan-AI/", "hunyuanvideo-community/")
UI_EXAMPLES = sorted(os.path.basename(path)[:-len(".json")] for path in os.listdir(os.path.join(PACK_DIR, "examples"))
                     if path.endswith(".json"))


def original_ui_workflow() -> dict:
    """The original pack's UI example (yangwhale/gpu-tpu-pedia, tpu/ComfyUI/custom_nodes/ComfyUI-Wan2.1-TPU/examples/
    wan21_t2v_720p.json), rebuilt from the facts tests/original_interface.py records: its node ids, links and
    widget values as its frontend (1.35.9) saved them. Its Sampler saved 9 widget values; ours has more widgets,
    which the page gives their defaults."""
    from original_interface import ORIGINAL_EXAMPLE_WIDGETS

    def node(node_id, kind, inputs, outputs, widgets, x, y=200):
        return {"id": node_id, "type": kind, "pos": [x, y], "size": [350, 300], "flags": {}, "order": len(nodes),
                "mode": 0, "properties": {"Node name for S&R": kind}, "widgets_values": widgets,
                "inputs": [{"name": name, "type": kind, "link": link} for name, kind, link in inputs],
                "outputs": [{"name": name, "type": kind, "slot_index": slot, "links": links}
                            for slot, (name, kind, links) in enumerate(outputs)]}

    nodes = []
    nodes.append(node(1, "Wan21TextEncoder", [], [("prompt_embeds", "TENSOR", [1]),
                                                  ("negative_prompt_embeds", "TENSOR", [2])],
                      ORIGINAL_EXAMPLE_WIDGETS["Wan21TextEncoder"], 100))
    nodes.append(node(2, "Wan21TPUSampler", [("prompt_embeds", "TENSOR", 1), ("negative_prompt_embeds", "TENSOR", 2)],
                      [("latents", "LATENT", [3]), ("num_frames", "INT", None)],
                      ORIGINAL_EXAMPLE_WIDGETS["Wan21TPUSampler"], 550))
    nodes.append(node(3, "Wan21TPUVAEDecoder", [("latents", "LATENT", 3)],
                      [("frames", "IMAGE", [6]), ("fps", "INT", None)], ORIGINAL_EXAMPLE_WIDGETS["Wan21TPUVAEDecoder"],
                      950))
    nodes.append(node(6, "CreateVideo", [("images", "IMAGE", 6), ("audio", "AUDIO", None)], [("VIDEO", "VIDEO", [7])],
                      [16], 1300, 100))
    nodes.append(node(7, "SaveVideo", [("video", "VIDEO", 7)], [], ["video/ComfyUI", "auto", "auto"], 1300, 360))
    links = [[1, 1, 0, 2, 0, "TENSOR"], [2, 1, 1, 2, 1, "TENSOR"], [3, 2, 0, 3, 0, "LATENT"], [6, 3, 0, 6, 0, "IMAGE"],
             [7, 6, 0, 7, 0, "VIDEO"]]
    return {"last_node_id": 7, "last_link_id": 7, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"frontendVersion": "1.35.9"}, "version": 0.4}


def _tiny_model_for(model_id, tiny_model_dir) -> tuple[str, str]:
    """(the value for the model_id widget, the folder) of the tiny model standing in for ``model_id``."""
    if model_id == ORIGINAL_MODEL_ID:
        return str(tiny_model_dir), str(tiny_model_dir)
    from conftest import pack_module

    name, family = _TINY_FAMILIES[model_id]
    folder = os.path.join(os.path.dirname(str(tiny_model_dir)), name)
    if not os.path.isdir(folder):
        if model_id.startswith("hunyuanvideo-community/"):
            tiny_hunyuan = pack_module("tiny_hunyuan")
            tiny_hunyuan.build_tiny_hunyuan(folder, getattr(tiny_hunyuan, family))
        else:
            tiny_wan = pack_module("tiny_wan")
            tiny_wan.build_tiny_wan(folder, getattr(tiny_wan, family))
    return name, folder  # a name under an allowed root, as users give it


@pytest.mark.skipif(not (os.path.exists(BROWSER_PYTHON) and os.path.exists("/usr/bin/chromium")),
                    reason="needs chromium and playwright (COMFYUI_BROWSER_PYTHON)")
@pytest.mark.parametrize("example", ["original_wan21_t2v_720p", *UI_EXAMPLES])
def test_a_browser_runs_the_workflow_from_the_run_button(server, tiny_model_dir, tmp_path, example):
    import zlib

    if example.startswith("original_"):
        workflow = original_ui_workflow()
    else:
        with open(os.path.join(PACK_DIR, "examples", f"{example}.json")) as handle:
            workflow = json.load(handle)
    model_ids = {value for node in workflow["nodes"] for value in node.get("widgets_values") or []
                 if isinstance(value, str) and value.startswith(MODEL_PREFIXES)}
    tiny = {model_id: _tiny_model_for(model_id, tiny_model_dir) for model_id in model_ids}
    assert len(tiny) == 1, model_ids  # one family per workflow
    (widget_value, folder), = tiny.values()
    # Tiny LoRAs under the names the example's LoRA nodes pick (widgets: lora_name, strength, expert), before the
    # page loads ComfyUI's list of LoRA files.
    _write_example_loras({str(node["id"]): {"class_type": node["type"], "inputs": dict(zip(
        ("lora_name", "strength", "expert"), node["widgets_values"]))} for node in workflow["nodes"]
        if node["type"] == "Wan21TPULoRA"}, folder, server["loras"])
    seed = 1000 + zlib.crc32(example.encode()) % 100000  # the test's own: no cached result from another test
    # HunyuanVideo's tiny model attends ~2,000 text tokens beside the video: a smaller video keeps it quick.
    size = (64, 64, 9) if example.startswith("hunyuan") else (256, 256, 17)
    edits = {"model_ids": {model_id: value for model_id, (value, _) in tiny.items()},
             "by_name": {"height": size[0], "width": size[1], "num_frames": size[2], "num_inference_steps": 2,
                         "seed": seed}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"workflow": workflow, "edits": edits}))
    shot = tmp_path / f"{example}.png"
    started = time.monotonic()
    done = subprocess.run([BROWSER_PYTHON, "-c", _BROWSER_RUN, server["url"], str(path), str(shot), "900"],
                          capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{example}: {time.monotonic() - started:.0f} s, {report.get('videos_in_page')} video(s) in the page, "
          f"screenshot {shot}")
    assert report["answer"] == 200, report.get("refusal")

    # Every node of the workflow is in the page, and the prompt the page sent carries the edits.
    assert sorted(node["id"] for node in report["loaded"]) == sorted(node["id"] for node in workflow["nodes"])
    sent = report["sent"]
    for node in sent.values():
        inputs = node["inputs"]
        assert inputs.get("model_id", widget_value) == widget_value, node
        if "height" in inputs:
            assert (inputs["height"], inputs["width"], inputs["num_frames"]) == size, node
    if example.startswith("original_"):  # its 9 saved values on the first 9 widgets, our later ones at defaults
        sampler = next(node["widgets"] for node in report["loaded"] if node["type"] == "Wan21TPUSampler")
        assert (sampler["model_id"], sampler["flow_shift"], sampler["num_inference_steps"]) == (
            ORIGINAL_MODEL_ID, 5, 50)
        assert (sampler["precision"], sampler["sampler"], sampler["magcache"]) == ("bf16", "unipc", False)
        assert {node["class_type"] for node in sent.values()} == {"Wan21TextEncoder", "Wan21TPUSampler",
                                                                  "Wan21TPUVAEDecoder", "CreateVideo", "SaveVideo"}

    entry = report["entry"]
    assert entry is not None, "no history entry within the time limit"
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], json.dumps(status["messages"])[:3000]
    assert "execution_success" in [message[0] for message in status["messages"]]
    videos = [server["output"] / path for path in _load_queue_script().output_files(entry) if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 0 for video in videos)
    assert shot.stat().st_size > 0


SETTINGS_DEFAULTS = {"sampler": "unipc", "timesteps": "", "guidance_scale_2": -1.0, "magcache": False,
                     "magcache_threshold": 0.06, "magcache_max_skip_steps": 3, "magcache_retention_ratio": 0.2,
                     "magcache_calibrate": False, "layout": "auto", "precision": "bf16", "dp": 0, "tp": 0}


def _refusal(url, prompt) -> str:
    request = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        return error.read().decode()
    raise AssertionError("the prompt was accepted")


def test_a_linked_settings_node_runs_and_its_values_win(server, tiny_model_dir):
    """'Wan TPU Sampler Settings' linked into the Sampler: ComfyUI accepts the prompt although the Sampler's own
    sampler/timesteps widgets (which the settings replace) would be refused on their own, the run succeeds, and
    the settings' values are the ones used."""
    workflow = tiny_480p_workflow(tiny_model_dir, 2, seed=53)
    sampler_id = next(key for key, node in workflow.items() if node["class_type"] == "Wan21TPUSampler")
    workflow[sampler_id]["inputs"].update(sampler="unipc", timesteps="999,500")  # UniPC takes no timesteps
    assert "need sampler='euler'" in _refusal(server["url"], workflow)  # not linked: the widgets are checked

    workflow["90"] = {"class_type": "WanTPUSamplerSettings",
                      "inputs": dict(SETTINGS_DEFAULTS, sampler="euler", timesteps="999,500")}
    workflow[sampler_id]["inputs"]["settings"] = ["90", 0]
    started = time.monotonic()
    files = _load_queue_script().queue_and_wait(server["url"], workflow, timeout=900)
    print(f"settings run: {time.monotonic() - started:.0f} s")
    videos = [server["output"] / path for path in files if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 0 for video in videos)
    assert "Wan TPU Sampler Settings connected: its values replace the node's widgets sampler='unipc' -> 'euler'" in \
        server["log"].read_text()
