"""ComfyUI nodes: declare, validate, delegate to ``pipeline.WanTPUPipeline``.

Node ids, display names, input names, the required/optional split, widget
order and return types and names are the original pack's (yangwhale/
gpu-tpu-pedia, ComfyUI-Wan2.1-TPU), so its saved workflows (widgets matched by
position) and API prompts (inputs matched by name) run unchanged. Inputs this
pack added (precision, mesh) are optional and come after the original widgets.

Nodes keep no instance state: the loaded, sharded, compiled components live in
``TorchaxEnvManager``'s cache and are shared by every node (one copy in HBM).
Outside ComfyUI the ComfyUI hooks (progress bar, Cancel, progress text) are
simply absent, so the nodes run in plain Python too.
"""

from __future__ import annotations

import logging
import os
import time

from . import loading, sampler_settings
from .env_manager import TorchaxEnvManager
from .lora import EXPERTS as LORA_EXPERTS
from .models.wan.modules import PRECISIONS
from .models.wan.radial import DENSE_BLOCKS, DENSE_STEPS

logger = logging.getLogger("wan_tpu")

CATEGORY = "TPU/Wan2.1"
DEFAULT_PROMPT = "A cat playing piano in a jazz club, warm cinematic lighting, smooth camera motion"
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, static, worst quality, jpeg artifacts, deformed, extra fingers, "
    "overexposed, subtitles, watermark"
)
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# --------------------------------------------------------------- input specs
MODEL_ID = (
    "STRING",
    {
        "default": loading.DEFAULT_MODEL_ID,
        "tooltip": "Hugging Face repo id (Wan-AI/Wan2.1-T2V-14B-Diffusers or -1.3B-Diffusers), a local diffusers "
        "folder, or a folder name under ComfyUI/models/diffusers. Loaded once and kept on the device.",
    },
)
OPTIONAL_DEVICE_INPUTS = {
    "precision": (
        list(PRECISIONS),
        {"default": "bf16", "tooltip": "Weights and activations of the text encoder and transformer. bf16 halves "
                                       "memory and is what the TPU runs fastest. fp32 stores fp32 and asks XLA for "
                                       "full-precision matmuls (on TPU its default would multiply fp32 in bf16 "
                                       "passes); it is for comparing with PyTorch. The VAE always runs in fp32."},
    ),
    "dp": ("INT", {"default": 0, "min": 0, "max": 256,
                   "tooltip": "Data-parallel mesh axis (cond/uncond split). 0 = automatic: 2 on an even device count."}),
    "tp": ("INT", {"default": 0, "min": 0, "max": 256,
                   "tooltip": "Tensor-parallel mesh axis (weights split). 0 = automatic: the remaining devices."}),
}
# Fewer transformer evaluations (after the original widgets and precision/dp/tp).
STEP_INPUTS = {
    "sampler": (["unipc", "euler"], {"default": "unipc", "tooltip": "unipc: Wan's own scheduler (the original's). "
                "euler: flow-matching Euler, what step-distilled LoRAs (lightx2v and the like) are used with, "
                "typically 4-8 steps at guidance_scale 1.0. flow_shift is its shift."}),
    "timesteps": ("STRING", {"default": "", "tooltip": "Euler only, optional: explicit timesteps such as "
                  "1000,750,500,250; their count must equal num_inference_steps. Empty: evenly spaced."}),
    "magcache": ("BOOLEAN", {"default": False, "tooltip": "MagCache: skip the transformer on steps whose output "
                 "the model's magnitude ratios predict, reusing the last residual (about 1.5-2x fewer evaluations "
                 "at 40-50 steps; small changes to the video). Ratios: a calibration saved for this model "
                 "(magcache_calibrate), else the published ones (Wan 2.1 T2V/I2V, Wan 2.2 A14B T2V/I2V, TI2V 5B). "
                 "Two experts: each expert skips within its own steps."}),
    "magcache_threshold": ("FLOAT", {"default": 0.06, "min": 0.0, "max": 1.0, "step": 0.01,
                           "tooltip": "MagCache error budget; higher skips more. 0.06 is MagCache's default."}),
    "magcache_max_skip_steps": ("INT", {"default": 3, "min": 0, "max": 50,
                                "tooltip": "MagCache: most consecutive steps skipped. 3 is the default."}),
    "magcache_retention_ratio": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.05,
                                 "tooltip": "MagCache: fraction of first steps never skipped. 0.2 is the default."}),
    "guidance_scale_2": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 20.0, "step": 0.1,
                         "tooltip": "Two-expert models (Wan 2.2 A14B) only: the guidance of the low-noise expert. "
                                    "-1: the same as guidance_scale."}),
    "layout": (["auto", "tensor", "sequence"], {"default": "auto", "tooltip": "How the step splits the transformer "
               "over the devices. tensor: each device holds all tokens and a share of every weight (the "
               "original's). sequence: each device holds a share of the tokens and gathers each layer's weights; "
               "far less traffic between chips at 480P and 720P. auto: the one the cost model says moves fewer "
               "bytes (WAN_TPU_LAYOUT overrides auto). The frames are the same either way."}),
    "magcache_calibrate": ("BOOLEAN", {"default": False, "tooltip": "Run every step in full and record this "
                           "model's MagCache magnitude ratios, saved in ComfyUI's user folder (wan_tpu_magcache/); "
                           "later runs with magcache on use them. Calibrate once at the settings you run (e.g. 50 "
                           "UniPC steps); the video is the same as without MagCache."}),
    # Radial attention (after every input above, so saved workflows keep their widget positions).
    "attention": (["dense", "radial"], {"default": "dense", "tooltip": "Self-attention of the transformer. dense: "
                  "every token attends every token (the original's). radial: Radial attention's static sparse mask, "
                  "opt-in: a token keeps its own, the neighbouring and the first latent frame whole, and of frames "
                  "further away a spatial band that narrows with the distance. It CHANGES the video; the quality "
                  "figures are the Radial Attention paper's, not measured here. The first radial_dense_steps steps "
                  "and the first radial_dense_blocks transformer blocks stay dense. Choosing it compiles a second "
                  "step program once (the dense steps keep the first). On TPU, by libtpu's cycle model (not "
                  "measured on a chip), a radial step of 14B at 1280x720 is about 1.6x faster than a dense one "
                  "(see the README). Off TPU, XLA applies the same mask with no saving."}),
    "radial_dense_steps": ("INT", {"default": DENSE_STEPS, "min": 0, "max": 100, "tooltip": "attention=radial "
                           f"only: the first steps that stay dense ({DENSE_STEPS}, the paper's setting for Wan). At "
                           "num_inference_steps or more every step is dense: the video equals dense attention's."}),
    "radial_dense_blocks": ("INT", {"default": DENSE_BLOCKS, "min": 0, "max": 100, "tooltip": "attention=radial "
                            "only: the first transformer blocks that stay dense in every sparse step "
                            f"({DENSE_BLOCKS}, the paper's)."}),
}


