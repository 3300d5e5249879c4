"""A HunyuanVideo 1.5 model's components on the device: the Qwen2.5-VL text model, the ByT5 glyph encoder,
the transformer, the VAE and (image-to-video) the SigLIP vision tower, each read from the diffusers folder
as diffusers loads it, placed on the mesh by the rules below and cached by ``TorchaxEnvManager``.

One HBM owner for every family: a HunyuanVideo component's cache key says its family
(``KIND_PREFIX``), and loading one frees every Wan component (``WanComponents`` frees these in turn),
so switching between the two families never holds both in HBM.

Imports jax, torch and the model libraries inside its methods only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from ... import loading, sharding
from ...env_manager import TorchaxEnvManager
from ...runtime.components import TransformerComponent
from ...runtime.placement import place_weights, unique_arrays
from ...utils import StageTimer
from ..wan.modules import PRECISIONS, torch_dtype
from . import attention, vae_tiles
from . import family as families

logger = logging.getLogger("wan_tpu")

KIND_PREFIX = "hunyuan_"  # the component cache's kinds of this family: "hunyuan_transformer", ...
LABELS = {"text_encoder": "Qwen2.5-VL text encoder", "text_encoder_2": "ByT5 glyph encoder",
          "transformer": "transformer", "vae": "VAE", "image_encoder": "SigLIP image encoder"}

# HunyuanVideo15Transformer3DModel over tp: projections into the heads and the FFNs' first layers split
# on their output dim, the projections back on their input dim (one all-reduce per sub-layer). The
# modulation layers (6 x width outputs each, 2.7B parameters over 54 blocks) split on their input dim:
# their all-reduce is a [batch, 6 x width] vector.
_BLOCK = r"transformer_blocks\.\d+\."
_REFINER = r"context_embedder\.token_refiner\.refiner_blocks\.\d+\."
TRANSFORMER_RULES: tuple[tuple[str, tuple], ...] = (
    (_BLOCK + r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.weight", ("tp", None)),
    (_BLOCK + r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.bias", ("tp",)),
    (_BLOCK + r"attn\.(to_out\.0|to_add_out)\.weight", (None, "tp")),
    (_BLOCK + r"(ff|ff_context)\.net\.0\.proj\.weight", ("tp", None)),
    (_BLOCK + r"(ff|ff_context)\.net\.0\.proj\.bias", ("tp",)),
    (_BLOCK + r"(ff|ff_context)\.net\.2\.weight", (None, "tp")),
    (_BLOCK + r"(norm1|norm1_context)\.linear\.weight", (None, "tp")),
    (_BLOCK + r".*", ()),
    (_REFINER + r"attn\.to_(q|k|v)\.weight", ("tp", None)),
    (_REFINER + r"attn\.to_(q|k|v)\.bias", ("tp",)),
    (_REFINER + r"attn\.to_out\.0\.weight", (None, "tp")),
    (_REFINER + r"ff\.net\.0\.proj\.weight", ("tp", None)),
    (_REFINER + r"ff\.net\.0\.proj\.bias", ("tp",)),
    (_REFINER + r"ff\.net\.2\.weight", (None, "tp")),
    (_REFINER + r".*", ()),
    (r"context_embedder_2\.linear_(1|2)\.weight", ("tp", None)),
    (r"context_embedder_2\.linear_(1|2)\.bias", ("tp",)),
    (r"norm_out\.linear\.weight", (None, "tp")),
    (r"(x_embedder|image_embedder|context_embedder|context_embedder_2|time_embed|cond_type_embed|norm_out|"
     r"proj_out)\..*", ()),
)

# The document's "fc2/proj replicated" layout (HunyuanVideo-1.5-TPU's default, 7.29 against 8.12 s/step on
# v6e-8): the video stream's attention output projection and FFN second layer whole on every device, for
# 1.1B more parameters per device at 720P's width. The text stream's stay split.
_REPLICATED_OUT = (
    (_BLOCK + r"attn\.to_out\.0\.weight", ()),
    (_BLOCK + r"ff\.net\.2\.weight", ()),
)
REPLICATED_OUT_RULES: tuple[tuple[str, tuple], ...] = _REPLICATED_OUT + TRANSFORMER_RULES
TRANSFORMER_LAYOUTS = {"tensor": TRANSFORMER_RULES, "replicated_out": REPLICATED_OUT_RULES}

# Qwen2.5-VL's text model, split over every device (it runs once per prompt, and its 7B parameters are
# the largest component after the transformer).
_LAYER = r"layers\.\d+\."
QWEN_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.weight", (("dp", "tp"), None)),
    (_LAYER + r"self_attn\.(q|k|v)_proj\.weight", (("dp", "tp"), None)),
    (_LAYER + r"self_attn\.(q|k|v)_proj\.bias", (("dp", "tp"),)),
    (_LAYER + r"self_attn\.o_proj\.weight", (None, ("dp", "tp"))),
    (_LAYER + r"mlp\.(gate|up)_proj\.weight", (("dp", "tp"), None)),
    (_LAYER + r"mlp\.down_proj\.weight", (None, ("dp", "tp"))),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", ()),
    (r"norm\.weight", ()),
    (r"rotary_emb\..*", ()),
)

# SigLIP's vision tower: its encoder layers have CLIP's names; its pooling head is unused and small.
SIGLIP_RULES: tuple[tuple[str, tuple], ...] = sharding.IMAGE_ENCODER_RULES + (
    (r"(?:vision_model\.)?head\..*", ()),
)

RULES = {"text_encoder": QWEN_RULES, "text_encoder_2": sharding.TEXT_ENCODER_RULES,
         "transformer": TRANSFORMER_RULES, "vae": sharding.VAE_RULES, "image_encoder": SIGLIP_RULES}


def check_transformer_layout(layout: str) -> None:
    if layout not in TRANSFORMER_LAYOUTS:
        raise ValueError(f"layout={layout!r}: HunyuanVideo 1.5 runs {' or '.join(map(repr, TRANSFORMER_LAYOUTS))} "
                         f"('auto' picks 'tensor')")


@dataclass
class Component:
    """A loaded module (structure on the meta device), its sharded weights, and its jitted programs."""

    module: Any
    weights: dict
    plan: sharding.ShardingPlan
    mesh: Any
    host: Any = None  # its tokenizer or image processor
    programs: dict = field(default_factory=dict)


def module_class(kind: str):
    """The class diffusers' HunyuanVideo 1.5 pipelines load each component as."""
    import diffusers
    import transformers

    return {"text_encoder": transformers.Qwen2_5_VLTextModel, "text_encoder_2": transformers.T5EncoderModel,
            "transformer": diffusers.HunyuanVideo15Transformer3DModel,
            "vae": diffusers.AutoencoderKLHunyuanVideo15,
            "image_encoder": transformers.SiglipVisionModel}[kind]


