"""The Wan components' module classes and dtypes, defined once, and the same modules built on torch's meta
device (nothing allocated) for the HBM plan and the compile command.

``loading.load_*`` loads each component with ``component_class`` at ``component_dtype``; ``meta_module``
builds it from a config with the same class and the dtypes those loaders end with; ``abstract_weights``
gives its tensors' shapes and itemsizes.

Imports neither torch nor jax until a function needs them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
from dataclasses import dataclass
from typing import Mapping

from . import configs

PRECISIONS = ("bf16", "fp32")  # the text encoder's and transformer's; the VAE and image encoder are fp32


@dataclass(frozen=True)
class ComponentClass:
    """Where a component's module class lives. ``config_class``: the transformers config class its
    config.json builds; None for a diffusers class, whose constructor takes the config's keys."""

    library: str
    name: str
    config_class: str | None = None

    def module_class(self):
        return getattr(importlib.import_module(self.library), self.name)


COMPONENT_CLASSES: dict[str, ComponentClass] = {
    "text_encoder": ComponentClass("transformers", "UMT5EncoderModel", "UMT5Config"),
    "transformer": ComponentClass("diffusers", "WanTransformer3DModel"),
    "vae": ComponentClass("diffusers", "AutoencoderKLWan"),
    "image_encoder": ComponentClass("transformers", "CLIPVisionModel", "CLIPVisionConfig"),  # Wan 2.1 I2V's CLIP
}
FP32_COMPONENTS = ("vae", "image_encoder")  # small, run once per video or image: always float32, as upstream


def component_class(component: str):
    """The module class of ``component`` ("transformer_2", Wan 2.2 A14B's low-noise expert, is a transformer)."""
    entry = COMPONENT_CLASSES.get("transformer" if component == "transformer_2" else component)
    if entry is None:
        raise ValueError(f"component={component!r}: use one of {tuple(COMPONENT_CLASSES)}")
    return entry.module_class()


def torch_dtype(precision: str):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def component_dtype(component: str, precision: str):
    """The ``torch_dtype`` the loader asks for: ``precision``'s, or float32 for ``FP32_COMPONENTS``."""
    import torch

    return torch.float32 if component in FP32_COMPONENTS else torch_dtype(precision)


def kept_in_fp32(component: str, module, precision: str) -> tuple[str, ...]:
    """The submodules (dotted-name parts) the library keeps in float32 whatever ``torch_dtype`` asks."""
    if component in FP32_COMPONENTS:
        return ()
    if component == "transformer":
        # diffusers keeps _keep_in_fp32_modules in fp32 (matched against the dotted name's parts).
        return tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    # transformers upcasts _keep_in_fp32_modules only for fp16 (UMT5's "wo" stays bf16 here); its
    # _keep_in_fp32_modules_strict also for bf16.
    strict = getattr(module, "_keep_in_fp32_modules_strict", None) or ()
    return tuple(strict) if precision == "bf16" else ()


def _init_keys(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _construct(component: str, config: dict):
    entry = COMPONENT_CLASSES.get(component)
    if entry is None:
        raise ValueError(f"component={component!r}: use one of {tuple(COMPONENT_CLASSES)}")
    cls = entry.module_class()
    if entry.config_class:
        config_class = getattr(importlib.import_module(entry.library), entry.config_class)
        return cls(config_class.from_dict(config))
    if component == "transformer" and isinstance(config.get("patch_size"), list):  # JSON's list; it takes a tuple
        config["patch_size"] = tuple(config["patch_size"])
    keys = _init_keys(cls)
    return cls(**{k: v for k, v in config.items() if k in keys})


def meta_module(component: str, config: Mapping, precision: str = "bf16"):
    """``component`` as ``loading.load_*`` gives it, built on torch's meta device (nothing allocated).

    Same classes (``COMPONENT_CLASSES``), same config keys and the dtypes the loaders end with
    (``component_dtype``, ``kept_in_fp32``): diffusers keeps the transformer's ``_keep_in_fp32_modules`` in
    fp32, transformers keeps UMT5's ``_keep_in_fp32_modules_strict`` in fp32 for bf16, the VAE and the
    image encoder are fp32. Non-persistent buffers (the transformer's RoPE tables) keep the dtype they are
    built in, as the loaders cast only what the checkpoint holds. ``benchmarks/tpu_compile.py`` traces the
    production programs with it.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    with torch.device("meta"):
        module = _construct(component, configs.clean_config(config))
    target, keep_fp32 = component_dtype(component, precision), kept_in_fp32(component, module, precision)
    persistent = set(module.state_dict())
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    cast = set()
    for name, tensor in tensors:
        if name in persistent and tensor.is_floating_point() and id(tensor) not in cast:
            cast.add(id(tensor))
            dtype = torch.float32 if any(m in name.split(".") for m in keep_fp32) else target
            tensor.data = tensor.data.to(dtype)
    module.eval()
    return module


def _config_key(config: Mapping) -> str:
    return json.dumps(config, sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _abstract_tensors(component: str, config_key: str, precision: str) -> tuple[tuple[str, tuple, int, int, bool], ...]:
    """(name, shape, itemsize, identity, is_parameter) of every parameter and buffer, as the loader would hold them.

    From ``meta_module``: shapes and dtypes only. ``identity`` groups tied
    weights (UMT5's shared embedding), which the pack places once.
    """
    module = meta_module(component, json.loads(config_key), precision)
    parameters = {id(p) for p in module.parameters()}
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return tuple((name, tuple(tensor.shape), tensor.dtype.itemsize, id(tensor), id(tensor) in parameters)
                 for name, tensor in tensors)


def abstract_weights(component: str, config: Mapping, precision: str = "bf16") -> tuple[dict, dict]:
    """({name: shape}, {name: itemsize}) of the distinct tensors ``component`` places.

    Tied weights appear once, as in ``runtime.placement.place_weights``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    unique = {}
    for name, shape, itemsize, identity, _ in _abstract_tensors(component, _config_key(config), precision):
        unique[identity] = (name, shape, itemsize)  # the last name of a tied tensor, as place_weights keeps it
    shapes = {name: shape for name, shape, _ in unique.values()}
    itemsizes = {name: itemsize for name, _, itemsize in unique.values()}
    return shapes, itemsizes


def parameter_count(component: str, config: Mapping) -> int:
    """Parameters of ``component`` (tied weights counted once; buffers not counted)."""
    unique = {identity: shape for _, shape, _, identity, is_parameter
              in _abstract_tensors(component, _config_key(config), "fp32") if is_parameter}
    return sum(math.prod(shape) for shape in unique.values())
