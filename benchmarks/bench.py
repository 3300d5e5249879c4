"""Side by side: diffusers' WanPipeline on PyTorch against our core on JAX.

    .venv/bin/python benchmarks/bench.py --config small            # CPU, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench.py --config wan-1.3b --height 480 --width 848 --frames 81  # GPU/TPU

Both run the same random-weight model folder (built offline, cached under
--models-dir), the same prompt, seed and shapes, alternating run by run in
one process. For each stage (load, encode, denoising step, decode) it prints
and writes as JSON the first-run time (compilation included) and the median
of the warm runs, with the ratio ours/peer (below 1: we are faster). It also
reports:

- FLOPs per denoising step from the architecture (linear + attention, CFG
  counted) and the TFLOP/s each side reached;
- recompilations during the warm runs (should be 0);
- the time per step spent outside the transformer call (scheduler, CFG
  combine, transfers), from a transformer-only program timed alone;
- with --startup: time to first step in a fresh process with an empty
  persistent compilation cache (cold) and in a second one that finds it
  filled (warm), and the compilations each made;
- with --fewer-steps: three cases per side, each against the 50-step UniPC
  baseline at guidance 5.0: "MagCache at defaults" (threshold 0.06, 3 skips,
  retention 0.2, the published Wan 2.1 14B ratios, given to both sides) and
  "4-step Euler, guidance 1" (shift 5). On a two-expert model (--config
  tiny-a14b, small-a14b) the baseline is Wan 2.2's own: 40 UniPC steps at
  guidance 4.0 / 3.0 and shift 12; "MagCache at defaults" uses the published
  Wan 2.2 T2V A14B ratios (diffusers: a MagCacheConfig per transformer, the
  ratios split at the switch), and "4-step Euler, LoRA pair" runs 4 Euler steps
  at guidance 1 with a random high/low LoRA pair fused into the experts (as
  lightx2v's Wan 2.2 Lightning pair is used). For each: transformer evaluations,
  warm denoising wall time, ours/diffusers, speed-up over the baseline, and
  the PSNR of the frames against the same side's baseline.

Timing: time.perf_counter around work that is synchronised (JAX
block_until_ready; CUDA synchronize). Peer and ours use the same precision.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "A cat playing piano in a jazz club, warm cinematic lighting"
NEGATIVE = "blurry, low quality, static"
# config -> (TinyWanConfig name in tiny_wan, default height, width, frames, steps)
CONFIGS = {
    "tiny": ("TinyWanConfig", 32, 48, 5, 4),
    "tiny-a14b": ("TINY_A14B", 32, 48, 5, 4),
    "small": ("SMALL", 256, 256, 33, 4),
    "small-a14b": ("SMALL_A14B", 256, 256, 33, 4),
    "wan-1.3b": ("WAN_1_3B", 480, 848, 81, 10),
    "wan-14b": ("WAN_14B", 720, 1280, 81, 10),
}


def load_pack():
    """The pack imported by folder path, as ComfyUI does (``pack_loader``): a function from a module name
    to the module."""
    if REPO not in sys.path:
        sys.path.append(REPO)  # last: nothing the environment already provides is shadowed
    from pack_loader import pack_module

    return pack_module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--runs", type=int, default=3, help="runs per side; the first includes compilation")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 elsewhere")
    parser.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "wan-tpu-bench-models"))
    parser.add_argument("--output", help="JSON path (default benchmarks/results/<config>-<backend>.json)")
    parser.add_argument("--startup", action="store_true", help="also measure cold/warm start in fresh processes")
    parser.add_argument("--layout", choices=("auto", "tensor", "sequence"), default=None,
                        help="the transformer step's layout (default: WAN_TPU_LAYOUT, else auto)")
    parser.add_argument("--project-chip", default="v6e-8",
                        help="the TPU slice the cost model projects s/step for, both layouts (a projection)")
    parser.add_argument("--no-peer", action="store_true", help="skip diffusers (e.g. on TPU, where torch has no device)")
    parser.add_argument("--fewer-steps", action="store_true",
                        help="benchmark MagCache and 4-step Euler against 50-step UniPC instead (see above)")
    parser.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)  # the --startup child
    args = parser.parse_args(argv)
    _, height, width, frames, steps = CONFIGS[args.config]
    args.height = args.height or height
    args.width = args.width or width
    args.frames = args.frames or frames
    args.steps = args.steps or steps
    return args


def model_folder(args, module) -> str:
    tiny_wan = module("tiny_wan")
    path = os.path.join(args.models_dir, args.config)
    if not os.path.exists(os.path.join(path, "model_index.json")):
        config = getattr(tiny_wan, CONFIGS[args.config][0])
        tiny_wan.build_tiny_wan(path, config() if isinstance(config, type) else config)
    return path


def step_flops(config: dict, height: int, width: int, frames: int, cfg: bool) -> float:
    """FLOPs of one denoising step: 2 per multiply-add in every linear layer and attention matmul."""
    pack = load_pack()
    tokens = pack("models.wan.latents").LatentGeometry.from_transformer_config(config).tokens(height, width, frames)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    text_tokens = pack("models.wan.configs").TEXT_TOKENS
    per_layer = (
        2 * tokens * dim * dim * 4  # self-attention q, k, v, out
        + 2 * tokens * dim * dim * 2 + 2 * text_tokens * dim * dim * 2  # cross-attention q, out; k, v of the text
        + 2 * tokens * dim * config["ffn_dim"] * 2  # feed-forward in and out
        + 4 * tokens * tokens * dim  # self-attention QK^T and PV
        + 4 * tokens * text_tokens * dim  # cross-attention QK^T and PV
    )
    patch = 2 * tokens * dim * 16 * 4 * 2  # patch embedding in, projection out
    return (config["num_layers"] * per_layer + patch) * (2 if cfg else 1)


def layout_projection(module, config: dict, height: int, width: int, frames: int, cfg: bool, chip_name: str) -> dict:
    """The cost model, per layout, for ``chip_name`` (a projection, not a measurement): compute =
    ``step_flops`` over the devices the layout splits the work over, at the chip's published peak and at
    the original's 38% MFU; collectives = ``sharding.layer_collective_bytes`` (the bytes through a chip's
    links) per layer x layers, over the chip's published ICI bandwidth; no overlap."""
    tpu_compile = _tpu_compile()
    sharding = module("sharding")
    chip = tpu_compile.parse_chip(chip_name)
    devices = chip.chips  # one jax device per chip (a v5p or v4 chip's two cores are one device)
    mesh = dict(zip(("dp", "tp"), module("env_manager").default_mesh_shape(devices)))
    batch = 2 if cfg else 1
    tokens = module("memory_plan").transformer_tokens(config, height, width, frames)
    moved = sharding.layer_collective_bytes(config, tokens, mesh, batch)
    peak = chip.spec.peak_flops * chip.chips / devices
    ici = chip.spec.ici_gbps * 1e9 / 8 * chip.chips / devices
    kind = chip.spec.device_kind  # "TPU v5 lite" is v5e: choose_layout matches on it
    report = {"chip": chip.name, "mesh": mesh, "auto": sharding.choose_layout(config, tokens, mesh, batch, kind)[0]}
    for layout in sharding.LAYOUTS:
        compute = step_flops(config, height, width, frames, cfg) / sharding.parallel_devices(layout, mesh, batch) / peak
        link_bytes = sum(moved[layout].values()) * config["num_layers"]
        report[layout] = {"ici_bytes_per_device": link_bytes, "compute_seconds_at_peak": compute,
                          "seconds_at_38pct_mfu": compute / tpu_compile.MFU_ORIGINAL + link_bytes / ici}
    return report


