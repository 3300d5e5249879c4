"""Radial attention through the nodes and the command line: the Sampler's and Full Pipeline's opt-in
``attention`` input (with ``radial_dense_steps``, ``radial_dense_blocks``), the Sampler Settings node's, and
``--radial``.

The tiny model's node chain with attention='radial' equals diffusers' own pipeline whose self-attention takes
the same mask (``test_radial_pipeline.masked_self_attention``). The attention backend is the default one here
(XLA's attention with the whole mask on CPU): the block-sparse Splash kernel against the same reference is
test_radial_pipeline's.
"""

import os
import re

import numpy as np
import pytest
import torch

import test_nodes
from conftest import TINY_VIDEO, diffusers_wan_pipeline, pack_module
from test_radial_pipeline import (DENSE_BLOCKS, DENSE_STEPS, GUIDANCE, NEGATIVE, PROMPT, SEED, SHIFT, STEPS,
                                  masked_self_attention)

comfy, nodes = test_nodes.comfy, test_nodes.nodes  # the ComfyUI stand-ins, and the nodes as ComfyUI loads them
radial = pack_module("models.wan.radial")
latent_space = pack_module("models.wan.latents")

# 3 latent frames of 2 x 3 tokens: frames this small are subsampled in time, so frame 0's and frame 2's
# queries skip each other's keys (a mask of 8/9), and the VAE decodes in seconds.
VIDEO = dict(TINY_VIDEO, num_frames=9)
RADIAL = dict(attention="radial", radial_dense_steps=DENSE_STEPS, radial_dense_blocks=DENSE_BLOCKS)
BAD_DENSE_STEPS = "radial_dense_steps=-1: give a whole number >= 0 (the paper's: 12 steps, 1 block)"


@pytest.fixture(scope="module")
def masked_reference(tiny_model_dir):
    """The final latents (in the VAE's space) of diffusers' pipeline with the radial mask in every block but
    the first of every step but the first."""
    pipe = diffusers_wan_pipeline(tiny_model_dir, flow_shift=SHIFT)
    with masked_self_attention(pipe.transformer, radial.RadialPattern.for_video(**VIDEO), DENSE_STEPS,
                               DENSE_BLOCKS) as seen:
        latents = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **VIDEO).frames
    assert seen["masked"] == 2, seen  # block 1 of step 1, for the cond and the uncond forward
    return latent_space.to_vae_latents(latents.numpy(), pipe.vae.config.latents_mean, pipe.vae.config.latents_std)


def assert_masked(latents, expected):
    """``latents`` equal diffusers' masked run within test_radial_pipeline's bound."""
    scale = np.abs(expected).max()
    error = np.abs(np.asarray(latents) - expected).max()
    assert error <= 1e-4 * scale, (error, scale)


def validated(node, **inputs) -> dict:
    """``inputs`` after ComfyUI's check before the run: the node's VALIDATE_INPUTS, given the inputs its
    signature names, must accept them."""
    import inspect

    accepted = inspect.signature(node.VALIDATE_INPUTS).parameters
    assert node.VALIDATE_INPUTS(**{k: v for k, v in inputs.items() if k in accepted}) is True
    return inputs


def sampler_inputs(model, **overrides) -> dict:
    return dict(height=VIDEO["height"], width=VIDEO["width"], num_frames=VIDEO["num_frames"],
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, model_id=str(model), flow_shift=SHIFT,
                precision="fp32", unique_id="21", **overrides)


def test_the_node_chain_with_radial_attention_equals_diffusers_with_the_mask(nodes, comfy, tiny_model_dir,
                                                                              masked_reference):
    """Text Encoder -> Sampler (attention='radial'), run as ComfyUI runs them: checked first, every input a
    keyword, under inference mode. (The VAE Decoder does not see the attention; its parity is test_nodes'.)"""
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        positive, negative = nodes.Wan21TextEncoder().encode(
            **validated(nodes.Wan21TextEncoder, prompt=PROMPT, negative_prompt=NEGATIVE, model_id=str(tiny_model_dir),
                        precision="fp32"))
        latent, num_frames = nodes.Wan21TPUSampler().sample(
            positive, negative, **validated(nodes.Wan21TPUSampler, **sampler_inputs(tiny_model_dir, **RADIAL)))
    assert num_frames == VIDEO["num_frames"] and comfy.progress[-1] == (STEPS, STEPS)
    assert_masked(latent["samples"].numpy(), masked_reference)


