"""Image-to-video on the one core: Wan 2.1 I2V (CLIP) and Wan 2.2 I2V A14B (two experts) equal diffusers'
own WanImageToVideoPipeline, through the core and through the nodes; mismatches are refused with the fix."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, pack_module

families = pack_module("models.wan.families")
pipeline_mod = pack_module("pipeline")
tiny_wan = pack_module("tiny_wan")

PROMPT, NEGATIVE = "a red fox running through snow", "blurry, static"
BOUND = 1e-3  # the fp32 parity bound of every other family


def start_image(seed: int, size=(40, 56)):
    """A random RGB picture of another size than the video: diffusers' resize is part of what is compared."""
    from PIL import Image

    pixels = np.random.default_rng(seed).random((*size, 3))
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan21-i2v", tiny_wan.TINY_I2V)


@pytest.fixture(scope="module")
def i2v_a14b_dir(tmp_path_factory):
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan22-i2v-a14b", tiny_wan.TINY_I2V_A14B)


def diffusers_i2v(path):
    """diffusers' WanImageToVideoPipeline (fp32) on a tiny folder: frames(image, seed, **settings), cached."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    cache = {}

    def frames(image_seed, seed, prompt=PROMPT, **settings):
        key = (image_seed, seed, prompt, tuple(sorted(settings.items())))
        if key not in cache:
            cache[key] = pipe(image=start_image(image_seed), prompt=prompt, negative_prompt=NEGATIVE,
                              num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed),
                              output_type="np", **TINY_VIDEO, **settings).frames[0]
        return cache[key]

    frames.pipe = pipe
    return frames


@pytest.fixture(scope="module")
def i2v_diffusers(i2v_dir):
    return diffusers_i2v(i2v_dir)


@pytest.fixture(scope="module")
def i2v_a14b_diffusers(i2v_a14b_dir):
    return diffusers_i2v(i2v_a14b_dir)


def run_core(path, image_seed, seed, prompt=PROMPT, num_steps=4, **settings):
    core = pipeline_mod.WanTPUPipeline(path, precision="fp32")
    embeddings = core.encode(prompt, NEGATIVE)
    conditioning = core.encode_image(start_image(image_seed), **TINY_VIDEO)
    latents = core.denoise(embeddings, num_inference_steps=num_steps, seed=seed, flow_shift=3.0, image=conditioning,
                           **TINY_VIDEO, **settings)
    return core, conditioning, core.decode(latents).numpy()


def test_families_are_read_from_the_folders(i2v_dir, i2v_a14b_dir):
    wan21 = pipeline_mod.WanTPUPipeline(i2v_dir).family
    assert wan21 is families.WAN21_I2V and wan21.clip_image_encoder and not wan21.two_experts
    wan22 = pipeline_mod.WanTPUPipeline(i2v_a14b_dir).family
    assert wan22.name == "Wan 2.2 I2V A14B" and wan22.two_experts and wan22.image_conditioning
    assert not wan22.clip_image_encoder and wan22.boundary_ratio == 0.6


@pytest.mark.parametrize("seed", [0, 5])
def test_wan21_i2v_matches_diffusers(i2v_dir, i2v_diffusers, manager, seed):
    _, conditioning, frames = run_core(i2v_dir, image_seed=seed, seed=seed, guidance_scale=5.0)
    assert conditioning.condition.shape == (1, 20, 2, 4, 6)  # mask (4) + image latents (16), 5 frames at 32x48
    assert conditioning.image_embeds.shape == (1, 17, 32)  # the tiny CLIP's tokens: 4x4 patches and the class
    expected = i2v_diffusers(seed, seed, guidance_scale=5.0)
    core = pipeline_mod.WanTPUPipeline(i2v_dir, precision="fp32")
    # Every parameter of the new modules has a sharding rule (the image cross-attention's, CLIP's).
    assert core.transformer().plan.unmatched == [] and core.image_encoder().plan.unmatched == []
    specs = core.image_encoder().plan.specs
    fc1 = next(name for name in specs if name.endswith("encoder.layers.0.mlp.fc1.weight"))  # "vision_model." or not
    assert specs[fc1] == ("tp", None)
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).max() <= BOUND


@pytest.mark.parametrize("seed", [0, 5])
def test_wan22_i2v_a14b_matches_diffusers_with_its_own_guidance_per_expert(i2v_a14b_dir, i2v_a14b_diffusers, manager,
                                                                            seed):
    core, conditioning, frames = run_core(i2v_a14b_dir, image_seed=seed + 1, seed=seed, guidance_scale=5.0,
                                          guidance_scale_2=2.5)
    assert conditioning.image_embeds is None  # Wan 2.2 I2V has no CLIP
    assert 0 < core.last_run["low_noise_expert_steps"] < 4  # the boundary is crossed within the run
    expected = i2v_a14b_diffusers(seed + 1, seed, guidance_scale=5.0, guidance_scale_2=2.5)
    assert np.abs(frames - expected).max() <= BOUND


def test_the_nodes_match_diffusers_and_a_new_image_prompt_or_seed_compiles_nothing(monkeypatch, i2v_dir,
                                                                                  i2v_diffusers, manager):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")

    def run(image_seed, seed, prompt):
        picture = torch.from_numpy(np.asarray(start_image(image_seed), np.float32) / 255)[None]  # ComfyUI's IMAGE
        with torch.inference_mode():
            positive, negative = nodes.Wan21TextEncoder().encode(prompt, NEGATIVE, i2v_dir, precision="fp32")
            (image,) = nodes.WanTPUImageToVideo().encode(picture, model_id=i2v_dir, precision="fp32", **TINY_VIDEO)
            latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=4, guidance_scale=5.0,
                                                        seed=seed, model_id=i2v_dir, flow_shift=3.0,
                                                        precision="fp32", image=image, **TINY_VIDEO)
            frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, i2v_dir, precision="fp32")
        return frames.numpy()

    first = run(2, 3, PROMPT)
    assert np.abs(first - i2v_diffusers(2, 3, guidance_scale=5.0)).max() <= BOUND
    compiles = manager.compile_count()
    second = run(4, 8, "a robot dancing in the rain")
    assert manager.compile_count() == compiles
    assert np.abs(second - i2v_diffusers(4, 8, prompt="a robot dancing in the rain", guidance_scale=5.0)).max() <= BOUND


def test_the_full_pipeline_node_takes_a_start_image(monkeypatch, i2v_a14b_dir, i2v_a14b_diffusers, manager):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")
    picture = torch.from_numpy(np.asarray(start_image(1), np.float32) / 255)[None]
    with torch.inference_mode():
        frames, _ = nodes.Wan21TPUPipeline().generate(PROMPT, NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                                                      seed=0, model_id=i2v_a14b_dir, flow_shift=3.0, precision="fp32",
                                                      start_image=picture, **TINY_VIDEO)
    assert np.abs(frames.numpy() - i2v_a14b_diffusers(1, 0, guidance_scale=5.0)).max() <= BOUND


def test_an_i2v_model_without_an_image_says_how_to_give_one(i2v_a14b_dir):
    core = pipeline_mod.WanTPUPipeline(i2v_a14b_dir, precision="fp32")
    embeddings = core.encode(PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="image-to-video model: give it the start image .*Wan TPU Image to Video"):
        core.denoise(embeddings, num_inference_steps=2, **TINY_VIDEO)


def test_a_t2v_model_refuses_an_image(i2v_dir, tiny_model_dir):
    t2v = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")
    with pytest.raises(ValueError, match="text-to-video model: it takes no image"):
        t2v.encode_image(start_image(0), **TINY_VIDEO)
    conditioning = pipeline_mod.WanTPUPipeline(i2v_dir, precision="fp32").encode_image(start_image(0), **TINY_VIDEO)
    with pytest.raises(ValueError, match="text-to-video model: it takes no image. Disconnect the image"):
        t2v.denoise(t2v.encode(PROMPT, NEGATIVE), num_inference_steps=2, image=conditioning, **TINY_VIDEO)


def test_an_image_made_for_another_size_or_model_is_refused(i2v_dir, i2v_a14b_dir):
    wan21 = pipeline_mod.WanTPUPipeline(i2v_dir, precision="fp32")
    conditioning = wan21.encode_image(start_image(0), **TINY_VIDEO)
    embeddings = wan21.encode(PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="made for 48x32, 5 frames, but this run is 64x32, 5 frames: give both the same"):
        wan21.denoise(embeddings, num_inference_steps=2, image=conditioning, height=32, width=64, num_frames=5)
    wan22 = pipeline_mod.WanTPUPipeline(i2v_a14b_dir, precision="fp32")
    with pytest.raises(ValueError, match="does not fit .*Wan 2.2 I2V A14B.*encode the image with the same model"):
        wan22.denoise(wan22.encode(PROMPT, NEGATIVE), num_inference_steps=2, image=conditioning, **TINY_VIDEO)
    with pytest.raises(ValueError, match="give the output of encode_image"):
        wan21.denoise(embeddings, num_inference_steps=2, image=start_image(0), **TINY_VIDEO)


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-i2v-a14b"])
def test_magcache_on_image_to_video_skips_exactly_what_diffusers_skips(request, family):
    """MagCache on I2V: the step that reuses the residual takes the image's conditioning too; with two
    experts, each expert has its own MagCacheConfig over its own steps (diffusers: enable_cache on each)."""
    from diffusers.hooks import MagCacheConfig
    from diffusers_cache import block_runs, expert_caches, per_step

    magcache = pack_module("magcache")
    path = request.getfixturevalue({"wan2.1-i2v": "i2v_dir", "wan2.2-i2v-a14b": "i2v_a14b_dir"}[family])
    pipe = request.getfixturevalue({"wan2.1-i2v": "i2v_diffusers", "wan2.2-i2v-a14b": "i2v_a14b_diffusers"}[family]).pipe
    steps, ratios = 8, [1.0] + [0.98] * 7
    settings = magcache.MagCacheSettings(mag_ratios=tuple(ratios))
    core, _, frames = run_core(path, 2, 4, magcache=settings, num_steps=steps)
    transformer = core.transformer()
    schedule = pack_module("scheduler").make_schedule("unipc", transformer.scheduler_config, steps, 3.0)
    experts = [core.family.expert_for(float(t)) for t in schedule.timesteps]
    assert len(set(experts)) == core.family.two_experts + 1
    configs = [MagCacheConfig(num_inference_steps=len(part), mag_ratios=part)
               for part in magcache.expert_ratio_slices(experts, ratios)]
    with expert_caches(pipe, configs), block_runs(pipe) as calls:
        expected = pipe(image=start_image(2), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                        generator=torch.Generator("cpu").manual_seed(4), output_type="np", **TINY_VIDEO).frames[0]
    computed = per_step(calls, cfg=True)
    assert computed == magcache.run_schedule(experts, ratios, settings) and computed.count(False) >= 2
    assert core.last_run["transformer_evaluations"] == computed.count(True)
    assert np.abs(frames - expected).max() <= BOUND


def test_a_comfyui_image_batch_and_a_bad_image(i2v_dir):
    pil = pack_module("models.wan.conditioning").as_pil_image(torch.rand(2, 24, 40, 3))
    assert pil.size == (40, 24) and pil.mode == "RGB"
    with pytest.raises(ValueError, match=r"image of shape \(24, 40\): give an RGB image"):
        pack_module("models.wan.conditioning").as_pil_image(np.zeros((24, 40)))


# ------------------------------------------------------------------ Wan 2.2 TI2V 5B
TI2V_VIDEO = dict(height=64, width=64, num_frames=5)  # multiples of 32: the Wan 2.2 VAE's 16x, then 2x2 patches


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan22-ti2v", tiny_wan.TINY_TI2V)


@pytest.fixture(scope="module")
def ti2v_diffusers(ti2v_dir):
    """diffusers' own runs of TI2V: WanPipeline (text) and WanImageToVideoPipeline (image) on one folder."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipes = {}
    for name, cls in (("text", WanPipeline), ("image", WanImageToVideoPipeline)):
        pipe = cls.from_pretrained(ti2v_dir, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
        pipes[name] = pipe

    def frames(image_seed, seed):
        image = {} if image_seed is None else {"image": start_image(image_seed)}
        pipe = pipes["text" if image_seed is None else "image"]
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **image,
                    **TI2V_VIDEO).frames[0]

    return frames