def _tpu_compile():
    """benchmarks/tpu_compile.py (its chip table and MFU), imported once."""
    if "tpu_compile" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tpu_compile", os.path.join(REPO, "benchmarks", "tpu_compile.py"))
        sys.modules["tpu_compile"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["tpu_compile"])
    return sys.modules["tpu_compile"]


# ------------------------------------------------------------------ the peer
class DiffusersSide:
    def __init__(self, folder: str, precision: str):
        import torch
        from diffusers import WanPipeline

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        started = time.perf_counter()
        self.pipe = WanPipeline.from_pretrained(folder, torch_dtype=dtype)
        self.pipe.vae.to(torch.float32)  # as ours: the VAE runs in fp32
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - started

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, args) -> dict:
        torch, pipe = self.torch, self.pipe
        times = {}
        with torch.no_grad():
            started = time.perf_counter()
            positive, negative = pipe.encode_prompt(
                PROMPT, NEGATIVE, do_classifier_free_guidance=args.guidance > 1, max_sequence_length=512,
                device=self.device,
            )
            self._sync()
            times["encode"] = time.perf_counter() - started
            stamps = [time.perf_counter()]

            def on_step_end(pipeline, step, timestep, callback_kwargs):
                self._sync()
                stamps.append(time.perf_counter())
                return callback_kwargs

            latents = pipe(
                prompt_embeds=positive, negative_prompt_embeds=negative, height=args.height, width=args.width,
                num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.guidance,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                callback_on_step_end=on_step_end,
            ).frames
            times["steps"] = [b - a for a, b in zip(stamps, stamps[1:])]
            started = time.perf_counter()
            vae = pipe.vae
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            video = vae.decode((latents * std + mean).float(), return_dict=False)[0]
            frames = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()
            self._sync()
            times["decode"] = time.perf_counter() - started
        times["frames"] = frames
        return times