IMAGE_CONDITIONING_INPUT = ("WAN_TPU_IMAGE", {"tooltip": "Image-to-video models only (Wan 2.1 I2V, Wan 2.2 I2V A14B): "
                                                       "the start image, from 'Wan TPU Image to Video' (made for "
                                                       "the same width, height and frames)."})
MODEL_FILES_INPUT = ("WAN_TPU_MODEL_FILES", {"tooltip": "Optional: ComfyUI model files from 'Wan TPU Model Files' "
                                                        "(diffusion_models, text_encoders, vae, clip_vision). "
                                                        "Connected, they are used instead of model_id."})
SETTINGS_INPUT = ("WAN_TPU_SETTINGS", {"tooltip": "Optional: the advanced settings from 'Wan TPU Sampler Settings'. "
                                                  "Connected, its values win over this node's own advanced "
                                                  "widgets (precision, dp, tp, sampler, timesteps, MagCache, "
                                                  "guidance_scale_2, layout, attention and its radial "
                                                  "settings), which are then ignored. Not "
                                                  "connected: those widgets apply."})
SETTINGS_NOTE = " A connected 'settings' input replaces this widget's value."


def overridden_by_settings(specs: dict) -> dict:
    """``specs`` with the note that a connected settings node replaces them in each tooltip."""
    return {name: (kind, {**options, "tooltip": options["tooltip"] + SETTINGS_NOTE})
            for name, (kind, options) in specs.items()}


LORA_INPUT = ("WAN_TPU_LORA", {"tooltip": "Optional: LoRAs from 'Wan 2.1 TPU LoRA' nodes, fused into the "
                                          "transformers' weights on the device (each into the expert it names). "
                                          "Not connected: no LoRA."})


def step_options(sampler="unipc", timesteps="", magcache=False, magcache_threshold=0.06, magcache_max_skip_steps=3,
                 magcache_retention_ratio=0.2, guidance_scale_2=-1.0, layout="auto", magcache_calibrate=False,
                 attention="dense", radial_dense_steps=DENSE_STEPS, radial_dense_blocks=DENSE_BLOCKS) -> dict:
    """The node's step inputs as ``WanTPUPipeline.denoise`` keywords."""
    from .magcache import MagCacheSettings
    from .scheduler import parse_timesteps

    settings = MagCacheSettings(magcache_threshold, magcache_max_skip_steps, magcache_retention_ratio) if magcache else None
    second = None if guidance_scale_2 is None or guidance_scale_2 < 0 else float(guidance_scale_2)
    # "auto" defers to the pipeline, where WAN_TPU_LAYOUT may name one.
    return {"sampler": sampler, "timesteps": parse_timesteps(timesteps), "magcache": settings,
            "guidance_scale_2": second, "layout": None if layout in (None, "", "auto") else layout,
            "magcache_calibrate": bool(magcache_calibrate), "attention": attention,
            "radial_dense_steps": radial_dense_steps, "radial_dense_blocks": radial_dense_blocks}


VIDEO_INPUTS = {
    "height": ("INT", {"default": 720, "min": 256, "max": 1280, "step": 16,
                       "tooltip": "Video height in pixels, a multiple of 16. 720 for 720P, 480 for 480P."}),
    "width": ("INT", {"default": 1280, "min": 256, "max": 1280, "step": 16,
                      "tooltip": "Video width in pixels, a multiple of 16. 1280 for 720P, 848 for 480P."}),
    "num_frames": ("INT", {"default": 81, "min": 17, "max": 121, "step": 4,
                           "tooltip": "Frames to generate; Wan needs 4n+1 (81 = 5 s at 16 fps)."}),
    "num_inference_steps": ("INT", {"default": 50, "min": 1, "max": 100,
                                    "tooltip": "Denoising steps. 50 is Wan's default; fewer is faster and rougher."}),
    "guidance_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                 "tooltip": "Classifier-free guidance. Above 1 runs prompt and negative prompt "
                                            "together as a batch of 2; 1 or less skips the negative prompt and "
                                            "runs half the transformer work per step."}),
    "seed": ("INT", {"default": 2025, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                     "tooltip": "Noise seed. The noise is drawn as diffusers draws it (CPU generator), so a seed "
                                "starts from the same noise as diffusers' WanPipeline."}),
}
# The original's range was 1.0-10.0 in steps of 0.5; ours is wider, so its saved values validate.
FLOW_SHIFT_INPUT = ("FLOAT", {"default": 5.0, "min": 0.1, "max": 20.0, "step": 0.1,
                              "tooltip": "Flow-matching shift of the noise schedule: 5.0 for 720P, 3.0 for 480P."})