def check_diffusers() -> None:
    """HunyuanVideo 1.5 arrived in diffusers 0.36: say so before anything loads."""
    import diffusers

    if not hasattr(diffusers, "HunyuanVideo15Transformer3DModel"):
        raise ValueError(f"diffusers {diffusers.__version__} has no HunyuanVideo 1.5: pip install 'diffusers>=0.36' "
                         f"into ComfyUI's venv to run it")


class HunyuanComponents:
    """A HunyuanVideo 1.5 folder's components, each loaded, sharded and cached on first use. ``precision``:
    'bf16' or 'fp32' for the text encoders and transformer (the VAE and SigLIP run in fp32)."""

    def __init__(self, model_id, precision: str = "bf16", dp: int | None = None, tp: int | None = None,
                 manager: TorchaxEnvManager | None = None, transformer_layout: str = "tensor"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
        check_transformer_layout(transformer_layout)
        self.transformer_layout = transformer_layout
        self.source = model_id if isinstance(model_id, loading.ModelSource) else loading.resolve_model_source(model_id)
        self.precision, self.dp, self.tp = precision, dp, tp
        self.manager = manager or TorchaxEnvManager.instance()
        self.timer = StageTimer()
        self._family = None

    @property
    def mesh(self):
        return self.manager.mesh(self.dp, self.tp)

    @property
    def family(self) -> families.HunyuanVideo15:
        if self._family is None:
            index = loading.load_model_index(self.source)
            image_config = None
            if index.get("_class_name") == families.HunyuanVideo15ImageToVideo.diffusers_pipeline:
                image_config = loading.load_json_config(self.source, "image_encoder")
            self._family = families.family_from_model_index(index, image_config, repr(self.source.model_id))
        return self._family

    @property
    def geometry(self) -> families.HunyuanGeometry:
        return families.HunyuanGeometry.from_configs(loading.load_json_config(self.source, "vae"),
                                                     loading.load_json_config(self.source, "transformer"))

    def matmul_precision(self):
        return self.manager.jax.default_matmul_precision("highest" if self.precision == "fp32" else None)

    def dtype_of(self, kind: str):
        return torch_dtype("fp32" if kind in ("vae", "image_encoder") else self.precision)

    def component_key(self, kind: str) -> tuple:
        precision = "fp32" if kind in ("vae", "image_encoder") else self.precision
        key = (KIND_PREFIX + kind, self.source.component_location(kind), precision, tuple(self.mesh.shape.values()))
        return key + (self.transformer_layout,) if kind == "transformer" and self.transformer_layout != "tensor" else key

    def rules(self, kind: str):
        return TRANSFORMER_LAYOUTS[self.transformer_layout] if kind == "transformer" else RULES[kind]

    def announce_loading(self, on_status: Callable | None, kind: str) -> None:
        if on_status is not None and self.component_key(kind) not in self.manager.cached_keys():
            on_status(f"loading the {LABELS[kind]}")

    def _load(self, kind: str, host: Callable | None = None):
        """(module, weights, plan) of ``kind``, loaded outside the torchax environment and placed."""
        check_diffusers()
        with self.timer(f"load_{kind}"), self.manager.loading():
            module = loading.load_module(self.source, kind, module_class(kind), self.dtype_of(kind),
                                         "diffusers" if kind in ("transformer", "vae") else "transformers")
            extra = host() if host else None
        weights, plan = place_weights(self.manager, module, self.rules(kind), self.mesh, LABELS[kind])
        return module, weights, plan, extra

    def _cached(self, kind: str, build: Callable):
        key = self.component_key(kind)
        if key not in self.manager.cached_keys():
            loading.check_component(self.source, kind)
        # Another model's component of this kind goes first, and every component of another family.
        return self.manager.cached_component(
            key, build, replaces=lambda other: other[0] == key[0] or not str(other[0]).startswith(KIND_PREFIX))

    def component(self, kind: str) -> Component:
        """The text encoders, the VAE or SigLIP (``transformer()`` for the transformer)."""
        def build():
            module, weights, plan, host = self._load(kind, lambda: self._host_side(kind))
            if kind == "vae":
                vae_tiles.install_frame_causal_mask(module)
            return Component(module, weights, plan, self.mesh, host), unique_arrays(weights)

        return self._cached(kind, build)

    def _host_side(self, kind: str):
        from transformers import AutoTokenizer, SiglipImageProcessor

        location = self.source.location
        if kind == "text_encoder":
            return AutoTokenizer.from_pretrained(location, subfolder="tokenizer", trust_remote_code=False)
        if kind == "text_encoder_2":
            return AutoTokenizer.from_pretrained(location, subfolder="tokenizer_2", trust_remote_code=False)
        if kind == "image_encoder":
            return SiglipImageProcessor.from_pretrained(location, subfolder="feature_extractor")
        return None

    def transformer(self) -> TransformerComponent:
        def build():
            scheduler = loading.load_json_config(self.source, "scheduler", "scheduler_config.json")
            module, weights, plan, _ = self._load("transformer")
            attention.install(module, self.manager)  # the joint attention as a prefix mask: Splash takes it
            component = TransformerComponent(module, weights, plan, self.mesh, dict(module.config), scheduler,
                                             module.dtype)
            return component, unique_arrays(weights)

        return self._cached("transformer", build)

    def guider_config(self) -> dict:
        """guider/config.json (CFG's scale); {} when the folder has none."""
        try:
            return loading.load_json_config(self.source, "guider", "guider_config.json")
        except ValueError:
            return {}

    def program(self, component: Component, name: str, make: Callable):
        """``component``'s jitted program ``name``, made once."""
        if name not in component.programs:
            component.programs[name] = make()
        return component.programs[name]
