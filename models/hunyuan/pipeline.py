"""HunyuanVideo 1.5 text- and image-to-video on the model-agnostic core: the same stages as
``pipeline.WanTPUPipeline`` (each usable alone; the nodes call them one by one):

- ``encode(prompt, negative_prompt)`` -> ``HunyuanEmbeddings`` (Qwen2.5-VL's and ByT5's tokens, CPU);
- ``encode_image(image, ...)`` -> ``HunyuanImageConditioning`` (image-to-video: VAE latents, SigLIP tokens);
- ``denoise(embeddings, ...)`` -> VAE latents [1, C, T, H/f, W/f] in the VAE's own space (CPU);
- ``decode(latents)`` -> frames [F, H, W, 3] float32 in [0, 1] (CPU).

The denoising loop is ``sampling.DenoiseRun`` over ``sampling.StepProgram``, the Wan families' own; what
differs is in ``models.hunyuan.family``. Prompts, seeds, guidance and step counts are data, so changing
them compiles nothing. Everything follows diffusers' ``HunyuanVideo15Pipeline`` and
``HunyuanVideo15ImageToVideoPipeline``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...runtime.multihost import mirrored
from ...runtime.placement import batch_sharding, replicated, to_host
from ...runtime.torch_bridge import call_torch_module
from ...sampling.denoise_run import Callbacks, DenoiseRun
from ...scheduler import flow_match_sigmas_schedule
from ...utils import device_errors, torch_to_numpy
from . import deepcache as deep_cache
from . import vae_tiles
from .components import HunyuanComponents, check_transformer_layout
from .family import GLYPH_TOKENS, TEMPLATE_CROP, TEXT_TOKENS

logger = logging.getLogger("wan_tpu")


@dataclass
class HunyuanEmbeddings:
    """One prompt's and one negative prompt's encodings, each (qwen [1, 1000, D], qwen_mask [1, 1000],
    byt5 [1, 256, D2], byt5_mask [1, 256]) as CPU tensors, and the model that made them."""

    prompt: tuple
    negative: tuple
    model_id: str


@dataclass
class HunyuanImageConditioning:
    """The start image's VAE latents [1, C, 1, h, w] (scaled) and SigLIP tokens [1, n, dim], made at
    ``height`` x ``width``."""

    image_latents: Any
    image_embeds: Any
    height: int
    width: int


def _diffusers_helpers():
    from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5 as module

    system = inspect.signature(module.HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"]
    return module.format_text_input, module.extract_glyph_texts, system.default


# The programs of the encoders, as functions of (weights, inputs) to jit: the pipeline's and the compile
# command's (benchmarks/hunyuan_compile.py --stage encoders).
def qwen_encode_fn(manager, module) -> Callable:
    """(weights, ids [B, S], mask [B, S]) -> Qwen2.5-VL's third-last hidden state [B, S, D], as diffusers'
    ``num_hidden_layers_to_skip=2`` takes it."""
    jnp = manager.jax.numpy
    layer_types = set(getattr(module.config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"the Qwen text encoder has layers {sorted(layer_types)}: HunyuanVideo 1.5's has only "
                         f"full attention (use_sliding_window false); use the released text_encoder/")

    def encode(weights, ids, mask):
        # The causal mask with each prompt's padding, made here: transformers would test the padding's
        # values to skip it, which a traced program cannot.
        causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
        full = causal[None, None] & (mask[:, None, None, :] > 0)  # [B, 1, S, S], True: attend
        return call_torch_module(manager, module, weights, "forward", (ids,),
                                 {"attention_mask": {"full_attention": full}, "output_hidden_states": True},
                                 pick=lambda out: out.hidden_states[-3])

    return encode


def byt5_encode_fn(manager, module) -> Callable:
    """(weights, ids [1, 256], mask [1, 256] float) -> ByT5's last hidden state."""
    return lambda weights, ids, mask: call_torch_module(manager, module, weights, "forward", (ids, mask),
                                                        pick=lambda out: out[0])


def vae_encode_fn(manager, module) -> Callable:
    """(weights, pixels [1, 3, 1, H, W]) -> the latent distribution's mode (unscaled)."""
    return lambda weights, x: call_torch_module(manager, module, weights, "encode", (x,),
                                                pick=lambda out: out.latent_dist.mode())


def siglip_encode_fn(manager, module) -> Callable:
    """(weights, pixel_values [1, 3, 384, 384]) -> SigLIP's last hidden state [1, 729, D]."""
    return lambda weights, x: call_torch_module(manager, module, weights, "forward", (x,),
                                                pick=lambda out: out.last_hidden_state)