# ------------------------------------------------------------------ ours
class OurSide:
    def __init__(self, folder: str, precision: str, module, layout: str | None = None):
        self.module = module
        self.manager = module("env_manager").TorchaxEnvManager.instance()
        self.pipe = module("pipeline").WanTPUPipeline(folder, precision=precision, layout=layout)
        started = time.perf_counter()
        self.pipe.text_encoder()
        self.pipe.transformer()
        self.pipe.vae()
        self.load_seconds = time.perf_counter() - started

    def run(self, args) -> dict:
        times = {}
        started = time.perf_counter()
        embeddings = self.pipe.encode(PROMPT, NEGATIVE)
        times["encode"] = time.perf_counter() - started
        latents = self.pipe.denoise(
            embeddings, height=args.height, width=args.width, num_frames=args.frames,
            num_inference_steps=args.steps, guidance_scale=args.guidance, seed=0,
            flow_shift=5.0 if args.height >= 720 else 3.0,
        )
        times["steps"] = list(self.pipe.last_step_seconds)
        started = time.perf_counter()
        times["frames"] = self.pipe.decode(latents)
        times["decode"] = time.perf_counter() - started
        return times

    def transformer_only_seconds(self, args, repeats: int = 3) -> float:
        """Median time of the transformer call alone, on the step's own inputs, mesh and layout."""
        import numpy as np

        placement, torch_bridge = self.module("runtime.placement"), self.module("runtime.torch_bridge")
        jax = self.manager.jax
        transformer = self.pipe.transformer()
        manager = self.manager
        cfg = args.guidance > 1
        batch = 2 if cfg else 1
        shape = self.pipe.geometry.latent_shape(args.height, args.width, args.frames)
        dtype = jax.numpy.bfloat16 if self.pipe.precision == "bf16" else jax.numpy.float32
        sharding = placement.batch_sharding(transformer.mesh, batch)
        hidden = jax.device_put(np.zeros((batch,) + shape[1:], np.float32), sharding).astype(dtype)
        context = jax.device_put(np.zeros((batch, 512, transformer.config["text_dim"]), np.float32), sharding).astype(dtype)
        timestep = jax.numpy.full((batch,), 500.0)

        split = None
        if self.pipe.last_run["layout"] == "sequence":
            split = self.module("sharding").token_split(dict(transformer.mesh.shape), batch)

        @jax.jit
        def forward(weights, hidden, timesteps, context):
            if split is not None:
                weights = placement.gather_split_weights(manager, weights, transformer.plan.specs, transformer.mesh)
            return torch_bridge.call_transformer(manager, transformer.module, weights, transformer.mesh, hidden,
                                                 timesteps, context, split=split)

        forward(transformer.weights, hidden=hidden, timesteps=timestep, context=context).block_until_ready()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(transformer.weights, hidden=hidden, timesteps=timestep, context=context).block_until_ready()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)


