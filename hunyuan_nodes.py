"""ComfyUI nodes for HunyuanVideo 1.5 (category TPU/HunyuanVideo): the same four-node shape as the Wan
nodes (text encoder, sampler, VAE decoder, full pipeline), delegating to
``models.hunyuan.pipeline.HunyuanVideoPipeline``. Its prompt encodings are four arrays per prompt (Qwen's
and ByT5's tokens and masks), so they travel as one ``HUNYUAN_TPU_EMBEDS`` value, not Wan's TENSOR pair.

The components share the pack's one cache (``TorchaxEnvManager``): loading HunyuanVideo frees a resident
Wan model first, and the reverse, so no Unload Models is needed between the two.
"""

from __future__ import annotations

import time

from .nodes import (HIDDEN, MAX_SEED, NEGATIVE_INPUT, OPTIONAL_DEVICE_INPUTS, PROMPT_INPUT, FramesOutput,
                    StepProgress, check_interrupted, decode_latents, status_reporter, validate_common)

CATEGORY = "TPU/HunyuanVideo"
DEFAULT_T2V = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v"
EMBEDS = "HUNYUAN_TPU_EMBEDS"

MODEL_ID = ("STRING", {"default": DEFAULT_T2V, "tooltip": "A HunyuanVideo 1.5 diffusers folder (or a folder name "
                       "under ComfyUI/models/diffusers, or a Hugging Face repo id): the 720p_t2v or 720p_i2v "
                       "one (480p too). Loaded once and kept on the device."})
VIDEO_INPUTS = {
    "width": ("INT", {"default": 1280, "min": 256, "max": 1920, "step": 16,
                      "tooltip": "Video width in pixels, a multiple of 16: 1280 for 720P, 848 for 480P."}),
    "height": ("INT", {"default": 720, "min": 256, "max": 1920, "step": 16,
                       "tooltip": "Video height in pixels, a multiple of 16: 720 for 720P, 480 for 480P."}),
    "num_frames": ("INT", {"default": 121, "min": 5, "max": 241, "step": 4,
                           "tooltip": "Frames to generate, 4n+1: 121 is 5 s at 24 fps."}),
    "num_inference_steps": ("INT", {"default": 50, "min": 1, "max": 200, "tooltip": "Denoising steps (50)."}),
    "guidance_scale": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                 "tooltip": "Classifier-free guidance: 6.0 for the 720P models; 1.0 runs the "
                                            "prompt alone (no negative prompt), twice as fast per step."}),
    "seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                     "tooltip": "Noise seed (diffusers' CPU generator)."}),
}
SAMPLING_INPUTS = {
    "flow_shift": ("FLOAT", {"default": 7.0, "min": 0.1, "max": 20.0, "step": 0.1,
                             "tooltip": "The flow-matching shift of the schedule: 7.0 for 720P (the folder's "
                                        "scheduler config), 5.0 is common for 480P."}),
    "start_image": ("IMAGE", {"tooltip": "Image-to-video folders only: the first frame (e.g. from Load Image), "
                                         "resized and center-cropped to width x height."}),
    "deepcache": ("BOOLEAN", {"default": False, "tooltip": "DeepCache: on cached steps run only the last "
                              "double-stream block on the deep blocks' output kept from the last full step. About "
                              "2x faster at 50 steps (the original's figure) and it changes the video a little. "
                              "Full steps: before deepcache_start, every deepcache_interval-th until "
                              "deepcache_end, and all after."}),
    "deepcache_start": ("INT", {"default": 11, "min": 1, "max": 200, "tooltip": "DeepCache: first step that may "
                                "be cached (11)."}),
    "deepcache_end": ("INT", {"default": 45, "min": 1, "max": 200, "tooltip": "DeepCache: steps from here on run "
                              "in full (45)."}),
    "deepcache_interval": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip": "DeepCache: between start and "
                                   "end, every n-th step runs in full (4)."}),
}
FPS_INPUT = ("INT", {"default": 24, "min": 1, "max": 120, "tooltip": "Frame rate passed on to the video node: "
                                                                    "HunyuanVideo 1.5 is trained at 24."})


def make_pipeline(model_id: str, precision: str = "bf16", dp: int = 0, tp: int = 0):
    from .models.hunyuan.pipeline import HunyuanVideoPipeline

    return HunyuanVideoPipeline(model_id, precision=precision, dp=dp or None, tp=tp or None)