FPS_INPUT = ("INT", {"default": 16, "min": 1, "max": 120, "tooltip": "Frame rate passed on to the video node. Wan 2.1 is trained at 16."})
PROMPT_INPUT = ("STRING", {"multiline": True, "default": DEFAULT_PROMPT, "tooltip": "What the video should show."})
NEGATIVE_INPUT = ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                             "tooltip": "What the video should avoid (used when guidance_scale > 1)."})
HIDDEN = {"unique_id": "UNIQUE_ID"}


# ------------------------------------------------------------ ComfyUI hooks
def _comfy_module(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    model_management = _comfy_module("comfy.model_management")
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()


def send_progress_text(text: str, unique_id) -> None:
    server = _comfy_module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and unique_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, unique_id)


class StepProgress:
    """``on_step`` and ``on_status`` for the core: ComfyUI's progress bar, Cancel, and progress text
    ("loading ...", "compiling ...", "step i/N, s/step, ETA").

    The core calls ``on_step(0, N)`` once loading and compiling are done, so
    s/step and the ETA count denoising steps only.
    """

    def __init__(self, total: int, unique_id=None, label: str = "denoise"):
        utils = _comfy_module("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils is not None else None
        self.unique_id, self.label, self.started = unique_id, label, None
        self.status = status_reporter(unique_id)
        self.previewers = {}  # latent channels -> ComfyUI's previewer
        self.pending_preview = None

    @property
    def previews(self) -> bool:
        """Whether ComfyUI wants previews: it is there and its ``--preview-method`` is not ``none``."""
        if self.bar is None:
            return False
        if 16 not in self.previewers:
            self.previewers[16] = latent_previewer(16)
        return self.previewers[16] is not None

    def preview(self, frame) -> None:
        """``on_preview`` for the core: the predicted clean latent's middle frame [C, h, w] (numpy), turned
        into ComfyUI's preview image by its own previewer; sent with the next progress update."""
        import torch

        channels = int(frame.shape[0])
        if channels not in self.previewers:
            self.previewers[channels] = latent_previewer(channels)
        previewer = self.previewers[channels]
        if previewer is not None:
            x0 = torch.from_numpy(frame[None, :, None].astype("float32"))  # [1, C, 1, h, w], as ComfyUI's video
            self.pending_preview = previewer.decode_latent_to_preview_image("JPEG", x0)

    def __call__(self, step: int, total: int) -> None:
        if step == 0 or self.started is None:
            self.started = time.perf_counter()
        if step == 0:
            text = f"{self.label} step 0/{total}"
        else:
            per_step = (time.perf_counter() - self.started) / step
            text = f"{self.label} step {step}/{total}, {per_step:.2f} s/step, ETA {per_step * (total - step):.0f} s"
        logger.info(text)
        if self.bar is not None:
            preview, self.pending_preview = self.pending_preview, None
            self.bar.update_absolute(step, total, preview)  # ComfyUI's hook raises here on Cancel
        send_progress_text(text, self.unique_id)
        check_interrupted()


def latent_previewer(channels: int):
    """ComfyUI's previewer for a Wan latent of ``channels`` (16: Wan 2.1's VAE, 48: Wan 2.2's), as its own
    samplers get one (``latent_preview.get_previewer``, which honours ``--preview-method``; latent2rgb with
    ``comfy.latent_formats``' RGB factors unless a TAESD decoder is there). None outside ComfyUI or when
    previews are off."""
    latent_preview, formats = _comfy_module("latent_preview"), _comfy_module("comfy.latent_formats")
    if latent_preview is None or formats is None:
        return None
    latent_format = formats.Wan22() if channels == 48 else formats.Wan21()
    return latent_preview.get_previewer("cpu", latent_format)


def status_reporter(unique_id):
    """``on_status`` for the core: progress text for the node, and Cancel between phases."""
    def report(text: str) -> None:
        logger.info(text)
        send_progress_text(text, unique_id)
        check_interrupted()

    return report


# -------------------------------------------------------------- validation
def validate_common(model_id=None, precision=None, dp=None, tp=None) -> str | bool:
    if model_id is not None and not str(model_id).strip():
        return f"model_id is empty: use {loading.DEFAULT_MODEL_ID} or a local diffusers folder"
    if model_id is not None:
        try:  # a folder outside the allowed roots, or a repo id while offline, fails before anything runs
            loading.resolve_model_source(str(model_id))
        except ValueError as error:
            return str(error)
    if precision is not None and precision not in PRECISIONS:
        return f"precision={precision!r}: use one of {', '.join(PRECISIONS)}"
    for name, value in (("dp", dp), ("tp", tp)):
        if value is not None and int(value) < 0:
            return f"{name}={value}: use 0 for automatic or a positive mesh size"
    return True


def validate_video(height=None, width=None, num_frames=None) -> str | bool:
    """ComfyUI's check before the run, when the model is not known yet: the rule every Wan model shares
    (Wan 2.1's latents: multiples of 16). The model's own, stricter one runs when it is known."""
    from .models.wan.latents import WAN21

    error = WAN21.video_size_error(*(None if value is None else int(value) for value in (height, width, num_frames)))
    return error or True


def validate_sampling(cls, height=None, width=None, num_frames=None, model_id=None, precision=None, dp=None, tp=None,
                      sampler=None, timesteps=None, num_inference_steps=None, settings=sampler_settings.NOT_CONNECTED,
                      attention=None, radial_dense_steps=None, radial_dense_blocks=None):
    """The Sampler's and Full Pipeline's ``VALIDATE_INPUTS`` (ComfyUI passes the inputs this signature names).
    A connected settings node replaces precision, dp, tp, sampler, timesteps, attention and its radial settings:
    those widgets are not checked."""
    own = sampler_settings.unchecked_when_connected(settings, precision=precision, dp=dp, tp=tp, sampler=sampler,
                                                    timesteps=timesteps, attention=attention,
                                                    radial_dense_steps=radial_dense_steps,
                                                    radial_dense_blocks=radial_dense_blocks)
    return _first_error(validate_video(height, width, num_frames),
                        validate_common(model_id, own["precision"], own["dp"], own["tp"]),
                        validate_steps(own["sampler"], own["timesteps"], num_inference_steps),
                        validate_attention(own["attention"], own["radial_dense_steps"], own["radial_dense_blocks"]))


def validate_attention(attention=None, radial_dense_steps=None, radial_dense_blocks=None) -> str | bool:
    """attention and its radial settings, by the core's own checks (``step_program.radial_steps``); None:
    not known yet (linked), checked when the run starts."""
    from .sampling.step_program import radial_steps

    try:
        radial_steps("dense" if attention is None else attention, 0, radial_dense_steps, radial_dense_blocks)
    except ValueError as error:
        return str(error)
    return True


def validate_steps(sampler=None, timesteps=None, num_inference_steps=None) -> str | bool:
    from .scheduler import SAMPLERS, parse_timesteps

    if sampler is not None and sampler not in SAMPLERS:
        return f"sampler={sampler!r}: use one of {', '.join(SAMPLERS)}"
    try:
        given = parse_timesteps(timesteps)
    except ValueError as error:
        return str(error)
    if given and sampler not in (None, "euler"):
        return f"timesteps={timesteps!r} need sampler='euler' (UniPC spaces its own): choose euler or clear timesteps"
    if given and num_inference_steps is not None and len(given) != int(num_inference_steps):
        return (f"timesteps has {len(given)} values but num_inference_steps={num_inference_steps}: "
                f"set num_inference_steps to {len(given)}")
    return True


def _first_error(*results) -> str | bool:
    return next((result for result in results if result is not True), True)


def run_denoise(pipe, embeddings, unique_id, *, num_inference_steps, lora=None, **settings):
    """``pipe.denoise`` with ComfyUI's progress, Cancel and progress text; the step inputs
    (sampler, timesteps, MagCache) come in ``settings`` under their node names, the LoRA
    chain in ``lora`` (None: no LoRA, and any LoRA a previous run fused is undone)."""
    step_names = set(STEP_INPUTS)
    options = step_options(**{k: v for k, v in settings.items() if k in step_names})
    options["loras"] = tuple(lora or ())
    video = {k: v for k, v in settings.items() if k not in step_names}
    if options["timesteps"]:
        num_inference_steps = len(options["timesteps"])  # explicit timesteps set the step count
    progress = StepProgress(num_inference_steps, unique_id)
    started = time.perf_counter()
    latents = pipe.denoise(embeddings, num_inference_steps=num_inference_steps, on_step=progress,
                           on_status=progress.status, on_preview=progress.preview if progress.previews else None,
                           **video, **options)
    run = pipe.last_run
    if "magcache_calibration" in run:
        saved = os.path.basename(run["magcache_calibration"])
        progress.status(f"MagCache: calibrated {run['steps']} ratios, saved to {saved}; runs with magcache on now use them")
    elif run["magcache"]:
        progress.status(f"MagCache: {run['transformer_evaluations']} of {run['steps']} steps ran the full transformer")
    progress.status(f"done: {run['steps']} steps in {time.perf_counter() - started:.0f} s")
    return latents


def with_settings(settings, num_inference_steps, **widgets) -> dict:
    """The node's precision, dp, tp and step inputs (``widgets``), with a connected settings node's values in
    their place (``sampler_settings.apply``); explicit timesteps from it must match num_inference_steps."""
    values = sampler_settings.apply(widgets, settings)
    if settings is not None:
        error = validate_steps(values["sampler"], values["timesteps"], num_inference_steps)
        if error is not True:
            raise ValueError(f"{error} (timesteps from '{sampler_settings.NODE_NAME}')")
    return values


def decode_latents(make_pipe, latents, fps: int, unique_id, source: str) -> tuple:
    """A VAE Decoder node's work: (frames, fps) from a LATENT dict, with progress text and Cancel.
    ``make_pipe()`` gives the family's core; ``source`` names what to connect when ``latents`` is wrong."""
    check_interrupted()
    if not isinstance(latents, dict) or "samples" not in latents:
        raise ValueError(f"latents has no 'samples': connect {source}")
    report, started = status_reporter(unique_id), time.perf_counter()
    frames = make_pipe().decode(latents["samples"], on_status=report)
    report(f"done: {frames.shape[0]} frames decoded in {time.perf_counter() - started:.0f} s")
    return (frames, fps)


def make_pipeline(model_id: str, precision: str = "bf16", dp: int = 0, tp: int = 0, model_files=None):
    """The core for ``model_id``, or for ``model_files`` (a ``model_files.FileSource``) when given."""
    from .pipeline import WanTPUPipeline

    return WanTPUPipeline(model_files if model_files is not None else model_id, precision=precision, dp=dp or None,
                          tp=tp or None)


def embeddings_from_tensors(prompt_embeds, negative_prompt_embeds, model_id: str):
    """Check the two TENSOR inputs and wrap them for the core."""
    import torch

    from .pipeline import WanEmbeddings

    for name, tensor in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{name} is {shape}: connect the outputs of 'Wan 2.1 Text Encoder (TPU)' ([1, 512, 4096] for Wan 2.1)"
            )
    if prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(
            f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
            f"{tuple(negative_prompt_embeds.shape)} differ: encode both with the same Text Encoder node"
        )
    return WanEmbeddings(prompt_embeds.float(), negative_prompt_embeds.float(), model_id)


