"""LoRAs through the core and the nodes: the frames equal diffusers' WanPipeline after
load_lora_weights + fuse_lora, for each format, stacked and after a switch that compiles nothing."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, pack_module
from test_lora import fuse_with_diffusers, write_random_lora

pipeline_mod = pack_module("pipeline")
lora = pack_module("lora")
loading = pack_module("loading")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="diffusers' load_lora_weights needs peft (requirements-test.txt)")
PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry, static"
SETTINGS = dict(num_inference_steps=3, guidance_scale=5.0, seed=3, flow_shift=3.0)


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory):
    module = loading.load_transformer(loading.resolve_model_source(tiny_model_dir), "fp32")
    folder = tmp_path_factory.mktemp("loras")
    return {
        fmt: write_random_lora(folder / f"{fmt}.safetensors", fmt, module, rank=4, alpha=2.0, seed=index, scale=0.3)
        for index, fmt in enumerate(("peft", "comfyui", "musubi"))
    }


def diffusers_with_loras(tiny_model_dir, loras):
    """diffusers' WanPipeline (fp32) with ``loras`` [(path, strength)] loaded and fused, as its docs do."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=SETTINGS["flow_shift"])
    fuse_with_diffusers(pipe, loras)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=SETTINGS["num_inference_steps"],
                guidance_scale=SETTINGS["guidance_scale"], generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]),
                output_type="np", **TINY_VIDEO).frames[0]


@pytest.fixture(scope="module")
def core(tiny_model_dir, manager):
    return pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")


def ours(core, loras):
    embeddings = core.encode(PROMPT, NEGATIVE)
    latents = core.denoise(embeddings, loras=[lora.LoraSpec(path, strength) for path, strength in loras],
                           **SETTINGS, **TINY_VIDEO)
    return core.decode(latents).numpy()


@pytest.mark.parametrize("fmt", ["peft", "comfyui", "musubi"])
def test_one_lora_in_each_format_matches_diffusers(core, tiny_model_dir, lora_files, diffusers_frames, fmt):
    loras = [(lora_files[fmt], 0.8)]
    frames = ours(core, loras)
    assert np.abs(frames - diffusers_with_loras(tiny_model_dir, loras)).max() <= 1e-3
    base = diffusers_frames(PROMPT, NEGATIVE, SETTINGS["seed"], SETTINGS["guidance_scale"],
                            SETTINGS["num_inference_steps"], SETTINGS["flow_shift"])
    assert np.abs(frames - base).max() > 1e-2  # the LoRA really changed the video


def test_two_stacked_then_a_switch_compiles_nothing_and_none_restores_the_base(
        core, tiny_model_dir, lora_files, diffusers_frames, manager):
    stacked = [(lora_files["peft"], 0.7), (lora_files["comfyui"], -0.4)]
    assert np.abs(ours(core, stacked) - diffusers_with_loras(tiny_model_dir, stacked)).max() <= 1e-3
    before = manager.compile_count()
    switched = [(lora_files["musubi"], 1.2)]
    frames = ours(core, switched)
    assert manager.compile_count() == before  # another LoRA and strength: same shapes, nothing compiled
    assert np.abs(frames - diffusers_with_loras(tiny_model_dir, switched)).max() <= 1e-3
    base = diffusers_frames(PROMPT, NEGATIVE, SETTINGS["seed"], SETTINGS["guidance_scale"],
                            SETTINGS["num_inference_steps"], SETTINGS["flow_shift"])
    assert np.abs(ours(core, []) - base).max() <= 1e-3
    assert manager.compile_count() == before


def test_release_frees_the_arrays_a_lora_made(core, lora_files, manager):
    ours(core, [(lora_files["peft"], 1.0)])
    owned = manager.owned_arrays()
    made = core.transformer().device_loras.live_arrays()
    assert made and {id(a) for a in made} <= {id(a) for a in owned}
    manager.release()
    assert all(array.is_deleted() for array in made)


def test_lora_node_chain_into_the_sampler(monkeypatch, tiny_model_dir, lora_files):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")
    (chain,) = nodes.Wan21TPULoRA().add(lora_files["peft"], 0.7)
    (chain,) = nodes.Wan21TPULoRA().add(lora_files["comfyui"], -0.4, lora=chain)
    assert [spec.strength for spec in chain] == [0.7, -0.4]
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, tiny_model_dir, precision="fp32")
        latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, model_id=tiny_model_dir, precision="fp32",
                                                    lora=chain, **SETTINGS, **TINY_VIDEO)
        frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, tiny_model_dir, precision="fp32")
    expected = diffusers_with_loras(tiny_model_dir, [(lora_files["peft"], 0.7), (lora_files["comfyui"], -0.4)])
    assert np.abs(frames.numpy() - expected).max() <= 1e-3
    assert nodes.Wan21TPULoRA.VALIDATE_INPUTS(lora_name=str(tiny_model_dir) + "/model_index.json").startswith(
        "LoRA")  # not a safetensors file
