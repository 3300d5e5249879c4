"""The nodes, called the way ComfyUI calls them, with stand-ins for ComfyUI."""

import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from comfy_stubs import ComfyStubs
from conftest import PACK_DIR, PACK_NAME, TINY_VIDEO, load_pack, pack_module

env_manager = pack_module("env_manager")
loading = pack_module("loading")

TINY_SAMPLER = dict(TINY_VIDEO, num_inference_steps=4, guidance_scale=5.0, seed=3, flow_shift=3.0)
PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry, static"


@pytest.fixture
def comfy(monkeypatch):
    """ComfyUI stand-ins in sys.modules, and the pack's __init__ executed by folder path as ComfyUI does."""
    stubs = ComfyStubs().install(monkeypatch)
    load_pack()
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_DIR, "__init__.py"))
    spec.loader.exec_module(sys.modules[PACK_NAME])  # re-runs registration with ComfyUI present
    return stubs


@pytest.fixture
def nodes(comfy):
    module = pack_module("nodes")
    registered = sys.modules[PACK_NAME].NODE_CLASS_MAPPINGS  # the Wan nodes and the HunyuanVideo ones
    assert registered == {**module.NODE_CLASS_MAPPINGS, **pack_module("hunyuan_nodes").NODE_CLASS_MAPPINGS}
    assert all(registered[name] is node for name, node in module.NODE_CLASS_MAPPINGS.items())
    return module


def run_three_nodes(nodes, model, unique_id="7", **overrides):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return _run_three_nodes(nodes, model, unique_id, **overrides)


def _run_three_nodes(nodes, model, unique_id="7", **overrides):
    settings = dict(TINY_SAMPLER, **overrides)
    positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, model, precision="fp32", unique_id=unique_id)
    latent, frames = nodes.Wan21TPUSampler().sample(
        positive, negative, settings["height"], settings["width"], settings["num_frames"],
        settings["num_inference_steps"], settings["guidance_scale"], settings["seed"], model, settings["flow_shift"],
        precision="fp32", unique_id=unique_id,
    )
    assert frames == settings["num_frames"]
    images, fps = nodes.Wan21TPUVAEDecoder().decode(latent, model, 16, precision="fp32", unique_id=unique_id)
    return latent, images, fps


def test_three_node_chain_matches_diffusers(nodes, tiny_model_dir, diffusers_frames, comfy):
    latent, images, fps = run_three_nodes(nodes, tiny_model_dir)
    expected = diffusers_frames(PROMPT, NEGATIVE, 3, 5.0, 4)
    assert latent["samples"].shape == (1, 16, 2, 4, 6) and latent["samples"].dtype == torch.float32
    assert images.dtype == torch.float32 and tuple(images.shape) == (5, 32, 48, 3) and fps == 16
    assert np.abs(images.numpy() - expected).max() <= 1e-3
    # Progress every step, and step i/N, s/step and ETA as progress text for the node.
    assert comfy.progress[-5:] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    step_texts = [text for text, node in comfy.texts if node == "7" and "s/step" in text]
    assert len(step_texts) == 4 and "step 4/4" in step_texts[-1] and "ETA" in step_texts[-1]


def test_full_pipeline_node_matches_diffusers_and_shares_the_cache(nodes, tiny_model_dir, diffusers_frames, manager):
    run_three_nodes(nodes, tiny_model_dir)
    cached = {key: manager.cached_component(key, None) for key in manager.cached_keys()}
    s = TINY_SAMPLER
    images, fps = nodes.Wan21TPUPipeline().generate(
        PROMPT, NEGATIVE, s["height"], s["width"], s["num_frames"], s["num_inference_steps"], s["guidance_scale"],
        s["seed"], tiny_model_dir, 12, s["flow_shift"], precision="fp32", unique_id="9",
    )
    assert fps == 12
    assert np.abs(images.numpy() - diffusers_frames(PROMPT, NEGATIVE, 3, 5.0, 4)).max() <= 1e-3
    # The same three components, not a second copy.
    assert {key: manager.cached_component(key, None) for key in manager.cached_keys()} == cached
    assert all(manager.cached_component(key, None) is value for key, value in cached.items())