# -------------------------------------------------------------------- nodes
class FramesOutput:
    """The outputs of a node that ends in frames (every family's VAE Decoder and Full Pipeline)."""

    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = ("Frames [frames, height, width, 3] in [0, 1].", "The frame rate, for the video node.")


class Wan21TextEncoder:
    DESCRIPTION = (
        "Encodes the prompt and negative prompt with Wan 2.1's UMT5-XXL text encoder on the TPU (512 tokens, as "
        "diffusers). The encoder is loaded once, split over all devices and kept for later runs."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("TENSOR", "TENSOR")
    RETURN_NAMES = ("prompt_embeds", "negative_prompt_embeds")
    OUTPUT_TOOLTIPS = ("Prompt embeddings [1, 512, 4096].", "Negative prompt embeddings [1, 512, 4096].")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"prompt": PROMPT_INPUT, "negative_prompt": NEGATIVE_INPUT},
            "optional": {"model_id": MODEL_ID, **OPTIONAL_DEVICE_INPUTS, "model_files": MODEL_FILES_INPUT},
            "hidden": dict(HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_id=None, precision=None, dp=None, tp=None):
        return validate_common(model_id, precision, dp, tp)

    def encode(self, prompt, negative_prompt, model_id=loading.DEFAULT_MODEL_ID, precision="bf16", dp=0, tp=0,
               unique_id=None, model_files=None):
        check_interrupted()
        report, started = status_reporter(unique_id), time.perf_counter()
        embeddings = make_pipeline(model_id, precision, dp, tp, model_files).encode(
            prompt, negative_prompt, on_status=report
        )
        report(f"done: prompt encoded in {time.perf_counter() - started:.0f} s")
        return (embeddings.prompt_embeds, embeddings.negative_prompt_embeds)


