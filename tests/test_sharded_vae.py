"""The VAE split over space: every device decodes (and encodes) a strip of each frame, and the frames equal
diffusers' own AutoencoderKLWan on every mesh."""

import numpy as np
import pytest
import torch
from conftest import pack_module

sharding = pack_module("sharding")
pipeline_mod = pack_module("pipeline")
vae_chunks = pack_module("sampling.vae_chunks")

SPLIT_VIDEO = dict(height=64, width=128, num_frames=5)  # latent 8x16: width splits 8 ways, height 4 or 8 ways


@pytest.mark.parametrize("mesh, latent, expected", [
    ({"dp": 2, "tp": 4}, (90, 160), (None, ("dp", "tp"), 8)),  # 1280x720: width over all 8
    ({"dp": 1, "tp": 8}, (60, 104), (None, ("dp", "tp"), 8)),  # 832x480
    ({"dp": 2, "tp": 4}, (60, 106), ("tp", "dp", 8)),  # 848x480: 60 rows over 4, 106 columns over 2
    ({"dp": 1, "tp": 8}, (60, 106), (None, None, 1)),  # nothing divides: whole on every device
    ({"dp": 1, "tp": 1}, (90, 160), (None, None, 1)),
])
def test_the_split_takes_as_many_devices_as_divide_the_frame(mesh, latent, expected):
    assert sharding.spatial_split(mesh, *latent) == expected


@pytest.fixture(scope="module")
def diffusers_vae(tiny_model_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tiny_model_dir, subfolder="vae", torch_dtype=torch.float32).eval()


def vae_on_mesh(manager, model_dir, dp, tp):
    """The pack's VAE decoder and encoder on a (dp, tp) mesh of the first dp * tp devices, weights placed
    as the pipeline places them (a (1, 1) mesh is one device: nothing to split)."""
    env_manager, loading = pack_module("env_manager"), pack_module("loading")
    mesh = env_manager.build_mesh(manager.jax.devices()[: dp * tp], dp, tp)
    module = loading.load_vae(loading.resolve_model_source(model_dir))
    decoder, encoder = vae_chunks.VAEChunkDecoder(manager, module, mesh), vae_chunks.VAEChunkEncoder(
        manager, module, mesh)
    weights, _ = pack_module("runtime.placement").place_weights(manager, module, sharding.VAE_RULES, mesh, "VAE")
    return decoder, encoder, weights, mesh.devices.flat[0]


# 9 frames on (2, 4) run all three decode programs (first, second, steady latent frame); 5 frames the first two.
@pytest.mark.parametrize("dp, tp, num_frames", [(2, 4, 9), (1, 8, 5), (1, 1, 5)])
def test_split_decode_and_encode_equal_diffusers_on_every_mesh(tiny_model_dir, diffusers_vae, manager, dp, tp,
                                                               num_frames):
    decoder, encoder, weights, device = vae_on_mesh(manager, tiny_model_dir, dp, tp)
    video = dict(SPLIT_VIDEO, num_frames=num_frames)
    latents = torch.randn(pack_module("models.wan.latents").WAN21.latent_shape(**video), generator=torch.Generator().manual_seed(dp + tp))
    frames = decoder.decode(weights, latents.numpy(), device=device)
    with torch.no_grad():
        video = diffusers_vae.decode(latents).sample  # [1, 3, F, H, W] in [-1, 1]
    expected = (video[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1).numpy()
    assert frames.shape == expected.shape == (num_frames, 64, 128, 3)
    assert np.abs(frames - expected).max() <= 1e-4

    chunk, devices = (1, 16, 1, 8, 16), dp * tp
    if devices > 1:  # the latent's 16 columns split over every device
        assert decoder.input_sharding(chunk).spec[-1] == ("dp", "tp")
        assert decoder.input_sharding(chunk).shard_shape(chunk) == (1, 16, 1, 8, 16 // devices)

    clip = video.clamp(-1, 1).numpy()
    means = encoder.encode(weights, clip, device=device)
    with torch.no_grad():
        expected_means = diffusers_vae.encode(torch.from_numpy(clip)).latent_dist.mode().numpy()
    assert means.shape == expected_means.shape == (1, 16, (num_frames - 1) // 4 + 1, 8, 16)
    assert np.abs(means - expected_means).max() <= 1e-4
    for array in {id(a): a for a in weights.values()}.values():
        array.delete()


def test_end_to_end_on_a_1x8_mesh_with_the_vae_split(tiny_model_dir, diffusers_frames, manager):
    core = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32", dp=1, tp=8)
    video = dict(height=64, width=128, num_frames=5)
    frames = core.generate("a cat playing piano", "blurry", num_inference_steps=3, guidance_scale=5.0, seed=4,
                           flow_shift=3.0, **video).numpy()
    expected = diffusers_frames("a cat playing piano", "blurry", 4, 5.0, 3, **video)
    assert np.abs(frames - expected).max() <= 1e-3