@pytest.mark.parametrize("seed", [0, 5])
def test_ti2v_text_and_image_to_video_match_diffusers(ti2v_dir, ti2v_diffusers, manager, seed):
    core = pipeline_mod.WanTPUPipeline(ti2v_dir, precision="fp32")
    assert core.family is families.WAN22_TI2V
    assert core.geometry == pack_module("models.wan.latents").WAN22
    embeddings = core.encode(PROMPT, NEGATIVE)
    compiles = None
    for image_seed in (None, seed):
        image = None if image_seed is None else core.encode_image(start_image(image_seed), **TI2V_VIDEO)
        if image is not None:
            assert image.condition.shape == (1, 48, 1, 4, 4)  # the image's latents: the video's first latent frame
        latents = core.denoise(embeddings, num_inference_steps=4, guidance_scale=5.0, seed=seed, flow_shift=3.0,
                               image=image, **TI2V_VIDEO)
        assert latents.shape == (1, 48, 2, 4, 4)
        frames = core.decode(latents).numpy()
        assert np.abs(frames - ti2v_diffusers(image_seed, seed)).max() <= BOUND
        # Text and image runs share one compiled step: the first-frame mask is data.
        compiles = manager.compile_count() if compiles is None else compiles
    assert manager.compile_count() - compiles <= 2  # the image run adds only the VAE encode's two chunk programs


