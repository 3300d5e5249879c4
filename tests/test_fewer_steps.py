"""Fewer transformer evaluations: flow-matching Euler and MagCache, equal to diffusers on the tiny model."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, pack_module

pipeline_mod = pack_module("pipeline")
scheduler = pack_module("scheduler")
magcache = pack_module("magcache")

PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry, static"
# Ratios under which diffusers' MagCache skips two steps of every three after the retention steps.
STEADY_RATIOS = [1.0] + [0.98] * 11
SKIPPING = dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2)


@pytest.fixture(scope="module")
def core(tiny_model_dir, manager):
    return pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")


def run(core, steps, guidance_scale, seed=3, **kwargs):
    embeddings = core.encode(PROMPT, NEGATIVE)
    latents = core.denoise(embeddings, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                           flow_shift=kwargs.pop("flow_shift", 3.0), **kwargs, **TINY_VIDEO)
    return core.decode(latents).numpy()


def diffusers_run(pipe, steps, guidance_scale, seed=3, scheduler_obj=None, cache=None, timesteps=None):
    """diffusers' WanPipeline with another scheduler and/or MagCache; returns (frames, computed-per-step)."""
    original = pipe.scheduler
    calls = []  # per transformer call: did its blocks run?
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(False)),
             pipe.transformer.blocks[0].attn1.register_forward_hook(lambda *_: calls.__setitem__(-1, True))]
    try:
        if scheduler_obj is not None:
            if timesteps is not None:  # WanPipeline takes no timesteps: the scheduler is told them instead
                set_timesteps = scheduler_obj.set_timesteps
                scheduler_obj.set_timesteps = lambda steps, device=None, **_: set_timesteps(
                    timesteps=timesteps, device=device)
            pipe.scheduler = scheduler_obj
        if cache is not None:
            pipe.transformer.enable_cache(cache)
            # diffusers 0.39 caches the list of hooked submodules the first time the transformer runs;
            # hooks added later (MagCache's) then never hear cache_context("cond"/"uncond"), and the two
            # CFG halves share one MagCache state. Drop that stale list, as a fresh pipeline would have.
            pipe.transformer._diffusers_hook._child_registries_cache = None
        frames = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", **TINY_VIDEO).frames[0]
    finally:
        for hook in hooks:
            hook.remove()
        if cache is not None:
            pipe.transformer.disable_cache()
        pipe.scheduler = original
    per_step = 2 if guidance_scale > 1 else 1
    computed = [any(calls[i:i + per_step]) for i in range(0, len(calls), per_step)]
    return frames, computed


