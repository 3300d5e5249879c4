"""Fewer evaluations on two experts (Wan 2.2 A14B-style tiny model): a high/low LoRA pair equals diffusers'
WanPipeline with each LoRA loaded into its transformer and fused; MagCache skips exactly what diffusers'
MagCacheConfig on each transformer skips; a calibration run records the ratios diffusers' calibration logs,
and MagCache then runs on them."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, diffusers_wan_pipeline, pack_module
from diffusers_cache import block_runs, calibration_log, expert_caches, per_step
from test_lora import write_random_lora

pipeline_mod = pack_module("pipeline")
loading = pack_module("loading")
lora = pack_module("lora")
magcache = pack_module("magcache")

PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry, static"
RUN = dict(guidance_scale=5.0, guidance_scale_2=2.5, flow_shift=3.0)
STEPS = 10  # 7 high-noise steps and 3 low-noise ones at flow_shift 3 and boundary 0.6
SKIPPING = dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2)
STEADY_RATIOS = [1.0] + [0.98] * (STEPS - 1)


@pytest.fixture(scope="module")
def pipe(a14b_dir):
    return diffusers_wan_pipeline(a14b_dir, RUN["flow_shift"])


@pytest.fixture(scope="module")
def core(a14b_dir, manager):
    return pipeline_mod.WanTPUPipeline(a14b_dir, precision="fp32")


def ours(core, steps, seed=3, **settings):
    latents = core.denoise(core.encode(PROMPT, NEGATIVE), num_inference_steps=steps, seed=seed,
                           **{**RUN, **settings}, **TINY_VIDEO)
    return core.decode(latents).numpy()


def theirs(pipe, steps, seed=3):
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                guidance_scale=RUN["guidance_scale"], guidance_scale_2=RUN["guidance_scale_2"],
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **TINY_VIDEO).frames[0]


def expert_of_step(core, steps):
    """The expert of each step of a ``steps`` run, as the core picks it (diffusers picks the same)."""
    transformer = core.transformer()
    schedule = pack_module("scheduler").make_schedule("unipc", transformer.scheduler_config, steps, RUN["flow_shift"])
    return [core.family.expert_for(float(t)) for t in schedule.timesteps]


def diffusers_configs(core, ratios, steps, **settings):
    """A MagCacheConfig per transformer: each expert's share of the steps and of the ratios."""
    from diffusers.hooks import MagCacheConfig

    experts = expert_of_step(core, steps)
    slices = magcache.expert_ratio_slices(experts, ratios)
    return [MagCacheConfig(num_inference_steps=len(part), mag_ratios=part, **settings) for part in slices]


# ------------------------------------------------------------------ MagCache
def test_magcache_skips_exactly_what_diffusers_skips_on_each_expert(core, pipe):
    experts = expert_of_step(core, STEPS)
    assert experts.count(0) >= 4 and experts.count(1) >= 3  # each expert has steps to skip
    settings = magcache.MagCacheSettings(mag_ratios=tuple(STEADY_RATIOS), **SKIPPING)
    frames = ours(core, STEPS, magcache=settings)
    with expert_caches(pipe, diffusers_configs(core, STEADY_RATIOS, STEPS, **SKIPPING)), block_runs(pipe) as calls:
        expected = theirs(pipe, STEPS)
    computed = per_step(calls, cfg=True)
    assert computed == magcache.run_schedule(experts, STEADY_RATIOS, settings)
    low_start = experts.index(1)
    assert not all(computed[:low_start]) and not all(computed[low_start:])  # both experts skipped steps
    assert computed[low_start]  # the low-noise expert's first step has no residual: it runs
    assert core.last_run["transformer_evaluations"] == computed.count(True)
    assert np.abs(frames - expected).max() <= 1e-3


