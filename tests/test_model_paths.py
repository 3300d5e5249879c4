"""Which folders a model_id may name: inside ComfyUI only those under the allowed roots
(models/diffusers and WAN_TPU_MODEL_ROOTS), anywhere from the command line; repo ids can
be switched off, and refusals name no path outside the roots."""

import logging
import os
import sys
import types

import pytest
from conftest import pack_module

loading = pack_module("loading")

WAN_ENV = ("WAN_TPU_MODEL_ROOTS", "WAN_TPU_OFFLINE", "HF_HUB_OFFLINE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in WAN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def outside_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # `import folder_paths` raises ImportError


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """ComfyUI with models/diffusers holding tiny-wan21 and sub/dir; a model outside it; cwd elsewhere."""
    root = tmp_path / "ComfyUI" / "models" / "diffusers"
    (root / "tiny-wan21").mkdir(parents=True)
    (root / "sub" / "dir").mkdir(parents=True)
    outside = tmp_path / "secret" / "outside-model"
    outside.mkdir(parents=True)
    fake = types.ModuleType("folder_paths")
    fake.get_folder_paths = lambda kind: [str(root)] if kind == "diffusers" else []
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return types.SimpleNamespace(root=root, outside=outside, tmp=tmp_path, cwd=cwd)


def _refused(model_id, *hidden):
    with pytest.raises(ValueError) as caught:
        loading.resolve_model_source(model_id)
    message = str(caught.value)
    for path in hidden:
        assert str(path) not in message, f"the error reveals {path}: {message}"
    assert "WAN_TPU_MODEL_ROOTS" in message and "models/diffusers" in message  # it says the fix
    return message


def test_a_name_under_models_diffusers_is_accepted(layout):
    source = loading.resolve_model_source("tiny-wan21")
    assert source.is_local and source.location == os.path.realpath(layout.root / "tiny-wan21")
    nested = loading.resolve_model_source("sub/dir")
    assert nested.is_local and nested.location == os.path.realpath(layout.root / "sub" / "dir")


def test_an_absolute_path_inside_the_root_is_accepted(layout):
    source = loading.resolve_model_source(str(layout.root / "tiny-wan21"))
    assert source.is_local and source.location == os.path.realpath(layout.root / "tiny-wan21")


def test_dotdot_climbing_out_is_refused(layout):
    relative = os.path.relpath(layout.outside, layout.root)
    assert relative.startswith("..") and os.path.isdir(layout.root / relative)  # it would reach the folder
    message = _refused(relative, layout.outside, layout.tmp / "secret")
    assert "'..' may not be used" in message
    _refused("tiny-wan21/../tiny-wan21")  # even when it would stay inside


def test_an_absolute_path_outside_is_refused_without_saying_whether_it_exists(layout):
    exists = _refused(str(layout.outside))
    missing = _refused(str(layout.outside.parent / "no-such-model"))
    assert "is not a folder under the allowed model folders" in exists
    assert exists.replace(str(layout.outside), "X") == missing.replace(str(layout.outside.parent / "no-such-model"), "X")
    assert str(layout.root) in exists  # the allowed roots are the server owner's, and the fix


def test_home_is_refused(layout, monkeypatch):
    home = layout.tmp / "home"
    (home / "x").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    message = _refused("~/x", home)
    assert "'~'" in message


def test_a_symlink_out_of_the_root_is_refused(layout):
    (layout.root / "linked").symlink_to(layout.outside, target_is_directory=True)
    message = _refused("linked", layout.outside, layout.tmp / "secret")
    assert "is a link to a folder outside" in message
    _refused(str(layout.root / "linked"), layout.outside)  # the same link, named by absolute path


def test_a_symlinked_root_and_links_inside_it_work(layout, tmp_path, monkeypatch):
    real = tmp_path / "disk" / "diffusers"
    (real / "model").mkdir(parents=True)
    (real / "alias").symlink_to(real / "model", target_is_directory=True)
    link = tmp_path / "ComfyUI-linked-models"
    link.symlink_to(real, target_is_directory=True)
    sys.modules["folder_paths"].get_folder_paths = lambda kind: [str(link)]
    assert loading.resolve_model_source("model").location == os.path.realpath(real / "model")
    assert loading.resolve_model_source(str(link / "model")).location == os.path.realpath(real / "model")
    assert loading.resolve_model_source("alias").location == os.path.realpath(real / "model")


def test_wan_tpu_model_roots_adds_roots(layout, monkeypatch):
    _refused(str(layout.outside))
    extra = layout.tmp / "more-models"
    (extra / "big-wan").mkdir(parents=True)
    monkeypatch.setenv("WAN_TPU_MODEL_ROOTS", os.pathsep.join([str(layout.outside.parent), str(extra)]))
    assert loading.resolve_model_source(str(layout.outside)).location == os.path.realpath(layout.outside)
    assert loading.resolve_model_source("outside-model").location == os.path.realpath(layout.outside)
    assert loading.resolve_model_source("big-wan").location == os.path.realpath(extra / "big-wan")
    # A link in models/diffusers to a folder in another allowed root is fine.
    (layout.root / "linked").symlink_to(layout.outside, target_is_directory=True)
    assert loading.resolve_model_source("linked").location == os.path.realpath(layout.outside)


def test_a_missing_name_says_where_it_looked(layout):
    message = _refused("no-such-model")
    assert "no such folder under" in message and str(layout.root) in message


def test_a_repo_id_that_is_also_a_folder_under_the_working_directory_is_refused(layout):
    # diffusers' from_pretrained would load ./custom_nodes/secret instead of asking the hub.
    (layout.cwd / "custom_nodes" / "secret").mkdir(parents=True)
    message = _refused("custom_nodes/secret", layout.cwd)
    assert "not also a local path" in message


def test_outside_comfyui_any_folder_works(outside_comfyui, tmp_path, monkeypatch):
    folder = tmp_path / "anywhere" / "model"
    folder.mkdir(parents=True)
    assert loading.resolve_model_source(str(folder)).location == os.path.abspath(folder)
    monkeypatch.chdir(tmp_path / "anywhere")
    assert loading.resolve_model_source("../anywhere/model").location == os.path.abspath(folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert loading.resolve_model_source("~/anywhere/model").location == os.path.abspath(folder)
    with pytest.raises(ValueError, match="no such folder"):
        loading.resolve_model_source(str(tmp_path / "missing"))


def test_outside_comfyui_the_pipeline_takes_any_folder(outside_comfyui, tiny_model_dir):
    pipe = pack_module("pipeline").WanTPUPipeline(str(tiny_model_dir), precision="fp32")
    assert pipe.source.is_local and pipe.source.location == os.path.abspath(tiny_model_dir)


def test_inside_comfyui_the_pipeline_refuses_a_folder_outside(layout):
    with pytest.raises(ValueError, match="WAN_TPU_MODEL_ROOTS"):
        pack_module("pipeline").WanTPUPipeline(str(layout.outside), precision="fp32")


@pytest.mark.parametrize("variable", ["WAN_TPU_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_refuses_a_repo_id_before_any_download(layout, monkeypatch, tmp_path, variable):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ValueError, match=f"is a Hugging Face repo id, but {variable}=1") as refused:
        loading.resolve_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert "WAN_TPU_MODEL_ROOTS" in str(refused.value)
    assert loading.resolve_model_source("tiny-wan21").is_local  # local folders still work


def test_hf_hub_offline_accepts_a_repo_in_the_hub_cache(monkeypatch, tmp_path, outside_comfyui):
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    repo = cache / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not loading.resolve_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").is_local
    monkeypatch.setenv("WAN_TPU_OFFLINE", "1")  # the pack's own switch allows local folders only
    with pytest.raises(ValueError, match="WAN_TPU_OFFLINE=1 allows local model folders only"):
        loading.resolve_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def test_a_repo_id_is_accepted_online_and_logged(layout, caplog):
    with caplog.at_level(logging.INFO, logger="wan_tpu"):
        source = loading.resolve_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert not source.is_local and source.location == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert "resolving Wan-AI/Wan2.1-T2V-1.3B-Diffusers from the Hugging Face hub" in caplog.text


def test_a_hub_config_download_is_logged(monkeypatch, caplog, tmp_path):
    import huggingface_hub

    config = tmp_path / "config.json"
    config.write_text('{"num_layers": 2}')
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append((a, k)) or str(config))
    source = loading.ModelSource("Owner/logged-repo", "Owner/logged-repo", False)
    with caplog.at_level(logging.INFO, logger="wan_tpu"):
        assert loading.load_json_config(source, "transformer") == {"num_layers": 2}
    assert calls == [(("Owner/logged-repo", "config.json"), {"subfolder": "transformer"})]
    assert "downloading transformer/config.json of Owner/logged-repo from the Hugging Face hub" in caplog.text
