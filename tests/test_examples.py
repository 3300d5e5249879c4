"""Example workflows use registered nodes with widgets in INPUT_TYPES order."""

import glob
import inspect
import json
import os

import pytest
from conftest import PACK_DIR, load_pack

nodes = load_pack()  # what ComfyUI registers: NODE_CLASS_MAPPINGS of the Wan and HunyuanVideo nodes
CORE_NODES = {"CreateVideo", "SaveVideo", "LoadImage"}  # ComfyUI's own; checked against a real ComfyUI in test_comfyui_server.py
UI_EXAMPLES = sorted(glob.glob(os.path.join(PACK_DIR, "examples", "*.json")))
API_EXAMPLES = sorted(glob.glob(os.path.join(PACK_DIR, "examples", "api", "*.json")))
with open(os.path.join(PACK_DIR, "README.md"), encoding="utf-8") as _handle:
    README = _handle.read()
WIDGET_KINDS = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def expected_widgets(node_class):
    """(name, spec) per widget value, in the order the frontend stores them."""
    spec = node_class.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            options = options[0] if options else {}
            if isinstance(kind, list) or kind in WIDGET_KINDS:
                widgets.append((name, kind))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"]))
    return widgets


def test_there_are_nine_ui_examples_and_their_api_twins():
    names = [os.path.basename(path)[:-5] for path in UI_EXAMPLES]
    assert names == ["hunyuan15_tpu_i2v_720p", "hunyuan15_tpu_t2v_720p", "wan21_tpu_480p", "wan21_tpu_4step_lora", "wan21_tpu_720p", "wan21_tpu_full_pipeline",
                     "wan22_tpu_i2v_a14b_720p", "wan22_tpu_t2v_a14b_4step_lora", "wan22_tpu_t2v_a14b_720p"]
    assert [os.path.basename(path) for path in API_EXAMPLES] == [f"{name}_api.json" for name in names]


@pytest.mark.parametrize("path", UI_EXAMPLES, ids=os.path.basename)
def test_ui_example_widgets_match_input_types(path):
    with open(path) as handle:
        workflow = json.load(handle)
    for node in workflow["nodes"]:
        if node["type"] in CORE_NODES:
            continue
        assert node["type"] in nodes.NODE_CLASS_MAPPINGS, node["type"]
        expected = expected_widgets(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        values = node["widgets_values"]
        assert len(values) == len(expected), (node["type"], values)
        for (name, kind), value in zip(expected, values):
            if isinstance(kind, list):
                assert value in kind, (node["type"], name, value)
            else:
                assert isinstance(value, WIDGET_KINDS[kind]) and not (kind != "BOOLEAN" and isinstance(value, bool)), (name, value)
    # Links connect existing nodes with matching types.
    by_id = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert by_id[origin]["outputs"][origin_slot]["type"] == kind
        assert by_id[target]["inputs"][target_slot]["type"] == kind


@pytest.mark.parametrize("path", API_EXAMPLES, ids=os.path.basename)
def test_api_example_inputs_match_input_types(path):
    with open(path) as handle:
        workflow = json.load(handle)
    for node_id, node in workflow.items():
        if node["class_type"] in CORE_NODES:
            continue
        spec = nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        required = spec["required"]
        assert set(required) <= set(node["inputs"]), (node_id, set(required) - set(node["inputs"]))
        assert set(node["inputs"]) <= set(required) | set(spec.get("optional", {}))
        node_class = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link [node_id, output_index]
                assert value[0] in workflow
                continue
            kind, options = (required.get(name) or spec["optional"][name])[:2]
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], (name, value)
        widget_values = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        accepted = inspect.signature(node_class.VALIDATE_INPUTS).parameters  # ComfyUI passes only these
        checked = {k: v for k, v in widget_values.items() if k in accepted}
        result = node_class.VALIDATE_INPUTS(**checked)
        if node["class_type"] == "Wan21TPULoRA":
            # A placeholder the README tells users to download into models/loras.
            assert "no such file" in result and node["inputs"]["lora_name"] in README
        else:
            assert result is True


def test_queue_script_reads_outputs_from_history():
    import importlib.util

    spec = importlib.util.spec_from_file_location("queue_workflow", os.path.join(PACK_DIR, "examples", "queue_workflow.py"))
    queue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(queue)
    entry = {"outputs": {"5": {"images": [{"filename": "wan_00001_.mp4", "subfolder": "video", "type": "output"}],
                               "animated": [True]}}}
    assert queue.output_files(entry) == ["video/wan_00001_.mp4"]
    workflow = {"1": {"inputs": {"prompt": "a", "seed": 1}}, "2": {"inputs": {"fps": 16}}}
    assert queue.override_inputs(workflow, prompt="b", seed=None)["1"]["inputs"] == {"prompt": "b", "seed": 1}