def resolve_layout(layout: str | None) -> str:
    """The transformer's sharding layout. "auto" is the tensor layout: the document's "replicated_out"
    (fc2 and the attention output projection whole on every device) compiles to more collective bytes and
    more HBM in the pack's program (README, "HunyuanVideo 1.5, compiled"), so it is opt-in."""
    layout = "tensor" if layout in (None, "auto") else layout
    check_transformer_layout(layout)
    return layout


class HunyuanVideoPipeline(HunyuanComponents):
    """HunyuanVideo 1.5 on the JAX default backend. ``model_id``: a diffusers folder (or repo id);
    ``precision``: 'bf16' or 'fp32'; ``dp``/``tp``: mesh override. ``layout``: "tensor" ("auto" picks it)
    or "replicated_out" (``resolve_layout``)."""

    def __init__(self, model_id, precision: str = "bf16", dp: int | None = None, tp: int | None = None,
                 manager=None, layout: str | None = None, vae_tile_pixels: int | None = None):
        super().__init__(model_id, precision=precision, dp=dp, tp=tp, manager=manager,
                         transformer_layout=resolve_layout(layout))
        self.model_arg = model_id  # as given: a follower makes its pipeline from it
        self.last_run: dict = {}
        self.last_step_seconds: list[float] = []
        self.vae_tile_pixels = vae_tile_pixels  # the decode's tile side; None: vae_tiles.default_tile_pixels

    def multihost_spec(self) -> dict:
        """What a follower makes the same pipeline from (``runtime.multihost``): its family and arguments."""
        return {"family": "hunyuan", "model_id": self.model_arg, "precision": self.precision, "dp": self.dp,
                "tp": self.tp, "layout": self.transformer_layout, "vae_tile_pixels": self.vae_tile_pixels}

    # ------------------------------------------------------------------ prompts
    @mirrored()
    def encode(self, prompt: str, negative_prompt: str = "", on_status: Callable[[str], None] | None = None
               ) -> HunyuanEmbeddings:
        """Qwen2.5-VL's (third-last layer, after the system prompt's crop) and ByT5's (the quoted text)
        encodings of both prompts, as diffusers' ``encode_prompt`` makes them."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: give the prompt as text")
        prompts = [prompt, negative_prompt or ""]
        for kind in ("text_encoder", "text_encoder_2"):
            self.announce_loading(on_status, kind)
        qwen, byt5 = self.component("text_encoder"), self.component("text_encoder_2")
        if on_status is not None:
            on_status("encoding the prompt")
        with self.timer("encode"), self.matmul_precision():
            qwen_embeds, qwen_mask = self._qwen(qwen, prompts)
            glyph_embeds, glyph_mask = self._byt5(byt5, prompts)
        import torch

        parts = [torch.from_numpy(np.ascontiguousarray(x)) for x in (qwen_embeds, qwen_mask, glyph_embeds, glyph_mask)]
        return HunyuanEmbeddings(tuple(p[:1] for p in parts), tuple(p[1:] for p in parts), self.source.model_id)

    def _qwen(self, component, prompts):
        format_text_input, _, system_message = _diffusers_helpers()
        tokens = component.host.apply_chat_template(
            format_text_input(prompts, system_message), add_generation_prompt=True, tokenize=True, return_dict=True,
            padding="max_length", max_length=TEXT_TOKENS + TEMPLATE_CROP, truncation=True, return_tensors="np")
        jax = self.manager.jax
        program = self.program(component, "encode", lambda: jax.jit(qwen_encode_fn(self.manager, component.module)))
        pair = batch_sharding(component.mesh, 2)
        ids = jax.device_put(np.asarray(tokens["input_ids"], np.int32), pair)
        mask = np.asarray(tokens["attention_mask"], np.int32)
        with device_errors("the Qwen2.5-VL text encoder", "Use a mesh with more devices."):
            # float32 on the host in either precision (numpy's bfloat16 is not one torch takes)
            hidden = to_host(program(component.weights, ids, jax.device_put(mask, pair))).astype(np.float32)
        return hidden[:, TEMPLATE_CROP:], mask[:, TEMPLATE_CROP:]

    def _byt5(self, component, prompts):
        _, extract_glyph_texts, _ = _diffusers_helpers()
        jax = self.manager.jax
        width = component.module.config.d_model
        program = self.program(component, "encode", lambda: jax.jit(byt5_encode_fn(self.manager, component.module)))
        embeds = np.zeros((len(prompts), GLYPH_TOKENS, width), np.float32)
        masks = np.zeros((len(prompts), GLYPH_TOKENS), np.int32)
        for row, prompt in enumerate(prompts):
            glyphs = extract_glyph_texts(prompt)
            if glyphs is None:  # no quoted text: zeros, masked out (diffusers' rule)
                continue
            tokens = component.host(glyphs, padding="max_length", max_length=GLYPH_TOKENS, truncation=True,
                                    add_special_tokens=True, return_tensors="np")
            mask = np.asarray(tokens["attention_mask"], np.int32)
            whole = replicated(component.mesh)
            with device_errors("the ByT5 glyph encoder", "Use a mesh with more devices."):
                embeds[row] = to_host(program(component.weights, jax.device_put(np.asarray(
                    tokens["input_ids"], np.int32), whole), jax.device_put(mask.astype(np.float32), whole)))[0]
            masks[row] = mask[0]
        return embeds, masks

    # ------------------------------------------------------------------ the image
    def image_size(self, image_height: int, image_width: int) -> tuple[int, int]:
        """The (height, width) diffusers' image-to-video pipeline picks for an image: the bucket of the
        transformer's ``target_size`` closest to its aspect ratio."""
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        target = self.transformer_config()["target_size"]
        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.geometry.spatial_factor)
        return tuple(int(v) for v in processor.calculate_default_height_width(image_height, image_width, target))

    def transformer_config(self) -> dict:
        from ... import loading

        return loading.load_json_config(self.source, "transformer")

    @mirrored()
    def encode_image(self, image, *, height: int | None = None, width: int | None = None,
                     on_status: Callable[[str], None] | None = None) -> HunyuanImageConditioning:
        """The start image's conditioning: resized and cropped to ``height`` x ``width`` (None: the size
        diffusers picks from the image, ``image_size``), its VAE latents and its SigLIP tokens. The
        conditioning is made for any frame count (``denoise`` spreads it over the latent frames)."""
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        from ..wan.conditioning import as_pil_image

        if not self.family.takes_image:
            self.family.refuse_image()
        picture = as_pil_image(image, "image")
        if height is None or width is None:
            height, width = self.image_size(picture.size[1], picture.size[0])
        self.geometry.check_video(height, width, None)
        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.geometry.spatial_factor, do_resize=False)
        picture = processor.resize(picture, height=height, width=width, resize_mode="crop")
        for kind in ("vae", "image_encoder"):
            self.announce_loading(on_status, kind)
        vae, siglip = self.component("vae"), self.component("image_encoder")
        if on_status is not None:
            on_status("encoding the image")
        jax = self.manager.jax
        pixels = processor.preprocess(picture, height=height, width=width).numpy()[:, :, None]  # [1, 3, 1, H, W]
        scale = vae.module.config.scaling_factor
        encode = self.program(vae, "encode", lambda: jax.jit(vae_encode_fn(self.manager, vae.module)))
        features = siglip.host.preprocess(images=picture, do_resize=True, return_tensors="np", do_convert_rgb=True)
        embed = self.program(siglip, "encode", lambda: jax.jit(siglip_encode_fn(self.manager, siglip.module)))
        with self.timer("encode_image"), device_errors("encoding the image", "Use a mesh with more devices."):
            latents = to_host(encode(vae.weights, jax.device_put(pixels.astype(np.float32), replicated(vae.mesh))))
            tokens = to_host(embed(siglip.weights, jax.device_put(
                np.asarray(features["pixel_values"], np.float32), replicated(siglip.mesh))))
        import torch

        return HunyuanImageConditioning(torch.from_numpy(np.array(latents * scale)), torch.from_numpy(np.array(tokens)),
                                        height, width)

    # ------------------------------------------------------------------ denoising
    @mirrored(steps=True)
    def denoise(self, embeddings: HunyuanEmbeddings, *, height: int = 720, width: int = 1280, num_frames: int = 121,
                num_inference_steps: int = 50, guidance_scale: float | None = None, seed: int = 0,
                flow_shift: float | None = None, image: HunyuanImageConditioning | None = None,
                deepcache: "deep_cache.DeepCacheSettings | None" = None,
                on_step: Callable[[int, int], None] | None = None, on_status: Callable[[str], None] | None = None,
                on_preview: Callable[[np.ndarray], None] | None = None, layout: str | None = None):
        """Denoise from the seed's noise; returns VAE latents [1, C, T, h, w] float32 on CPU.

        ``guidance_scale``/``flow_shift``: None takes the folder's (guider/ and scheduler/ configs: 6.0 and
        7.0 for the 720P models). ``deepcache``: ``DeepCacheSettings`` or None for every step in full;
        ``self.last_run`` says how many steps ran in full. ``on_step``/``on_status``/``on_preview`` as for
        ``WanTPUPipeline.denoise``."""
        family = self.family
        if layout is not None:  # a run's own layout: the transformer is reloaded with its rules if it differs
            self.transformer_layout = resolve_layout(layout)
        self.geometry.check_video(height, width, num_frames)
        guidance_scale = self._guidance(guidance_scale)
        transformer_config = self.transformer_config()
        self._check_inputs(embeddings, image, height, width)
        schedule_shift = flow_shift if flow_shift is not None else self._scheduler_shift()
        schedule = flow_match_sigmas_schedule(num_inference_steps, schedule_shift,
                                              self._scheduler_config().get("num_train_timesteps", 1000))
        modes = deep_cache.step_modes(deepcache, num_inference_steps)
        self.check_memory(transformer_config, height, width, num_frames, guidance_scale > 1.0)
        self.announce_loading(on_status, "transformer")
        transformer = self.transformer()
        cfg = guidance_scale > 1.0
        steps = len(modes)
        run = DenoiseRun(self.manager, family, [transformer], schedule, [0] * steps, [guidance_scale] * steps, modes,
                         "tensor", cfg)  # the step's activations as the tensor layout; only the weights' rules differ
        self.last_step_seconds = run.step_seconds
        condition = embeds = None
        if image is not None:
            latent_frames = self.geometry.latent_shape(height, width, num_frames)[2]
            condition = family.condition_from_latents(image.image_latents.float().numpy(), latent_frames)
            embeds = image.image_embeds.float().numpy()
        with self.timer("denoise"):
            latents = run.run(self._noise(seed, height, width, num_frames, transformer.dtype),
                              self._context(embeddings, cfg), condition, embeds, Callbacks(on_step, on_status, on_preview))
        full = sum(mode != "reuse" for mode in modes)
        self.last_run = {"steps": steps, "transformer_evaluations": full, "skipped_steps": steps - full,
                         "deepcache": deepcache is not None, "layout": self.transformer_layout, "sampler": "euler",
                         "always_run_blocks": family.always_run(transformer_config) if deepcache else ()}
        if deepcache is not None:
            logger.info("DeepCache: %d of %d steps ran every block", full, steps)
        import torch

        return torch.from_numpy(latents / np.float32(self._vae_config()["scaling_factor"]))

    def check_memory(self, transformer_config: dict, height: int, width: int, num_frames: int, cfg: bool):
        """The HBM plan (``models.hunyuan.memory``), before anything loads: raises ``HBMPlanError`` naming
        the fix when the step will not fit one device's HBM (unknown devices, e.g. CPU, are not checked)."""
        from ... import memory_plan
        from ...runtime import chips
        from .memory import plan_step

        mesh = self.mesh
        plan = plan_step(transformer_config, dict(mesh.shape), height, width, num_frames, cfg,
                         chips.hbm_bytes(mesh.devices.flat[0].device_kind), layout=self.transformer_layout)
        logger.info("HBM plan: %s", plan.summary())
        if not plan.fits:
            raise memory_plan.HBMPlanError(plan.message())
        return plan

    def _check_inputs(self, embeddings, image, height: int, width: int) -> None:
        family, model = self.family, repr(self.source.model_id)
        if not isinstance(embeddings, HunyuanEmbeddings):
            raise ValueError(f"embeddings of type {type(embeddings).__name__}: {model} is HunyuanVideo 1.5; encode "
                             f"the prompt with its own text encoder (HunyuanVideoPipeline.encode)")
        if family.takes_image and image is None:
            raise ValueError(f"{model} is {family.name}: give the start image (encode_image)")
        if image is not None:
            if not family.takes_image:
                family.refuse_image()
            if (image.height, image.width) != (height, width):
                raise ValueError(f"the image was encoded at {image.width}x{image.height} but the video is "
                                 f"{width}x{height}: encode the image at the video's size")

    def _guidance(self, guidance_scale: float | None) -> float:
        config = self.guider_config()
        if guidance_scale is None:
            guidance_scale = float(config.get("guidance_scale", 6.0))
        for key, plain in (("guidance_rescale", 0.0), ("use_original_formulation", False), ("start", 0.0),
                           ("stop", 1.0)):
            if config.get(key, plain) != plain:
                raise ValueError(f"guider {key}={config[key]!r} is not supported (the released models use {plain!r})")
        if not 0 <= guidance_scale <= 100:
            raise ValueError(f"guidance_scale={guidance_scale}: use a value between 0 and 100 (6.0 is typical)")
        return 1.0 if not config.get("enabled", True) else float(guidance_scale)

    def _scheduler_config(self) -> dict:
        from ... import loading

        return loading.load_json_config(self.source, "scheduler", "scheduler_config.json")

    def _scheduler_shift(self) -> float:
        config = self._scheduler_config()
        for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "shift_terminal"):
            if config.get(key):
                raise ValueError(f"scheduler {key}={config[key]!r} is not supported: HunyuanVideo 1.5 uses a plain "
                                 f"FlowMatchEulerDiscreteScheduler with a fixed shift")
        return float(config.get("shift", 1.0))

    def _vae_config(self) -> dict:
        from ... import loading

        return loading.load_json_config(self.source, "vae")

    def _noise(self, seed: int, height: int, width: int, num_frames: int, dtype) -> np.ndarray:
        """The seed's noise as diffusers draws it (CPU generator, in the transformer's dtype)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = randn_tensor(self.geometry.latent_shape(height, width, num_frames), generator=generator, dtype=dtype)
        return noise.float().numpy()

    def _context(self, embeddings: HunyuanEmbeddings, cfg: bool) -> tuple:
        """(qwen, qwen_mask, byt5, byt5_mask), the prompt first and with CFG the negative prompt second."""
        import torch

        rows = [embeddings.prompt] + ([embeddings.negative] if cfg else [])
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        parts = []
        for index in range(4):
            joined = torch.cat([row[index] for row in rows])
            parts.append(torch_to_numpy(joined.to(dtype)) if index % 2 == 0 else joined.numpy().astype(np.int32))
        return tuple(parts)

    # ------------------------------------------------------------------ decoding
    @mirrored()
    def decode(self, latents, on_status: Callable[[str], None] | None = None):
        """Frames [F, H, W, 3] float32 in [0, 1] (CPU) from VAE latents [B, C, T, h, w]."""
        import torch

        latents = torch.as_tensor(latents)
        if latents.ndim == 4:
            latents = latents.unsqueeze(0)
        geometry = self.geometry
        if latents.ndim != 5 or latents.shape[1] != geometry.channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)}: the VAE of {self.source.model_id!r} decodes "
                             f"[batch, {geometry.channels}, frames, height/{geometry.spatial_factor}, "
                             f"width/{geometry.spatial_factor}]: decode with the model that made them")
        self.announce_loading(on_status, "vae")
        vae = self.component("vae")
        if on_status is not None:
            on_status("decoding the video")
        jax = self.manager.jax
        from ...runtime import chips

        tile_pixels = self.vae_tile_pixels or vae_tiles.default_tile_pixels(
            chips.hbm_bytes(vae.mesh.devices.flat[0].device_kind))
        tiles = self.program(vae, f"tiled_decode_{tile_pixels}", lambda: vae_tiles.TiledVAEDecoder(
            self.manager, vae.module, vae.mesh, geometry.spatial_factor, tile_pixels))
        frames = []
        with self.timer("decode"):
            if vae_tiles.needs_tiles(latents.shape[-2], latents.shape[-1], tiles.latent_tile):
                videos = tiles.decode(vae.weights, latents.float().numpy(), on_status)
            else:  # one tile or less: the whole video in one program, as diffusers' untiled decode
                decode = self.program(vae, "decode", lambda: jax.jit(lambda weights, z: call_torch_module(
                    self.manager, vae.module, weights, "decode", (z,), pick=lambda out: out.sample)))
                with device_errors("the VAE decoder", "Lower the resolution or num_frames."):
                    videos = [to_host(decode(vae.weights, jax.device_put(item[None], replicated(vae.mesh))))[0]
                              for item in latents.float().numpy()]
            for video in videos:
                frames.append(np.clip(video / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 3, 0))  # [F, H, W, 3]
        return torch.from_numpy(np.concatenate(frames).astype(np.float32))

    @mirrored(steps=True)
    def generate(self, prompt: str, negative_prompt: str = "", on_status=None, image=None, **denoise_args):
        """encode -> (encode_image) -> denoise -> decode; returns frames [F, H, W, 3]."""
        embeddings = self.encode(prompt, negative_prompt, on_status=on_status)
        conditioning = None
        if image is not None:
            conditioning = self.encode_image(image, height=denoise_args.get("height"),
                                             width=denoise_args.get("width"), on_status=on_status)
            denoise_args.update(height=conditioning.height, width=conditioning.width)
        latents = self.denoise(embeddings, image=conditioning, on_status=on_status, **denoise_args)
        return self.decode(latents, on_status=on_status)