# ------------------------------------------------------------------ Euler
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("steps, timesteps", [(1, None), (4, None), (50, None), (4, [1000, 750, 500, 250])])
def test_euler_schedule_equals_diffusers(shift, steps, timesteps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    if timesteps is None:
        reference.set_timesteps(steps)
    else:
        reference.set_timesteps(timesteps=timesteps)
    ours = scheduler.flow_match_euler_schedule(steps, shift, timesteps)
    assert np.abs(ours.sigmas - reference.sigmas.numpy()).max() < 1e-6
    assert np.abs(ours.timesteps - reference.timesteps.numpy()).max() < 1e-3


@pytest.mark.parametrize("timesteps", [None, [1000, 750, 500, 250]])
def test_four_step_euler_at_guidance_one_matches_diffusers(core, diffusers_frames, timesteps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = run(core, 4, 1.0, sampler="euler", flow_shift=5.0, timesteps=timesteps)
    expected, _ = diffusers_run(diffusers_frames.pipe, 4, 1.0, scheduler_obj=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                timesteps=timesteps)
    assert np.abs(ours - expected).max() <= 1e-3
    assert core.last_run["transformer_evaluations"] == 4


def test_switching_sampler_compiles_nothing(core, manager):
    run(core, 4, 5.0)  # UniPC
    before = manager.compile_count()
    run(core, 4, 5.0, sampler="euler", flow_shift=5.0)
    run(core, 6, 5.0, sampler="euler", flow_shift=8.0, timesteps=None)
    assert manager.compile_count() == before


def test_bad_sampler_inputs_are_refused_with_the_fix(core):
    embeddings = core.encode(PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="sampler='ddim': use one of unipc, euler"):
        core.denoise(embeddings, num_inference_steps=4, sampler="ddim", **TINY_VIDEO)
    with pytest.raises(ValueError, match="explicit timesteps need sampler='euler'"):
        core.denoise(embeddings, num_inference_steps=4, timesteps=[1000, 500, 250, 100], **TINY_VIDEO)
    with pytest.raises(ValueError, match="timesteps has 3 values but num_inference_steps=4"):
        core.denoise(embeddings, num_inference_steps=4, sampler="euler", timesteps=[900, 500, 100], **TINY_VIDEO)
    with pytest.raises(ValueError, match="give decreasing values"):
        core.denoise(embeddings, num_inference_steps=2, sampler="euler", timesteps=[500, 900], **TINY_VIDEO)


# ------------------------------------------------------------------ MagCache
@pytest.mark.parametrize("steps", [4, 12, 28, 50])
@pytest.mark.parametrize("size", ["14B", "1.3B"])
def test_skip_schedule_equals_diffusers_hook_decisions_on_the_published_ratios(steps, size):
    """Drive diffusers' own MagCache head hook step by step and compare its decisions with ours."""
    from diffusers.hooks.mag_cache import MagCacheConfig, MagCacheHeadHook, MagCacheState

    shape = {"14B": (40, 40), "1.3B": (30, 12)}[size]
    ratios = magcache.published_ratios("Wan 2.1 T2V", {"num_layers": shape[0], "num_attention_heads": shape[1]},
                                       720, 1280, False).ratios
    for threshold in (0.06, 0.12, 0.24):
        settings = magcache.MagCacheSettings(threshold=threshold)
        config = MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios)
        hook = MagCacheHeadHook(state_manager=None, config=config)
        state = MagCacheState()
        decisions = []
        for step in range(steps):  # the head hook's decision logic, with diffusers' own state object
            state.step_index = step
            current = config.mag_ratios[step] if step < len(config.mag_ratios) else 1.0
            run_it = True
            if step >= int(config.retention_ratio * config.num_inference_steps + 0.5):
                state.accumulated_ratio *= current
                state.accumulated_steps += 1
                state.accumulated_err += abs(1.0 - state.accumulated_ratio)
                if (state.previous_residual is not None and state.accumulated_err <= config.threshold
                        and state.accumulated_steps <= config.max_skip_steps):
                    run_it = False
                else:
                    state.accumulated_ratio, state.accumulated_steps, state.accumulated_err = 1.0, 0, 0.0
            if run_it:
                state.previous_residual = torch.zeros(1)
            decisions.append(run_it)
        assert hook.config is config
        assert magcache.skip_schedule(steps, ratios, settings) == decisions, (size, steps, threshold)


def test_magcache_skips_exactly_what_diffusers_skips_and_the_frames_match(core, diffusers_frames):
    from diffusers.hooks import MagCacheConfig

    steps = len(STEADY_RATIOS)
    settings = magcache.MagCacheSettings(mag_ratios=tuple(STEADY_RATIOS), **SKIPPING)
    ours = run(core, steps, 5.0, magcache=settings)
    expected, computed = diffusers_run(
        diffusers_frames.pipe, steps, 5.0,
        cache=MagCacheConfig(num_inference_steps=steps, mag_ratios=STEADY_RATIOS, **SKIPPING))
    ours_computed = magcache.skip_schedule(steps, STEADY_RATIOS, settings)
    assert computed == ours_computed, (computed, ours_computed)
    assert computed.count(False) >= steps / 3  # at least a third of the steps skipped
    assert core.last_run["transformer_evaluations"] == computed.count(True)
    assert np.abs(ours - expected).max() <= 1e-3


def test_magcache_changes_the_frames_and_a_second_run_compiles_nothing(core, manager):
    settings = magcache.MagCacheSettings(mag_ratios=tuple(STEADY_RATIOS), **SKIPPING)
    full = run(core, len(STEADY_RATIOS), 5.0)
    cached = run(core, len(STEADY_RATIOS), 5.0, magcache=settings)
    assert np.abs(full - cached).max() > 0  # the skip program really skipped
    before = manager.compile_count()
    run(core, len(STEADY_RATIOS), 5.0, seed=9, magcache=settings)
    assert manager.compile_count() == before


def test_magcache_needs_ratios_for_an_unknown_model(core):
    embeddings = core.encode(PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="no published magnitude ratios .* 2 layers and 4 heads"):
        core.denoise(embeddings, num_inference_steps=4, magcache=magcache.MagCacheSettings(), **TINY_VIDEO)


# ------------------------------------------------------------------ through the nodes
def test_sampler_node_runs_four_step_euler_and_magcache_with_progress_text(monkeypatch, tiny_model_dir,
                                                                            diffusers_frames, tmp_path):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack
    from diffusers import FlowMatchEulerDiscreteScheduler

    stubs = ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, tiny_model_dir, precision="fp32")
        latents, _ = nodes.Wan21TPUSampler().sample(
            positive, negative, num_inference_steps=4, guidance_scale=1.0, seed=3, model_id=tiny_model_dir,
            flow_shift=5.0, precision="fp32", sampler="euler", timesteps="1000, 750, 500, 250", unique_id="4",
            **TINY_VIDEO)
        frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, tiny_model_dir, precision="fp32")
    expected, _ = diffusers_run(diffusers_frames.pipe, 4, 1.0, scheduler_obj=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                timesteps=[1000, 750, 500, 250])
    assert np.abs(frames.numpy() - expected).max() <= 1e-3

    steps = len(STEADY_RATIOS)
    tiny = magcache.PublishedRatios("the tiny model", "Wan 2.1 T2V", (2, 4), STEADY_RATIOS)
    monkeypatch.setattr(magcache, "PUBLISHED", magcache.PUBLISHED + [tiny])  # the tiny model's "published" ratios
    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path))  # no calibration saved
    with torch.inference_mode():
        nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=steps, guidance_scale=5.0, seed=3,
                                       model_id=tiny_model_dir, precision="fp32", magcache=True, unique_id="5",
                                       **TINY_VIDEO)
    ran = magcache.skip_schedule(steps, STEADY_RATIOS, magcache.MagCacheSettings()).count(True)
    assert (f"MagCache: {ran} of {steps} steps ran the full transformer", "5") in stubs.texts


