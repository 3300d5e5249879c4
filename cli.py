"""Headless text-to-video: ``python wan_t2v.py "a prompt" --output video.mp4``; image-to-video models
take ``--image start.png``.

Runs the same core as the ComfyUI nodes (encode -> denoise -> decode) and
writes an MP4 with imageio-ffmpeg. ``--tiny`` builds a tiny random model
offline for a smoke run; its video is noise-coloured, by design.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from . import loading
from .env_manager import ATTENTION_BACKENDS
from .models.wan.modules import PRECISIONS
from .models.wan.radial import DENSE_BLOCKS, DENSE_STEPS
from .tiny_wan import TINY_FAMILIES

logger = logging.getLogger("wan_tpu")

_TINY_DEFAULTS = dict(height=64, width=64, frames=9, steps=4)
_FULL_DEFAULTS = dict(height=720, width=1280, frames=81, steps=50)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Wan text-to-video and image-to-video on TPU (or GPU/CPU) through "
                                                 "torchax.")
    parser.add_argument("prompt", nargs="?", default="A cat playing piano in a jazz club, cinematic lighting")
    parser.add_argument("--negative-prompt", default="blurry, low quality, static, worst quality")
    parser.add_argument("--model", default=loading.DEFAULT_MODEL_ID, help="Hugging Face repo id or diffusers folder")
    parser.add_argument("--tiny", action="store_true", help="build and use a tiny random model (smoke run, no download)")
    parser.add_argument("--tiny-family", default="wan2.1-t2v",
                        choices=tuple(TINY_FAMILIES),
                        help="with --tiny: which family's layout the tiny model has (the i2v ones need --image; "
                             "ti2v takes one or not)")
    parser.add_argument("--image", help="image-to-video models: the start image (PNG, JPEG...), resized to the video")
    parser.add_argument("--end-image", help="first-last-frame models (Wan 2.1 FLF2V): the last frame, with --image")
    parser.add_argument("--height", type=int, help="multiple of 16 (default 720; 64 with --tiny)")
    parser.add_argument("--width", type=int, help="multiple of 16 (default 1280; 64 with --tiny)")
    parser.add_argument("--frames", type=int, help="4n+1 (default 81; 9 with --tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; 4 with --tiny)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance; <= 1 turns it off")
    parser.add_argument("--guidance-2", type=float, default=None,
                        help="Wan 2.2 A14B: guidance of the low-noise expert (default: --guidance)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--flow-shift", type=float, help="5.0 for 720P, 3.0 for 480P (default: by height)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--dp", type=int, help="data-parallel mesh axis (default 2 on an even device count)")
    parser.add_argument("--tp", type=int, help="tensor-parallel mesh axis (default: the remaining devices)")
    parser.add_argument("--layout", choices=("auto", "tensor", "sequence"), default=None,
                        help="how the step splits the transformer: tensor (weights split, every device holds all "
                             "tokens), sequence (tokens split, weights gathered per layer), auto (default; the one "
                             "moving fewer bytes; WAN_TPU_LAYOUT sets it too)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                        help="attention override (default: Splash for long self-attention on TPU)")
    parser.add_argument("--radial", action="store_true",
                        help="Radial attention's static sparse mask for self-attention (opt-in; it changes the "
                             "video; the quality figures are the paper's, not measured here); the first "
                             "--radial-dense-steps steps and --radial-dense-blocks blocks stay dense; compiles a "
                             "second step program once")
    parser.add_argument("--radial-dense-steps", type=int, default=None,
                        help=f"with --radial: the first steps that stay dense (default {DENSE_STEPS})")
    parser.add_argument("--radial-dense-blocks", type=int, default=None,
                        help=f"with --radial: the first transformer blocks that stay dense (default {DENSE_BLOCKS})")
    parser.add_argument("--sampler", choices=("unipc", "euler"), default="unipc",
                        help="unipc (Wan's default) or euler (flow-matching Euler, for step-distilled LoRAs)")
    parser.add_argument("--timesteps", default="",
                        help="explicit Euler timesteps, e.g. 1000,750,500,250 (sets the step count)")
    parser.add_argument("--magcache", action="store_true",
                        help="skip steps with MagCache (ratios: this model's calibration, else the published ones)")
    parser.add_argument("--magcache-calibrate", action="store_true",
                        help="run every step in full and save this model's MagCache ratios for later --magcache runs")
    parser.add_argument("--magcache-threshold", type=float, default=0.06)
    parser.add_argument("--magcache-max-skip", type=int, default=3, help="most consecutive skipped steps")
    parser.add_argument("--magcache-retention", type=float, default=0.2, help="fraction of first steps never skipped")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH:STRENGTH",
                        help="a .safetensors Wan LoRA and its strength (default 1.0), into every transformer; "
                             "repeat to stack")
    parser.add_argument("--lora-high", action="append", default=[], metavar="PATH:STRENGTH",
                        help="Wan 2.2 A14B: a LoRA for the high-noise expert only (e.g. a Lightning pair's high file)")
    parser.add_argument("--lora-low", action="append", default=[], metavar="PATH:STRENGTH",
                        help="Wan 2.2 A14B: a LoRA for the low-noise expert only")
    parser.add_argument("--output", help="MP4 path (default output/wan_<time>.mp4)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    check_radial(parser, args)
    defaults = _TINY_DEFAULTS if args.tiny else _FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.flow_shift is None:
        args.flow_shift = 5.0 if args.height >= 720 else 3.0
    from .scheduler import parse_timesteps

    args.timesteps = parse_timesteps(args.timesteps)
    args.lora = ([parse_lora(text) for text in args.lora] + [parse_lora(text, "high_noise") for text in args.lora_high]
                 + [parse_lora(text, "low_noise") for text in args.lora_low])
    if args.timesteps:
        args.steps = len(args.timesteps)
    return args


def check_radial(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--radial's settings by the core's own checks; a dense-steps or dense-blocks count without --radial is
    refused (it would do nothing)."""
    from .sampling.step_program import radial_steps

    given = [flag for flag, value in (("--radial-dense-steps", args.radial_dense_steps),
                                      ("--radial-dense-blocks", args.radial_dense_blocks)) if value is not None]
    if given and not args.radial:
        parser.error(f"{' and '.join(given)} only apply with --radial: add --radial or leave them out")
    try:
        radial_steps("radial" if args.radial else "dense", 0, args.radial_dense_steps, args.radial_dense_blocks)
    except ValueError as error:
        parser.error(str(error).replace("radial_dense_", "--radial-dense-"))  # the flags' names


