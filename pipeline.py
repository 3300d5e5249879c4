"""The ComfyUI-free core: Wan video generation on torchax over a (dp, tp) mesh, every family through one
set of stages (each usable alone; the ComfyUI nodes call them one by one):

- ``encode(prompt, negative_prompt)`` -> ``WanEmbeddings`` (CPU tensors);
- ``encode_image(image, end_image=None, ...)`` -> ``WanImageConditioning``, for the families that take an image;
- ``denoise(embeddings, ...)`` -> VAE latents [1, C, T, H/f, W/f] (CPU), in the VAE's own space: the
  convention of ComfyUI's LATENT and of ``decode``;
- ``decode(latents)`` -> frames [F, H, W, 3] float32 in [0, 1] (CPU).

The diffusers modules run unchanged: their weights become sharded jax arrays, and each stage is a
``jax.jit`` of a pure function that calls the torch module through torchax (``runtime.torch_bridge``).
Components are loaded, sharded and compiled once and cached by ``TorchaxEnvManager``
(``models.wan.components``); prompts, seeds, guidance, step counts and flow_shift are traced values, so
changing them compiles nothing. What differs between families is in their class (``models.wan.families``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

from . import sharding
from .magcache import MagCacheSettings, RatioSource, save_calibration, step_modes
from .models.wan.components import WanComponents
from .models.wan.conditioning import (WanEmbeddings, WanImageConditioning, check_embeddings,
                                      check_image_conditioning)
from .models.wan.configs import TEXT_TOKENS
from .models.wan.latents import to_vae_latents
from .runtime import environment
from .runtime.multihost import mirrored
from .runtime.placement import batch_sharding, local_device, to_host
from .sampling.denoise_run import Callbacks, DenoiseRun
from .sampling.step_program import radial_steps
from .sampling.loras import apply_loras
from .scheduler import make_schedule
from .utils import device_errors, torch_to_numpy

__all__ = ["WanTPUPipeline", "WanEmbeddings", "WanImageConditioning"]

logger = logging.getLogger("wan_tpu")


class WanTPUPipeline(WanComponents):
    """Wan text- and image-to-video on the JAX default backend (TPU, GPU or CPU).

    ``model_id``: repo id or folder (or ``model_files.FileSource``); ``precision``: 'bf16' or 'fp32' for
    the text encoder and transformer (the VAE always runs in fp32); ``dp``/``tp``: mesh override (default:
    dp=2 when the device count is even). ``layout``: how the denoising step splits the transformer,
    "tensor", "sequence" or "auto" (None: ``WAN_TPU_LAYOUT``, else "auto": the one whose collectives move
    fewer bytes, ``sharding.choose_layout``). Both use the same weights.
    """

    def __init__(self, model_id: str | Any = None, precision: str = "bf16", dp: int | None = None,
                 tp: int | None = None, manager=None, layout: str | None = None):
        self.layout = (sharding.check_layout(layout) if layout else
                       sharding.check_layout(environment.read(environment.LAYOUT), given_as=environment.LAYOUT))
        super().__init__(*(() if model_id is None else (model_id,)), precision=precision, dp=dp, tp=tp,
                         manager=manager)
        self.model_arg = model_id
        self.last_step_seconds: list[float] = []

    def multihost_spec(self) -> dict:
        """The arguments a follower makes the same pipeline with (``runtime.multihost``)."""
        return {"model_id": self.model_arg, "precision": self.precision, "dp": self.dp, "tp": self.tp,
                "layout": self.layout}

    def memory_plan(self, height, width, num_frames, guidance_scale, layout=None):
        return super().memory_plan(height, width, num_frames, guidance_scale, layout or self.layout)

    def apply_loras(self, loras=(), on_status: Callable[[str], None] | None = None) -> None:
        """Fuse ``loras`` into the transformers' weights on the device (``sampling.loras.apply_loras``)."""
        apply_loras(self, loras, on_status)

    def step_layout(self, transformer, height: int, width: int, num_frames: int, batch: int,
                    layout: str | None = None) -> str:
        """The layout this run's step uses: ``layout`` (else the pipeline's), or for "auto" the cost model's."""
        from . import memory_plan

        mesh = transformer.mesh
        layout, why = memory_plan.resolve_layout(layout or self.layout, transformer.config, dict(mesh.shape), height,
                                                 width, num_frames, batch == 2, mesh.devices.flat[0].device_kind)
        if why is not None:
            logger.info("layout %s (auto): %s", layout, why)
        return layout

    # ------------------------------------------------------------------ stages
    @mirrored()
    def encode(self, prompt: str, negative_prompt: str = "", on_status: Callable[[str], None] | None = None
               ) -> WanEmbeddings:
        """UMT5 embeddings of ``prompt`` and ``negative_prompt`` (diffusers' semantics, 512 tokens).

        ``on_status(text)`` hears "loading ..." and "encoding ..." as they start."""
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: give the prompt as text")
        self.announce_loading(on_status, "text_encoder")
        component = self.text_encoder()
        if on_status is not None:
            on_status("encoding the prompt")
        jax = self.manager.jax
        with self.timer("encode"):
            tokens = component.tokenizer(
                [prompt_clean(prompt), prompt_clean(negative_prompt or "")],
                padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                add_special_tokens=True, return_attention_mask=True, return_tensors="np",
            )
            pair = batch_sharding(component.mesh, 2)
            ids = jax.device_put(tokens["input_ids"].astype(np.int32), pair)
            mask = jax.device_put(tokens["attention_mask"].astype(np.int32), pair)
            with device_errors("the text encoder", "Use a mesh with more devices."), self.matmul_precision():
                hidden = to_host(component.encode_fn(component.weights, ids, mask))
        embeds = torch.from_numpy(hidden.copy())
        return WanEmbeddings(embeds[:1], embeds[1:], self.source.model_id)

    @mirrored()
    def encode_image(self, image, *, height: int = 480, width: int = 832, num_frames: int = 81,
                     on_status: Callable[[str], None] | None = None, end_image=None) -> WanImageConditioning:
        """An image-to-video model's conditioning on ``image`` (its first frame) and, for first-last-frame
        models, ``end_image`` (its last), as diffusers' ``WanImageToVideoPipeline`` makes it (``last_image``),
        with the VAE encoder and CLIP on the device.

        ``image``/``end_image``: a PIL image, or an array [H, W, 3] (or [1, H, W, 3], ComfyUI's IMAGE) in
        [0, 1]; resized to ``width`` x ``height`` on the host by diffusers' own processors.
        """
        from .models.wan.image_encoding import encode_image

        return encode_image(self, image, end_image, height, width, num_frames, on_status)

    @mirrored(steps=True)
    def denoise(self, embeddings: WanEmbeddings, *, height: int = 720, width: int = 1280, num_frames: int = 81,
                num_inference_steps: int = 50, guidance_scale: float = 5.0, seed: int = 0, flow_shift: float = 5.0,
                on_step: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
                sampler: str = "unipc", timesteps=None, magcache: MagCacheSettings | None = None, loras=(),
                guidance_scale_2: float | None = None, image: WanImageConditioning | None = None,
                layout: str | None = None, magcache_calibrate: bool = False,
                on_preview: Callable[[np.ndarray], None] | None = None, attention: str = "dense",
                radial_dense_steps: int | None = None, radial_dense_blocks: int | None = None):
        """Denoise from the seed's noise; returns VAE latents [1, C, T, H/f, W/f] float32 on CPU.

        ``layout``: how the step splits the transformer over the mesh, "tensor", "sequence" or "auto";
        None: the pipeline's (``WanTPUPipeline(layout=...)``, ``WAN_TPU_LAYOUT``, else "auto").

        ``image``: for image-to-video models, ``encode_image``'s conditioning (made for this size).

        ``on_preview(frame)``: after every step, before ``on_step``, the predicted clean latent's middle
        frame [C, h, w] (numpy, float32, in the transformer's normalised space) for a live preview. Only
        that frame leaves the device, and only when ``on_preview`` is given.

        ``on_step(i, total)`` runs once with i=0 when loading and compiling are
        done and the first step starts, then after every step; an exception
        from it (a Cancel) stops the run, and the cached components stay
        usable. ``on_status(text)`` hears "loading ..." and "compiling ...".
        Guidance above 1 runs cond and uncond as one batch of 2.

        ``sampler``: "unipc" (the model's scheduler) or "euler" (flow-matching
        Euler with shift ``flow_shift`` and optional explicit ``timesteps``).
        ``magcache``: MagCache settings, or None for every step in full.
        ``self.last_run`` then says how many steps ran the transformer.
        ``magcache_calibrate``: run every step in full and record MagCache's magnitude ratios, saved
        for this model (``magcache.save_calibration``): later MagCache runs of it use them.
        ``self.last_run["magcache_ratios"]`` and ``["magcache_calibration"]`` (the file) say what was saved.
        ``loras``: ``lora.LoraSpec``s fused into the transformers' weights on the
        device for this run (and kept until another list is given; () undoes them);
        each goes into the expert its ``expert`` names.

        Two-expert families (Wan 2.2 A14B): steps whose timestep is below the
        boundary run the low-noise expert, with ``guidance_scale_2`` (None: the
        same as ``guidance_scale``); CFG runs when ``guidance_scale`` > 1, as in
        diffusers. Both experts share one compiled step (same shapes).

        ``attention``: "dense" (every query attends every key), or "radial": Radial attention's static
        sparse mask (``models.wan.radial``; it changes the video), dense for the first
        ``radial_dense_steps`` steps (12) and the first ``radial_dense_blocks`` transformer blocks (1), as the
        paper runs Wan. It compiles a second step program once; dense steps keep the first.
        """
        attention_of_step, dense_blocks = radial_steps(attention, num_inference_steps, radial_dense_steps,
                                                       radial_dense_blocks)
        video = dict(height=height, width=width, num_frames=num_frames)
        layout, plan, experts = self._checked_run(embeddings, image, guidance_scale, guidance_scale_2, layout,
                                                  on_status, **video)
        transformer = experts[0]
        schedule = make_schedule(sampler, transformer.scheduler_config, num_inference_steps, flow_shift, timesteps)
        train_steps = transformer.scheduler_config.get("num_train_timesteps", 1000)
        expert_of_step = [self.family.expert_for(float(t), train_steps) for t in schedule.timesteps]
        second_guidance = guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
        guidance_of_step = [guidance_scale if e == 0 else second_guidance for e in expert_of_step]
        modes = step_modes(lambda: self.ratio_source(transformer, height, width, image), magcache,
                           magcache_calibrate, expert_of_step)
        self.apply_loras(loras, on_status)
        cfg = guidance_scale > 1.0
        layout = self.step_layout(transformer, height, width, num_frames, 2 if cfg else 1, layout)  # resolves "auto"
        whole = layout == "sequence" == plan.layout and plan.whole_weights and len(experts) == 1
        run = DenoiseRun(self.manager, self.family, experts, schedule, expert_of_step, guidance_of_step, modes,
                         layout, cfg, whole_weights=whole, calibrate=magcache_calibrate,
                         attention_of_step=attention_of_step, dense_blocks=dense_blocks)
        self.last_step_seconds = run.step_seconds
        with self.timer("denoise"):
            latents = run.run(self._noise(seed, **video), self._context(embeddings, cfg),
                              None if image is None else image.condition.numpy(),
                              None if image is None or image.image_embeds is None
                              else image.image_embeds.float().numpy(),
                              Callbacks(on_step, on_status, on_preview))
        self._record_run(run, sampler, magcache, transformer, image, dict(video, flow_shift=float(flow_shift),
                                                                          guidance_scale=guidance_scale))
        import torch

        return torch.from_numpy(to_vae_latents(latents, *self.vae_latent_stats()))

    def _checked_run(self, embeddings, image, guidance_scale, guidance_scale_2, layout, on_status, *, height,
                     width, num_frames):
        """Every check of a run's inputs, before anything loads (the HBM plan) and before the loop (the
        embeddings and image against the loaded transformer). Returns (layout, HBM plan, experts)."""
        family = self.family
        family.check_video(self.geometry, height, width, num_frames)
        layout = sharding.check_layout(layout or self.layout)
        if not 0 <= guidance_scale <= 100:
            raise ValueError(f"guidance_scale={guidance_scale}: use a value between 0 and 100 (5.0 is typical)")
        if guidance_scale_2 is not None and not family.two_experts:
            raise ValueError(f"guidance_scale_2={guidance_scale_2} is for two-expert models (Wan 2.2 A14B); "
                             f"{self.source.model_id!r} is {family.name}: leave it unset")
        plan = self.memory_plan(height, width, num_frames, guidance_scale, layout)
        experts = self.experts(on_status)
        model = repr(self.source.model_id)
        check_embeddings(embeddings, experts[0].config, model)
        check_image_conditioning(image, family, experts[0].config, model, height, width, num_frames)
        return layout, plan, experts

    def _noise(self, seed: int, height: int, width: int, num_frames: int) -> np.ndarray:
        """The seed's noise, drawn exactly as diffusers draws it (CPU generator, float32)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator("cpu").manual_seed(int(seed))
        return randn_tensor(self.geometry.latent_shape(height, width, num_frames), generator=generator,
                            dtype=torch.float32).numpy()

    def _context(self, embeddings: WanEmbeddings, cfg: bool) -> np.ndarray:
        """The prompt (and, with CFG, the negative prompt) as one batch, in the transformer's precision."""
        import torch

        context = [embeddings.prompt_embeds] + ([embeddings.negative_prompt_embeds] if cfg else [])
        return torch_to_numpy(torch.cat(context).to(torch.bfloat16 if self.precision == "bf16" else torch.float32))

    def _record_run(self, run: DenoiseRun, sampler, magcache, transformer, image, settings: dict) -> None:
        """``self.last_run``, and a MagCache calibration's ratios saved for this model."""
        total = len(run.modes)
        evaluations = sum(mode != "reuse" for mode in run.modes)
        self.last_run = {"steps": total, "transformer_evaluations": evaluations, "skipped_steps": total - evaluations,
                         "sampler": sampler, "magcache": magcache is not None,
                         "low_noise_expert_steps": sum(run.expert_of_step), "layout": run.layout,
                         "whole_weights": run.whole_weights}
        if magcache is not None and not run.calibrate:
            logger.info("MagCache: %d of %d steps ran the transformer", evaluations, total)
        if run.calibrate:
            self.last_run["magcache_ratios"] = run.calibration
            self.last_run["magcache_calibration"] = save_calibration(
                self.ratio_source(transformer, settings["height"], settings["width"], image), run.calibration,
                {"steps": total, "sampler": sampler, **settings})

    def ratio_source(self, transformer, height: int, width: int, image) -> RatioSource:
        """What MagCache's ratios are looked up by: this model, its family and shape, and the video."""
        model = os.path.realpath(self.source.location) if self.source.is_local else self.source.location
        return RatioSource(model, self.family.name, transformer.config, height, width, image is not None)

    @mirrored()
    def decode(self, latents, on_status: Callable[[str], None] | None = None) -> Any:
        """Frames [F, H, W, 3] float32 in [0, 1] (CPU) from VAE latents [B, C, T, h, w].

        Batches are decoded one by one and their frames concatenated. The HBM
        plan is checked first, as before denoising.
        """
        import torch

        latents = torch.as_tensor(latents)
        if latents.ndim == 4:
            latents = latents.unsqueeze(0)
        geometry = self.geometry
        if latents.ndim != 5 or latents.shape[1] != geometry.channels:
            f = geometry.spatial_factor
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: the VAE of {self.source.model_id!r} decodes "
                f"[batch, {geometry.channels}, frames, height/{f}, width/{f}]: decode with the model that made them"
            )
        self.memory_plan(*geometry.video_size(latents.shape), guidance_scale=1.0)
        self.announce_loading(on_status, "vae")
        component = self.vae()
        if on_status is not None:
            on_status("decoding the video")
        frames = []
        with self.timer("decode"):
            for item in latents.float():
                frames.append(component.decoder.decode(component.weights, item[None].numpy(), on_status,
                                                       device=local_device(component.mesh)))
        return torch.from_numpy(np.concatenate(frames))

    @mirrored(steps=True)
    def generate(self, prompt: str, negative_prompt: str = "", on_status: Callable[[str], None] | None = None,
                 **denoise_args):
        """encode -> denoise -> decode; returns frames [F, H, W, 3]."""
        embeddings = self.encode(prompt, negative_prompt, on_status=on_status)
        latents = self.denoise(embeddings, on_status=on_status, **denoise_args)
        return self.decode(latents, on_status=on_status)