def test_ti2v_calibrates_and_magcache_skips_what_diffusers_skips(ti2v_dir, monkeypatch, tmp_path):
    """TI2V 5B (a timestep per token): a calibration run records diffusers' calibration ratios, and MagCache on
    them skips exactly what diffusers' MagCacheConfig skips, with the same frames."""
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig
    from diffusers_cache import block_runs, calibration_log, expert_caches, per_step

    magcache = pack_module("magcache")
    monkeypatch.setenv("WAN_TPU_MAGCACHE_DIR", str(tmp_path))
    steps = 6
    core = pipeline_mod.WanTPUPipeline(ti2v_dir, precision="fp32")
    embeddings = core.encode(PROMPT, NEGATIVE)
    run = dict(num_inference_steps=steps, guidance_scale=5.0, seed=2, flow_shift=3.0, **TI2V_VIDEO)
    core.denoise(embeddings, magcache_calibrate=True, **run)
    recorded = core.last_run["magcache_ratios"]
    pipe = WanPipeline.from_pretrained(ti2v_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)

    def theirs():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(2), output_type="np", **TI2V_VIDEO).frames[0]

    with expert_caches(pipe, [MagCacheConfig(calibrate=True, num_inference_steps=steps)]), calibration_log() as logged:
        theirs()
    np.testing.assert_allclose(recorded, logged[0], rtol=1e-4)  # the cond context's ratios
    settings = magcache.MagCacheSettings(threshold=1.0, max_skip_steps=2)
    frames = core.decode(core.denoise(embeddings, magcache=settings, **run)).numpy()
    with expert_caches(pipe, [MagCacheConfig(num_inference_steps=steps, mag_ratios=recorded, threshold=1.0,
                                             max_skip_steps=2)]), block_runs(pipe) as calls:
        expected = theirs()
    computed = per_step(calls, cfg=True)
    assert computed == magcache.skip_schedule(steps, recorded, settings) and computed.count(False) >= 1
    assert np.abs(frames - expected).max() <= BOUND