def test_second_run_loads_and_compiles_nothing(nodes, tiny_model_dir, manager, monkeypatch):
    run_three_nodes(nodes, tiny_model_dir)

    def no_loading(*args, **kwargs):
        raise AssertionError("a second run loaded a model")

    for name in ("load_text_encoder", "load_transformer", "load_vae", "load_tokenizer"):
        monkeypatch.setattr(loading, name, no_loading)
    before = manager.compile_count()
    positive, negative = nodes.Wan21TextEncoder().encode("a fox", "ugly", tiny_model_dir, precision="fp32")
    latent, _ = nodes.Wan21TPUSampler().sample(
        positive, negative, 32, 48, 5, 6, 3.0, 99, tiny_model_dir, 5.0, precision="fp32",
    )
    nodes.Wan21TPUVAEDecoder().decode(latent, tiny_model_dir, 16, precision="fp32")
    assert manager.compile_count() == before


@pytest.mark.parametrize(
    "node, inputs, message",
    [
        ("Wan21TPUSampler", dict(num_frames=80), "num_frames=80: Wan needs 4n+1 frames (77 or 81)"),
        ("Wan21TPUSampler", dict(height=730), "height=730: Wan needs a multiple of 16 (720 or 736)"),
        ("Wan21TPUPipeline", dict(width=1000), "width=1000: Wan needs a multiple of 16 (992 or 1008)"),
        ("Wan21TextEncoder", dict(model_id="  "), "model_id is empty"),
        ("Wan21TPUVAEDecoder", dict(model_id=""), "model_id is empty"),
        ("Wan21TPUSampler", dict(precision="fp16"), "precision='fp16'"),
    ],
)
def test_validate_inputs_messages(nodes, node, inputs, message):
    result = nodes.NODE_CLASS_MAPPINGS[node].VALIDATE_INPUTS(**inputs)
    assert isinstance(result, str) and result.startswith(message)


def test_validate_inputs_accepts_good_values(nodes):
    sampler = nodes.NODE_CLASS_MAPPINGS["Wan21TPUSampler"]
    assert sampler.VALIDATE_INPUTS(height=480, width=848, num_frames=81, model_id="Wan-AI/x", precision="bf16") is True


def test_embeddings_from_another_model_family_are_refused(nodes, tiny_model_dir):
    wrong = torch.zeros(1, 512, 4096)
    with pytest.raises(ValueError, match="embeddings have width 4096 .* expects 32"):
        nodes.Wan21TPUSampler().sample(wrong, wrong, 32, 48, 5, 2, 5.0, 0, tiny_model_dir, 3.0, precision="fp32")
    with pytest.raises(ValueError, match="prompt_embeds is \\(512, 32\\)"):
        nodes.Wan21TPUSampler().sample(torch.zeros(512, 32), wrong, 32, 48, 5, 2, 5.0, 0, tiny_model_dir, 3.0)


def test_cancel_stops_within_one_step_and_the_next_run_works(nodes, comfy, tiny_model_dir, diffusers_frames):
    run_three_nodes(nodes, tiny_model_dir)  # warm: everything loaded and compiled
    comfy.progress.clear()
    comfy.interrupt_at_step = 2
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_three_nodes(nodes, tiny_model_dir)
    assert comfy.progress == [(0, 4), (1, 4), (2, 4)]  # stopped right after the step in which Cancel came
    comfy.interrupt_at_step = None
    _, images, _ = run_three_nodes(nodes, tiny_model_dir)
    assert np.abs(images.numpy() - diffusers_frames(PROMPT, NEGATIVE, 3, 5.0, 4)).max() <= 1e-3


def test_unload_all_models_frees_every_pack_array_and_the_next_run_works(nodes, comfy, tiny_model_dir, manager):
    import jax

    run_three_nodes(nodes, tiny_model_dir)
    owned = manager.owned_arrays()
    assert owned and all(not array.is_deleted() for array in owned)
    owned_ids = {id(array) for array in owned}
    live_before = len(jax.live_arrays())

    comfy.model_management.unload_all_models()  # what POST /free {"unload_models": true} reaches

    assert comfy.unloads == 1  # ComfyUI's own unload ran too
    assert manager.cached_keys() == [] and manager.owned_arrays() == []
    assert all(array.is_deleted() for array in owned)
    assert not owned_ids & {id(array) for array in jax.live_arrays()}
    assert len(jax.live_arrays()) <= live_before - len(owned)
    assert manager.meshes == {}
    _, images, _ = run_three_nodes(nodes, tiny_model_dir)
    assert images.shape == (5, 32, 48, 3)


def test_unload_hook_is_installed_once(comfy):
    mm = comfy.model_management
    first = mm.unload_all_models
    assert getattr(first, "_wan_tpu_wrapped", False)
    assert env_manager.install_comfyui_unload_hook(mm) is True
    assert mm.unload_all_models is first


def test_unload_node(nodes, tiny_model_dir, manager):
    run_three_nodes(nodes, tiny_model_dir)
    assert manager.cached_keys()
    assert nodes.Wan21TPUUnload().unload() == ()
    assert manager.cached_keys() == []


