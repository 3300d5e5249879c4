"""Find and load the Wan diffusers components (every family's), each on its own.

``model_id`` is a Hugging Face repo id or a local diffusers folder. Anyone who
can reach a ComfyUI server chooses ``model_id``, so inside ComfyUI a local
folder must lie under an allowed root (ComfyUI's ``models/diffusers`` folders
and the folders listed in ``WAN_TPU_MODEL_ROOTS``), errors name no path outside
those roots, only safetensors are loaded and remote code is never trusted.
Outside ComfyUI (the command line) any folder works. ``WAN_TPU_OFFLINE=1``
refuses repo ids; ``HF_HUB_OFFLINE=1`` refuses those not in the hub cache.

The module classes and dtypes are ``models.wan.modules``; path confinement is ``runtime.paths``.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
from dataclasses import dataclass

from .models.wan import modules
from .runtime import environment, paths

logger = logging.getLogger("wan_tpu")

DEFAULT_MODEL_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"

MODEL_ROOTS_ENV = environment.MODEL_ROOTS  # extra folders (os.pathsep-separated) that may hold models
OFFLINE_ENV = environment.OFFLINE  # 1: local folders only, never the hub
HF_OFFLINE_ENV = environment.HF_OFFLINE  # huggingface_hub's own switch: only repos already in its cache
_ROOTS_FIX = f"put the model folder under ComfyUI/models/diffusers or add its parent folder to {MODEL_ROOTS_ENV}"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Weight files each component folder must have, as safetensors.
_COMPONENT_WEIGHTS = {
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "model.safetensors.index.json"),
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "transformer_2": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "image_encoder": ("model.safetensors", "model.safetensors.index.json"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``location`` is a local folder or a repo id."""

    model_id: str
    location: str
    is_local: bool

    def describe(self) -> str:
        return self.location if self.is_local else f"Hugging Face repo {self.location}"

    def component_location(self, kind: str) -> str:
        """Where a component comes from (the component cache's key): the one folder or repo."""
        return self.location


def _files(source):
    """``model_files`` when ``source`` is a ``model_files.FileSource`` (ComfyUI single files), else None."""
    from . import model_files

    return model_files if isinstance(source, model_files.FileSource) else None


def in_comfyui() -> bool:
    """True when ComfyUI's ``folder_paths`` module can be imported: model_id then comes from
    whoever can reach the server, and local folders are confined to the allowed roots."""
    try:
        import folder_paths  # noqa: F401  (ComfyUI's module; absent when the pack runs alone)
    except ImportError:
        return False
    return True


def comfyui_diffusers_folders() -> list[str]:
    """ComfyUI's ``models/diffusers`` folders, or [] outside ComfyUI."""
    return comfyui_folders("diffusers")


def comfyui_folders(folder_type: str) -> list[str]:
    """ComfyUI's folders of ``folder_type`` (``folder_paths``: "diffusers", "diffusion_models",
    "text_encoders", "vae", "clip_vision"), or [] outside ComfyUI."""
    try:
        import folder_paths  # ComfyUI's module; absent when the pack runs alone
    except ImportError:
        return []
    try:
        return list(folder_paths.get_folder_paths(folder_type))
    except Exception:  # an old ComfyUI without this folder type
        return []


def model_roots(folder_type: str = "diffusers") -> list[str]:
    """The folders local models may come from, as given: ComfyUI's ``models/<folder_type>``
    folders, then those listed in ``WAN_TPU_MODEL_ROOTS`` (os.pathsep-separated)."""
    extra = [entry.strip() for entry in environment.read(MODEL_ROOTS_ENV, "").split(os.pathsep)]
    roots = []
    for root in comfyui_folders(folder_type) + [os.path.expanduser(entry) for entry in extra if entry]:
        if root not in roots:
            roots.append(root)
    return roots


def real_model_roots(folder_type: str = "diffusers") -> list[tuple[str, str]]:
    # (as given, resolved): symlinked roots (a models/ folder on another disk) compare by their target.
    return paths.real_roots(model_roots(folder_type))