@pytest.mark.parametrize("inputs, message", [
    (dict(sampler="ddim"), "sampler='ddim': use one of unipc, euler"),
    (dict(sampler="unipc", timesteps="1000,500"), "need sampler='euler'"),
    (dict(sampler="euler", timesteps="1000,500", num_inference_steps=4), "set num_inference_steps to 2"),
    (dict(sampler="euler", timesteps="1000,abc"), "give numbers separated by commas"),
])
def test_step_inputs_are_validated_before_anything_runs(inputs, message):
    nodes = pack_module("nodes")
    for node in (nodes.Wan21TPUSampler, nodes.Wan21TPUPipeline):
        result = node.VALIDATE_INPUTS(**inputs)
        assert isinstance(result, str) and message in result


def test_sampler_node_calibrates_and_magcache_then_uses_the_saved_ratios(monkeypatch, tiny_model_dir, tmp_path):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    stubs = ComfyStubs().install(monkeypatch)
    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path))
    load_pack()
    nodes = pack_module("nodes")
    inputs = dict(num_inference_steps=6, guidance_scale=5.0, seed=3, model_id=tiny_model_dir, precision="fp32",
                  **TINY_VIDEO)
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, tiny_model_dir, precision="fp32")
        nodes.Wan21TPUSampler().sample(positive, negative, magcache_calibrate=True, unique_id="6", **inputs)
        (saved,) = list(tmp_path.iterdir())
        assert saved.name.startswith("tiny-wan21-") and saved.suffix == ".json"
        assert any(text.startswith(f"MagCache: calibrated 6 ratios, saved to {saved.name}") for text, _ in stubs.texts)
        nodes.Wan21TPUSampler().sample(positive, negative, magcache=True, magcache_threshold=1.0, unique_id="7",
                                       **inputs)
    core = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")
    recorded = magcache.load_calibration(core.ratio_source(core.transformer(), 32, 48, None))
    ran = magcache.skip_schedule(6, recorded, magcache.MagCacheSettings(threshold=1.0)).count(True)
    assert ran < 6 and (f"MagCache: {ran} of 6 steps ran the full transformer", "7") in stubs.texts
