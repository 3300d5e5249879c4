"""Model families on the one core: Wan 2.2 T2V A14B (two experts) equals diffusers' WanPipeline;
families the pack does not run yet are refused with a message."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, diffusers_wan_pipeline, pack_module

families = pack_module("models.wan.families")
pipeline_mod = pack_module("pipeline")

PROMPT, NEGATIVE = "a robot dancing in the rain", "blurry, static"


@pytest.fixture(scope="module")
def a14b_diffusers(a14b_dir):
    pipe = diffusers_wan_pipeline(a14b_dir)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.6
    return pipe


@pytest.mark.parametrize("seed", [0, 7])
def test_two_experts_with_their_own_guidance_match_diffusers(a14b_dir, a14b_diffusers, manager, seed):
    core = pipeline_mod.WanTPUPipeline(a14b_dir, precision="fp32")
    assert core.family.two_experts and core.family.boundary_ratio == 0.6
    embeddings = core.encode(PROMPT, NEGATIVE)
    latents = core.denoise(embeddings, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=2.5, seed=seed,
                           flow_shift=3.0, **TINY_VIDEO)
    frames = core.decode(latents).numpy()
    assert 0 < core.last_run["low_noise_expert_steps"] < 4  # the boundary is crossed within the run
    pipe = a14b_diffusers
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                    guidance_scale_2=2.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                    **TINY_VIDEO).frames[0]
    assert np.abs(frames - expected).max() <= 1e-3


def test_both_experts_stay_resident_and_share_one_compiled_step(a14b_dir, manager):
    core = pipeline_mod.WanTPUPipeline(a14b_dir, precision="fp32")
    embeddings = core.encode(PROMPT, NEGATIVE)
    core.denoise(embeddings, num_inference_steps=4, guidance_scale=5.0, seed=1, flow_shift=3.0, **TINY_VIDEO)
    kinds = {key[0] for key in manager.cached_keys()}
    assert {"transformer", "transformer_2"} <= kinds
    before = manager.compile_count()
    core.denoise(embeddings, num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=3.0, seed=2, flow_shift=5.0,
                 **TINY_VIDEO)
    assert manager.compile_count() == before
    assert not core.transformer("transformer_2").compiled_steps  # the first expert's program ran both


def test_switching_to_a_one_expert_model_frees_the_second_expert(a14b_dir, tiny_model_dir, manager):
    core = pipeline_mod.WanTPUPipeline(a14b_dir, precision="fp32")
    core.experts()
    second = core.transformer("transformer_2")
    other = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")
    other.transformer()
    assert "transformer_2" not in {key[0] for key in manager.cached_keys()}
    assert all(array.is_deleted() for array in second.weights.values())


def test_guidance_scale_2_is_refused_for_a_one_expert_model(tiny_model_dir):
    core = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")
    embeddings = core.encode(PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="guidance_scale_2=3.0 is for two-expert models"):
        core.denoise(embeddings, num_inference_steps=2, guidance_scale_2=3.0, **TINY_VIDEO)


@pytest.mark.parametrize("model_index, message", [
    ({"_class_name": "WanImageToVideoPipeline", "image_encoder": [None, None]}, "without a CLIP image encoder"),
    ({"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"],
      "boundary_ratio": 0.9, "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "no Wan release has"),
    ({"_class_name": "WanImageToVideoPipeline", "expand_timesteps": True,
      "image_encoder": ["transformers", "CLIPVisionModel"]}, "expanded timesteps"),
    ({"_class_name": "QwenImagePipeline"}, "not a Wan pipeline"),
    ({"_class_name": "WanPipeline", "expand_timesteps": True, "boundary_ratio": 0.9,
      "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "expanded timesteps \\(Wan 2.2 TI2V 5B\\)"),
    ({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "no boundary_ratio"),
])
def test_folders_no_wan_release_has_are_refused_with_what_to_use(model_index, message):
    with pytest.raises(ValueError, match=message):
        families.family_from_model_index(model_index, "'some/model'")


def test_family_detection():
    assert families.family_from_model_index({"_class_name": "WanPipeline", "transformer_2": [None, None]}) is \
        families.WAN21_T2V
    a14b = families.family_from_model_index({"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                                             "transformer_2": ["diffusers", "WanTransformer3DModel"]})
    assert a14b.experts == ("transformer", "transformer_2")
    assert [a14b.expert_for(t) for t in (999, 875, 874.9, 0)] == [0, 0, 1, 1]


def test_the_hbm_plan_counts_both_experts():
    memory_plan = pack_module("memory_plan")
    one = memory_plan.plan_memory("14B", (2, 4), 720, 1280, 81, hbm_bytes=32 * 2**30)
    two = memory_plan.plan_memory("14B", (2, 4), 720, 1280, 81, hbm_bytes=32 * 2**30, experts=2)
    assert two.second_expert_weights_bytes == one.transformer_weights_bytes > 0
    assert two.peak_bytes == one.peak_bytes + one.transformer_weights_bytes
    assert "low-noise transformer" in two.summary()
    on_one_v5e = memory_plan.plan_memory("14B", (1, 1), 720, 1280, 81, hbm_bytes=16 * 2**30, experts=2)
    with pytest.raises(memory_plan.HBMPlanError):
        on_one_v5e.check()


def test_the_nodes_run_a_two_expert_model_with_guidance_scale_2(monkeypatch, a14b_dir, a14b_diffusers):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    ComfyStubs().install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, a14b_dir, precision="fp32")
        latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=4, guidance_scale=5.0,
                                                    seed=3, model_id=a14b_dir, flow_shift=3.0, precision="fp32",
                                                    guidance_scale_2=2.5, **TINY_VIDEO)
        frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, a14b_dir, precision="fp32")
    pipe = a14b_diffusers
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                    guidance_scale_2=2.5, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                    **TINY_VIDEO).frames[0]
    assert np.abs(frames.numpy() - expected).max() <= 1e-3