def test_switching_model_id_releases_the_old_component_first(nodes, tiny_model_dir, tmp_path, manager):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-wan")
    run_three_nodes(nodes, tiny_model_dir)
    old = {key[0]: manager.cached_component(key, None) for key in manager.cached_keys()}
    run_three_nodes(nodes, str(other))
    keys = manager.cached_keys()
    assert sorted(key[0] for key in keys) == ["text_encoder", "transformer", "vae"]
    assert all(key[1] == os.path.abspath(other) for key in keys)
    assert all(array.is_deleted() for component in old.values() for array in component.weights.values())


def test_vae_decoder_on_a_comfyui_latent_equals_diffusers_vae_decode(nodes, tiny_model_dir, diffusers_frames):
    vae = diffusers_frames.pipe.vae
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        video = vae.decode(latent, return_dict=False)[0]
    expected = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    images, _ = nodes.Wan21TPUVAEDecoder().decode({"samples": latent}, tiny_model_dir, 16)
    assert images.shape == expected.shape == (9, 32, 48, 3)
    assert np.abs(images.numpy() - expected).max() <= 1e-4


def test_sampler_latent_is_in_the_vae_space(nodes, tiny_model_dir, diffusers_frames):
    """Our LATENT is what diffusers' VAE decodes directly (mean/std applied once, by us)."""
    latent, images, _ = run_three_nodes(nodes, tiny_model_dir)
    vae = diffusers_frames.pipe.vae
    with torch.no_grad():
        video = vae.decode(latent["samples"], return_dict=False)[0]
    expected = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    assert np.abs(images.numpy() - expected).max() <= 1e-4


def test_every_input_has_a_tooltip_and_every_node_a_description(nodes):
    for name, node in sys.modules[PACK_NAME].NODE_CLASS_MAPPINGS.items():
        assert node.DESCRIPTION and node.CATEGORY == ("TPU/HunyuanVideo" if "Hunyuan" in name else "TPU/Wan2.1")
        spec = node.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, (kind, *options) in spec.get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_display_names_and_ids_are_the_original_packs(nodes):
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {
        "Wan21TextEncoder": "Wan 2.1 Text Encoder (TPU)",
        "Wan21TPUSampler": "Wan 2.1 TPU Sampler",
        "Wan21TPUVAEDecoder": "Wan 2.1 TPU VAE Decoder",
        "Wan21TPUPipeline": "Wan 2.1 TPU Full Pipeline",
        "Wan21TPUUnload": "Wan 2.1 TPU Unload",
        "Wan21TPULoRA": "Wan 2.1 TPU LoRA",
        "WanTPUImageToVideo": "Wan TPU Image to Video",
        "WanTPUModelFiles": "Wan TPU Model Files",
        "WanTPUSamplerSettings": "Wan TPU Sampler Settings",
    }
    sampler = nodes.Wan21TPUSampler.INPUT_TYPES()["required"]
    assert (sampler["height"][1]["default"], sampler["width"][1]["default"], sampler["num_frames"][1]["default"]) == (720, 1280, 81)


def test_progress_text_says_loading_compiling_then_steps_and_the_eta_counts_steps_only(
        nodes, comfy, tiny_model_dir, manager):
    manager.release()  # a first run: everything loads and compiles
    comfy.texts.clear()
    run_three_nodes(nodes, tiny_model_dir, unique_id="11")
    texts = [text for text, node in comfy.texts if node == "11"]
    loading_at = next(i for i, t in enumerate(texts) if t.startswith("loading the transformer"))
    compiling_at = next(i for i, t in enumerate(texts) if t.startswith("compiling the denoising step"))
    first_step = next(i for i, t in enumerate(texts) if t.startswith("denoise step 1/4"))
    assert loading_at < compiling_at < first_step
    assert any(t.startswith("loading the text encoder") for t in texts[:loading_at])
    assert any(t.startswith("loading the VAE") for t in texts[first_step:])
    # A warm run neither loads nor compiles, and says so by not saying it.
    comfy.texts.clear()
    run_three_nodes(nodes, tiny_model_dir, unique_id="12")
    texts = [text for text, node in comfy.texts if node == "12"]
    assert not [t for t in texts if t.startswith(("loading", "compiling"))]


