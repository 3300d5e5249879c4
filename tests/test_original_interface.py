"""The original pack's interface, held to the facts in ``original_interface.py``:
its saved workflows (widgets by position) and API prompts (inputs by name) run here."""

import numpy as np
import pytest
import torch
from comfy_stubs import ComfyStubs
from conftest import load_pack, pack_module
from original_interface import ORIGINAL_EXAMPLE_WIDGETS, ORIGINAL_INPUTS, ORIGINAL_OUTPUTS, ORIGINAL_RANGES
from test_examples import expected_widgets

nodes = pack_module("nodes")
TINY_SIZE = dict(height=32, width=48, num_frames=5)


@pytest.mark.parametrize("node_id", sorted(ORIGINAL_INPUTS))
def test_inputs_begin_with_the_originals_in_order_and_split(node_id):
    spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    original = ORIGINAL_INPUTS[node_id]
    assert list(spec["required"]) == original["required"]
    assert list(spec.get("optional", {}))[: len(original["optional"])] == original["optional"]


@pytest.mark.parametrize("node_id", sorted(ORIGINAL_OUTPUTS))
def test_outputs_are_the_originals(node_id):
    node = nodes.NODE_CLASS_MAPPINGS[node_id]
    assert (tuple(node.RETURN_TYPES), tuple(node.RETURN_NAMES)) == ORIGINAL_OUTPUTS[node_id]


@pytest.mark.parametrize("node_id", sorted(ORIGINAL_INPUTS))
def test_every_value_the_original_accepted_still_validates(node_id):
    spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    for name, (kind, *options) in {**spec["required"], **spec.get("optional", {})}.items():
        if name in ORIGINAL_RANGES:
            low, high = ORIGINAL_RANGES[name]
            assert options[0]["min"] <= low and options[0]["max"] >= high, (node_id, name)


def test_the_signatures_take_the_original_names_as_keywords():
    """ComfyUI calls FUNCTION with every input as a keyword: each original name must be a parameter."""
    import inspect

    for node_id, original in ORIGINAL_INPUTS.items():
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        parameters = list(inspect.signature(getattr(node, node.FUNCTION)).parameters)[1:]
        names = original["required"] + original["optional"]
        assert parameters[: len(names)] == names, node_id


def widgets_as_inputs(node_id, widgets_values):
    """What the ComfyUI frontend does with a saved workflow: widget values to inputs, by position."""
    names = [name for name, _ in expected_widgets(nodes.NODE_CLASS_MAPPINGS[node_id])]
    assert len(widgets_values) <= len(names), (node_id, widgets_values, names)
    return {name: value for name, value in zip(names, widgets_values) if name != "control_after_generate"}


def test_the_original_example_maps_onto_our_widgets_by_name():
    sampler = widgets_as_inputs("Wan21TPUSampler", ORIGINAL_EXAMPLE_WIDGETS["Wan21TPUSampler"])
    assert sampler == dict(height=720, width=1280, num_frames=81, num_inference_steps=50, guidance_scale=5, seed=42,
                           model_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", flow_shift=5)
    decoder = widgets_as_inputs("Wan21TPUVAEDecoder", ORIGINAL_EXAMPLE_WIDGETS["Wan21TPUVAEDecoder"])
    assert decoder == dict(model_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", fps=16)
    for node_id, values in ORIGINAL_EXAMPLE_WIDGETS.items():
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        inputs = widgets_as_inputs(node_id, values)
        import inspect

        accepted = inspect.signature(node.VALIDATE_INPUTS).parameters
        assert node.VALIDATE_INPUTS(**{k: v for k, v in inputs.items() if k in accepted}) is True, node_id


def run_original_example(tiny_model_dir, **extra):
    """The original's example workflow, with only model_id and the size changed, executed the way
    ComfyUI executes it: widget values by position, links by output index, every input as a keyword."""
    inputs = {node_id: widgets_as_inputs(node_id, values) for node_id, values in ORIGINAL_EXAMPLE_WIDGETS.items()}
    for node_inputs in inputs.values():
        node_inputs.update(model_id=str(tiny_model_dir), **extra)
    inputs["Wan21TPUSampler"].update(TINY_SIZE)
    with torch.inference_mode():
        encoded = nodes.Wan21TextEncoder().encode(**inputs["Wan21TextEncoder"], unique_id="1")
        sampled = nodes.Wan21TPUSampler().sample(
            prompt_embeds=encoded[0], negative_prompt_embeds=encoded[1], **inputs["Wan21TPUSampler"], unique_id="2")
        frames, fps = nodes.Wan21TPUVAEDecoder().decode(latents=sampled[0], **inputs["Wan21TPUVAEDecoder"],
                                                        unique_id="3")
    assert sampled[1] == TINY_SIZE["num_frames"] and fps == 16
    return frames.numpy(), inputs


@pytest.fixture
def comfy(monkeypatch):
    stubs = ComfyStubs().install(monkeypatch)
    load_pack()
    return stubs


def test_the_original_example_runs_and_equals_diffusers_in_fp32(comfy, tiny_model_dir, diffusers_frames):
    frames, inputs = run_original_example(tiny_model_dir, precision="fp32")
    encoder, sampler = inputs["Wan21TextEncoder"], inputs["Wan21TPUSampler"]
    expected = diffusers_frames(encoder["prompt"], encoder["negative_prompt"], sampler["seed"],
                                float(sampler["guidance_scale"]), sampler["num_inference_steps"],
                                float(sampler["flow_shift"]), **TINY_SIZE)
    assert frames.shape == expected.shape == (5, 32, 48, 3)
    assert np.abs(frames - expected).max() <= 1e-3
    assert comfy.progress[-1] == (50, 50)


def test_the_original_example_runs_at_the_default_precision_and_matches_diffusers_bf16(
        comfy, tiny_model_dir, diffusers_frames, diffusers_bf16_frames):
    from test_bf16_parity import assert_bf16_parity

    frames, inputs = run_original_example(tiny_model_dir)  # the original has no precision input: bf16
    encoder, sampler = inputs["Wan21TextEncoder"], inputs["Wan21TPUSampler"]
    args = (encoder["prompt"], encoder["negative_prompt"], sampler["seed"], float(sampler["guidance_scale"]),
            sampler["num_inference_steps"], float(sampler["flow_shift"]))
    assert_bf16_parity(frames, diffusers_bf16_frames(*args, **TINY_SIZE), diffusers_frames(*args, **TINY_SIZE))