class Wan21TPUSampler:
    DESCRIPTION = (
        "Denoises Wan 2.1 latents on the TPU: the transformer's weights are split over a (dp, tp) device mesh and "
        "the prompt/negative pair runs as one batch. Returns a LATENT in the VAE's space, as ComfyUI's own Wan "
        "nodes use, so it also decodes with the core VAE Decode node. Progress and Cancel work every step. "
        "A 'Wan TPU Sampler Settings' node connected to 'settings' supplies the advanced values (its values win "
        "over this node's own advanced widgets)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "INT")
    RETURN_NAMES = ("latents", "num_frames")
    OUTPUT_TOOLTIPS = ("Video latent [1, C, (frames-1)/4+1, height/f, width/f] (Wan 2.1's VAE: C=16, f=8; Wan 2.2's: "
                       "48, 16).", "The number of frames.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt_embeds": ("TENSOR", {"tooltip": "From 'Wan 2.1 Text Encoder (TPU)'."}),
                "negative_prompt_embeds": ("TENSOR", {"tooltip": "From 'Wan 2.1 Text Encoder (TPU)'."}),
                **VIDEO_INPUTS,
            },
            "optional": {"model_id": MODEL_ID, "flow_shift": FLOW_SHIFT_INPUT,
                         **overridden_by_settings(OPTIONAL_DEVICE_INPUTS), **overridden_by_settings(STEP_INPUTS),
                         "lora": LORA_INPUT, "image": IMAGE_CONDITIONING_INPUT, "model_files": MODEL_FILES_INPUT,
                         "settings": SETTINGS_INPUT},
            "hidden": dict(HIDDEN),
        }

    VALIDATE_INPUTS = classmethod(validate_sampling)

    def sample(self, prompt_embeds, negative_prompt_embeds, height, width, num_frames, num_inference_steps,
               guidance_scale, seed, model_id=loading.DEFAULT_MODEL_ID, flow_shift=5.0, precision="bf16", dp=0, tp=0,
               unique_id=None, model_files=None, settings=None, **step_inputs):
        check_interrupted()
        step_inputs = with_settings(settings, num_inference_steps, precision=precision, dp=dp, tp=tp, **step_inputs)
        precision, dp, tp = (step_inputs.pop(name) for name in ("precision", "dp", "tp"))
        embeddings = embeddings_from_tensors(prompt_embeds, negative_prompt_embeds, model_id)
        pipe = make_pipeline(model_id, precision, dp, tp, model_files)
        latents = run_denoise(pipe, embeddings, unique_id, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                              flow_shift=flow_shift, **step_inputs)
        return ({"samples": latents}, num_frames)