def deepcache_settings(deepcache=False, deepcache_start=11, deepcache_end=45, deepcache_interval=4):
    if not deepcache:
        return None
    from .models.hunyuan.deepcache import DeepCacheSettings

    return DeepCacheSettings(int(deepcache_start), int(deepcache_end), int(deepcache_interval))


def validate_video(width=None, height=None, num_frames=None) -> str | bool:
    from .models.hunyuan.family import HunyuanGeometry

    error = HunyuanGeometry().video_size_error(*(None if v is None else int(v) for v in (height, width, num_frames)))
    return error or True


def validate_deepcache(deepcache_start=None, deepcache_end=None, deepcache_interval=None) -> str | bool:
    if None in (deepcache_start, deepcache_end, deepcache_interval):
        return True
    try:
        deepcache_settings(True, deepcache_start, deepcache_end, deepcache_interval)
    except ValueError as error:
        return str(error)
    return True


def sample(pipe, embeddings, unique_id, *, width, height, num_frames, num_inference_steps, guidance_scale, seed,
           flow_shift=7.0, start_image=None, **cache_inputs):
    """The sampler's work, shared with the full pipeline: the image's conditioning when given, then
    ``denoise`` with ComfyUI's progress, Cancel and progress text."""
    report = status_reporter(unique_id)
    image = None
    if start_image is not None:
        image = pipe.encode_image(start_image, height=height, width=width, on_status=report)
    progress = StepProgress(num_inference_steps, unique_id)
    started = time.perf_counter()
    latents = pipe.denoise(embeddings, height=height, width=width, num_frames=num_frames,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                           flow_shift=flow_shift, image=image, deepcache=deepcache_settings(**cache_inputs),
                           on_step=progress, on_status=progress.status)
    run = pipe.last_run
    if run["deepcache"]:
        progress.status(f"DeepCache: {run['transformer_evaluations']} of {run['steps']} steps ran in full")
    progress.status(f"done: {run['steps']} steps in {time.perf_counter() - started:.0f} s")
    return latents


class HunyuanVideo15TPUTextEncoder:
    DESCRIPTION = ("Encodes the prompt and negative prompt for HunyuanVideo 1.5 on the TPU, as diffusers does: "
                   "Qwen2.5-VL (the system prompt's template, 1000 tokens) and, for quoted text in the prompt, the "
                   "ByT5 glyph encoder. Both are split over all devices and kept for later runs.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeddings",)
    OUTPUT_TOOLTIPS = ("Both prompts' encodings, for the HunyuanVideo 1.5 TPU Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": PROMPT_INPUT, "negative_prompt": NEGATIVE_INPUT},
                "optional": {"model_id": MODEL_ID, **OPTIONAL_DEVICE_INPUTS}, "hidden": dict(HIDDEN)}

    @classmethod
    def VALIDATE_INPUTS(cls, model_id=None, precision=None, dp=None, tp=None):
        return validate_common(model_id, precision, dp, tp)

    def encode(self, prompt, negative_prompt, model_id=DEFAULT_T2V, precision="bf16", dp=0, tp=0, unique_id=None):
        check_interrupted()
        report, started = status_reporter(unique_id), time.perf_counter()
        embeddings = make_pipeline(model_id, precision, dp, tp).encode(prompt, negative_prompt, on_status=report)
        report(f"done: prompt encoded in {time.perf_counter() - started:.0f} s")
        return (embeddings,)


class HunyuanVideo15TPUSampler:
    DESCRIPTION = ("Denoises HunyuanVideo 1.5 latents on the TPU (text-to-video, or image-to-video with "
                   "start_image and an i2v folder): the transformer split over the (dp, tp) mesh, the prompt and "
                   "negative prompt as one batch. DeepCache is off by default. Progress and Cancel work every step.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "INT")
    RETURN_NAMES = ("latents", "num_frames")
    OUTPUT_TOOLTIPS = ("Video latent [1, 32, (frames-1)/4+1, height/16, width/16] in the VAE's space.",
                       "The number of frames.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeddings": (EMBEDS, {"tooltip": "From 'HunyuanVideo 1.5 Text Encoder (TPU)'."}),
                             **VIDEO_INPUTS},
                "optional": {"model_id": MODEL_ID, **SAMPLING_INPUTS, **OPTIONAL_DEVICE_INPUTS},
                "hidden": dict(HIDDEN)}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, num_frames=None, model_id=None, precision=None, dp=None,
                        tp=None, deepcache_start=None, deepcache_end=None, deepcache_interval=None):
        for result in (validate_video(width, height, num_frames), validate_common(model_id, precision, dp, tp),
                       validate_deepcache(deepcache_start, deepcache_end, deepcache_interval)):
            if result is not True:
                return result
        return True

    def sample(self, embeddings, width, height, num_frames, num_inference_steps, guidance_scale, seed,
               model_id=DEFAULT_T2V, precision="bf16", dp=0, tp=0, unique_id=None, **sampling):
        check_interrupted()
        pipe = make_pipeline(model_id, precision, dp, tp)
        latents = sample(pipe, embeddings, unique_id, width=width, height=height, num_frames=num_frames,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, **sampling)
        return ({"samples": latents}, num_frames)


