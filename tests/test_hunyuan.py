"""HunyuanVideo 1.5 on the core: frames equal diffusers' own pipelines on tiny random models (fp32,
4 steps, two seeds), DeepCache runs the steps its rule says, a second prompt compiles nothing, and
switching between Wan and HunyuanVideo frees the first one's arrays."""

import numpy as np
import pytest
import torch
from conftest import pack_module

hunyuan = pack_module("models.hunyuan.pipeline")
deepcache = pack_module("models.hunyuan.deepcache")
hunyuan_transformer = pack_module("models.hunyuan.transformer")
tiny_hunyuan = pack_module("tiny_hunyuan")

BOUND = 1e-4  # frames in [0, 1]; measured about 2e-6
VIDEO = dict(height=32, width=32, num_frames=9)
STEPS = 4
PROMPT = 'a cat holding a sign that says "OPEN"'  # the quoted text goes through ByT5
NEGATIVE = "blurry, low quality"


def picture(seed: int, size=(40, 56)):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return tiny_hunyuan.build_tiny_hunyuan(tmp_path_factory.mktemp("models") / "tiny-hunyuan-t2v")


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return tiny_hunyuan.build_tiny_hunyuan(tmp_path_factory.mktemp("models") / "tiny-hunyuan-i2v",
                                           tiny_hunyuan.TINY_I2V)


def diffusers_frames(pipe, seed, prompt=PROMPT, **inputs):
    return pipe(prompt=prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed), **inputs).frames[0]