def test_the_published_a14b_ratios_are_used_for_the_real_shape():
    config = {"num_layers": 40, "num_attention_heads": 40}
    entry = magcache.published_ratios("Wan 2.2 T2V A14B", config, 720, 1280, False)
    assert entry.name == "Wan 2.2 T2V A14B" and len(entry.ratios) == 40 and entry.ratios[0] == 1.0
    assert min(entry.ratios) == pytest.approx(0.65523)  # the dip where the low-noise expert takes over
    assert magcache.published_ratios("Wan 2.2 I2V A14B", config, 720, 1280, True).name == "Wan 2.2 I2V A14B"
    i2v = {size: magcache.published_ratios("Wan 2.1 I2V", config, *size, True).name
           for size in ((480, 832), (720, 1280))}
    assert i2v == {(480, 832): "Wan 2.1 I2V 14B 480P", (720, 1280): "Wan 2.1 I2V 14B 720P"}
    ti2v = {"num_layers": 30, "num_attention_heads": 24}
    assert [magcache.published_ratios("Wan 2.2 TI2V 5B", ti2v, 704, 1280, image).name for image in (False, True)] == [
        "Wan 2.2 TI2V 5B, text to video", "Wan 2.2 TI2V 5B, image to video"]
    assert magcache.published_ratios("Wan 2.2 T2V A14B", {"num_layers": 2, "num_attention_heads": 4}, 32, 48,
                                     False) is None  # ratios are checkpoint facts: not for another shape


def test_calibration_records_diffusers_ratios_and_magcache_then_uses_them(core, pipe, manager, monkeypatch, tmp_path):
    from diffusers.hooks import MagCacheConfig

    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="none are calibrated .* run it once with magcache_calibrate on"):
        ours(core, STEPS, magcache=magcache.MagCacheSettings())
    full = ours(core, STEPS)
    calibrated = ours(core, STEPS, magcache_calibrate=True)
    assert np.array_equal(calibrated, full)  # a calibration run is a full run
    recorded = core.last_run["magcache_ratios"]
    path = core.last_run["magcache_calibration"]
    assert path.startswith(str(tmp_path)) and path.endswith(".json")

    experts = expert_of_step(core, STEPS)
    counts = [experts.count(0), experts.count(1)]
    with expert_caches(pipe, [MagCacheConfig(calibrate=True, num_inference_steps=n) for n in counts]), \
            calibration_log() as logged:
        theirs(pipe, STEPS)
    # Logged per transformer and context as each finishes: high cond, high uncond, low cond, low uncond.
    assert [len(ratios) for ratios in logged] == [counts[0], counts[0], counts[1], counts[1]]
    np.testing.assert_allclose(recorded, logged[0] + logged[2], rtol=1e-4)
    assert recorded[0] == recorded[counts[0]] == 1.0

    # MagCache now finds the saved ratios; a threshold that skips on these random-weight ratios.
    settings = magcache.MagCacheSettings(threshold=1.0, max_skip_steps=2, retention_ratio=0.2)
    before = manager.compile_count()
    frames = ours(core, STEPS, magcache=settings)
    schedule = magcache.run_schedule(experts, recorded, settings)
    assert schedule.count(False) >= 2 and core.last_run["transformer_evaluations"] == schedule.count(True)
    with expert_caches(pipe, diffusers_configs(core, recorded, STEPS, threshold=1.0, max_skip_steps=2,
                                               retention_ratio=0.2)), block_runs(pipe) as calls:
        expected = theirs(pipe, STEPS)
    assert per_step(calls, cfg=True) == schedule
    assert np.abs(frames - expected).max() <= 1e-3
    ours(core, STEPS, seed=9, magcache=settings)
    assert manager.compile_count() == before  # the programs of the calibration and MagCache runs are reused


def test_a_damaged_calibration_is_refused_with_the_fix(core, monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path))
    source = core.ratio_source(core.transformer(), TINY_VIDEO["height"], TINY_VIDEO["width"], None)
    path = magcache.save_calibration(source, [1.0, 0.9, 0.95], {"steps": 3})
    assert magcache.load_calibration(source).tolist() == pytest.approx([1.0, 0.9, 0.95])
    with open(path, "w") as file:
        file.write('{"mag_ratios": [1.0, "x"')
    with pytest.raises(ValueError, match="cannot be used .* delete it and run magcache_calibrate again"):
        ours(core, 4, magcache=magcache.MagCacheSettings())


# ------------------------------------------------------------------ LoRAs per expert
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="diffusers' load_lora_weights needs peft (requirements-test.txt)")