def test_ti2v_through_the_nodes_and_its_size_rule(monkeypatch, ti2v_dir, ti2v_diffusers, manager):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")
    picture = torch.from_numpy(np.asarray(start_image(3), np.float32) / 255)[None]
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, ti2v_dir, precision="fp32")
        (image,) = nodes.WanTPUImageToVideo().encode(picture, model_id=ti2v_dir, precision="fp32", **TI2V_VIDEO)
        latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=4, guidance_scale=5.0,
                                                    seed=1, model_id=ti2v_dir, flow_shift=3.0, precision="fp32",
                                                    image=image, **TI2V_VIDEO)
        assert latents["samples"].shape[1] == 48
        frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, ti2v_dir, precision="fp32")
    assert np.abs(frames.numpy() - ti2v_diffusers(3, 1)).max() <= BOUND
    core = pipeline_mod.WanTPUPipeline(ti2v_dir, precision="fp32")
    with pytest.raises(ValueError, match=r"height=48: Wan needs a multiple of 32 \(32 or 64\)"):
        core.denoise(core.encode(PROMPT, NEGATIVE), num_inference_steps=2, height=48, width=64, num_frames=5)
    with pytest.raises(ValueError, match=r"decodes \[batch, 48, frames, height/16, width/16\]"):
        core.decode(torch.zeros(1, 16, 2, 4, 4))