@pytest.fixture(scope="module")
def t2v_reference(t2v_dir):
    from diffusers import HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline.from_pretrained(t2v_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2v(t2v_dir, manager):
    manager.release()
    return hunyuan.HunyuanVideoPipeline(t2v_dir, precision="fp32")


def test_text_to_video_matches_diffusers_for_two_seeds_and_a_second_prompt_compiles_nothing(
        t2v, t2v_reference, manager):
    first = t2v.generate(PROMPT, NEGATIVE, seed=0, num_inference_steps=STEPS, **VIDEO).numpy()
    assert first.shape == (9, 32, 32, 3)
    assert np.abs(first - diffusers_frames(t2v_reference, 0, **VIDEO)).max() <= BOUND
    compiles = manager.compile_count()
    second = t2v.generate("a quiet lake at dawn", NEGATIVE, seed=7, num_inference_steps=STEPS, **VIDEO).numpy()
    assert manager.compile_count() == compiles  # new prompt (no quoted text), new seed: the same programs
    assert np.abs(second - diffusers_frames(t2v_reference, 7, "a quiet lake at dawn", **VIDEO)).max() <= BOUND
    assert np.abs(first - second).max() > 0.05


def test_components_are_split_over_the_mesh_by_rules(t2v):
    transformer = t2v.transformer()
    assert transformer.plan.unmatched == []
    specs = transformer.plan.specs
    assert specs["transformer_blocks.0.attn.to_q.weight"] == ("tp", None)
    assert specs["transformer_blocks.0.attn.to_out.0.weight"] == (None, "tp")
    assert specs["transformer_blocks.0.norm1.linear.weight"] == (None, "tp")
    assert transformer.weights["transformer_blocks.0.ff.net.0.proj.weight"].sharding.spec[0] == "tp"
    qwen = t2v.component("text_encoder")
    assert qwen.plan.unmatched == [] and qwen.plan.specs["layers.0.mlp.gate_proj.weight"] == (("dp", "tp"), None)
    assert t2v.component("text_encoder_2").plan.unmatched == []


def test_the_hbm_plan_counts_the_weights_each_device_holds_and_refuses_what_will_not_fit(t2v):
    memory = pack_module("models.hunyuan.memory")
    transformer = t2v.transformer()
    device = transformer.mesh.devices.flat[0]
    held = sum(shard.data.nbytes for array in transformer.weights.values() for shard in array.addressable_shards
               if shard.device == device)
    assert memory.weights_bytes_per_device(transformer.config, dict(transformer.mesh.shape), itemsize=4) == held
    plan = memory.plan_step(transformer.config, dict(transformer.mesh.shape), 720, 1280, 121, True, hbm_bytes=2**20)
    assert not plan.fits and "lower the resolution or num_frames" in plan.message()


def test_text_packing_puts_each_prompts_valid_tokens_first_in_diffusers_order():
    tokens = [torch.arange(6.0).reshape(1, 3, 2) + 10 * k for k in range(3)]
    masks = [torch.tensor([[True, False, True]]), torch.tensor([[False, True, False]]), torch.tensor([[True] * 3])]
    packed, mask = hunyuan_transformer.pack_text_tokens(tokens, masks, (False, True, True))
    first = packed[0, :, 0].tolist()
    # valid: image 0, 2; glyph 1; text 0, 1, 2 -- then invalid: image 1 (kept), glyph 0, 2 (zeroed)
    assert first == [0.0, 4.0, 12.0, 20.0, 22.0, 24.0, 2.0, 0.0, 0.0]
    assert mask[0].tolist() == [True] * 6 + [False] * 3


@pytest.fixture
def hunyuan_nodes(monkeypatch):
    """The HunyuanVideo nodes with ComfyUI's progress bar, progress text and Cancel stood in."""
    from comfy_stubs import ComfyStubs

    stubs = ComfyStubs().install(monkeypatch)
    return pack_module("hunyuan_nodes"), stubs


def test_the_node_chain_matches_diffusers_text_to_video(hunyuan_nodes, t2v_dir, t2v_reference, manager):
    nodes, stubs = hunyuan_nodes
    widgets = dict(width=32, height=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=6.0, seed=0)
    assert nodes.HunyuanVideo15TPUSampler.VALIDATE_INPUTS(width=32, height=32, num_frames=9, model_id=t2v_dir) is True
    (embeddings,) = nodes.HunyuanVideo15TPUTextEncoder().encode(PROMPT, NEGATIVE, t2v_dir, "fp32", unique_id="1")
    latent, frames_out = nodes.HunyuanVideo15TPUSampler().sample(embeddings, model_id=t2v_dir, precision="fp32",
                                                                 unique_id="2", **widgets)
    compiles = manager.compile_count()
    nodes.HunyuanVideo15TPUSampler().sample(embeddings, model_id=t2v_dir, precision="fp32", unique_id="2",
                                            **dict(widgets, seed=1))
    assert manager.compile_count() == compiles  # a new seed through the nodes compiles nothing
    images, fps = nodes.HunyuanVideo15TPUVAEDecoder().decode(latent, t2v_dir, 24, "fp32", unique_id="3")
    assert (frames_out, fps) == (9, 24) and latent["samples"].shape == (1, 4, 5, 8, 8)
    assert np.abs(images.numpy() - diffusers_frames(t2v_reference, 0, **VIDEO)).max() <= BOUND
    texts = [text for text, _ in stubs.texts]
    assert any(text.startswith("done: 4 steps") for text in texts)
    assert any(text.startswith("done: 9 frames decoded") for text in texts)


def test_the_default_bf16_precision_runs_the_node_chain_close_to_fp32(hunyuan_nodes, t2v_dir, t2v_reference):
    """bf16 (the nodes' default) end to end: the Qwen encodings come back to the host as float32, and the
    frames stay within bf16 rounding of diffusers' fp32 ones."""
    nodes, _ = hunyuan_nodes
    (embeddings,) = nodes.HunyuanVideo15TPUTextEncoder().encode(PROMPT, NEGATIVE, t2v_dir)
    assert embeddings.prompt[0].dtype == torch.float32
    latent, _ = nodes.HunyuanVideo15TPUSampler().sample(embeddings, 32, 32, 9, 2, 6.0, 0, model_id=t2v_dir)
    images, _ = nodes.HunyuanVideo15TPUVAEDecoder().decode(latent, t2v_dir)
    expected = t2v_reference(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, output_type="np",
                             generator=torch.Generator("cpu").manual_seed(0), **VIDEO).frames[0]
    assert np.isfinite(images.numpy()).all() and np.abs(images.numpy() - expected).max() <= 0.1


@pytest.fixture(scope="module")
def i2v(i2v_dir):
    return hunyuan.HunyuanVideoPipeline(i2v_dir, precision="fp32")


@pytest.fixture(scope="module")
def i2v_reference(i2v_dir):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(i2v_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_to_video_matches_diffusers_for_two_seeds(i2v, i2v_reference):
    for seed, image in ((0, picture(1)), (5, picture(2))):
        frames = i2v.generate(PROMPT, NEGATIVE, seed=seed, image=image, num_frames=9,
                              num_inference_steps=STEPS).numpy()
        expected = diffusers_frames(i2v_reference, seed, image=image, num_frames=9)
        assert frames.shape == expected.shape == (9, 28, 36, 3)  # diffusers' size bucket for a 56x40 image
        assert np.abs(frames - expected).max() <= BOUND
    with pytest.raises(ValueError, match="give the start image"):
        i2v.denoise(i2v.encode(PROMPT), num_inference_steps=1, **VIDEO)
    with pytest.raises(TypeError, match="magcache"):  # a Wan-only setting is refused, not ignored
        i2v.denoise(i2v.encode(PROMPT), num_inference_steps=1, magcache=object(), **VIDEO)
    with pytest.raises(ValueError, match="layout='sequence'.*tensor"):
        i2v.denoise(i2v.encode(PROMPT), num_inference_steps=1, layout="sequence", **VIDEO)


def test_a_text_to_video_model_refuses_an_image_with_the_fix(t2v):
    with pytest.raises(ValueError, match="text-to-video model: it takes no image.*image-to-video"):
        t2v.encode_image(picture(0))


def full_steps_by_the_documents_rule(start, end, interval, steps):
    """The original HunyuanVideo 1.5 TPU notes' DeepCache: full before ``start``, every ``interval``-th
    from ``start``, and all from ``end``."""
    return [i for i in range(steps) if i < start or i >= end or (i - start) % interval == 0]


def test_deepcache_schedule_is_the_documents():
    assert deepcache.full_steps(deepcache.DeepCacheSettings(), 50) == full_steps_by_the_documents_rule(11, 45, 4, 50)
    assert len(deepcache.full_steps(deepcache.DeepCacheSettings(), 50)) == 25  # half the steps cached
    for start, end, interval, steps in ((2, 5, 2, 6), (1, 3, 3, 4), (3, 3, 1, 8), (4, 9, 5, 12)):
        settings = deepcache.DeepCacheSettings(start, end, interval)
        assert deepcache.full_steps(settings, steps) == full_steps_by_the_documents_rule(start, end, interval, steps)
    with pytest.raises(ValueError, match="interval=0"):
        deepcache.DeepCacheSettings(interval=0)


def deepcache_reference(pipe, full):
    """diffusers' pipeline with each block's forward wrapped as the original's DeepCache helper does it:
    on a cached step every block but the last returns its output from the last full step (one cache
    per CFG branch: diffusers runs cond and uncond as separate calls)."""
    blocks = pipe.transformer.transformer_blocks
    seen, cache = [], {}

    def note_step(module, args, kwargs):
        timestep = float(kwargs["timestep"][0])
        if seen and seen[-1][0] == timestep:
            seen[-1][1] += 1
        else:
            seen.append([timestep, 0])

    handle = pipe.transformer.register_forward_pre_hook(note_step, with_kwargs=True)
    for index, block in enumerate(blocks):
        def wrapped(*args, _index=index, _forward=block.forward, **kwargs):
            step, branch = len(seen) - 1, seen[-1][1]
            if step in full or _index == len(blocks) - 1:
                cache[(branch, _index)] = _forward(*args, **kwargs)
            return cache[(branch, _index)]

        block.forward = wrapped
    return handle


def test_deepcache_runs_its_rules_steps_and_equals_a_reference_of_the_document(i2v, i2v_dir):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    settings, steps = deepcache.DeepCacheSettings(start=2, end=5, interval=2), 6
    full = full_steps_by_the_documents_rule(2, 5, 2, steps)
    assert full == [0, 1, 2, 4, 5]
    embeddings = i2v.encode(PROMPT, NEGATIVE)
    image = i2v.encode_image(picture(3))
    run = dict(image=image, height=image.height, width=image.width, num_frames=9, num_inference_steps=steps, seed=2)
    cached = i2v.decode(i2v.denoise(embeddings, deepcache=settings, **run)).numpy()
    assert i2v.last_run["transformer_evaluations"] == len(full) and i2v.last_run["skipped_steps"] == 1

    reference = HunyuanVideo15ImageToVideoPipeline.from_pretrained(i2v_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    deepcache_reference(reference, set(full))
    expected = reference(image=picture(3), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                         num_frames=9, output_type="np", generator=torch.Generator("cpu").manual_seed(2)).frames[0]
    assert np.abs(cached - expected).max() <= BOUND

    plain = i2v.decode(i2v.denoise(embeddings, **run)).numpy()
    assert np.abs(plain - cached).max() > 1e-3  # the cached step changed the video
    every_step = i2v.decode(i2v.denoise(embeddings, deepcache=deepcache.DeepCacheSettings(interval=1), **run)).numpy()
    assert i2v.last_run["skipped_steps"] == 0
    assert np.abs(every_step - plain).max() <= 1e-5  # caching disabled: the uncached run


def test_the_full_pipeline_node_matches_diffusers_image_to_video_with_deepcache(hunyuan_nodes, i2v_dir, i2v):
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    nodes, stubs = hunyuan_nodes
    image = torch.from_numpy(np.asarray(picture(4), np.float32) / 255)[None]  # ComfyUI's IMAGE [1, H, W, 3]
    frames, fps = nodes.HunyuanVideo15TPUPipeline().generate(
        PROMPT, NEGATIVE, width=36, height=28, num_frames=9, num_inference_steps=6, guidance_scale=6.0, seed=3,
        model_id=i2v_dir, precision="fp32", start_image=image, deepcache=True, deepcache_start=2, deepcache_end=5,
        deepcache_interval=2, unique_id="9")
    assert any("DeepCache: 5 of 6 steps ran in full" in text for text, _ in stubs.texts)
    reference = HunyuanVideo15ImageToVideoPipeline.from_pretrained(i2v_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    deepcache_reference(reference, {0, 1, 2, 4, 5})
    expected = reference(image=picture(4), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6,
                         num_frames=9, output_type="np", generator=torch.Generator("cpu").manual_seed(3)).frames[0]
    assert fps == 24 and np.abs(frames.numpy() - expected).max() <= BOUND


def test_the_sampler_refuses_bad_sizes_and_deepcache_settings_naming_the_fix(hunyuan_nodes):
    nodes, _ = hunyuan_nodes
    validate = nodes.HunyuanVideo15TPUSampler.VALIDATE_INPUTS
    assert "num_frames=120" in validate(width=1280, height=720, num_frames=120) and "121" in validate(num_frames=120)
    assert "width=1000" in validate(width=1000, height=720, num_frames=121)
    assert "end=3 is before start=11" in validate(deepcache_start=11, deepcache_end=3, deepcache_interval=4)


def test_switching_between_wan_and_hunyuanvideo_frees_the_first_ones_arrays(t2v, tiny_model_dir, manager):
    import jax

    wan = pack_module("pipeline").WanTPUPipeline(tiny_model_dir, precision="fp32")
    wan.text_encoder()
    wan_arrays = manager.owned_arrays()
    t2v.component("text_encoder")
    assert all(array.is_deleted() for array in wan_arrays)
    assert not {id(a) for a in wan_arrays} & {id(a) for a in jax.live_arrays()}
    assert all(str(key[0]).startswith("hunyuan_") for key in manager.cached_keys())
    hunyuan_arrays = manager.owned_arrays()
    wan.text_encoder()
    assert all(array.is_deleted() for array in hunyuan_arrays)
    assert [key[0] for key in manager.cached_keys()] == ["text_encoder"]


def test_with_the_splash_kernel_the_joint_attention_still_matches_diffusers(t2v, t2v_reference, manager,
                                                                            monkeypatch):
    """The double-stream blocks' attention on the Splash kernel (interpret mode), each prompt's text length
    as data: the frames equal diffusers' masked SDPA."""
    splash = pack_module("splash_attention")
    calls, kernel = [], splash.splash_attention

    def recording(query, key, value, **kwargs):
        calls.append((tuple(key.shape), kwargs.get("kv_lengths") is not None, kwargs.get("min_kv_len")))
        return kernel(query, key, value, **kwargs)

    monkeypatch.setattr(splash, "splash_attention", recording)
    manager.set_attention_backend("splash", splash_min_kv_len=1)
    try:
        frames = t2v.generate(PROMPT, NEGATIVE, seed=0, num_inference_steps=1, **VIDEO).numpy()
    finally:
        manager.set_attention_backend(None)
    video_tokens = 5 * 8 * 8
    joint = (2, 4, video_tokens + 729 + 256 + 1000, 8)  # [batch (CFG), heads, video + text tokens, head_dim]
    assert calls and all(call == (joint, True, video_tokens) for call in calls)  # the two blocks, traced once
    expected = t2v_reference(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, output_type="np",
                             generator=torch.Generator("cpu").manual_seed(0), **VIDEO).frames[0]
    assert np.abs(frames - expected).max() <= BOUND


def test_a_video_larger_than_a_tile_decodes_in_tiles_equal_to_diffusers_tiled_decode(t2v, t2v_reference, manager):
    """Tiles of several shapes (interior, edges, corner), one per device and call, blended by diffusers' own
    ``tiled_decode``: the frames equal diffusers' decode after ``enable_tiling`` with the same tile size."""
    vae_tiles = pack_module("models.hunyuan.vae_tiles")
    geometry = t2v.geometry
    latents = torch.from_numpy(np.random.default_rng(3).standard_normal(
        geometry.latent_shape(40, 48, 9)).astype(np.float32))  # 10x12 latent cells, 4-cell tiles every 3
    windows = vae_tiles.tile_windows(10, 12, 4)
    assert len(windows) == 16 and {w[2:] for w in windows} == {(4, 4), (4, 3), (1, 4), (1, 3)}
    statuses = []
    t2v.vae_tile_pixels = 16
    try:
        frames = t2v.decode(latents, on_status=statuses.append).numpy()
    finally:
        t2v.vae_tile_pixels = None
    assert vae_tiles.default_tile_pixels(None) == 256 and vae_tiles.default_tile_pixels(32 * 2**30) == 256
    assert vae_tiles.default_tile_pixels(16 * 2**30) == 128  # v5e
    assert frames.shape == (9, 40, 48, 3)
    assert any("tiles 1-8 of 9 at 16x16" in status for status in statuses)  # 9 interior tiles over 8 devices
    vae = t2v_reference.vae
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_latent_min_height=4,
                      tile_latent_min_width=4)
    try:
        with torch.no_grad():
            expected = vae.decode(latents, return_dict=False)[0]
    finally:
        vae.disable_tiling()
    expected = np.clip(expected[0].numpy() / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0)
    assert np.abs(frames - expected).max() <= BOUND
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    for frames_, cells in ((3, 4), (1, 6), (5, 1)):  # the vectorised mask is diffusers' row-by-row one
        assert torch.equal(vae_tiles.frame_causal_mask(frames_, cells, torch.float32, "cpu", 2),
                           HunyuanVideo15AttnBlock.prepare_causal_attention_mask(frames_, cells, torch.float32, "cpu", 2))
    blocks = [m for m in t2v.component("vae").module.modules() if hasattr(m, "prepare_causal_attention_mask")]
    assert blocks and all(m.prepare_causal_attention_mask is vae_tiles.frame_causal_mask for m in blocks)  # at load
    with pytest.raises(ValueError, match="tile_pixels=10: use a multiple of the VAE.s 4-pixel latent cell"):
        vae_tiles.TiledVAEDecoder(manager, None, None, 4, 10)


def test_the_replicated_out_layout_holds_fc2_and_the_output_projection_whole_and_equals_diffusers(
        t2v, t2v_dir, t2v_reference, manager):
    """The document's "fc2/proj replicated" sharding (opt-in): those weights whole on every device, the HBM plan
    counting exactly what each device holds, and the same frames."""
    memory = pack_module("models.hunyuan.memory")
    pipe = hunyuan.HunyuanVideoPipeline(t2v_dir, precision="fp32", layout="replicated_out")
    transformer = pipe.transformer()
    specs = transformer.plan.specs
    assert specs["transformer_blocks.0.attn.to_out.0.weight"] == ()
    assert specs["transformer_blocks.0.ff.net.2.weight"] == ()
    assert specs["transformer_blocks.0.ff_context.net.2.weight"] == (None, "tp")  # the text stream's stay split
    assert transformer.weights["transformer_blocks.0.ff.net.2.weight"].sharding.is_fully_replicated
    device = transformer.mesh.devices.flat[0]
    held = sum(shard.data.nbytes for array in transformer.weights.values() for shard in array.addressable_shards
               if shard.device == device)
    mesh_shape = dict(transformer.mesh.shape)
    assert memory.weights_bytes_per_device(transformer.config, mesh_shape, 4, "replicated_out") == held
    assert held > memory.weights_bytes_per_device(transformer.config, mesh_shape, 4, "tensor")
    frames = pipe.generate(PROMPT, NEGATIVE, seed=0, num_inference_steps=1, **VIDEO).numpy()
    assert pipe.last_run["layout"] == "replicated_out"
    expected = t2v_reference(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, output_type="np",
                             generator=torch.Generator("cpu").manual_seed(0), **VIDEO).frames[0]
    assert np.abs(frames - expected).max() <= BOUND
    assert t2v.transformer().plan.specs["transformer_blocks.0.ff.net.2.weight"] == (None, "tp")  # back: reloaded