def test_every_node_ends_in_a_final_done_state(nodes, comfy, tiny_model_dir):
    """The last text under each node says it finished (not "encoding the prompt" or "decoding the video")."""
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, tiny_model_dir, precision="fp32",
                                                             unique_id="31")
        nodes.Wan21TPUPipeline().generate(PROMPT, NEGATIVE, 32, 48, 5, 2, 5.0, 0, tiny_model_dir, precision="fp32",
                                          unique_id="32")
    for node, final in (("31", "done: prompt encoded in "), ("32", "done: 5 frames in ")):
        texts = [text for text, unique_id in comfy.texts if unique_id == node]
        assert texts and texts[-1].startswith(final), texts[-3:]


def test_step_progress_eta_excludes_what_came_before_step_zero(nodes, comfy, monkeypatch):
    clock = iter([100.0, 103.0, 105.0])  # step 0 at t=100 (after a long load), steps of 3 s and 2 s
    monkeypatch.setattr(nodes.time, "perf_counter", lambda: next(clock))
    progress = nodes.StepProgress(4, unique_id="5")
    progress(0, 4)
    progress(1, 4)
    progress(2, 4)
    texts = [text for text, _ in comfy.texts]
    assert texts[-2] == "denoise step 1/4, 3.00 s/step, ETA 9 s"
    assert texts[-1] == "denoise step 2/4, 2.50 s/step, ETA 5 s"


@pytest.mark.parametrize("method", ["auto", "none"])
def test_the_sampler_sends_a_preview_every_step_unless_previews_are_off(nodes, comfy, tiny_model_dir, method):
    comfy.preview_method = method
    comfy.progress.clear(), comfy.previews.clear(), comfy.previewed_latents.clear()
    run_three_nodes(nodes, tiny_model_dir, unique_id="13")
    step_previews = comfy.previews[-4:]  # with the updates of steps 1..4
    if method == "none":  # no previewer: nothing drawn, and the core is given no preview callback
        assert not comfy.previewed_latents and step_previews == [None] * 4
        return
    assert step_previews == [("JPEG", f"preview {i}", 512) for i in range(1, 5)]
    latents = comfy.previewed_latents
    assert all(tuple(x0.shape) == (1, 16, 1, 4, 6) for x0 in latents)  # the middle latent frame, as ComfyUI's video
    assert not torch.equal(latents[0], latents[-1])  # each step's own prediction
    # Each node's status ends in a final state, not in "compiling ...".
    texts = [text for text, node in comfy.texts if node == "13"]
    assert texts[-1].startswith("done: 5 frames decoded in") and any(t.startswith("done: 4 steps in") for t in texts)


# ------------------------------------------------------------- the Sampler Settings node
def settings_node(nodes, **values):
    """The settings node run as ComfyUI runs it: every widget, at its default unless given."""
    spec = nodes.WanTPUSamplerSettings.INPUT_TYPES()["required"]
    inputs = {name: options.get("default", kind[0] if isinstance(kind, list) else None)
              for name, (kind, options) in spec.items()}
    inputs.update(values)
    assert nodes.WanTPUSamplerSettings.VALIDATE_INPUTS(**inputs) is True
    (settings,) = nodes.WanTPUSamplerSettings().settings(**inputs)
    return settings


def test_the_settings_node_wins_over_the_samplers_widgets(nodes, tiny_model_dir, monkeypatch):
    """Connected, its sampler, timesteps and precision are what the run uses, whatever the Sampler's own
    widgets say; the frames equal a run with those values as the Sampler's widgets. Compiles nothing new."""
    pipeline = pack_module("pipeline")
    calls, denoise = [], pipeline.WanTPUPipeline.denoise

    def spy(self, embeddings, **kwargs):
        calls.append(dict(kwargs, precision=self.precision))
        return denoise(self, embeddings, **kwargs)

    monkeypatch.setattr(pipeline.WanTPUPipeline, "denoise", spy)
    euler = dict(sampler="euler", timesteps="1000, 750, 500, 250")
    settings = settings_node(nodes, precision="fp32", **euler)
    s = TINY_SAMPLER
    video = [s[name] for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "seed")]
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, tiny_model_dir, precision="fp32")
        sampler = nodes.Wan21TPUSampler()
        # The widgets say UniPC in bf16 (which would load and compile a bf16 transformer): the settings win.
        connected, _ = sampler.sample(positive, negative, *video, tiny_model_dir, s["flow_shift"], precision="bf16",
                                      sampler="unipc", settings=settings)
        as_widgets, _ = sampler.sample(positive, negative, *video, tiny_model_dir, s["flow_shift"], precision="fp32",
                                       **euler)
        unipc, _ = sampler.sample(positive, negative, *video, tiny_model_dir, s["flow_shift"], precision="fp32")
    assert [(c["sampler"], c["timesteps"], c["precision"]) for c in calls] == [
        ("euler", [1000.0, 750.0, 500.0, 250.0], "fp32")] * 2 + [("unipc", None, "fp32")]
    assert torch.equal(connected["samples"], as_widgets["samples"])
    assert not torch.allclose(connected["samples"], unipc["samples"], atol=1e-3)