def parse_lora(text: str, expert: str = "both"):
    """'path/to/lora.safetensors:0.8' -> LoraSpec(path, 0.8, expert); no ':<number>' means strength 1.0."""
    from .lora import LoraSpec

    path, _, strength = text.rpartition(":")
    try:
        return LoraSpec(path, float(strength), expert) if path else LoraSpec(text, 1.0, expert)
    except ValueError:
        return LoraSpec(text, 1.0, expert)  # a ':' inside the path, no strength given


def load_image(path: str, flag: str = "--image"):
    """An image file as a PIL RGB image; a clear error when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"{flag} {path!r}: cannot read it as an image ({error}); give a PNG or JPEG file") from None


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    from .env_manager import TorchaxEnvManager
    from .pipeline import WanTPUPipeline
    from .utils import write_mp4

    manager = TorchaxEnvManager.instance()
    if args.attention:
        manager.set_attention_backend(args.attention)
    with tempfile.TemporaryDirectory(prefix="wan-tiny-") as scratch:
        model = args.model
        if args.tiny:
            from .tiny_wan import build_tiny_wan

            model = build_tiny_wan(os.path.join(scratch, "tiny-" + args.tiny_family), TINY_FAMILIES[args.tiny_family])
        pipe = WanTPUPipeline(model, precision=args.precision, dp=args.dp, tp=args.tp, layout=args.layout)
        started = time.perf_counter()
        embeddings = pipe.encode(args.prompt, args.negative_prompt)
        image = None
        if args.end_image and not args.image:
            raise SystemExit("--end-image needs --image too: the video goes from the start image to the end image")
        if args.image:
            end_image = load_image(args.end_image, "--end-image") if args.end_image else None
            image = pipe.encode_image(load_image(args.image), height=args.height, width=args.width,
                                      num_frames=args.frames, on_status=logger.info, end_image=end_image)

        def report(step: int, total: int):
            if step:  # step 0: loaded and compiled, the first step starts
                logger.info("step %d/%d: %.2f s", step, total, pipe.last_step_seconds[-1])

        magcache = None
        if args.magcache:
            from .magcache import MagCacheSettings

            magcache = MagCacheSettings(args.magcache_threshold, args.magcache_max_skip, args.magcache_retention)
        latents = pipe.denoise(
            embeddings, height=args.height, width=args.width, num_frames=args.frames,
            num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
            flow_shift=args.flow_shift, on_step=report, on_status=logger.info, sampler=args.sampler,
            timesteps=args.timesteps, magcache=magcache, loras=args.lora, guidance_scale_2=args.guidance_2,
            image=image, magcache_calibrate=args.magcache_calibrate, attention="radial" if args.radial else "dense",
            radial_dense_steps=args.radial_dense_steps, radial_dense_blocks=args.radial_dense_blocks,
        )
        if args.magcache_calibrate:
            logger.info("MagCache ratios saved to %s", pipe.last_run["magcache_calibration"])
        frames = pipe.decode(latents)
    output = args.output or os.path.join("output", time.strftime("wan_%Y%m%d_%H%M%S.mp4"))
    write_mp4(frames.numpy(), output, fps=args.fps)
    steps = pipe.last_step_seconds
    warm = steps[1:] or steps
    logger.info(
        "done in %.1f s: %s; first step %.2f s, then %.3f s/step (%s layout)",
        time.perf_counter() - started, {k: round(v, 2) for k, v in pipe.timer.seconds.items()},
        steps[0], sum(warm) / len(warm), pipe.last_run["layout"],
    )
    return output