class Wan21TPUVAEDecoder(FramesOutput):
    DESCRIPTION = (
        "Decodes a Wan 2.1 LATENT (from the TPU Sampler or ComfyUI's own Wan nodes) into frames on the TPU. "
        "Connect IMAGE to Create Video -> Save Video, or to VHS Video Combine."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"latents": ("LATENT", {"tooltip": "Wan video latent [1, C, T, H/f, W/f] (Wan 2.1's VAE: "
                                                           "C=16, f=8; Wan 2.2's: 48, 16)."})},
            "optional": {"model_id": MODEL_ID, "fps": FPS_INPUT, **OPTIONAL_DEVICE_INPUTS,
                         "model_files": MODEL_FILES_INPUT},
            "hidden": dict(HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_id=None, precision=None, dp=None, tp=None):
        return validate_common(model_id, precision, dp, tp)

    def decode(self, latents, model_id=loading.DEFAULT_MODEL_ID, fps=16, precision="bf16", dp=0, tp=0,
               unique_id=None, model_files=None):
        return decode_latents(lambda: make_pipeline(model_id, precision, dp, tp, model_files), latents, fps,
                              unique_id, "a LATENT output such as the TPU Sampler's")


class Wan21TPUPipeline(FramesOutput):
    DESCRIPTION = (
        "Text to video in one node: text encoder, sampler and VAE decoder on the TPU. It shares the loaded models "
        "with the separate nodes, so nothing is loaded twice and a second run loads and compiles nothing. A "
        "'Wan TPU Sampler Settings' node connected to 'settings' supplies the advanced values (its values win "
        "over this node's own advanced widgets; its precision, dp and tp apply to all three stages)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"prompt": PROMPT_INPUT, "negative_prompt": NEGATIVE_INPUT, **VIDEO_INPUTS},
            "optional": {"model_id": MODEL_ID, "fps": FPS_INPUT, "flow_shift": FLOW_SHIFT_INPUT,
                         **overridden_by_settings(OPTIONAL_DEVICE_INPUTS), **overridden_by_settings(STEP_INPUTS),
                         "lora": LORA_INPUT,
                         "start_image": ("IMAGE", {"tooltip": "Image-to-video models only: the first frame "
                                                              "(e.g. from Load Image)."}),
                         "model_files": MODEL_FILES_INPUT, "settings": SETTINGS_INPUT},
            "hidden": dict(HIDDEN),
        }

    VALIDATE_INPUTS = classmethod(validate_sampling)

    def generate(self, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                 seed, model_id=loading.DEFAULT_MODEL_ID, fps=16, flow_shift=5.0, precision="bf16", dp=0, tp=0,
                 unique_id=None, model_files=None, settings=None, **step_inputs):
        check_interrupted()
        step_inputs = with_settings(settings, num_inference_steps, precision=precision, dp=dp, tp=tp, **step_inputs)
        precision, dp, tp = (step_inputs.pop(name) for name in ("precision", "dp", "tp"))
        pipe = make_pipeline(model_id, precision, dp, tp, model_files)
        report, started = status_reporter(unique_id), time.perf_counter()
        embeddings = pipe.encode(prompt, negative_prompt, on_status=report)
        start_image = step_inputs.pop("start_image", None)
        if start_image is not None:
            step_inputs["image"] = pipe.encode_image(start_image, height=height, width=width, num_frames=num_frames,
                                                     on_status=report)
        latents = run_denoise(pipe, embeddings, unique_id, height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                              flow_shift=flow_shift, **step_inputs)
        frames = pipe.decode(latents, on_status=report)
        report(f"done: {frames.shape[0]} frames in {time.perf_counter() - started:.0f} s")
        return (frames, fps)


