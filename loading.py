"""Find and load the Wan 2.1 diffusers components, each on its own.

``model_id`` is a Hugging Face repo id, a local diffusers folder, or (inside
ComfyUI) a folder name under ``models/diffusers``. Anyone who can reach a
ComfyUI server chooses ``model_id``, so only safetensors are loaded and
remote code is never trusted.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
from dataclasses import dataclass

logger = logging.getLogger("wan_tpu")

DEFAULT_MODEL_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
PRECISIONS = ("bf16", "fp32")
MAX_SEQUENCE_LENGTH = 512  # diffusers' WanPipeline default; the original pack used 226 by mistake

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Weight files each component folder must have, as safetensors.
_COMPONENT_WEIGHTS = {
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``location`` is a local folder or a repo id."""

    model_id: str
    location: str
    is_local: bool

    def describe(self) -> str:
        return self.location if self.is_local else f"Hugging Face repo {self.location}"


def comfyui_diffusers_folders() -> list[str]:
    """ComfyUI's ``models/diffusers`` folders, or [] outside ComfyUI."""
    try:
        import folder_paths  # ComfyUI's module; absent when the pack runs alone
    except ImportError:
        return []
    try:
        return list(folder_paths.get_folder_paths("diffusers"))
    except Exception:  # an old ComfyUI without a "diffusers" folder type
        return []


def resolve_model_source(model_id: str) -> ModelSource:
    """Decide what ``model_id`` names. Raises ValueError saying where it looked."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id={model_id!r} is empty: give a repo id such as {DEFAULT_MODEL_ID} or a folder")
    model_id = model_id.strip()
    path = os.path.expanduser(model_id)
    if os.path.isdir(path):
        return ModelSource(model_id, os.path.abspath(path), True)
    searched = []
    for base in comfyui_diffusers_folders():
        candidate = os.path.realpath(os.path.join(base, model_id))
        searched.append(candidate)
        inside = os.path.commonpath([os.path.realpath(base), candidate]) == os.path.realpath(base)
        if inside and os.path.isdir(candidate):
            return ModelSource(model_id, candidate, True)
    if os.path.isabs(path) or model_id.startswith((".", "~")) or not _REPO_ID.match(model_id):
        where = f" and under ComfyUI's models/diffusers ({', '.join(searched)})" if searched else ""
        raise ValueError(
            f"model_id={model_id!r}: no such folder{where}, and it is not a Hugging Face repo id "
            f"(owner/name, e.g. {DEFAULT_MODEL_ID})"
        )
    return ModelSource(model_id, model_id, False)


def check_component(source: ModelSource, component: str) -> None:
    """For a local folder, check ``component`` exists with safetensors weights."""
    if not source.is_local:
        return
    folder = os.path.join(source.location, component)
    if not os.path.isdir(folder):
        raise ValueError(
            f"model {source.model_id!r} has no {component}/ folder (looked in {folder}): "
            f"point model_id at a Wan 2.1 diffusers folder with {component}/ in it"
        )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder} has no config.json: it is not a diffusers {component} folder")
    wanted = _COMPONENT_WEIGHTS.get(component)
    if wanted is None:
        return
    if any(os.path.isfile(os.path.join(folder, name)) for name in wanted) or glob.glob(os.path.join(folder, "*.safetensors")):
        return
    pickles = [os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))]
    if pickles:
        raise ValueError(
            f"{folder} has only pickle weights ({', '.join(pickles)}), which this pack never loads: "
            f"convert them to safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise ValueError(f"{folder} has no {wanted[0]}: the {component} weights are missing")


def load_json_config(source: ModelSource, component: str, filename: str = "config.json") -> dict:
    """A component's JSON config, from the folder or the hub (a few KB). A fresh dict each call."""
    return json.loads(_read_json_config(source, component, filename))


@functools.lru_cache(maxsize=64)
def _read_json_config(source: ModelSource, component: str, filename: str) -> str:
    # Cached: every run plans its memory from these, and a hub lookup is a network round trip.
    if source.is_local:
        path = os.path.join(source.location, component, filename)
        if not os.path.isfile(path):
            raise ValueError(f"model {source.model_id!r} has no {component}/{filename} (looked for {path})")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source.location, filename, subfolder=component)
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def torch_dtype(precision: str):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.is_local and not os.path.isdir(os.path.join(source.location, "tokenizer")):
        raise ValueError(f"model {source.model_id!r} has no tokenizer/ folder (looked in {source.location})")
    return AutoTokenizer.from_pretrained(source.location, subfolder="tokenizer", trust_remote_code=False)


def load_text_encoder(source: ModelSource, precision: str):
    from transformers import UMT5EncoderModel

    check_component(source, "text_encoder")
    return UMT5EncoderModel.from_pretrained(
        source.location, subfolder="text_encoder", torch_dtype=torch_dtype(precision),
        use_safetensors=True, trust_remote_code=False,
    ).eval()


def load_transformer(source: ModelSource, precision: str):
    from diffusers import WanTransformer3DModel

    check_component(source, "transformer")
    return WanTransformer3DModel.from_pretrained(
        source.location, subfolder="transformer", torch_dtype=torch_dtype(precision), use_safetensors=True
    ).eval()


def load_vae(source: ModelSource):
    """The VAE, always in float32: it is small, and Wan's VAE is run in fp32 upstream."""
    import torch
    from diffusers import AutoencoderKLWan

    check_component(source, "vae")
    return AutoencoderKLWan.from_pretrained(
        source.location, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True
    ).eval()