def test_radial_with_every_step_dense_equals_dense_and_dense_is_not_the_masked_video(nodes, tiny_model_dir, manager,
                                                                                     masked_reference):
    """radial_dense_steps at the step count: every step dense, the same latents as attention='dense' and no
    radial program compiled; and the dense video is measurably not the masked one (so the test above sees
    the mask)."""
    with torch.inference_mode():
        positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, str(tiny_model_dir), precision="fp32")
        sampler = nodes.Wan21TPUSampler()
        dense, _ = sampler.sample(positive, negative, **sampler_inputs(tiny_model_dir, attention="dense"))
        before = manager.compile_count()
        all_dense, _ = sampler.sample(positive, negative, **validated(nodes.Wan21TPUSampler, **sampler_inputs(
            tiny_model_dir, attention="radial", radial_dense_steps=STEPS, radial_dense_blocks=0)))
        assert manager.compile_count() == before
    assert torch.equal(dense["samples"], all_dense["samples"])
    scale = np.abs(masked_reference).max()
    assert np.abs(dense["samples"].numpy() - masked_reference).max() > 5e-4 * scale


@pytest.mark.parametrize("node", ["Wan21TPUSampler", "Wan21TPUPipeline", "WanTPUSamplerSettings"])
@pytest.mark.parametrize("inputs, message", [
    (dict(attention="radial", radial_dense_steps=-1), BAD_DENSE_STEPS),
    (dict(attention="radial", radial_dense_blocks=-2), "radial_dense_blocks=-2: give a whole number >= 0"),
    (dict(attention="sparse"), "attention='sparse': use 'dense' (the default) or 'radial'"),
])
def test_bad_radial_inputs_are_refused_before_the_run_with_the_fix(nodes, node, inputs, message):
    node_class = nodes.NODE_CLASS_MAPPINGS[node]
    result = node_class.VALIDATE_INPUTS(**inputs)
    assert isinstance(result, str) and message in result, result
    if node != "WanTPUSamplerSettings":  # a connected settings node replaces them: these widgets are not used
        assert node_class.VALIDATE_INPUTS(**inputs, settings=None) is True
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            node_class().settings(**inputs)


def test_a_run_without_the_check_refuses_a_bad_dense_step_count_before_loading(nodes, tiny_model_dir, monkeypatch):
    """Outside ComfyUI (no check before the run) the core refuses it before any model loads."""
    loading = pack_module("loading")
    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: pytest.fail("a transformer loaded"))
    embeds = torch.zeros(1, 512, 32)
    with pytest.raises(ValueError, match=re.escape(BAD_DENSE_STEPS)):
        nodes.Wan21TPUSampler().sample(embeds, embeds, **sampler_inputs(tiny_model_dir, attention="radial",
                                                                        radial_dense_steps=-1))


