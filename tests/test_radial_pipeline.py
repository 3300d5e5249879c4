"""Radial attention through the pipeline: the tiny model's encode -> denoise with ``attention="radial"`` (the
block-sparse Splash kernel in interpret mode) equals diffusers' own pipeline whose self-attention takes the
same mask (``radial.token_mask``) where the run is sparse: every block but the first, every step after the
dense ones. Choosing radial compiles its second step program once; switching back compiles nothing. (Not in
the nodes yet: on v6e the sparse kernel is still slower than the dense one.)"""

import contextlib

import numpy as np
import pytest
import torch

from conftest import diffusers_wan_pipeline, pack_module

radial = pack_module("models.wan.radial")
step_program = pack_module("sampling.step_program")

# 3 latent frames of 16 x 16 tokens: frame 0's queries keep only a band (|l - k| <= 128) of frame 2's keys
# (frame 0 is every query's sink, and frames 1 apart are whole), so the mask is not full even on the tiny model.
VIDEO = dict(height=256, width=256, num_frames=9)
STEPS, DENSE_STEPS, DENSE_BLOCKS = 2, 1, 1
PROMPT, NEGATIVE, SEED, GUIDANCE, SHIFT = "a red fox running through snow", "blurry", 4, 5.0, 3.0


def test_the_pattern_of_the_tiny_video_is_sparse():
    pattern = step_program.radial_pattern((1, 16, 3, 32, 32), {"patch_size": (1, 2, 2)})
    assert (pattern.num_frames, pattern.tokens_per_frame) == (3, 256)
    share = radial.token_mask(pattern).mean()
    assert 0.95 < share < 0.98, share  # frame 0's queries keep a band of frame 2's keys; the rest is whole


@contextlib.contextmanager
def masked_self_attention(transformer, pattern, dense_steps, dense_blocks, cfg=True):
    """diffusers' Wan attention with ``pattern``'s mask on self-attention in block >= ``dense_blocks`` of every
    step >= ``dense_steps`` (diffusers runs the cond and uncond halves as two forwards per step)."""
    from diffusers.models.transformers import transformer_wan

    mask = torch.from_numpy(radial.token_mask(pattern))
    original = transformer_wan.dispatch_attention_fn
    seen = {"forwards": 0, "blocks": 0, "masked": 0}

    def count_forward(module, args, kwargs):
        seen["forwards"] += 1
        seen["blocks"] = 0

    def attend(query, key, value, attn_mask=None, **kwargs):  # [B, S, H, D]
        if query.shape[1] == key.shape[1] == pattern.num_tokens:
            block, seen["blocks"] = seen["blocks"], seen["blocks"] + 1
            step = (seen["forwards"] - 1) // (2 if cfg else 1)
            if block >= dense_blocks and step >= dense_steps:
                assert attn_mask is None
                seen["masked"] += 1
                out = torch.nn.functional.scaled_dot_product_attention(
                    query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask)
                return out.transpose(1, 2)
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    hook = transformer.register_forward_pre_hook(count_forward, with_kwargs=True)
    transformer_wan.dispatch_attention_fn = attend
    try:
        yield seen
    finally:
        transformer_wan.dispatch_attention_fn = original
        hook.remove()


def test_radial_attention_equals_diffusers_with_the_mask_and_switching_back_compiles_nothing(
        manager, tiny_model_dir, monkeypatch):
    pattern = radial.RadialPattern.for_video(**VIDEO)
    pipe = diffusers_wan_pipeline(tiny_model_dir, flow_shift=SHIFT)
    with masked_self_attention(pipe.transformer, pattern, DENSE_STEPS, DENSE_BLOCKS) as seen:
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED),
                        output_type="latent", **VIDEO).frames
    # Cond and uncond per step; the mask in block 1 of step 1 (of 0-1), for each half.
    assert seen["forwards"] == 2 * STEPS and seen["masked"] == 2, seen

    ours_pipe = pack_module("pipeline").WanTPUPipeline(tiny_model_dir, precision="fp32")
    embeddings = ours_pipe.encode(PROMPT, NEGATIVE)

    def sample(attention):
        return ours_pipe.denoise(embeddings, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                                 flow_shift=SHIFT, attention=attention, radial_dense_steps=DENSE_STEPS,
                                 radial_dense_blocks=DENSE_BLOCKS, **VIDEO)

    splash = pack_module("splash_attention")
    visits = []
    real_frame_plan = splash.frame_plan
    monkeypatch.setattr(splash, "frame_plan", lambda *a, **k: visits.append(a) or real_frame_plan(*a, **k))
    manager.set_attention_backend("splash", splash_min_kv_len=1)  # the kernels, in interpret mode
    try:
        dense = sample("dense")
        before = manager.compile_count()
        ours = sample("radial")
        radial_compiles = manager.compile_count() - before
        before = manager.compile_count()
        again = sample("dense")
        assert manager.compile_count() == before  # switching back compiles nothing
    finally:
        manager.set_attention_backend(None)
    assert visits, "the radial step never reached the frame-banded kernels"
    assert visits[0][1] == splash.FrameBlocks()  # the path sparse_block_sizes chooses where it runs
    assert radial_compiles == 1, radial_compiles  # one more step program, nothing else
    assert torch.equal(dense, again)
    # ``denoise`` returns the VAE's space (``to_vae_latents``); diffusers' latent output is the transformer's.
    latent_space = pack_module("models.wan.latents")
    expected_vae_space = torch.from_numpy(latent_space.to_vae_latents(
        expected.numpy(), pipe.vae.config.latents_mean, pipe.vae.config.latents_std))
    scale = expected_vae_space.abs().max().item()
    assert np.abs(ours.numpy() - expected_vae_space.numpy()).max() <= 1e-4 * scale
    # ...and radial really changed the video against dense.
    assert np.abs(ours.numpy() - dense.numpy()).max() > 5e-4 * scale  # measured 1.3e-3; parity 1.6e-6


def test_a_bad_attention_setting_is_named_with_the_fix():
    radial_steps = step_program.radial_steps
    with pytest.raises(ValueError, match="attention='sparse': use 'dense' \\(the default\\) or 'radial'"):
        radial_steps("sparse", 4, None, None)
    with pytest.raises(ValueError, match="radial_dense_steps=-1: give a whole number >= 0 \\(the paper's: 12 steps"):
        radial_steps("radial", 4, -1, None)
    assert radial_steps("radial", 4, 2, None) == (["dense", "dense", "radial", "radial"], 1)
    assert radial_steps("dense", 4, 2, 3) == (None, 0)