class WanTPUImageToVideo:
    DESCRIPTION = (
        "The start image of an image-to-video model (Wan 2.1 I2V 14B, Wan 2.2 I2V A14B, Wan 2.2 TI2V 5B), and for "
        "Wan 2.1 FLF2V the end image too, encoded on the TPU as diffusers does it: resized to the video size, "
        "through the VAE encoder (and for Wan 2.1 through CLIP). Connect it to the sampler's 'image' input; give "
        "both the same width, height and frames."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("WAN_TPU_IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image conditioning, for the sampler's 'image' input.",)

    @classmethod
    def INPUT_TYPES(cls):
        video = {name: VIDEO_INPUTS[name] for name in ("height", "width", "num_frames")}
        return {
            "required": {"start_image": ("IMAGE", {"tooltip": "The first frame, e.g. from Load Image. The first "
                                                              "image of a batch is used."}),
                         **video},
            "optional": {"model_id": MODEL_ID, **OPTIONAL_DEVICE_INPUTS, "model_files": MODEL_FILES_INPUT,
                         "end_image": ("IMAGE", {"tooltip": "First-last-frame models (Wan 2.1 FLF2V) only: the "
                                                            "last frame; the video goes from start to end."})},
            "hidden": dict(HIDDEN),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, height=None, width=None, num_frames=None, model_id=None, precision=None, dp=None,
                        tp=None):
        return _first_error(validate_video(height, width, num_frames), validate_common(model_id, precision, dp, tp))

    def encode(self, start_image, height, width, num_frames, model_id=loading.DEFAULT_MODEL_ID, precision="bf16",
               dp=0, tp=0, unique_id=None, model_files=None, end_image=None):
        check_interrupted()
        pipe = make_pipeline(model_id, precision, dp, tp, model_files)
        report, started = status_reporter(unique_id), time.perf_counter()
        image = pipe.encode_image(start_image, height=height, width=width, num_frames=num_frames, on_status=report,
                                  end_image=end_image)
        report(f"done: {'images' if end_image is not None else 'image'} encoded in {time.perf_counter() - started:.0f} s")
        return (image,)


def lora_file_choices() -> list[str] | None:
    """The files in ComfyUI's models/loras folders, or None outside ComfyUI."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None:
        return None
    try:
        return list(folder_paths.get_filename_list("loras"))
    except Exception:  # a ComfyUI without a "loras" folder type
        return []


class Wan21TPULoRA:
    DESCRIPTION = (
        "Adds a Wan LoRA (ComfyUI/kohya, diffusers/PEFT or musubi-tuner safetensors, from models/loras) to a "
        "chain for the TPU Sampler or Full Pipeline. The LoRA is fused into the sharded weights on the device: "
        "changing LoRAs or strengths compiles nothing and reloads nothing (the base weights they change are kept "
        "in host memory, about 28 GB per 14B transformer in bf16: 56 GB for a Wan 2.2 A14B pair). For Wan 2.2 "
        "A14B, expert picks the transformer: LoRAs shipped as a high/low pair take one node each."
    )
    CATEGORY = CATEGORY
    FUNCTION = "add"
    RETURN_TYPES = ("WAN_TPU_LORA",)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The LoRA chain: connect to the Sampler's or Full Pipeline's lora input, or to another LoRA node.",)

    @classmethod
    def INPUT_TYPES(cls):
        choices = lora_file_choices()
        name_tooltip = "A .safetensors LoRA for Wan 2.1 in ComfyUI/models/loras."
        lora_name = (choices, {"tooltip": name_tooltip}) if choices is not None else (
            "STRING", {"default": "", "tooltip": name_tooltip + " Outside ComfyUI: a path."})
        return {
            "required": {
                "lora_name": lora_name,
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "LoRA strength, as diffusers' fuse_lora(lora_scale=...)."}),
            },
            "optional": {
                "lora": ("WAN_TPU_LORA", {"tooltip": "Optional: a chain to add this LoRA to (they stack)."}),
                "expert": (list(LORA_EXPERTS), {"default": "both", "tooltip": "Which transformer the LoRA goes "
                           "into. both: every one (Wan 2.1, TI2V 5B: the only choice). Wan 2.2 A14B: high_noise "
                           "(the first steps' expert) or low_noise, for LoRAs that ship as a high/low pair, such "
                           "as lightx2v's Wan 2.2 Lightning."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None, strength=None):
        if lora_name is None:
            return True
        from .lora import resolve_lora_path

        try:
            resolve_lora_path(str(lora_name))
        except ValueError as error:
            return str(error)
        return True

    def add(self, lora_name, strength, lora=None, expert="both"):
        from .lora import LoraSpec, resolve_lora_path

        return (tuple(lora or ()) + (LoraSpec(resolve_lora_path(str(lora_name)), float(strength), str(expert)),),)


def model_file_choices(kind: str) -> list[str] | None:
    """The .safetensors and .gguf files of ComfyUI's folder for ``kind`` (``model_files.FOLDERS``), or None
    outside ComfyUI."""
    from .model_files import EXTENSIONS, FOLDERS

    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None:
        return None
    try:
        names = folder_paths.get_filename_list(FOLDERS[kind])
    except Exception:  # a ComfyUI without this folder type
        names = []
    return [name for name in names if name.lower().endswith(EXTENSIONS)]


class WanTPUModelFiles:
    DESCRIPTION = (
        "Wan model files from ComfyUI's own folders (Comfy-Org's repackaged files and GGUF quantisations), for "
        "the Wan TPU nodes' model_files input instead of a diffusers model_id. The family (Wan 2.1 T2V/I2V, "
        "Wan 2.2 A14B, TI2V 5B) is read from the weights. fp8, fp8_scaled and GGUF weights are dequantized "
        "once on the host at load, to the run's precision. Each file is loaded once and shared."
    )
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("WAN_TPU_MODEL_FILES",)
    RETURN_NAMES = ("model_files",)
    OUTPUT_TOOLTIPS = ("The model files, for the model_files input of the Text Encoder, Sampler, VAE Decoder, "
                       "Full Pipeline and Image to Video nodes.",)
    _TOOLTIPS = {
        "transformer": "The Wan transformer, from models/diffusion_models (bf16, fp16, fp8_e4m3fn, fp8_scaled or "
                       "GGUF). For Wan 2.2 A14B: the high-noise expert.",
        "text_encoder": "UMT5-XXL from models/text_encoders (umt5_xxl_fp16 or umt5_xxl_fp8_e4m3fn_scaled); its "
                        "tokenizer comes in the file.",
        "vae": "The VAE from models/vae: wan_2.1_vae for Wan 2.1 and Wan 2.2 A14B, wan2.2_vae for TI2V 5B.",
        "transformer_2": "Wan 2.2 A14B only: the low-noise expert, from models/diffusion_models. none otherwise.",
        "clip_vision": "Wan 2.1 I2V only: clip_vision_h from models/clip_vision. none otherwise.",
    }

    @classmethod
    def INPUT_TYPES(cls):
        def spec(kind, input_name, optional=False):
            choices = model_file_choices(kind)
            if choices is None:  # outside ComfyUI: a path
                return ("STRING", {"default": "", "tooltip": cls._TOOLTIPS[input_name] + " Outside ComfyUI: a path."})
            return ((["none"] + choices) if optional else choices,
                    {"tooltip": cls._TOOLTIPS[input_name], **({"default": "none"} if optional else {})})

        return {
            "required": {"transformer": spec("transformer", "transformer"),
                         "text_encoder": spec("text_encoder", "text_encoder"), "vae": spec("vae", "vae")},
            "optional": {"transformer_2": spec("transformer_2", "transformer_2", True),
                         "clip_vision": spec("image_encoder", "clip_vision", True)},
        }

    @staticmethod
    def _resolve(transformer, text_encoder, vae, transformer_2=None, clip_vision=None):
        from .model_files import resolve_model_files

        def given(name):
            return None if name in (None, "", "none") else str(name)

        return resolve_model_files(str(transformer), str(text_encoder), str(vae), given(transformer_2),
                                   given(clip_vision))

    @classmethod
    def VALIDATE_INPUTS(cls, transformer=None, text_encoder=None, vae=None, transformer_2=None, clip_vision=None):
        if None in (transformer, text_encoder, vae):
            return True
        try:  # headers only: a file outside the folders, of another part or family, or broken fails here
            cls._resolve(transformer, text_encoder, vae, transformer_2, clip_vision)
        except ValueError as error:
            return str(error)
        return True

    def select(self, transformer, text_encoder, vae, transformer_2="none", clip_vision="none"):
        return (self._resolve(transformer, text_encoder, vae, transformer_2, clip_vision),)


class WanTPUSamplerSettings:
    DESCRIPTION = (
        "The advanced settings of the TPU Sampler and Full Pipeline in one node: the sampler and its timesteps, "
        "the low-noise expert's guidance, MagCache, the transformer's layout over the devices, precision, the "
        "(dp, tp) mesh and the attention (dense, or Radial attention's sparse mask). Connect its output to their "
        "'settings' input. Precedence: connected, every value here "
        "wins over the receiving node's own advanced widget of the same name (those widgets are then ignored); "
        "not connected, the node's own widgets apply, as in workflows saved before this node existed. The "
        "defaults are the nodes' defaults."
    )
    CATEGORY = CATEGORY
    FUNCTION = "settings"
    RETURN_TYPES = ("WAN_TPU_SETTINGS",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("The settings, for the 'settings' input of the TPU Sampler or Full Pipeline (one settings "
                       "node may feed several).",)
    ORDER = ("sampler", "timesteps", "guidance_scale_2", "magcache", "magcache_threshold", "magcache_max_skip_steps",
             "magcache_retention_ratio", "magcache_calibrate", "layout", "precision", "dp", "tp")
    # Added later: optional and last, so saved nodes keep their widget positions and API prompts without
    # them still run (with the defaults).
    OPTIONAL_ORDER = ("attention", "radial_dense_steps", "radial_dense_blocks")

    @classmethod
    def INPUT_TYPES(cls):
        specs = {**STEP_INPUTS, **OPTIONAL_DEVICE_INPUTS}
        return {"required": {name: specs[name] for name in cls.ORDER},
                "optional": {name: specs[name] for name in cls.OPTIONAL_ORDER}}

    @classmethod
    def VALIDATE_INPUTS(cls, sampler=None, timesteps=None, guidance_scale_2=None, magcache=None,
                        magcache_threshold=None, magcache_max_skip_steps=None, magcache_retention_ratio=None,
                        magcache_calibrate=None, layout=None, precision=None, dp=None, tp=None, attention=None,
                        radial_dense_steps=None, radial_dense_blocks=None):
        return sampler_settings.check_inputs(
            sampler=sampler, timesteps=timesteps, guidance_scale_2=guidance_scale_2, magcache=magcache,
            magcache_threshold=magcache_threshold, magcache_max_skip_steps=magcache_max_skip_steps,
            magcache_retention_ratio=magcache_retention_ratio, magcache_calibrate=magcache_calibrate, layout=layout,
            precision=precision, dp=dp, tp=tp, attention=attention, radial_dense_steps=radial_dense_steps,
            radial_dense_blocks=radial_dense_blocks)

    def settings(self, **values):
        return (sampler_settings.SamplerSettings(**values),)


class Wan21TPUUnload:
    DESCRIPTION = (
        "Frees everything this pack holds on the TPU (models, compiled programs, the mesh). ComfyUI Manager's "
        "'Unload Models' does the same. The next Wan run loads again."
    )
    CATEGORY = CATEGORY
    FUNCTION = "unload"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "optional": {"images": ("IMAGE", {"tooltip": "Optional: connect to unload only after these frames exist."})},
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # never cached: unloading is the point

    def unload(self, images=None):
        TorchaxEnvManager.instance().release()
        return ()


NODE_CLASS_MAPPINGS = {
    "Wan21TextEncoder": Wan21TextEncoder,
    "Wan21TPUSampler": Wan21TPUSampler,
    "Wan21TPUVAEDecoder": Wan21TPUVAEDecoder,
    "Wan21TPUPipeline": Wan21TPUPipeline,
    "Wan21TPUUnload": Wan21TPUUnload,
    "Wan21TPULoRA": Wan21TPULoRA,
    "WanTPUImageToVideo": WanTPUImageToVideo,
    "WanTPUModelFiles": WanTPUModelFiles,
    "WanTPUSamplerSettings": WanTPUSamplerSettings,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Wan21TextEncoder": "Wan 2.1 Text Encoder (TPU)",
    "Wan21TPUSampler": "Wan 2.1 TPU Sampler",
    "Wan21TPUVAEDecoder": "Wan 2.1 TPU VAE Decoder",
    "Wan21TPUPipeline": "Wan 2.1 TPU Full Pipeline",
    "Wan21TPUUnload": "Wan 2.1 TPU Unload",
    "Wan21TPULoRA": "Wan 2.1 TPU LoRA",
    "WanTPUImageToVideo": "Wan TPU Image to Video",
    "WanTPUModelFiles": "Wan TPU Model Files",
    "WanTPUSamplerSettings": "Wan TPU Sampler Settings",
}