def offline_reason(repo_id: str) -> str | None:
    """Why ``repo_id`` may not come from the hub now, or None when it may."""
    if environment.flag(OFFLINE_ENV):
        return f"{OFFLINE_ENV}=1 allows local model folders only"
    if environment.flag(HF_OFFLINE_ENV):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
            return f"{HF_OFFLINE_ENV}=1 and {repo_id} is not in the Hugging Face cache"
    return None


def resolve_model_source(model_id: str) -> ModelSource:
    """Decide what ``model_id`` names. Raises ValueError saying where it looked.

    Inside ComfyUI a folder is accepted only if it resolves (symlinks followed) under an
    allowed root, and an error names no resolved path outside the roots.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id={model_id!r} is empty: give a repo id such as {DEFAULT_MODEL_ID} or a folder")
    model_id = model_id.strip()
    if "\0" in model_id:
        raise ValueError(f"model_id={model_id!r} has a NUL character: give a repo id or a folder name")
    roots = real_model_roots()
    confined = in_comfyui()
    if confined:
        local = _confined_folder(model_id, roots)
    else:
        local = _any_folder(model_id, roots)
    if local is not None:
        return ModelSource(model_id, local, True)
    if not _REPO_ID.match(model_id) or (not confined and (os.path.isabs(model_id) or model_id.startswith((".", "~")))):
        where = f" under {', '.join(given for given, _ in roots)}" if roots else ""
        raise ValueError(
            f"model_id={model_id!r}: no such folder{where}, and it is not a Hugging Face repo id "
            f"(owner/name, e.g. {DEFAULT_MODEL_ID})"
            + (f"; to use a local model, {_ROOTS_FIX}" if confined else "")
        )
    if confined and os.path.isdir(model_id):
        # diffusers and transformers load an existing folder before asking the hub, so this
        # "repo id" would read a folder relative to the server's working directory.
        raise ValueError(
            f"model_id={model_id!r} is not under the allowed model folders, and as a repo id it would "
            f"load a folder outside them: {_ROOTS_FIX}, or give a repo id that is not also a local path"
        )
    reason = offline_reason(model_id)
    if reason is not None:
        raise ValueError(
            f"model_id={model_id!r} is a Hugging Face repo id, but {reason}: download the model into a "
            f"folder that model_id may name ({_ROOTS_FIX}), or unset {OFFLINE_ENV} / {HF_OFFLINE_ENV}"
        )
    logger.info("resolving %s from the Hugging Face hub", model_id)
    return ModelSource(model_id, model_id, False)


def _any_folder(model_id: str, roots: list[tuple[str, str]]) -> str | None:
    """Outside ComfyUI (the command line): any existing folder, else a name under a root."""
    path = os.path.expanduser(model_id)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isabs(path):
        return None
    for _, real_root in roots:
        candidate = os.path.realpath(os.path.join(real_root, model_id))
        if os.path.isdir(candidate):
            return candidate
    return None


def _confined_folder(model_id: str, roots: list[tuple[str, str]]) -> str | None:
    """Inside ComfyUI: the real folder under an allowed root that ``model_id`` names, or None
    when it names none (it may still be a repo id). Refuses what points out of the roots."""
    return paths.confined_path(model_id, roots, "folder", "model_id", "model folder name",
                               f"none (ComfyUI has no models/diffusers folder and {MODEL_ROOTS_ENV} is unset)",
                               _ROOTS_FIX)


def check_component(source: ModelSource, component: str) -> None:
    """For a local folder, check ``component`` exists with safetensors weights (for model files: its file
    holds that component)."""
    if _files(source):
        _files(source).check_component(source, component)
        return
    if not source.is_local:
        return
    folder = os.path.join(source.location, component)
    if not os.path.isdir(folder):
        raise ValueError(
            f"model {source.model_id!r} has no {component}/ folder (looked in {folder}): "
            f"point model_id at a Wan diffusers folder with {component}/ in it"
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
    """A component's JSON config, from the folder or the hub (a few KB). A fresh dict each call. For model
    files, what the folder's JSON would say, read from the file's header."""
    if _files(source):
        return _files(source).json_config(source, component, filename)
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

        _log_hub(source, f"{component}/{filename}")
        path = hf_hub_download(source.location, filename, subfolder=component)
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _log_hub(source: ModelSource, what: str) -> None:
    if not source.is_local:
        logger.info("downloading %s of %s from the Hugging Face hub (or its cache)", what, source.location)


def load_model_index(source: ModelSource) -> dict:
    """The folder's ``model_index.json`` (which components and pipeline settings it has)."""
    return load_json_config(source, "", "model_index.json")



