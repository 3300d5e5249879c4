"""The core on torchax equals diffusers' own PyTorch pipeline on the tiny model."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, lowered_tiny_cfg_step, pack_module

pipeline_mod = pack_module("pipeline")
sharding = pack_module("sharding")
env_manager = pack_module("env_manager")
loading = pack_module("loading")


@pytest.fixture(scope="module")
def core(tiny_model_dir, manager):
    manager.release()
    manager.set_attention_backend(None)
    return pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32")


def _transformer_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 2, 4, 6, generator=generator)
    timestep = torch.tensor([999.0, 420.0])
    context = torch.randn(2, 512, 32, generator=generator)
    return hidden, timestep, context


def transformer_forward_on_mesh(manager, model_dir, mesh):
    """(ours, pytorch) outputs of one transformer forward pass with weights sharded on ``mesh``."""
    import jax

    source = loading.resolve_model_source(model_dir)
    reference_module = loading.load_transformer(source, "fp32")
    hidden, timestep, context = _transformer_inputs()
    with torch.no_grad():
        expected = reference_module(hidden, timestep, context, return_dict=False)[0].numpy()
    module = loading.load_transformer(source, "fp32")
    weights, plan = pack_module("runtime.placement").place_weights(manager, module, sharding.TRANSFORMER_RULES, mesh, "transformer")

    @jax.jit
    def forward(weights, hidden, timestep, context):
        return pack_module("runtime.torch_bridge").call_transformer(manager, module, weights, mesh, hidden, timestep, context)

    actual = np.asarray(forward(weights, hidden.numpy(), timestep.numpy(), context.numpy()))
    return actual, expected, weights, plan


@pytest.mark.parametrize("device_count", [8, 1])
def test_transformer_forward_matches_pytorch_on_mesh(manager, tiny_model_dir, device_count):
    import jax

    mesh = env_manager.build_mesh(jax.devices()[:device_count])
    actual, expected, _, plan = transformer_forward_on_mesh(manager, tiny_model_dir, mesh)
    assert plan.unmatched == []
    assert np.abs(actual - expected).max() <= 1e-4


def test_transformer_weights_follow_their_rules_on_the_2x4_mesh(manager, tiny_model_dir):
    import re

    import jax
    from jax.sharding import PartitionSpec

    mesh = env_manager.build_mesh(jax.devices())
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    _, _, weights, plan = transformer_forward_on_mesh(manager, tiny_model_dir, mesh)
    assert plan.unmatched == [] and plan.indivisible == []
    split = 0
    for name, array in weights.items():
        rule = next(spec for pattern, spec in sharding.TRANSFORMER_RULES if re.fullmatch(pattern, name))
        assert array.sharding.mesh.shape == mesh.shape
        assert array.sharding.spec == PartitionSpec(*rule), name
        split += bool(rule)
        if rule:  # really split: each device holds a quarter along the tp dim
            dim = next(i for i, axis in enumerate(rule) if axis == "tp")
            assert array.addressable_shards[0].data.shape[dim] == array.shape[dim] // 4
    assert split >= 6 * 2  # q, k, v, out and the FFN of every block


def test_every_text_encoder_and_vae_parameter_has_a_rule(core):
    assert core.text_encoder().plan.unmatched == []
    assert core.vae().plan.unmatched == []
    ids = core.text_encoder().weights
    assert ids["shared.weight"].sharding.spec[0] == ("dp", "tp")


def test_indivisible_dims_fall_back_to_replication():
    plan = sharding.plan_shardings(
        {"blocks.0.attn1.to_q.weight": (12, 12), "mystery.weight": (4,)}, sharding.TRANSFORMER_RULES,
        {"dp": 2, "tp": 8},
    )
    assert plan.specs["blocks.0.attn1.to_q.weight"] == ()
    assert plan.indivisible == ["blocks.0.attn1.to_q.weight[0]=12 over tp"]
    assert plan.unmatched == ["mystery.weight"]


def test_text_encoder_matches_diffusers_encode_prompt(core, diffusers_frames):
    pipe = diffusers_frames.pipe
    prompt, negative = "a cat playing piano in a jazz club", "blurry, low quality"
    with torch.no_grad():
        expected, expected_negative = pipe.encode_prompt(
            prompt, negative, do_classifier_free_guidance=True, max_sequence_length=512
        )
    embeds = core.encode(prompt, negative)
    assert embeds.prompt_embeds.shape == (1, 512, 32)
    np.testing.assert_allclose(embeds.prompt_embeds.numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(embeds.negative_prompt_embeds.numpy(), expected_negative.numpy(), atol=1e-5)
    length = int((np.abs(expected.numpy()[0]).sum(-1) > 0).sum())
    assert 0 < length < 512 and not embeds.prompt_embeds[0, length:].any()  # padding is zero


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_end_to_end_matches_diffusers_wan_pipeline(core, diffusers_frames, seed, guidance_scale):
    prompt, negative = "a red fox running through snow", "blurry"
    expected = diffusers_frames(prompt, negative, seed, guidance_scale, 4)
    frames = core.generate(
        prompt, negative, num_inference_steps=4, guidance_scale=guidance_scale, seed=seed, flow_shift=3.0,
        **TINY_VIDEO,
    )
    assert frames.dtype == torch.float32 and tuple(frames.shape) == (5, 32, 48, 3)
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert np.abs(frames.numpy() - expected).max() <= 1e-3


def test_second_run_at_the_same_shape_compiles_nothing(core, manager):
    core.generate("a robot dancing", "ugly", num_inference_steps=3, guidance_scale=5.0, seed=1, flow_shift=3.0,
                  **TINY_VIDEO)
    before = manager.compile_count()
    core.generate("the quick brown fox", "static", num_inference_steps=6, guidance_scale=3.5, seed=123,
                  flow_shift=5.0, **TINY_VIDEO)
    assert manager.compile_count() == before


def test_cfg_pair_is_one_batch_split_over_dp(core):
    lowered = lowered_tiny_cfg_step(core, "tensor")
    transformer = core.transformer()
    # The transformer's input is the (cond, uncond) batch of 2, constrained to split over dp.
    constraints = [line for line in lowered.splitlines() if "sharding_constraint" in line and "tensor<2x16x" in line]
    assert constraints and all('[{"dp"}, {}, {}, {}, {}]' in line for line in constraints)
    assert dict(transformer.mesh.shape) == {"dp": 2, "tp": 4}