class HunyuanVideo15TPUVAEDecoder(FramesOutput):
    DESCRIPTION = ("Decodes a HunyuanVideo 1.5 LATENT (from its TPU Sampler) into frames on the TPU. Connect "
                   "IMAGE to Create Video -> Save Video.")
    CATEGORY = CATEGORY
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latents": ("LATENT", {"tooltip": "From 'HunyuanVideo 1.5 TPU Sampler'."})},
                "optional": {"model_id": MODEL_ID, "fps": FPS_INPUT, **OPTIONAL_DEVICE_INPUTS},
                "hidden": dict(HIDDEN)}

    @classmethod
    def VALIDATE_INPUTS(cls, model_id=None, precision=None, dp=None, tp=None):
        return validate_common(model_id, precision, dp, tp)

    def decode(self, latents, model_id=DEFAULT_T2V, fps=24, precision="bf16", dp=0, tp=0, unique_id=None):
        return decode_latents(lambda: make_pipeline(model_id, precision, dp, tp), latents, fps, unique_id,
                              "the HunyuanVideo 1.5 TPU Sampler's LATENT output")


class HunyuanVideo15TPUPipeline(FramesOutput):
    DESCRIPTION = ("HunyuanVideo 1.5 in one node: text encoders, sampler and VAE decoder on the TPU, sharing the "
                   "loaded models with the separate nodes (a second run loads and compiles nothing).")
    CATEGORY = CATEGORY
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": PROMPT_INPUT, "negative_prompt": NEGATIVE_INPUT, **VIDEO_INPUTS},
                "optional": {"model_id": MODEL_ID, "fps": FPS_INPUT, **SAMPLING_INPUTS, **OPTIONAL_DEVICE_INPUTS},
                "hidden": dict(HIDDEN)}

    VALIDATE_INPUTS = HunyuanVideo15TPUSampler.VALIDATE_INPUTS

    def generate(self, prompt, negative_prompt, width, height, num_frames, num_inference_steps, guidance_scale,
                 seed, model_id=DEFAULT_T2V, fps=24, precision="bf16", dp=0, tp=0, unique_id=None, **sampling):
        check_interrupted()
        pipe = make_pipeline(model_id, precision, dp, tp)
        report, started = status_reporter(unique_id), time.perf_counter()
        embeddings = pipe.encode(prompt, negative_prompt, on_status=report)
        latents = sample(pipe, embeddings, unique_id, width=width, height=height, num_frames=num_frames,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, **sampling)
        frames = pipe.decode(latents, on_status=report)
        report(f"done: {frames.shape[0]} frames in {time.perf_counter() - started:.0f} s")
        return (frames, fps)


NODE_CLASS_MAPPINGS = {
    "HunyuanVideo15TPUTextEncoder": HunyuanVideo15TPUTextEncoder,
    "HunyuanVideo15TPUSampler": HunyuanVideo15TPUSampler,
    "HunyuanVideo15TPUVAEDecoder": HunyuanVideo15TPUVAEDecoder,
    "HunyuanVideo15TPUPipeline": HunyuanVideo15TPUPipeline,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HunyuanVideo15TPUTextEncoder": "HunyuanVideo 1.5 Text Encoder (TPU)",
    "HunyuanVideo15TPUSampler": "HunyuanVideo 1.5 TPU Sampler",
    "HunyuanVideo15TPUVAEDecoder": "HunyuanVideo 1.5 TPU VAE Decoder",
    "HunyuanVideo15TPUPipeline": "HunyuanVideo 1.5 TPU Full Pipeline",
}