def test_the_settings_node_carries_radial_to_the_core_and_wins_over_the_widgets(nodes, monkeypatch):
    """A settings node's attention and dense counts reach ``denoise`` in place of the Sampler's own widgets; not
    connected, the widgets do. (The core is a stand-in: no model runs.)"""
    calls = []

    class Core:
        last_run = {"steps": STEPS, "magcache": False}

        def denoise(self, embeddings, **kwargs):
            calls.append({name: kwargs[name] for name in RADIAL})
            return torch.zeros(1, 16, 2, 4, 6)

    monkeypatch.setattr(nodes, "make_pipeline", lambda *args, **kwargs: Core())
    settings_inputs = dict(RADIAL, radial_dense_steps=3, radial_dense_blocks=2)
    assert nodes.WanTPUSamplerSettings.VALIDATE_INPUTS(**settings_inputs) is True
    (settings,) = nodes.WanTPUSamplerSettings().settings(**settings_inputs)
    embeds = torch.zeros(1, 512, 32)
    for given in (settings, None):
        nodes.Wan21TPUSampler().sample(embeds, embeds, 32, 48, 5, STEPS, 5.0, 0, "m", 3.0, settings=given,
                                       attention="dense", radial_dense_steps=7, radial_dense_blocks=0)
    assert calls == [settings_inputs, dict(attention="dense", radial_dense_steps=7, radial_dense_blocks=0)]


def test_the_new_inputs_come_after_every_existing_widget(nodes):
    """Saved workflows match widgets by position: the radial inputs are the Sampler's, Full Pipeline's and
    Settings node's last widgets, with the defaults the core uses."""
    from test_examples import expected_widgets

    for node_id in ("Wan21TPUSampler", "Wan21TPUPipeline", "WanTPUSamplerSettings"):
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert [name for name, _ in expected_widgets(node)][-3:] == list(RADIAL), node_id
        spec = node.INPUT_TYPES()["optional"]
        assert [spec[name][1]["default"] for name in RADIAL] == ["dense", radial.DENSE_STEPS, radial.DENSE_BLOCKS]
    tooltip = nodes.Wan21TPUSampler.INPUT_TYPES()["optional"]["attention"][1]["tooltip"]
    assert "CHANGES the video" in tooltip and "not measured here" in tooltip and "second step program" in tooltip


# ---------------------------------------------------------------------------------------- the command line
cli = pack_module("cli")


def test_the_command_line_passes_radial_through(tmp_path, tiny_model_dir, masked_reference, monkeypatch):
    """--radial with its counts reaches the core, whose latents are diffusers' masked ones (the frames are not
    decoded: the decoder does not see the attention, and compiling it would double this file's time)."""
    pipeline = pack_module("pipeline")
    calls, denoise = [], pipeline.WanTPUPipeline.denoise

    def spy(self, embeddings, **kwargs):
        calls.append({name: kwargs[name] for name in RADIAL})
        latents = denoise(self, embeddings, **kwargs)
        calls[-1]["latents"] = latents
        return latents

    monkeypatch.setattr(pipeline.WanTPUPipeline, "denoise", spy)
    monkeypatch.setattr(pipeline.WanTPUPipeline, "decode",
                        lambda self, latents, on_status=None: torch.zeros(VIDEO["num_frames"], 32, 48, 3))
    output = tmp_path / "radial.mp4"
    cli.main([PROMPT, "--negative-prompt", NEGATIVE, "--model", str(tiny_model_dir), "--precision", "fp32",
              "--radial", "--radial-dense-steps", str(DENSE_STEPS), "--radial-dense-blocks", str(DENSE_BLOCKS),
              "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", str(SEED), "--flow-shift", str(SHIFT),
              "--frames", str(VIDEO["num_frames"]), "--height", str(VIDEO["height"]), "--width", str(VIDEO["width"]),
              "--output", str(output)])
    assert os.path.getsize(output) > 0
    (call,) = calls
    assert_masked(call.pop("latents").numpy(), masked_reference)
    assert call == RADIAL
    args = cli.parse_args(["--tiny"])
    assert (args.radial, args.radial_dense_steps, args.radial_dense_blocks) == (False, None, None)  # core defaults


@pytest.mark.parametrize("argv, message", [
    (["--radial", "--radial-dense-steps", "-1"], "--radial-dense-steps=-1: give a whole number >= 0"),
    (["--radial-dense-steps", "3"], "--radial-dense-steps only apply with --radial: add --radial or leave them out"),
])
def test_the_command_line_refuses_bad_radial_flags_with_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--tiny", *argv])
    assert message in capsys.readouterr().err