def load_tokenizer(source: ModelSource):
    if _files(source):
        return _files(source).load_tokenizer(source)
    from transformers import AutoTokenizer

    if source.is_local and not os.path.isdir(os.path.join(source.location, "tokenizer")):
        raise ValueError(f"model {source.model_id!r} has no tokenizer/ folder (looked in {source.location})")
    _log_hub(source, "tokenizer/")
    return AutoTokenizer.from_pretrained(source.location, subfolder="tokenizer", trust_remote_code=False)


def _from_pretrained(source: ModelSource, component: str, precision: str | None = None, subfolder: str | None = None):
    """``component``'s module class (``models.wan.modules``) from the folder or the hub, in eval mode, at
    the dtype ``modules.component_dtype`` gives; safetensors only, remote code never trusted."""
    subfolder = subfolder or component
    entry = modules.COMPONENT_CLASSES["transformer" if component == "transformer_2" else component]
    return load_module(source, subfolder, modules.component_class(component),
                       modules.component_dtype(component, precision), entry.library)


def load_module(source: ModelSource, subfolder: str, module_class, torch_dtype, library: str):
    """``module_class`` (a diffusers or transformers class) from ``subfolder`` of the folder or the hub, in
    eval mode: safetensors only, remote code never trusted. Any model family's loader ends here."""
    check_component(source, subfolder)
    _log_hub(source, f"{subfolder}/")
    untrusted = {"trust_remote_code": False} if library == "transformers" else {}
    return module_class.from_pretrained(source.location, subfolder=subfolder, torch_dtype=torch_dtype,
                                        use_safetensors=True, **untrusted).eval()


def load_text_encoder(source: ModelSource, precision: str):
    if _files(source):
        return _files(source).load_text_encoder(source, modules.torch_dtype(precision))
    return _from_pretrained(source, "text_encoder", precision)


def load_transformer(source: ModelSource, precision: str, subfolder: str = "transformer"):
    """A Wan transformer: ``transformer`` or, for Wan 2.2 A14B's low-noise expert, ``transformer_2``."""
    if _files(source):
        return _files(source).load_transformer(source, modules.torch_dtype(precision), subfolder)
    return _from_pretrained(source, "transformer", precision, subfolder)


def load_vae(source: ModelSource):
    """The VAE, always in float32: it is small, and Wan's VAE is run in fp32 upstream."""
    if _files(source):
        return _files(source).load_vae(source)
    return _from_pretrained(source, "vae")


def load_image_encoder(source: ModelSource):
    """Wan 2.1 I2V's CLIP vision tower, in float32 as diffusers' Wan I2V examples load it (it runs once
    per image)."""
    if _files(source):
        return _files(source).load_image_encoder(source)
    return _from_pretrained(source, "image_encoder")


def load_image_processor(source: ModelSource):
    """The CLIP image processor (resize, crop, normalise on the host) that diffusers' pipeline uses."""
    if _files(source):
        return _files(source).load_image_processor(source)
    from transformers import CLIPImageProcessor

    if source.is_local and not os.path.isdir(os.path.join(source.location, "image_processor")):
        raise ValueError(f"model {source.model_id!r} has no image_processor/ folder (looked in {source.location}): "
                         f"a Wan 2.1 I2V diffusers folder has one")
    _log_hub(source, "image_processor/")
    return CLIPImageProcessor.from_pretrained(source.location, subfolder="image_processor", trust_remote_code=False)