# ------------------------------------------------------------------ reporting
def stage_summary(runs: list[dict]) -> dict:
    first, warm = runs[0], runs[1:] or runs[:1]
    step_first = first["steps"][0]
    warm_steps = [s for run in warm for s in run["steps"]] + first["steps"][1:]
    return {
        "encode": {"first": first["encode"], "warm": statistics.median(r["encode"] for r in warm)},
        "step": {"first": step_first, "warm": statistics.median(warm_steps)},
        "decode": {"first": first["decode"], "warm": statistics.median(r["decode"] for r in warm)},
        "pipeline": {
            "first": first["encode"] + sum(first["steps"]) + first["decode"],
            "warm": statistics.median(r["encode"] + sum(r["steps"]) + r["decode"] for r in warm),
        },
    }


def startup_times(args) -> dict:
    """Time to first step in two fresh processes sharing a new, empty compilation cache."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="wan-jax-cache-") as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, WAN_TPU_COMPILE_CACHE="1")
        for label in ("cold", "warm"):
            command = [sys.executable, os.path.abspath(__file__), "--first-step-only", "--config", args.config,
                       "--height", str(args.height), "--width", str(args.width), "--frames", str(args.frames),
                       "--models-dir", args.models_dir, "--precision", args.precision]
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            results[label] = json.loads(output.strip().splitlines()[-1])
    return results


def first_step_only(args) -> None:
    """The --startup child: load, encode and one denoising step; prints JSON."""
    started = time.perf_counter()
    module = load_pack()
    side = OurSide(model_folder(args, module), args.precision, module)
    embeddings = side.pipe.encode(PROMPT, NEGATIVE)
    side.pipe.denoise(embeddings, height=args.height, width=args.width, num_frames=args.frames,
                      num_inference_steps=1, guidance_scale=args.guidance, seed=0, flow_shift=3.0)
    sys.stdout.write(json.dumps({
        "time_to_first_step": time.perf_counter() - started,
        "first_step": side.pipe.last_step_seconds[0],
        "compilations": side.manager.compile_count(),
        "cache_hits": side.manager.cache_hit_count(),
    }) + "\n")


# ------------------------------------------------------------------ fewer steps
# name -> (steps, guidance, guidance_2, sampler, shift, magcache, lora pair)
FEWER_STEP_CASES = {
    "UniPC 50 steps (baseline)": (50, 5.0, None, "unipc", None, False, False),
    "MagCache at defaults": (50, 5.0, None, "unipc", None, True, False),
    "4-step Euler, guidance 1": (4, 1.0, None, "euler", 5.0, False, False),
}
# Wan 2.2 T2V A14B's own settings (40 steps, guidance 4.0 / 3.0, shift 12), and its 4-step LoRA pair.
TWO_EXPERT_CASES = {
    "UniPC 40 steps (baseline)": (40, 4.0, 3.0, "unipc", 12.0, False, False),
    "MagCache at defaults": (40, 4.0, 3.0, "unipc", 12.0, True, False),
    "4-step Euler, LoRA pair": (4, 1.0, 1.0, "euler", 5.0, False, True),
}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def write_lora_pair(folder: str, transformer_config: dict, rank: int = 32) -> dict:
    """A random high/low LoRA pair in ComfyUI's format (lightx2v's Wan 2.2 Lightning layout: every
    block's attention and FFN linears) for this architecture; {"high_noise": path, "low_noise": path}."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    ffn = transformer_config["ffn_dim"]
    shapes = {**{f"{attn}.{x}": (dim, dim) for attn in ("self_attn", "cross_attn") for x in "qkvo"},
              "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    paths = {}
    for seed, expert in enumerate(("high_noise", "low_noise")):
        generator = np.random.default_rng(seed)
        tensors = {}
        for block in range(transformer_config["num_layers"]):
            for name, (out_dim, in_dim) in shapes.items():
                key = f"diffusion_model.blocks.{block}.{name}"
                tensors[f"{key}.lora_down.weight"] = torch.from_numpy(
                    generator.normal(0, 0.02, (rank, in_dim)).astype(np.float32))
                tensors[f"{key}.lora_up.weight"] = torch.from_numpy(
                    generator.normal(0, 0.02, (out_dim, rank)).astype(np.float32))
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        paths[expert] = os.path.join(folder, f"bench_lora_{expert}.safetensors")
        save_file(tensors, paths[expert])
    return paths


def _diffusers_case(peer, args, ours, case, ratios, loras):
    """(seconds denoising, transformer evaluations, frames) for diffusers doing the same thing."""
    steps, guidance, guidance_2, sampler, shift, use_magcache, use_loras = case
    torch, pipe = peer.torch, peer.pipe
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import MagCacheConfig

    transformers = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    original = pipe.scheduler
    calls = []
    hooks = []
    for transformer in transformers:
        hooks.append(transformer.register_forward_pre_hook(lambda *_: calls.append(False)))
        hooks.append(transformer.blocks[0].attn1.register_forward_hook(lambda *_: calls.__setitem__(-1, True)))
    fused = []
    try:
        shift = shift or (5.0 if args.height >= 720 else 3.0)
        if sampler == "euler":
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        else:
            pipe.scheduler = pipe.scheduler.from_config(original.config, flow_shift=shift)
        if use_loras:
            for index, (expert, path) in enumerate(sorted(loras.items())):
                component = "transformer" if expert == "high_noise" else "transformer_2"
                pipe.load_lora_weights(path, adapter_name=expert, load_into_transformer_2=component == "transformer_2")
                pipe.fuse_lora(components=[component], lora_scale=1.0, adapter_names=[expert])
                fused.append(component)
        if use_magcache:  # a MagCacheConfig per transformer, over its share of the steps and of the ratios
            schedule = ours.module("scheduler").make_schedule(sampler, ours.pipe.transformer().scheduler_config,
                                                              steps, shift)
            experts = [ours.pipe.family.expert_for(float(t)) for t in schedule.timesteps]
            parts = ours.module("magcache").expert_ratio_slices(experts, ratios)
            for transformer, part in zip(transformers, parts):
                transformer.enable_cache(MagCacheConfig(num_inference_steps=len(part), mag_ratios=part))
                # diffusers 0.39 keeps a stale list of hooked submodules once the transformer has run, and
                # MagCache's hooks would then share one state between the CFG halves: refresh it.
                transformer._diffusers_hook._child_registries_cache = None
        extra = {} if guidance_2 is None else {"guidance_scale_2": guidance_2}
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=guidance > 1,
                                                    max_sequence_length=512, device=peer.device)
            peer._sync()
            started = time.perf_counter()
            latents = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, height=args.height,
                           width=args.width, num_frames=args.frames, num_inference_steps=steps,
                           guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(0),
                           output_type="latent", **extra).frames
            peer._sync()
            seconds = time.perf_counter() - started
            vae = pipe.vae
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            video = vae.decode((latents * std + mean).float(), return_dict=False)[0]
            frames = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy()
    finally:
        for hook in hooks:
            hook.remove()
        if use_magcache:
            for transformer in transformers:
                transformer.disable_cache()
        if fused:
            pipe.unfuse_lora(components=fused)
            pipe.unload_lora_weights()
        pipe.scheduler = original
    per_call = 2 if guidance > 1 else 1
    return seconds, sum(calls) // per_call, frames


