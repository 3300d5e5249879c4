"""Bad model ids, precisions and folders fail early with messages that say what was looked for."""

import os
import shutil

import pytest
from conftest import pack_module

loading = pack_module("loading")
pipeline_mod = pack_module("pipeline")


def test_empty_model_id():
    with pytest.raises(ValueError, match="model_id='  ' is empty"):
        loading.resolve_model_source("  ")


def test_missing_folder_is_not_mistaken_for_a_repo_id(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no such folder"):
        loading.resolve_model_source(missing)
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        loading.resolve_model_source("not a/repo id")


def test_repo_ids_and_folders_resolve(tiny_model_dir):
    source = loading.resolve_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert not source.is_local and source.location == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    local = loading.resolve_model_source(str(tiny_model_dir))
    assert local.is_local and local.location == os.path.abspath(tiny_model_dir)


def test_comfyui_models_diffusers_folder_by_name(tiny_model_dir, monkeypatch, tmp_path):
    import sys
    import types

    fake = types.ModuleType("folder_paths")
    fake.get_folder_paths = lambda kind: [str(os.path.dirname(tiny_model_dir))] if kind == "diffusers" else []
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.chdir(tmp_path)
    source = loading.resolve_model_source(os.path.basename(tiny_model_dir))
    assert source.is_local and source.location == os.path.realpath(tiny_model_dir)
    # A name may not climb out of models/diffusers to another folder.
    outside = tmp_path / "outside-model"
    outside.mkdir()
    elsewhere = tmp_path / "a" / "b" / "c" / "d" / "e"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=r"'\.\.' may not be used") as refused:
        loading.resolve_model_source(os.path.relpath(outside, os.path.dirname(tiny_model_dir)))
    assert str(outside) not in str(refused.value)


def test_missing_component_names_the_folder(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "transformer")
    source = loading.resolve_model_source(str(broken))
    with pytest.raises(ValueError, match=r"has no transformer/ folder \(looked in .*broken/transformer\)"):
        loading.load_transformer(source, "fp32")


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    os.rename(weights, broken / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights .*diffusion_pytorch_model.bin.* convert them to safetensors"):
        loading.load_vae(loading.resolve_model_source(str(broken)))


def test_bad_precision():
    with pytest.raises(ValueError, match="precision='fp16': use one of"):
        pipeline_mod.WanTPUPipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", precision="fp16")


@pytest.mark.parametrize(
    "size, message",
    [
        (dict(height=33, width=48, num_frames=5), r"height=33: Wan needs a multiple of 16 \(32 or 48\)"),
        (dict(height=32, width=40, num_frames=5), "width=40"),
        (dict(height=32, width=48, num_frames=80), r"num_frames=80: Wan needs 4n\+1 frames \(77 or 81\)"),
    ],
)
def test_bad_video_shapes(size, message):
    with pytest.raises(ValueError, match=message):
        pack_module("models.wan.latents").WAN21.check_video(**size)


def test_failed_load_leaves_no_cache_entry_and_keeps_the_working_one(tiny_model_dir, tmp_path, manager):
    working = pipeline_mod.WanTPUPipeline(str(tiny_model_dir), precision="fp32")
    working.vae()
    broken = tmp_path / "no-vae-weights"
    shutil.copytree(tiny_model_dir, broken)
    os.remove(broken / "vae" / "diffusion_pytorch_model.safetensors")
    pipe = pipeline_mod.WanTPUPipeline(str(broken), precision="fp32")
    before = manager.cached_keys()
    with pytest.raises(ValueError, match="vae weights are missing"):
        pipe.vae()
    assert manager.cached_keys() == before


def test_a_run_that_will_not_fit_is_refused_before_loading(tiny_model_dir, manager, monkeypatch):
    memory_plan = pack_module("memory_plan")
    monkeypatch.setenv("WAN_TPU_HBM_GIB", "0.0001")  # a chip with 100 KiB of HBM
    manager.release()
    pipe = pipeline_mod.WanTPUPipeline(str(tiny_model_dir), precision="fp32")
    embeddings = pipeline_mod.WanEmbeddings(*([__import__("torch").zeros(1, 512, 32)] * 2), "tiny")
    with pytest.raises(memory_plan.HBMPlanError, match="GiB"):
        pipe.denoise(embeddings, height=32, width=48, num_frames=5, num_inference_steps=1, seed=0, flow_shift=3.0)
    assert manager.cached_keys() == []  # refused before the transformer was loaded


def test_xla_out_of_memory_names_the_component_the_size_and_the_fix():
    utils = pack_module("utils")
    with pytest.raises(utils.DeviceMemoryError, match=r"the transformer ran out of device memory \(XLA asked for 12.5 GiB\)\. Lower the resolution"):
        with utils.device_errors("the transformer", "Lower the resolution or num_frames."):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.5GiB.")
    with pytest.raises(KeyError):  # anything else passes through untouched
        with utils.device_errors("the transformer", "Lower the resolution."):
            raise KeyError("x")
