"""Wan 2.1 first-last-frame to video (FLF2V), the family that proves the seam: its class, its rules and one
optional end_image input on the image-to-video node. It equals diffusers' own WanImageToVideoPipeline with
``last_image``, through the core and through the nodes; a second run with new images compiles nothing."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, pack_module

families = pack_module("models.wan.families")
pipeline_mod = pack_module("pipeline")
tiny_wan = pack_module("tiny_wan")

PROMPT, NEGATIVE = "a red fox running through snow", "blurry, static"
BOUND = 1e-3  # the fp32 parity bound of every other family
VIDEO = TINY_VIDEO  # 5 frames, 2 latent frames: the last frame is the last of the second one's four


def picture(seed: int, size=(40, 56)):
    from PIL import Image

    pixels = np.random.default_rng(seed).random((*size, 3))
    return Image.fromarray((pixels * 255).astype(np.uint8))


def comfy_image(seed: int):
    return torch.from_numpy(np.asarray(picture(seed), np.float32) / 255)[None]  # ComfyUI's IMAGE


@pytest.fixture(scope="module")
def flf2v_dir(tmp_path_factory):
    return tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan21-flf2v", tiny_wan.TINY_FLF2V)


@pytest.fixture(scope="module")
def flf2v_diffusers(flf2v_dir):
    """diffusers' WanImageToVideoPipeline (fp32) with ``last_image``: frames(start_seed, end_seed, seed, prompt)."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(flf2v_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, flow_shift=3.0)

    def frames(start_seed, end_seed, seed, prompt=PROMPT):
        return pipe(image=picture(start_seed), last_image=picture(end_seed), prompt=prompt, negative_prompt=NEGATIVE,
                    num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="np", **VIDEO).frames[0]

    return frames


def test_the_core_matches_diffusers_with_a_last_image(flf2v_dir, flf2v_diffusers, manager):
    core = pipeline_mod.WanTPUPipeline(flf2v_dir, precision="fp32")
    assert core.family is families.WAN21_FLF2V  # read from the transformer's pos_embed_seq_len
    conditioning = core.encode_image(picture(1), end_image=picture(2), **VIDEO)
    assert conditioning.condition.shape == (1, 20, 2, 4, 6)
    mask = conditioning.condition[0, :4].numpy()  # the given frames: the first, and the last of the last latent frame
    assert mask[:, 0].min() == 1 and mask[:3, 1].max() == 0 and mask[3, 1].min() == 1
    assert conditioning.image_embeds.shape == (2, tiny_wan.TINY_CLIP_TOKENS, 32)  # both images through CLIP
    latents = core.denoise(core.encode(PROMPT, NEGATIVE), num_inference_steps=3, guidance_scale=5.0, seed=4,
                           flow_shift=3.0, image=conditioning, **VIDEO)
    frames = core.decode(latents).numpy()
    assert core.transformer().plan.unmatched == []  # the image position embedding has its rule too
    expected = flf2v_diffusers(1, 2, 4)
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).max() <= BOUND


def test_the_nodes_match_diffusers_and_new_images_compile_nothing(monkeypatch, flf2v_dir, flf2v_diffusers, manager):
    from comfy_stubs import ComfyStubs
    from conftest import load_pack

    comfy = ComfyStubs()
    comfy.install(monkeypatch)
    load_pack()
    nodes = pack_module("nodes")

    def run(start_seed, end_seed, seed):
        with torch.inference_mode():
            positive, negative = nodes.Wan21TextEncoder().encode(PROMPT, NEGATIVE, flf2v_dir, precision="fp32")
            (image,) = nodes.WanTPUImageToVideo().encode(comfy_image(start_seed), model_id=flf2v_dir,
                                                         precision="fp32", end_image=comfy_image(end_seed),
                                                         unique_id="9", **VIDEO)
            latents, _ = nodes.Wan21TPUSampler().sample(positive, negative, num_inference_steps=3, guidance_scale=5.0,
                                                        seed=seed, model_id=flf2v_dir, flow_shift=3.0,
                                                        precision="fp32", image=image, **VIDEO)
            frames, _ = nodes.Wan21TPUVAEDecoder().decode(latents, flf2v_dir, precision="fp32")
        return frames.numpy()

    first = run(3, 5, 1)
    assert np.abs(first - flf2v_diffusers(3, 5, 1)).max() <= BOUND
    assert [text for text, node in comfy.texts if node == "9"][-1].startswith("done: images encoded in ")
    compiles = manager.compile_count()
    second = run(6, 7, 2)
    assert manager.compile_count() == compiles
    assert np.abs(second - flf2v_diffusers(6, 7, 2)).max() <= BOUND


def test_the_end_image_is_asked_for_and_refused_where_it_does_not_belong(flf2v_dir, tiny_model_dir):
    flf2v = pipeline_mod.WanTPUPipeline(flf2v_dir, precision="fp32")
    with pytest.raises(ValueError, match="makes the video between two images: connect the end image too"):
        flf2v.encode_image(picture(0), **VIDEO)
    with pytest.raises(ValueError, match="num_frames=1: first-last-frame video needs at least 5 frames"):
        flf2v.encode_image(picture(0), end_image=picture(1), **dict(VIDEO, num_frames=1))
    with pytest.raises(ValueError, match="image-to-video model: give it the start image"):
        flf2v.denoise(flf2v.encode(PROMPT, NEGATIVE), num_inference_steps=2, **VIDEO)


def test_a_one_image_model_refuses_an_end_image(tmp_path):
    """Wan 2.1 I2V's folder differs from FLF2V's only in its transformer config: no image position embedding."""
    i2v = families.family_from_model_index(
        {"_class_name": "WanImageToVideoPipeline", "image_encoder": ["transformers", "CLIPVisionModel"]},
        "'some/model'", {"image_dim": 1280})
    assert i2v is families.WAN21_I2V and not i2v.takes_end_image
    image_module = pack_module("models.wan.image_encoding")

    class Components:
        source = type("Source", (), {"model_id": "some/i2v"})()

    with pytest.raises(ValueError, match="starts from one image: disconnect the end image, or use a first-last-frame"):
        image_module.check_images_wanted(Components(), i2v, picture(0))


def test_a_text_to_video_family_refuses_image_conditioning_with_the_fix():
    t2v = families.WAN21_T2V
    with pytest.raises(ValueError, match="Wan 2.1 T2V is a text-to-video model: it takes no image. Use an image-to"):
        t2v.video_to_encode(np.zeros((1, 3, 32, 48), np.float32), 5, None)
    with pytest.raises(ValueError, match="it takes no image"):
        t2v.condition_from_latents(np.zeros((1, 16, 2, 4, 6), np.float32))
    assert t2v.step_conditioning(None, None, (1, 16, 2, 4, 6), 2, "float32") is None