def _our_case(ours, args, case, ratios, loras):
    steps, guidance, guidance_2, sampler, shift, use_magcache, use_loras = case
    module = ours.module
    settings = module("magcache").MagCacheSettings(mag_ratios=tuple(ratios)) if use_magcache else None
    specs = [module("lora").LoraSpec(path, 1.0, expert) for expert, path in loras.items()] if use_loras else []
    embeddings = ours.pipe.encode(PROMPT, NEGATIVE)
    started = time.perf_counter()
    latents = ours.pipe.denoise(embeddings, height=args.height, width=args.width, num_frames=args.frames,
                                num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
                                seed=0, sampler=sampler, flow_shift=shift or (5.0 if args.height >= 720 else 3.0),
                                magcache=settings, loras=specs)
    seconds = time.perf_counter() - started
    return seconds, ours.pipe.last_run["transformer_evaluations"], ours.pipe.decode(latents).numpy()


def fewer_steps(args, module, peer, ours) -> dict:
    """Each case twice per side (the first compiles), alternating; the second run is reported. The LoRA
    case's time includes fusing the pair (ours: on the device; diffusers: load_lora_weights + fuse_lora
    happen before its timer starts, so it is timed without them)."""
    magcache = module("magcache")
    two_experts = ours.pipe.family.two_experts
    family = "Wan 2.2 T2V A14B" if two_experts else "Wan 2.1 T2V"
    ratios = magcache.published_ratios(family, {"num_layers": 40, "num_attention_heads": 40}, 720, 1280,
                                       False).ratios
    cases = TWO_EXPERT_CASES if two_experts else FEWER_STEP_CASES
    loras = write_lora_pair(args.models_dir, ours.pipe.transformer().config) if two_experts else {}
    results = {}
    for name, case in cases.items():
        for _ in range(2):
            peer_result = _diffusers_case(peer, args, ours, case, ratios, loras) if peer is not None else None
            before = ours.manager.compile_count()
            ours_result = _our_case(ours, args, case, ratios, loras)
        results[name] = {"ours": ours_result, "diffusers": peer_result,
                         "recompilations_in_warm_run": ours.manager.compile_count() - before}
    baseline = next(iter(results.values()))
    report = {}
    for name, result in results.items():
        entry = {"recompilations_in_warm_run": result["recompilations_in_warm_run"]}
        for side in ("ours", "diffusers"):
            if result[side] is None:
                continue
            seconds, evaluations, frames = result[side]
            entry[side] = {"seconds": seconds, "transformer_evaluations": evaluations,
                           "speedup_over_baseline": baseline[side][0] / seconds,
                           "psnr_vs_baseline_db": _psnr(frames, baseline[side][2])}
        if result["diffusers"] is not None:
            entry["ours_over_diffusers"] = result["ours"][0] / result["diffusers"][0]
            entry["max_abs_frame_difference"] = float(abs(result["ours"][2] - result["diffusers"][2]).max())
        report[name] = entry
    return report


