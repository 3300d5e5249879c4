"""A Wan model's components on the device: read from a source (a diffusers folder or repo, or ComfyUI
single files), placed on the mesh by the sharding rules, and cached by ``TorchaxEnvManager`` so each is
loaded once. ``WanComponents`` is what ``pipeline.WanTPUPipeline`` builds its stages on.

Imports jax, torch and the model libraries inside its methods only.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ... import loading, memory_plan, sharding
from ...env_manager import TorchaxEnvManager
from ...runtime.components import (ImageEncoderComponent, TextEncoderComponent, TransformerComponent,
                                   VAEComponent)
from ...runtime.placement import local_device, place_weights, unique_arrays
from ...runtime.torch_bridge import call_torch_module
from ...sampling.vae_chunks import VAEChunkDecoder, VAEChunkEncoder
from ...scheduler import UniPCFlowSchedule
from ...utils import StageTimer
from . import families
from .latents import LatentGeometry
from .modules import PRECISIONS

logger = logging.getLogger("wan_tpu")

LABELS = {"text_encoder": "text encoder", "transformer": "transformer", "transformer_2": "low-noise transformer",
          "vae": "VAE", "image_encoder": "image encoder"}


def matmul_precision(manager, precision: str):
    """The matmul precision the text encoder and transformer are traced with.

    fp32 asks XLA for full fp32 matmuls ("highest"): on TPU its default would multiply fp32 operands in
    bf16 passes. bf16 keeps the default. The VAE (fp32 weights) always keeps XLA's default, for speed.
    """
    return manager.jax.default_matmul_precision("highest" if precision == "fp32" else None)


def text_encode_fn(manager, module):
    """The jitted UMT5 encode: last hidden states, zero past each prompt's length (diffusers' trim and pad)."""
    jax = manager.jax

    def encode(weights, input_ids, attention_mask):
        hidden = call_torch_module(manager, module, weights, "forward", (input_ids, attention_mask),
                                   pick=lambda output: output.last_hidden_state)
        return hidden.astype(jax.numpy.float32) * attention_mask[..., None].astype(jax.numpy.float32)

    return jax.jit(encode)


def image_encode_fn(manager, module):
    """The jitted CLIP vision encode: diffusers' Wan I2V takes the penultimate layer's hidden states."""
    def encode(weights, pixel_values):
        return call_torch_module(manager, module, weights, "forward", (pixel_values,),
                                 {"output_hidden_states": True}, pick=lambda out: out.hidden_states[-2])

    return manager.jax.jit(encode)


class WanComponents:
    """A Wan model's text encoder, transformer expert(s), VAE and image encoder, each loaded, sharded and
    cached on first use. ``model_id``: repo id or folder, or ``model_files.FileSource``; ``precision``:
    'bf16' or 'fp32' for the text encoder and transformer (the VAE and image encoder run in fp32)."""

    def __init__(self, model_id: str = loading.DEFAULT_MODEL_ID, precision: str = "bf16", dp: int | None = None,
                 tp: int | None = None, manager: TorchaxEnvManager | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
        from ...model_files import FileSource, check_files

        # model_id: a repo id or diffusers folder, or ComfyUI single files (model_files.FileSource).
        self.source = model_id if isinstance(model_id, FileSource) else loading.resolve_model_source(model_id)
        if isinstance(self.source, FileSource):
            check_files(self.source)  # headers only: a wrong or broken file is named before anything runs
        self.precision = precision
        self.dp, self.tp = dp, tp
        self.manager = manager or TorchaxEnvManager.instance()
        self.timer = StageTimer()
        self._family = None

    def matmul_precision(self):
        return matmul_precision(self.manager, self.precision)

    @property
    def mesh(self):
        return self.manager.mesh(self.dp, self.tp)

    def component_key(self, kind: str) -> tuple:
        precision = "fp32" if kind in ("vae", "image_encoder") else self.precision
        return (kind, self.source.component_location(kind), precision, tuple(self.mesh.shape.values()))

    def _cached(self, kind: str, build: Callable):
        key = self.component_key(kind)
        if key not in self.manager.cached_keys():
            # Check the folder before the old component of this kind is released for it.
            loading.check_component(self.source, kind)
        # Another model's component of this kind goes first; so does another model's second
        # expert when its first is replaced (a Wan 2.1 model after a Wan 2.2 A14B one), and every
        # component of another family (their kinds say it: models.hunyuan.components.KIND_PREFIX).
        kinds = ("transformer", "transformer_2") if kind == "transformer" else (kind,)
        return self.manager.cached_component(
            key, build, replaces=lambda other: other[0] == kind or (other[0] in kinds and other[1] != key[1])
            or other[0] not in LABELS)

    def announce_loading(self, on_status: Callable | None, kind: str) -> None:
        """Tell ``on_status`` when ``kind`` is about to be loaded (not cached yet)."""
        if on_status is not None and self.component_key(kind) not in self.manager.cached_keys():
            on_status(f"loading the {LABELS[kind]}")

    @property
    def family(self) -> families.WanFamily:
        """The model family: from the weights (single files), else the folder's model_index.json and
        transformer config (Wan 2.1 T2V when it has none)."""
        if self._family is None and not isinstance(self.source, loading.ModelSource):
            from ... import model_files

            self._family = model_files.family(self.source)  # from the weights; an error says which file to fix
        if self._family is None:
            try:
                model_index = loading.load_model_index(self.source)
            except (ValueError, OSError):
                logger.info("%s has no model_index.json: taken as Wan 2.1 T2V", self.source.describe())
                model_index = {}
            transformer_config = None
            if model_index.get("_class_name") == "WanImageToVideoPipeline":  # FLF2V or I2V: its transformer says
                transformer_config = loading.load_json_config(self.source, "transformer")
            self._family = families.family_from_model_index(model_index, repr(self.source.model_id),
                                                            transformer_config)
        return self._family

    @property
    def geometry(self) -> LatentGeometry:
        """The VAE's latent channels and downsampling, from its config (Wan 2.1: 16, 8x; Wan 2.2: 48, 16x)."""
        return LatentGeometry.from_vae_config(loading.load_json_config(self.source, "vae"))

    def vae_latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(latents_mean, latents_std) from the VAE's config, without loading the VAE."""
        config = loading.load_json_config(self.source, "vae")
        return np.asarray(config["latents_mean"], np.float32), np.asarray(config["latents_std"], np.float32)

    def memory_plan(self, height: int, width: int, num_frames: int, guidance_scale: float,
                    layout: str | None = None) -> "memory_plan.MemoryPlan":
        """Per-device HBM this run will need, from the configs alone; logged, and raised (``HBMPlanError``)
        before anything loads when it will not fit. ``layout``: the step's ("auto" plans the one the cost
        model will choose)."""
        configs = {name: loading.load_json_config(self.source, name) for name in ("transformer", "text_encoder", "vae")}
        mesh = self.mesh
        plan = memory_plan.plan_memory(
            configs["transformer"], dict(mesh.shape), height, width, num_frames, self.precision,
            cfg=guidance_scale > 1.0, text_encoder_config=configs["text_encoder"], vae_config=configs["vae"],
            experts=len(self.family.experts), device=local_device(mesh), layout=layout or "auto",
        )
        logger.info("HBM plan: %s", plan.summary())
        return plan.check()

    # ------------------------------------------------------------------ the components
    def text_encoder(self) -> TextEncoderComponent:
        def build():
            mesh = self.mesh
            with self.timer("load_text_encoder"), self.manager.loading():
                tokenizer = loading.load_tokenizer(self.source)
                module = loading.load_text_encoder(self.source, self.precision)
            weights, plan = place_weights(self.manager, module, sharding.TEXT_ENCODER_RULES, mesh, "text encoder")
            component = TextEncoderComponent(tokenizer, module, weights, plan, mesh,
                                             text_encode_fn(self.manager, module), module.config.d_model)
            return component, unique_arrays(weights)

        return self._cached("text_encoder", build)

    def transformer(self, expert: str = "transformer") -> TransformerComponent:
        """A transformer expert: "transformer" (every family; Wan 2.2 A14B's high-noise expert) or
        "transformer_2" (Wan 2.2 A14B's low-noise expert). Both experts of A14B stay resident."""
        def build():
            mesh = self.mesh
            with self.timer(f"load_{expert}"), self.manager.loading():
                scheduler_config = loading.load_json_config(self.source, "scheduler", "scheduler_config.json")
                UniPCFlowSchedule.create(scheduler_config, 1, 1.0)  # refuse an unsupported scheduler before loading
                module = loading.load_transformer(self.source, self.precision, expert)
            weights, plan = place_weights(self.manager, module, sharding.TRANSFORMER_RULES, mesh, expert)
            component = TransformerComponent(module, weights, plan, mesh, dict(module.config), scheduler_config,
                                             module.dtype)
            return component, unique_arrays(weights)

        return self._cached(expert, build)

    def experts(self, on_status: Callable[[str], None] | None = None) -> list[TransformerComponent]:
        """The family's transformer experts, loaded (high-noise first)."""
        loaded = []
        for expert in self.family.experts:
            self.announce_loading(on_status, expert)
            loaded.append(self.transformer(expert))
        if len(loaded) == 2 and loaded[0].config != loaded[1].config:
            raise ValueError(f"{self.source.model_id!r}: its two transformer experts have different configs; "
                             f"Wan 2.2 A14B's experts share one architecture, so this folder is not one")
        return loaded

    def vae(self) -> VAEComponent:
        def build():
            mesh = self.mesh
            with self.timer("load_vae"), self.manager.loading():
                module = loading.load_vae(self.source)
            weights, plan = place_weights(self.manager, module, sharding.VAE_RULES, mesh, "VAE")
            config = module.config
            component = VAEComponent(
                module, weights, plan, mesh, VAEChunkDecoder(self.manager, module, mesh),
                np.asarray(config.latents_mean, np.float32), np.asarray(config.latents_std, np.float32),
                VAEChunkEncoder(self.manager, module, mesh),
            )
            return component, unique_arrays(weights)

        return self._cached("vae", build)

    def image_encoder(self) -> ImageEncoderComponent:
        """The CLIP vision tower (fp32, split over tp) of the families that take CLIP image tokens."""
        def build():
            mesh = self.mesh
            with self.timer("load_image_encoder"), self.manager.loading():
                processor = loading.load_image_processor(self.source)
                module = loading.load_image_encoder(self.source)
            weights, plan = place_weights(self.manager, module, sharding.IMAGE_ENCODER_RULES, mesh, "image encoder")
            component = ImageEncoderComponent(processor, module, weights, plan, mesh,
                                              image_encode_fn(self.manager, module))
            return component, unique_arrays(weights)

        return self._cached("image_encoder", build)