@pytest.fixture(scope="module")
def lora_pair(a14b_dir, tmp_path_factory):
    """Random LoRAs: a high-noise/low-noise pair (ComfyUI format, as lightx2v ships them) and a third one."""
    source = loading.resolve_model_source(a14b_dir)
    folder = tmp_path_factory.mktemp("a14b-loras")
    files = {}
    for index, (name, expert, fmt) in enumerate([("high", "transformer", "comfyui"), ("low", "transformer_2", "comfyui"),
                                                  ("other", "transformer_2", "peft")]):
        module = loading.load_transformer(source, "fp32", expert)
        files[name] = write_random_lora(folder / f"{name}.safetensors", fmt, module, rank=4, alpha=2.0, seed=10 + index,
                                        scale=0.3)
    return files


def diffusers_with_pair(a14b_dir, high, low, steps):
    """diffusers' WanPipeline with ``high`` [(path, strength)] in transformer and ``low`` in transformer_2, fused."""
    pipe = diffusers_wan_pipeline(a14b_dir, RUN["flow_shift"])
    for component, loras, into_second in (("transformer", high, False), ("transformer_2", low, True)):
        for index, (path, strength) in enumerate(loras):
            name = f"{component}_{index}"
            pipe.load_lora_weights(path, adapter_name=name, load_into_transformer_2=into_second)
            pipe.fuse_lora(components=[component], lora_scale=strength, adapter_names=[name])
    return theirs(pipe, steps)


@needs_peft
def test_a_high_low_lora_pair_through_the_nodes_matches_diffusers_and_switches_compile_nothing(
        monkeypatch, a14b_dir, lora_pair, manager):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")

    def chain(*links):
        result = None
        for path, strength, expert in links:
            (result,) = nodes.Wan21TPULoRA().add(path, strength, lora=result, expert=expert)
        return result

    def sample(lora_chain):
        with torch.inference_mode():
            positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, a14b_dir, precision="fp32")
            latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=4, seed=3,
                                                        model_id=a14b_dir, precision="fp32", lora=lora_chain,
                                                        **RUN, **TINY_VIDEO)
            frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, a14b_dir, precision="fp32")
        return frames.numpy()

    base = sample(None)
    pair = sample(chain((lora_pair["high"], 1.0, "high_noise"), (lora_pair["low"], 0.8, "low_noise")))
    expected = diffusers_with_pair(a14b_dir, [(lora_pair["high"], 1.0)], [(lora_pair["low"], 0.8)], 4)
    assert np.abs(pair - expected).max() <= 1e-3
    assert np.abs(pair - base).max() > 1e-2  # the pair really changed the video

    before = manager.compile_count()
    switched = sample(chain((lora_pair["other"], -0.6, "low_noise")))  # high-noise expert back to its base
    assert manager.compile_count() == before
    expected = diffusers_with_pair(a14b_dir, [], [(lora_pair["other"], -0.6)], 4)
    assert np.abs(switched - expected).max() <= 1e-3
    assert np.array_equal(sample(None), base)  # no LoRA: both experts' weights restored bit-exactly
    assert manager.compile_count() == before


@needs_peft
def test_expert_loras_are_checked_before_any_weight_changes(core, lora_pair, tiny_model_dir, tmp_path):
    bad = tmp_path / "for-another-size.safetensors"
    other = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")
    module = loading.load_transformer(loading.resolve_model_source(core.source.location), "fp32")
    # A LoRA whose factors do not fit this model: one of its down matrices is wider than the layer.
    write_random_lora(bad, "peft", module, rank=4, seed=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad))
    name = next(key for key in tensors if key.endswith("lora_A.weight"))
    tensors[name] = torch.zeros(4, tensors[name].shape[1] + 8)
    save_file(tensors, str(bad))
    specs = [lora.LoraSpec(lora_pair["high"], 1.0, "high_noise"), lora.LoraSpec(str(bad), 1.0, "low_noise")]
    high = core.transformer("transformer")
    kept = dict(high.weights)
    with pytest.raises(ValueError, match="for-another-size.safetensors"):
        core.apply_loras(specs)
    assert all(high.weights[key] is kept[key] for key in kept)  # the valid high-noise LoRA was not applied
    with pytest.raises(ValueError, match="is for the low_noise expert, but .* has one transformer: set its expert "
                                         "to 'both'"):
        other.apply_loras([lora.LoraSpec(lora_pair["low"], 1.0, "low_noise")])
    with pytest.raises(ValueError, match="expert='middle': use one of both, high_noise, low_noise"):
        lora.LoraSpec(lora_pair["low"], 1.0, "middle")