def print_fewer_steps(report: dict) -> None:
    print(f"{'case':28} {'evals ours':>10} {'evals peer':>10} {'ours s':>8} {'peer s':>8} {'ours/peer':>9} "
          f"{'speed-up':>9} {'PSNR dB':>8}")
    for name, entry in report.items():
        ours, peer = entry["ours"], entry.get("diffusers", {})
        print(f"{name:28} {ours['transformer_evaluations']:10d} {peer.get('transformer_evaluations', -1):10d} "
              f"{ours['seconds']:8.1f} {peer.get('seconds', float('nan')):8.1f} "
              f"{entry.get('ours_over_diffusers', float('nan')):9.3f} {ours['speedup_over_baseline']:9.2f} "
              f"{ours['psnr_vs_baseline_db']:8.1f}")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = load_pack()
    jax = module("env_manager").TorchaxEnvManager.instance().jax
    backend = jax.default_backend()
    args.precision = args.precision or ("fp32" if backend == "cpu" else "bf16")
    if args.first_step_only:
        return first_step_only(args)
    if args.fewer_steps:
        folder = model_folder(args, module)
        peer = None if args.no_peer else DiffusersSide(folder, args.precision)
        ours = OurSide(folder, args.precision, module)
        report = {"config": args.config, "height": args.height, "width": args.width, "frames": args.frames,
                  "precision": args.precision, "backend": backend, "cpus": os.cpu_count(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "cases": fewer_steps(args, module, peer, ours)}
        output = args.output or os.path.join(REPO, "benchmarks", "results", f"{args.config}-{backend}-fewer-steps.json")
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "w") as handle:
            json.dump(report, handle, indent=2)
        print_fewer_steps(report["cases"])
        print(f"\nwritten to {output}")
        return
    folder = model_folder(args, module)
    import numpy as np
    import torch

    peer = None if args.no_peer else DiffusersSide(folder, args.precision)
    ours = OurSide(folder, args.precision, module, args.layout)
    ours_runs, peer_runs, recompiles = [], [], []
    for run in range(args.runs):  # alternate, so drift in the machine affects both alike
        if peer is not None:
            peer_runs.append(peer.run(args))
        before = ours.manager.compile_count()
        ours_runs.append(ours.run(args))
        if run > 0:
            recompiles.append(ours.manager.compile_count() - before)
    transformer_alone = ours.transformer_only_seconds(args)
    config = json.load(open(os.path.join(folder, "transformer", "config.json")))
    flops = step_flops(config, args.height, args.width, args.frames, args.guidance > 1)
    summary = {"ours": stage_summary(ours_runs)}
    summary["ours"]["load"] = ours.load_seconds
    report = {
        "config": args.config, "height": args.height, "width": args.width, "frames": args.frames,
        "steps": args.steps, "guidance": args.guidance, "precision": args.precision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": backend,
                    "jax_devices": [str(d) for d in jax.devices()], "torch_device": peer.device if peer else None,
                    "jax": jax.__version__, "torch": torch.__version__},
        "runs": args.runs, "flops_per_step": flops,
        "recompilations_in_warm_runs": recompiles,
        "transformer_only_step": transformer_alone,
        "outside_transformer_fraction": max(0.0, 1 - transformer_alone / summary["ours"]["step"]["warm"]),
        "tflops_ours": flops / summary["ours"]["step"]["warm"] / 1e12,
        "layout": ours.pipe.last_run["layout"],
        "projection": layout_projection(module, config, args.height, args.width, args.frames, args.guidance > 1,
                                        args.project_chip),
    }
    if peer is not None:
        summary["diffusers"] = stage_summary(peer_runs)
        summary["diffusers"]["load"] = peer.load_seconds
        report["ratios_ours_over_diffusers"] = {
            stage: {kind: summary["ours"][stage][kind] / summary["diffusers"][stage][kind] for kind in ("first", "warm")}
            for stage in ("encode", "step", "decode", "pipeline")
        }
        report["ratios_ours_over_diffusers"]["load"] = ours.load_seconds / peer.load_seconds
        report["tflops_diffusers"] = flops / summary["diffusers"]["step"]["warm"] / 1e12
        report["max_abs_frame_difference"] = float(
            np.abs(ours_runs[-1]["frames"].numpy() - peer_runs[-1]["frames"].numpy()).max()
        )
    report["summary"] = summary
    if args.startup:
        report["startup"] = startup_times(args)
    output = args.output or os.path.join(REPO, "benchmarks", "results", f"{args.config}-{backend}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(report, handle, indent=2)
    print_report(report)
    print(f"\nwritten to {output}")


def print_report(report: dict) -> None:
    summary = report["summary"]
    print(f"{report['config']}: {report['height']}x{report['width']}, {report['frames']} frames, "
          f"{report['steps']} steps, guidance {report['guidance']}, {report['precision']}, "
          f"{report['machine']['jax_backend']} ({report['machine']['cpus']} cpus)")
    print(f"{'stage':10} {'ours first':>11} {'ours warm':>10} {'peer first':>11} {'peer warm':>10} {'warm ratio':>11}")
    for stage in ("encode", "step", "decode", "pipeline"):
        ours = summary["ours"][stage]
        peer = summary.get("diffusers", {}).get(stage, {"first": float("nan"), "warm": float("nan")})
        print(f"{stage:10} {ours['first']:11.3f} {ours['warm']:10.3f} {peer['first']:11.3f} {peer['warm']:10.3f} "
              f"{ours['warm'] / peer['warm']:11.3f}")
    print(f"load: ours {summary['ours']['load']:.2f} s, diffusers {summary.get('diffusers', {}).get('load', float('nan')):.2f} s")
    print(f"FLOPs/step {report['flops_per_step']:.3e}: ours {report['tflops_ours']:.3f} TFLOP/s"
          + (f", diffusers {report['tflops_diffusers']:.3f} TFLOP/s" if "tflops_diffusers" in report else ""))
    print(f"outside the transformer: {100 * report['outside_transformer_fraction']:.1f}% of a step; "
          f"recompilations in warm runs: {report['recompilations_in_warm_runs']}")
    print(f"layout: {report['layout']}")
    projection = report["projection"]
    for layout in ("tensor", "sequence"):
        entry = projection[layout]
        print(f"projected on {projection['chip']} {projection['mesh']}, {layout} layout"
              f"{' (auto)' if projection['auto'] == layout else ''}: {entry['seconds_at_38pct_mfu']:.3f} s/step at 38% "
              f"MFU with {entry['ici_bytes_per_device'] / 2**30:.2f} GiB through each chip's ICI, no overlap "
              f"(a projection from the cost model, not a measurement)")
    if "max_abs_frame_difference" in report:
        print(f"max |ours - diffusers| over the last run's frames: {report['max_abs_frame_difference']:.2e}")
    if "startup" in report:
        for label, values in report["startup"].items():
            print(f"{label} start: {values['time_to_first_step']:.2f} s to the first step "
                  f"({values['compilations']} compiled, {values['cache_hits']} from the cache)")


if __name__ == "__main__":
    main()