def test_queue_script_reports_a_failed_prompt_instead_of_waiting(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("queue_workflow", os.path.join(PACK_DIR, "examples", "queue_workflow.py"))
    queue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(queue)
    answers = {"/prompt": {"prompt_id": "p1"},
               "/history/p1": {"p1": {"status": {"status_str": "error", "completed": False,
                                                 "messages": [["execution_error", {"exception_message": "boom"}]]},
                                      "outputs": {}}}}
    monkeypatch.setattr(queue, "_request", lambda server, path, payload=None: answers[path])
    with pytest.raises(SystemExit, match="the workflow failed: .*boom"):
        queue.queue_and_wait("http://127.0.0.1:1", {}, timeout=5)


def named_widgets(node):
    """A UI node's widget values by input name (the frontend stores them by position)."""
    names = [name for name, _ in expected_widgets(nodes.NODE_CLASS_MAPPINGS[node["type"]])]
    return dict(zip(names, node["widgets_values"]))


@pytest.mark.parametrize("path", UI_EXAMPLES, ids=os.path.basename)
def test_ui_examples_say_what_their_api_twins_say(path):
    """Each widget of a UI example equals its API twin's input, or the input's default where the twin leaves
    it out: a value in the wrong slot (guidance_scale_2 = 0.2 for a Wan 2.1 model once) fails here."""
    with open(path) as handle:
        workflow = json.load(handle)
    with open(os.path.join(PACK_DIR, "examples", "api", os.path.basename(path)[:-5] + "_api.json")) as handle:
        api = json.load(handle)
    for node in workflow["nodes"]:
        if node["type"] in CORE_NODES:
            continue
        twin = api[str(node["id"])]
        assert twin["class_type"] == node["type"]
        spec = nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        options = {**spec["required"], **spec.get("optional", {})}
        for name, value in named_widgets(node).items():
            if name == "control_after_generate":
                continue
            expected = twin["inputs"][name] if name in twin["inputs"] else options[name][1].get("default")
            assert value == expected, (os.path.basename(path), node["type"], name, value, expected)


def test_the_wan22_examples_name_their_family_and_the_i2v_one_starts_from_load_image():
    with open(os.path.join(PACK_DIR, "examples", "api", "wan22_tpu_i2v_a14b_720p_api.json")) as handle:
        i2v = json.load(handle)
    by_class = {node["class_type"]: node for node in i2v.values()}
    assert by_class["Wan21TPUSampler"]["inputs"]["model_id"] == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    image_node = by_class["WanTPUImageToVideo"]
    assert i2v[image_node["inputs"]["start_image"][0]]["class_type"] == "LoadImage"
    assert i2v[by_class["Wan21TPUSampler"]["inputs"]["image"][0]] is image_node
    with open(os.path.join(PACK_DIR, "examples", "api", "wan22_tpu_t2v_a14b_720p_api.json")) as handle:
        t2v = json.load(handle)
    sampler = next(node for node in t2v.values() if node["class_type"] == "Wan21TPUSampler")["inputs"]
    assert sampler["model_id"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and sampler["guidance_scale_2"] == 3.0


def test_the_wan22_lora_example_puts_a_pair_on_the_two_experts():
    with open(os.path.join(PACK_DIR, "examples", "api", "wan22_tpu_t2v_a14b_4step_lora_api.json")) as handle:
        workflow = json.load(handle)
    sampler = workflow["2"]["inputs"]
    assert sampler["num_inference_steps"] == 4 and sampler["sampler"] == "euler"
    assert sampler["guidance_scale"] == sampler["guidance_scale_2"] == 1.0
    chain, experts = sampler["lora"], []
    while chain:
        node = workflow[chain[0]]
        assert node["class_type"] == "Wan21TPULoRA"
        experts.append(node["inputs"]["expert"])
        chain = node["inputs"].get("lora")
    assert sorted(experts) == ["high_noise", "low_noise"]


def test_the_hunyuanvideo_examples_are_720p_121_frames_and_the_i2v_one_starts_from_load_image():
    for task in ("t2v", "i2v"):
        with open(os.path.join(PACK_DIR, "examples", "api", f"hunyuan15_tpu_{task}_720p_api.json")) as handle:
            workflow = json.load(handle)
        by_class = {node["class_type"]: node for node in workflow.values()}
        sampler = by_class["HunyuanVideo15TPUSampler"]["inputs"]
        assert (sampler["width"], sampler["height"], sampler["num_frames"]) == (1280, 720, 121)
        assert sampler["model_id"] == f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_{task}"
        assert {"CreateVideo", "SaveVideo"} <= set(by_class)
        if task == "i2v":
            assert workflow[sampler["start_image"][0]]["class_type"] == "LoadImage"
        else:
            assert "start_image" not in sampler