def test_the_full_pipeline_and_sampler_pass_the_settings_to_the_core(nodes, monkeypatch):
    """MagCache's settings, guidance_scale_2, layout, calibration and the mesh reach the core's calls;
    without the link the node's own widgets do (no model runs: the core is a stand-in)."""
    magcache = pack_module("magcache")
    made, denoised = [], []

    class Core:
        last_run = {"steps": 4, "magcache": False}

        def encode(self, prompt, negative_prompt, on_status=None):
            return "embeddings"

        def denoise(self, embeddings, **kwargs):
            denoised.append(kwargs)
            return torch.zeros(1, 16, 2, 4, 6)

        def decode(self, latents, on_status=None):
            return torch.zeros(5, 32, 48, 3)

    def make_pipeline(model_id, precision="bf16", dp=0, tp=0, model_files=None):
        made.append((precision, dp, tp))
        return Core()

    monkeypatch.setattr(nodes, "make_pipeline", make_pipeline)
    settings = settings_node(nodes, magcache=True, magcache_threshold=0.1, magcache_max_skip_steps=2,
                             magcache_retention_ratio=0.3, guidance_scale_2=3.0, layout="tensor", precision="fp32",
                             dp=1, tp=8)
    widgets = dict(precision="bf16", dp=2, tp=4, magcache=False, layout="sequence", guidance_scale_2=-1.0,
                   magcache_calibrate=True)
    embeds = torch.zeros(1, 512, 32)
    s = TINY_SAMPLER
    video = [s[name] for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "seed")]
    with torch.inference_mode():
        for given in (settings, None):
            nodes.Wan21TPUPipeline().generate(PROMPT, NEGATIVE, *video, "m", 16, 3.0, settings=given, **widgets)
            nodes.Wan21TPUSampler().sample(embeds, embeds, *video, "m", 3.0, settings=given, **widgets)
    connected = dict(magcache=magcache.MagCacheSettings(0.1, 2, 0.3), guidance_scale_2=3.0, layout="tensor",
                     magcache_calibrate=False)
    own = dict(magcache=None, guidance_scale_2=None, layout="sequence", magcache_calibrate=True)
    assert [{name: call[name] for name in connected} for call in denoised] == [connected] * 2 + [own] * 2
    assert made == [("fp32", 1, 8)] * 2 + [("bf16", 2, 4)] * 2


@pytest.mark.parametrize("values, message", [
    (dict(sampler="ddim"), "sampler='ddim': use one of unipc, euler"),
    (dict(timesteps="1000,500"), "timesteps='1000,500' need sampler='euler'"),
    (dict(layout="diagonal"), "layout='diagonal' is unknown: use one of"),
    (dict(dp=-1), "dp=-1: use 0 for automatic"),
    (dict(guidance_scale_2=-0.5), "guidance_scale_2=-0.5: use -1 (the same as guidance_scale)"),
    (dict(magcache_retention_ratio=1.5), "retention_ratio=1.5: use a fraction in [0, 1]"),
])
def test_bad_settings_are_refused_with_the_fix(nodes, values, message):
    assert message in nodes.WanTPUSamplerSettings.VALIDATE_INPUTS(**values)
    spec = nodes.WanTPUSamplerSettings.INPUT_TYPES()["required"]
    inputs = dict({name: options["default"] for name, (_, options) in spec.items()}, **values)
    with pytest.raises(ValueError, match=re.escape(message)):
        nodes.WanTPUSamplerSettings().settings(**inputs)


def test_the_sampler_refuses_what_is_not_a_settings_node_and_timesteps_of_another_count(nodes):
    embeds = torch.zeros(1, 512, 32)
    with pytest.raises(ValueError, match="settings is a dict: connect the output of 'Wan TPU Sampler Settings'"):
        nodes.Wan21TPUSampler().sample(embeds, embeds, 32, 48, 5, 4, 5.0, 0, "m", settings={"sampler": "euler"})
    settings = settings_node(nodes, sampler="euler", timesteps="1000,500")
    with pytest.raises(ValueError, match="set num_inference_steps to 2 \\(timesteps from 'Wan TPU Sampler Settings'"):
        nodes.Wan21TPUPipeline().generate(PROMPT, NEGATIVE, 32, 48, 5, 4, 5.0, 0, "m", settings=settings)
