"""Load the single files ComfyUI users have: transformer, UMT5, VAE and CLIP vision files.

The files live in ComfyUI's own folders (``folder_paths``: ``diffusion_models``, ``text_encoders``,
``vae``, ``clip_vision``) or under ``WAN_TPU_MODEL_ROOTS``, and are safetensors or GGUF (never a
pickle). A ``FileSource`` stands where a diffusers folder's ``ModelSource`` stands: ``loading``'s
functions take either, so the pipeline, the component cache and the HBM plan work the same. What a
diffusers folder says in JSON is read here from the weights' names and shapes (file headers only,
nothing loaded): each component's config and the family.

- Transformers carry the original Wan key names (``blocks.N.self_attn.q``, ``ffn.0``, ``modulation``,
  ``head.head``, ``patch_embedding``, ``text_embedding``, ``time_embedding``, ``img_emb``), maybe under
  ``model.diffusion_model.``, and are renamed to diffusers' ``WanTransformer3DModel`` names.
- bf16/fp16 load as they are; fp8 (``float8_e4m3fn``/``e5m2``) is widened exactly, times its per-tensor
  ``scale_weight`` / ``weight_scale`` in fp8_scaled files; GGUF tensors are dequantized with the ``gguf``
  package. All of it once, on the host, at load, then cast to the run's precision.
- The UMT5 file has Hugging Face T5 key names and its tokenizer as a ``spiece_model`` byte tensor,
  tokenized with sentencepiece as ComfyUI does (T5's rules: ``</s>`` appended, padded with 0).
- VAEs are the Wan 2.1 or the Wan 2.2 VAE in Wan's own names; the CLIP file is HF ``vision_model.*``.

Imports neither torch nor jax at module import.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
from dataclasses import dataclass

from . import loading
from .models.wan import families
from .models.wan.configs import TEXT_TOKENS
from .runtime import environment, paths

logger = logging.getLogger("wan_tpu")

EXTENSIONS = (".safetensors", ".gguf")
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# Component -> ComfyUI's folder type.
FOLDERS = {"transformer": "diffusion_models", "transformer_2": "diffusion_models", "text_encoder": "text_encoders",
           "vae": "vae", "image_encoder": "clip_vision"}
WHAT = {"transformer": "Wan transformer", "transformer_2": "Wan transformer (low-noise expert)",
        "text_encoder": "UMT5 text encoder", "vae": "Wan VAE", "image_encoder": "CLIP vision"}
# GGUF tensor types dequantized here (gguf.quants), the ones Wan GGUF releases use.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K")
# Wan 2.2 A14B's switch between its experts (model_index.json of Wan-AI's diffusers folders).
BOUNDARY_RATIOS = {"t2v": 0.875, "i2v": 0.9}
# Wan's heads are 128 wide in every release (1.3B: 12, TI2V 5B: 24, 14B: 40). No weight shape says it,
# so a width that is not a multiple of 128 (the tiny test models) is taken as 8-wide heads.
HEAD_DIM, SMALL_HEAD_DIM = 128, 8
# The Wan 2.2 VAE's latent statistics (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json; ComfyUI's
# comfy.latent_formats.Wan22). Wan 2.1's are AutoencoderKLWan's defaults.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
_DROPPED = ("scale_input", "input_scale", "comfy_quant")  # fp8 runtime hints; the weights need none of them
_FOLDER_FIX = (f"put the file in ComfyUI's models/<folder> (diffusion_models, text_encoders, vae, clip_vision) or "
               f"add its folder to {environment.MODEL_ROOTS}")


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------ the source
@dataclass(frozen=True)
class FileSource:
    """A model made of single files (real paths). Stands where ``loading.ModelSource`` stands."""

    transformer: str
    text_encoder: str
    vae: str
    transformer_2: str | None = None  # Wan 2.2 A14B's low-noise expert
    image_encoder: str | None = None  # Wan 2.1 I2V's CLIP vision file
    boundary_ratio: float | None = None  # two experts: None takes the Wan 2.2 release's

    is_local = True

    @property
    def model_id(self) -> str:
        return os.path.basename(self.transformer)

    @property
    def location(self) -> str:
        """What identifies the model (MagCache calibrations are kept per location): its transformer file."""
        return self.transformer

    def describe(self) -> str:
        return f"model files {', '.join(os.path.basename(p) for p in self.files().values())}"

    def files(self) -> dict[str, str]:
        return {kind: getattr(self, kind) for kind in FOLDERS if getattr(self, kind)}

    def component_location(self, kind: str) -> str:
        """The file a component comes from: components are cached per file, so a text encoder or VAE
        file is loaded once and shared by every transformer it is used with."""
        if kind == "scheduler" or kind == "":
            return self.transformer
        path = getattr(self, kind, None)
        if not path:
            raise ModelFileError(f"model files {self.model_id!r} have no {WHAT.get(kind, kind)} file: "
                                 f"pick one in the 'Wan TPU Model Files' node ({FOLDERS.get(kind, kind)} folder)")
        return path


def resolve_file(name: str, kind: str) -> str:
    """The real path of the ``kind`` file ``name`` names: inside ComfyUI only under its ``FOLDERS[kind]``
    folders or ``WAN_TPU_MODEL_ROOTS`` (as ``model_id`` is confined), outside any file."""
    label = kind if kind != "image_encoder" else "clip_vision"
    if not isinstance(name, str) or not name.strip():
        raise ModelFileError(f"{label}={name!r} is empty: pick a file from ComfyUI's models/{FOLDERS[kind]} folder")
    name = name.strip()
    if "\0" in name:
        raise ModelFileError(f"{label}={name!r} has a NUL character: pick a file from models/{FOLDERS[kind]}")
    lower = name.lower()
    if lower.endswith(PICKLE_EXTENSIONS):
        raise ModelFileError(f"{label}={name!r} is a pickle file, which this pack never loads (it can run code): "
                             f"use the .safetensors or .gguf release of it")
    if not lower.endswith(EXTENSIONS):
        raise ModelFileError(f"{label}={name!r}: only .safetensors and .gguf files are loaded; pick one from "
                             f"models/{FOLDERS[kind]}")
    if not loading.in_comfyui():
        path = os.path.expanduser(name)
        for candidate in [path] + [os.path.join(root, name) for root in loading.model_roots(FOLDERS[kind])]:
            if os.path.isfile(candidate):
                return os.path.realpath(candidate)
        raise ModelFileError(f"{label}={name!r}: no such file (looked for {os.path.abspath(path)})")
    roots = loading.real_model_roots(FOLDERS[kind])
    found = paths.confined_path(name, roots, "file", label, "model file name",
                                  f"none (ComfyUI has no models/{FOLDERS[kind]} folder)", _FOLDER_FIX)
    if found is None:
        allowed = ", ".join(given for given, _ in roots)
        raise ModelFileError(f"{label}={name!r}: no such file under {allowed or 'the model folders'}: {_FOLDER_FIX}")
    return found


def resolve_model_files(transformer: str, text_encoder: str, vae: str, transformer_2: str | None = None,
                        clip_vision: str | None = None, boundary_ratio: float | None = None) -> FileSource:
    """A ``FileSource`` from file names (as the node's dropdowns give them) or paths; checks each file's
    header and that together they make one model (``check_files``)."""
    paths = {"transformer": resolve_file(transformer, "transformer"),
             "text_encoder": resolve_file(text_encoder, "text_encoder"), "vae": resolve_file(vae, "vae")}
    if transformer_2:
        paths["transformer_2"] = resolve_file(transformer_2, "transformer_2")
    if clip_vision:
        paths["image_encoder"] = resolve_file(clip_vision, "image_encoder")
    source = FileSource(**paths, boundary_ratio=boundary_ratio)
    check_files(source)
    return source


# ------------------------------------------------------------------ file headers
@dataclass(frozen=True)
class FileIndex:
    """A file's tensors from its header alone: name -> (shape, dtype name), prefixes stripped."""

    path: str
    format: str  # "safetensors" or "gguf"
    tensors: dict
    names: dict  # stripped name -> name in the file
    metadata: dict

    @property
    def label(self) -> str:
        return os.path.basename(self.path)

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name][0])

    def has(self, name: str) -> bool:
        return name in self.tensors


_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.", "umt5xxl.transformer.",
             "text_encoders.umt5xxl.transformer.", "transformer.", "clip_vision.")


def _strip_prefix(names) -> dict:
    names = list(names)
    for prefix in _PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return {name[len(prefix):]: name for name in names if name.startswith(prefix)}
    return {name: name for name in names}


def read_index(path: str) -> FileIndex:
    """The header of a safetensors or GGUF file (cached while the file is unchanged)."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise ModelFileError(f"{os.path.basename(path)}: cannot be read ({error.strerror}): check the file") from None
    return _read_index(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _read_index(path: str, size: int, mtime: int) -> FileIndex:
    reader = _read_gguf_header if path.lower().endswith(".gguf") else _read_safetensors_header
    tensors, metadata = reader(path, size)
    names = _strip_prefix(tensors)
    return FileIndex(path, "gguf" if path.lower().endswith(".gguf") else "safetensors",
                     {short: tensors[full] for short, full in names.items()}, names, metadata)


def _damaged(path: str, why: str) -> ModelFileError:
    return ModelFileError(f"{os.path.basename(path)} is {why}: the download is incomplete or the file is damaged; "
                          f"download it again")


def _read_safetensors_header(path: str, size: int) -> tuple[dict, dict]:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _damaged(path, f"truncated ({size} bytes, no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * 2**20:
            raise _damaged(path, f"truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise _damaged(path, "not a readable safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise _damaged(path, f"truncated ({size} bytes; its header lists {8 + length + end})")
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items()}, metadata


def _gguf_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # truncated or not GGUF: the reader raises ValueError, IndexError, struct errors
        raise _damaged(path, f"not a readable GGUF file ({type(error).__name__}: {error})") from None


def _gguf_shape(reader, tensor) -> tuple:
    field = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")  # ComfyUI-GGUF keeps 5-D shapes here
    if field is not None:
        return tuple(int(field.parts[index][0]) for index in field.data)
    return tuple(int(v) for v in reversed(tensor.shape.tolist()))


def _read_gguf_header(path: str, size: int) -> tuple[dict, dict]:
    reader = _gguf_reader(path)
    tensors = {}
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise _damaged(path, f"truncated (tensor {tensor.name} is cut off)")
        tensors[tensor.name] = (_gguf_shape(reader, tensor), tensor.tensor_type.name)
    architecture = reader.get_field("general.architecture")
    metadata = {"general.architecture": str(bytes(architecture.parts[architecture.data[-1]]), "utf-8")
                if architecture is not None else None}
    return tensors, metadata


def what_is(index: FileIndex) -> str | None:
    """Which component a file holds, from its tensor names: a FOLDERS key or None (not a Wan part)."""
    has = index.has
    if has("patch_embedding.weight") and (has("blocks.0.self_attn.q.weight") or has("head.head.weight")):
        return "transformer"
    if has("decoder.middle.0.residual.0.gamma") or has("decoder.conv1.weight") and has("conv2.weight"):
        return "vae"
    if has("encoder.block.0.layer.0.SelfAttention.q.weight"):
        return "text_encoder"
    if has("vision_model.encoder.layers.0.layer_norm1.weight"):
        return "image_encoder"
    return None


def _describe_kind(index: FileIndex) -> str:
    kind = what_is(index)
    if kind is None:
        return "no Wan model part this pack knows (not a Wan transformer, UMT5, Wan VAE or CLIP vision file)"
    if kind == "vae":
        return "the Wan 2.2 VAE" if _is_vae22(index) else "the Wan 2.1 VAE"
    return f"a {WHAT[kind]}" + (f" ({transformer_family_name(index)})" if kind == "transformer" else "")


def expect(index: FileIndex, kind: str) -> None:
    """Raise, naming the file and where it belongs, unless ``index`` holds a ``kind`` component."""
    found = what_is(index)
    if found == kind or (kind == "transformer_2" and found == "transformer"):
        return
    where = f"; pick it in the {_INPUT[found]} input" if found in _INPUT else ""
    raise ModelFileError(f"{index.label} was given as the {WHAT[kind]} file, but it holds {_describe_kind(index)}"
                         f"{where}: for the {_INPUT[kind]} input pick a {WHAT[kind]} file from "
                         f"models/{FOLDERS[kind]}")


_INPUT = {"transformer": "transformer", "transformer_2": "transformer_2", "text_encoder": "text_encoder",
          "vae": "vae", "image_encoder": "clip_vision"}


# ------------------------------------------------------------------ configs from shapes
def _block_count(index: FileIndex, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for name in index.tensors if (m := pattern.match(name))}
    return max(found) + 1 if found else 0


def _unsupported_transformer(index: FileIndex) -> str | None:
    names = index.tensors
    if any(name.startswith("vace_") for name in names):
        return "Wan VACE"
    if any(name.startswith(("motion_encoder.", "face_adapter.")) for name in names):
        return "Wan Animate"
    if index.has("img_emb.emb_pos"):
        return "Wan 2.1 FLF2V (first-last frame)"
    return None


def transformer_config(index: FileIndex) -> dict:
    """``WanTransformer3DModel``'s config from an original-names Wan transformer file."""
    unsupported = _unsupported_transformer(index)
    if unsupported:
        raise ModelFileError(f"{index.label} is a {unsupported} transformer, which this pack does not run yet: use a "
                             f"Wan 2.1 T2V/I2V, Wan 2.2 A14B or TI2V 5B file")
    try:
        dim, in_channels, *patch = index.shape("patch_embedding.weight")
        layers = _block_count(index, "blocks.")
        config = dict(
            patch_size=tuple(patch), num_attention_heads=dim // (HEAD_DIM if dim % HEAD_DIM == 0 else SMALL_HEAD_DIM),
            attention_head_dim=HEAD_DIM if dim % HEAD_DIM == 0 else SMALL_HEAD_DIM, in_channels=in_channels,
            out_channels=index.shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]),
            text_dim=index.shape("text_embedding.0.weight")[1], freq_dim=index.shape("time_embedding.0.weight")[1],
            ffn_dim=index.shape("blocks.0.ffn.0.weight")[0], num_layers=layers,
            cross_attn_norm=index.has("blocks.0.norm3.weight"),
            qk_norm="rms_norm_across_heads" if index.has("blocks.0.self_attn.norm_q.weight") else None,
            eps=1e-6, image_dim=index.shape("img_emb.proj.1.weight")[1] if index.has("img_emb.proj.1.weight") else None,
            added_kv_proj_dim=dim if index.has("blocks.0.cross_attn.k_img.weight") else None, rope_max_seq_len=1024,
        )
    except (KeyError, ValueError, IndexError):
        raise ModelFileError(f"{index.label} is not a complete Wan transformer (its patch_embedding, head, text/time "
                             f"embedding or blocks are missing): download it again or pick a Wan transformer "
                             f"file") from None
    if layers == 0:
        raise ModelFileError(f"{index.label} has no transformer blocks: it is not a complete Wan transformer")
    return config


def transformer_family_name(index: FileIndex) -> str:
    try:
        config = transformer_config(index)
    except ModelFileError:
        return "not one this pack runs"
    if config["in_channels"] == 48:
        return "Wan 2.2 TI2V 5B"
    if config["in_channels"] == 36:
        return "Wan 2.1 I2V" if config["image_dim"] else "Wan 2.2 I2V A14B expert"
    return "Wan T2V"


def text_encoder_config(index: FileIndex) -> dict:
    """``UMT5Config`` keywords from a UMT5 file (HF T5 names)."""
    try:
        vocab, d_model = index.shape("shared.weight") if index.has("shared.weight") else \
            index.shape("encoder.embed_tokens.weight")
        buckets, heads = index.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = index.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        d_ff = index.shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    except KeyError:
        raise ModelFileError(f"{index.label} is not a complete UMT5 encoder (its embedding, relative attention bias "
                             f"or gated feed-forward is missing): pick umt5_xxl_*.safetensors from "
                             f"models/text_encoders") from None
    return dict(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                num_layers=_block_count(index, "encoder.block."), num_heads=heads,
                relative_attention_num_buckets=buckets, relative_attention_max_distance=128 if buckets == 32 else 16,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _is_vae22(index: FileIndex) -> bool:
    return index.has("decoder.upsamples.0.upsamples.0.residual.2.weight")


def vae_config(index: FileIndex) -> dict:
    """``AutoencoderKLWan``'s config from a Wan 2.1 or Wan 2.2 VAE file (Wan's own names)."""
    try:
        base = index.shape("encoder.conv1.weight")[0]
        z_dim = index.shape("conv2.weight")[0]
        decoder_base = index.shape("decoder.head.0.gamma")[0]
        wan22 = _is_vae22(index)
        stages = _block_count(index, "encoder.downsamples.")
        if wan22:
            down = [f"encoder.downsamples.{i}.downsamples." for i in range(stages)]
            res_blocks = sum(1 for j in range(_block_count(index, down[0]))
                             if index.has(f"{down[0]}{j}.residual.0.gamma"))
            mult = [index.shape(f"{prefix}0.residual.2.weight")[0] // base for prefix in down]
            temporal = [index.has(f"{prefix}{res_blocks}.time_conv.weight") for prefix in down[:-1]]
        else:
            res_blocks, mult, temporal, stage = 0, [], [], []
            for i in range(stages):  # a flat list: each stage's residual blocks, then its downsampling
                prefix = f"encoder.downsamples.{i}."
                if index.has(prefix + "residual.2.weight"):
                    stage.append(index.shape(prefix + "residual.2.weight")[0])
                else:
                    temporal.append(index.has(prefix + "time_conv.weight"))
                    mult.append(stage[-1] // base)
                    res_blocks, stage = len(stage), []
            mult.append(stage[-1] // base)
    except (KeyError, IndexError):
        raise ModelFileError(f"{index.label} is not a complete Wan VAE: pick wan_2.1_vae.safetensors or "
                             f"wan2.2_vae.safetensors from models/vae") from None
    config = dict(base_dim=base, z_dim=z_dim, dim_mult=mult, num_res_blocks=res_blocks, attn_scales=[],
                  temperal_downsample=temporal, dropout=0.0)
    if wan22:
        config.update(decoder_base_dim=decoder_base, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                      scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=list(WAN22_LATENTS_MEAN),
                      latents_std=list(WAN22_LATENTS_STD))
    else:
        config.update(_wan21_latent_stats())
    return config


def _wan21_latent_stats() -> dict:
    import inspect

    from diffusers import AutoencoderKLWan

    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    return {name: list(defaults[name].default) for name in ("latents_mean", "latents_std")}


def clip_config(index: FileIndex) -> dict:
    """``CLIPVisionConfig`` keywords from a CLIP vision file (HF names)."""
    try:
        hidden, _, patch, _ = index.shape("vision_model.embeddings.patch_embedding.weight")
        positions = index.shape("vision_model.embeddings.position_embedding.weight")[0]
        intermediate = index.shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    except KeyError:
        raise ModelFileError(f"{index.label} is not a complete CLIP vision tower: pick clip_vision_h.safetensors "
                             f"from models/clip_vision") from None
    side = round((positions - 1) ** 0.5)
    # ViT-H/14 (clip_vision_h, Wan 2.1 I2V's) has 16 heads of 80 and GELU (open_clip's towers); other widths
    # are taken as OpenAI CLIP's: 64-wide heads (8-wide below 64, the tiny test towers) and quick GELU.
    heads = 16 if hidden in (1280, 1024, 1664) else hidden // 64 if hidden >= 64 else max(1, hidden // 8)
    projection = index.shape("visual_projection.weight")[0] if index.has("visual_projection.weight") else hidden
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=_block_count(
        index, "vision_model.encoder.layers."), num_attention_heads=heads, image_size=side * patch, patch_size=patch,
        projection_dim=projection, hidden_act="gelu" if hidden in (1280, 1664) else "quick_gelu", layer_norm_eps=1e-5)


def scheduler_config() -> dict:
    """Wan's scheduler (what every Wan-AI diffusers folder's scheduler_config.json holds, flow_shift aside,
    which the sampler's flow_shift input sets)."""
    from diffusers import UniPCMultistepScheduler

    return dict(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0).config)


# ------------------------------------------------------------------ family and checks
def family(source: FileSource) -> families.WanFamily:
    index = read_index(source.transformer)
    expect(index, "transformer")
    config = transformer_config(index)
    image = config["in_channels"] == 36
    if config["in_channels"] == 48:
        if source.transformer_2:
            raise ModelFileError(f"{source.model_id} is Wan 2.2 TI2V 5B, which has one transformer: clear the "
                                 f"transformer_2 input")
        return families.WAN22_TI2V
    if source.transformer_2:
        if config["image_dim"]:
            raise ModelFileError(f"{source.model_id} is Wan 2.1 I2V, which has one transformer: clear the "
                                 f"transformer_2 input")
        ratio = source.boundary_ratio or BOUNDARY_RATIOS["i2v" if image else "t2v"]
        return families.two_expert_family(image, ratio)
    if image and not config["image_dim"]:
        raise ModelFileError(f"{source.model_id} is one expert of Wan 2.2 I2V A14B (image-to-video without CLIP): pick "
                             f"the high-noise file as transformer and the low-noise file as transformer_2")
    if image:
        if not source.image_encoder:
            raise ModelFileError(f"{source.model_id} is Wan 2.1 I2V, which also needs its CLIP vision tower: pick "
                                 f"clip_vision_h.safetensors (models/clip_vision) in the clip_vision input")
        return families.WAN21_I2V
    return families.WAN21_T2V


def model_index(source: FileSource) -> dict:
    """What a diffusers folder's model_index.json would say (``families.family_from_model_index`` reads it)."""
    found = family(source)
    index = {"_class_name": found.diffusers_pipeline, "transformer": ["diffusers", "WanTransformer3DModel"]}
    if found.two_experts:
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=found.boundary_ratio)
    if found.clip_image_encoder:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    if found.expand_timesteps:
        index["expand_timesteps"] = True
    return index


def check_files(source: FileSource) -> None:
    """Each file holds the part it was given as, and the parts fit together: the family is complete, the
    experts share one architecture, the UMT5 width is the transformer's text width, the VAE's latents are
    the transformer's channels, the CLIP width is its image width. Reads headers only."""
    indexes = {kind: read_index(path) for kind, path in source.files().items()}
    for kind in indexes:
        check_component(source, kind)
    config = transformer_config(indexes["transformer"])
    found = family(source)
    name = f"{source.model_id} ({found.name})"
    if "transformer_2" in indexes and transformer_config(indexes["transformer_2"]) != config:
        raise ModelFileError(f"{indexes['transformer_2'].label} and {source.model_id} are not two experts of one "
                             f"model (their shapes differ): pick Wan 2.2 A14B's high- and low-noise files")
    text = text_encoder_config(indexes["text_encoder"])
    if text["d_model"] != config["text_dim"]:
        raise ModelFileError(f"{indexes['text_encoder'].label} is {text['d_model']} wide, but {name} takes "
                             f"{config['text_dim']}-wide text embeddings: pick the UMT5-XXL file "
                             f"(umt5_xxl_*.safetensors) that goes with it")
    vae = vae_config(indexes["vae"])
    if vae["z_dim"] != config["out_channels"]:
        wanted = "wan2.2_vae.safetensors (the Wan 2.2 VAE)" if config["out_channels"] == 48 else \
            "wan_2.1_vae.safetensors (the Wan 2.1 VAE)"
        raise ModelFileError(f"{indexes['vae'].label} is {_describe_kind(indexes['vae'])} ({vae['z_dim']} latent "
                             f"channels), but {name} works in {config['out_channels']}: pick {wanted}")
    if "image_encoder" in indexes:
        if not found.clip_image_encoder:
            raise ModelFileError(f"{name} takes no CLIP image embeddings: clear the clip_vision input")
        clip = clip_config(indexes["image_encoder"])
        if clip["hidden_size"] != config["image_dim"]:
            raise ModelFileError(f"{indexes['image_encoder'].label} is {clip['hidden_size']} wide, but {name} takes "
                                 f"{config['image_dim']}-wide image embeddings: pick clip_vision_h.safetensors")


def check_component(source: FileSource, kind: str) -> None:
    """Before a component of ``kind`` is loaded (and the one it replaces is freed): its file holds that
    part, complete in its header, with every fp8 scale and only GGUF types this pack dequantizes."""
    index = read_index(source.component_location(kind))
    expect(index, kind)
    if index.format == "gguf":
        _check_gguf_types(index)
    else:
        _fp8_plan(index)
    {"transformer": transformer_config, "transformer_2": transformer_config, "text_encoder": text_encoder_config,
     "vae": vae_config, "image_encoder": clip_config}[kind](index)


def json_config(source: FileSource, component: str, filename: str = "config.json") -> dict:
    """What ``loading.load_json_config`` reads from a diffusers folder, for a ``FileSource``."""
    if component == "" and filename == "model_index.json":
        return model_index(source)
    if component == "scheduler":
        return scheduler_config()
    if component in ("transformer", "transformer_2"):
        return transformer_config(read_index(source.component_location(component)))
    if component == "text_encoder":
        return text_encoder_config(read_index(source.text_encoder))
    if component == "vae":
        return vae_config(read_index(source.vae))
    if component == "image_encoder":
        return clip_config(read_index(source.component_location("image_encoder")))
    raise ModelFileError(f"model files {source.model_id!r} have no {component}/{filename}")


# ------------------------------------------------------------------ key names
_TRANSFORMER_RENAMES = (  # original Wan -> diffusers, applied in order to each name's dotted parts
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.(attn[12])\.q\.", r".\1.to_q."),
    (r"\.(attn[12])\.k\.", r".\1.to_k."),
    (r"\.(attn[12])\.v\.", r".\1.to_v."),
    (r"\.(attn[12])\.o\.", r".\1.to_out.0."),
    (r"\.k_img\.", ".add_k_proj."),
    (r"\.v_img\.", ".add_v_proj."),
    (r"\.norm_k_img\.", ".norm_added_k."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # Wan's norm3 is the cross-attention norm, diffusers' norm2
)


def transformer_key(name: str) -> str:
    """A Wan transformer tensor's diffusers name."""
    for pattern, replacement in _TRANSFORMER_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


_VAE_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
                 "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                 "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_VAE_FIXED = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
              "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
              "encoder.conv1.weight": "encoder.conv_in.weight", "encoder.conv1.bias": "encoder.conv_in.bias",
              "decoder.conv1.weight": "decoder.conv_in.weight", "decoder.conv1.bias": "decoder.conv_in.bias",
              "encoder.head.0.gamma": "encoder.norm_out.gamma", "encoder.head.2.weight": "encoder.conv_out.weight",
              "encoder.head.2.bias": "encoder.conv_out.bias", "decoder.head.0.gamma": "decoder.norm_out.gamma",
              "decoder.head.2.weight": "decoder.conv_out.weight", "decoder.head.2.bias": "decoder.conv_out.bias"}


def vae_keys(names) -> dict:
    """Wan VAE names (2.1 or 2.2) -> ``AutoencoderKLWan``'s, for every name in ``names``."""
    names = list(names)
    out = {}
    flat_decoder = {}  # Wan 2.1's decoder is one flat list: a stage's residual blocks, then its upsampling
    indices = sorted({int(n.split(".")[2]) for n in names if re.match(r"decoder\.upsamples\.\d+\.(residual|shortcut|"
                                                                     r"resample|time_conv)", n)})
    stage, block = 0, 0
    for i in indices:
        if any(n.startswith(f"decoder.upsamples.{i}.resample") or n.startswith(f"decoder.upsamples.{i}.time_conv")
               for n in names):
            flat_decoder[i] = f"decoder.up_blocks.{stage}.upsamplers.0."
            stage, block = stage + 1, 0
        else:
            flat_decoder[i] = (f"decoder.up_blocks.{stage}.resnets.{block}.", True)
            block += 1
    for name in names:
        if name in _VAE_FIXED:
            out[name] = _VAE_FIXED[name]
            continue
        m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.+)$", name)
        if m:
            part, index, rest = m.groups()
            if index == "1":
                out[name] = f"{part}.mid_block.attentions.0.{rest}"
            else:
                out[name] = f"{part}.mid_block.resnets.{int(index) // 2}.{_VAE_RESIDUAL.get(rest, rest)}"
            continue
        m = re.match(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(down|up)samples\.(\d+)\.(.+)$", name)
        if m:  # Wan 2.2: stages of blocks
            part, i, _, j, rest = m.groups()
            blocks = "encoder.down_blocks" if part.startswith("encoder") else "decoder.up_blocks"
            if rest in _VAE_RESIDUAL:
                out[name] = f"{blocks}.{i}.resnets.{j}.{_VAE_RESIDUAL[rest]}"
            else:
                sampler = "downsampler" if part.startswith("encoder") else "upsampler"
                out[name] = f"{blocks}.{i}.{sampler}.{rest}"
            continue
        m = re.match(r"encoder\.downsamples\.(\d+)\.(.+)$", name)
        if m:  # Wan 2.1's encoder: the same flat list in diffusers
            i, rest = m.groups()
            out[name] = f"encoder.down_blocks.{i}.{_VAE_RESIDUAL.get(rest, rest)}"
            continue
        m = re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            target = flat_decoder[i]
            out[name] = target[0] + _VAE_RESIDUAL.get(rest, rest) if isinstance(target, tuple) else target + rest
            continue
        out[name] = name
    return out


# ------------------------------------------------------------------ reading tensors
def _check_gguf_types(index: FileIndex) -> None:
    bad = sorted({dtype for _, dtype in index.tensors.values() if dtype not in GGUF_TYPES})
    if bad:
        raise ModelFileError(f"{index.label} holds GGUF tensors of type {', '.join(bad)}, which this pack does not "
                             f"dequantize: use a file quantised as one of {', '.join(GGUF_TYPES)} (Q8_0 is closest "
                             f"to the bf16 weights)")


def _fp8_plan(index: FileIndex) -> dict:
    """fp8 weight -> its scale tensor's name in the file (None: a plain fp8_e4m3fn file). Raises when the
    file is scaled (a ``scaled_fp8`` marker or any scale) but some fp8 weight has no scale."""
    fp8 = [name for name, (_, dtype) in index.tensors.items() if dtype.startswith("F8") and name != "scaled_fp8"]
    scaled = index.has("scaled_fp8") or any(name.endswith(_SCALE_SUFFIXES) for name in index.tensors)
    plan, missing = {}, []
    for name in fp8:
        base = name[: -len("weight")] if name.endswith("weight") else name + "."
        scale = next((base + suffix for suffix in _SCALE_SUFFIXES if index.has(base + suffix)), None)
        if scale is None and scaled:
            missing.append(name)
        plan[name] = scale
    if missing:
        raise ModelFileError(f"{index.label} is an fp8_scaled file, but {len(missing)} of its fp8 weights have no "
                             f"scale_weight/weight_scale (e.g. {missing[0]}): without them the weights come out "
                             f"wrong. Download the file again, or use the bf16, fp16 or plain fp8_e4m3fn file")
    return plan


def read_tensors(index: FileIndex, dtype, keep_fp32=lambda name: False) -> dict:
    """Every weight of the file (stripped names) as a torch tensor of ``dtype`` (``keep_fp32(name)``:
    float32), dequantized exactly on the host: fp8 times its scale in float32, GGUF by ``gguf.quants``.
    One tensor of the file is widened at a time. Raises ``ModelFileError`` naming the file."""
    import torch

    def target(name):
        return torch.float32 if keep_fp32(name) else dtype

    out = {}
    try:
        if index.format == "gguf":
            _check_gguf_types(index)
            out = _read_gguf(index, target)
        else:
            plan = _fp8_plan(index)
            from safetensors import safe_open

            with safe_open(index.path, framework="pt") as handle:
                for short, full in index.names.items():
                    if short == "scaled_fp8" or short.endswith(_SCALE_SUFFIXES + _DROPPED) or short == "spiece_model":
                        continue
                    tensor = handle.get_tensor(full)
                    if short in plan:
                        tensor = tensor.to(torch.float32)
                        if plan[short] is not None:
                            tensor = tensor * handle.get_tensor(index.names[plan[short]]).to(torch.float32)
                    out[short] = tensor.to(target(short)) if tensor.is_floating_point() else tensor
    except ModelFileError:
        raise
    except Exception as error:  # a file that changed or broke after its header was read
        raise _damaged(index.path, f"unreadable ({type(error).__name__}: {error})") from None
    return out


def _read_gguf(index: FileIndex, target) -> dict:
    import numpy as np
    import torch
    from gguf import quants

    reader = _gguf_reader(index.path)
    stripped = {full: short for short, full in index.names.items()}
    out = {}
    for tensor in reader.tensors:
        short = stripped.get(tensor.name)
        if short is None:
            continue
        shape = index.shape(short)
        kind = tensor.tensor_type.name
        if kind in ("F32", "F16"):
            array = np.asarray(tensor.data).reshape(shape)
            value = torch.from_numpy(array.copy())
        else:  # BF16 and the quantised types: float32, exactly
            value = torch.from_numpy(np.asarray(quants.dequantize(tensor.data, tensor.tensor_type),
                                                np.float32).reshape(shape))
        out[short] = value.to(target(short))
    return out


def _load_strict(module, state: dict, label: str, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        detail = "; ".join(part for part in (f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
                                             f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected
                                             else "") if part)
        raise ModelFileError(f"{label} does not hold a complete {what} of the shapes its header implies ({detail}): "
                             f"download it again or pick a {what} file")


def _empty(build):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _fp32_rule(names) -> callable:
    names = tuple(names or ())
    return lambda name: any(part in name.split(".") for part in names)


def load_transformer(source: FileSource, torch_dtype, kind: str = "transformer"):
    """A ``WanTransformer3DModel`` from a transformer file, in ``torch_dtype`` (the modules diffusers keeps
    in fp32 stay fp32, as ``from_pretrained`` leaves them)."""
    from diffusers import WanTransformer3DModel

    index = read_index(source.component_location(kind))
    expect(index, kind)
    config = transformer_config(index)
    module = _empty(lambda: WanTransformer3DModel.from_config(config))
    keep = _fp32_rule(getattr(module, "_keep_in_fp32_modules", None))
    state = read_tensors(index, torch_dtype, lambda name: keep(transformer_key(name)))
    state = {transformer_key(name): tensor for name, tensor in state.items()}
    _load_strict(module, state, index.label, "Wan transformer")
    return module.eval()


def load_vae(source: FileSource):
    import torch
    from diffusers import AutoencoderKLWan

    index = read_index(source.vae)
    expect(index, "vae")
    config = vae_config(index)
    module = _empty(lambda: AutoencoderKLWan(**config))
    names = vae_keys(index.tensors)
    state = {names[name]: tensor for name, tensor in read_tensors(index, torch.float32).items()}
    _load_strict(module, state, index.label, "Wan VAE")
    return module.eval()


def load_text_encoder(source: FileSource, torch_dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    index = read_index(source.text_encoder)
    expect(index, "text_encoder")
    module = _empty(lambda: UMT5EncoderModel(UMT5Config(**text_encoder_config(index))))
    keep = _fp32_rule(getattr(module, "_keep_in_fp32_modules", None) if _keeps_fp32(torch_dtype) else ())
    state = read_tensors(index, torch_dtype, keep)
    for name in ("shared.weight", "encoder.embed_tokens.weight"):  # tied: a file may hold either
        other = "encoder.embed_tokens.weight" if name == "shared.weight" else "shared.weight"
        if name not in state and other in state:
            state[name] = state[other]
    _load_strict(module, state, index.label, "UMT5 encoder")
    module.tie_weights()
    return module.eval()


def _keeps_fp32(torch_dtype) -> bool:
    import torch

    return torch_dtype == torch.float16


def load_image_encoder(source: FileSource):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    index = read_index(source.component_location("image_encoder"))
    expect(index, "image_encoder")
    module = _empty(lambda: CLIPVisionModel(CLIPVisionConfig(**clip_config(index))))
    # Files name the tower's weights vision_model.* (and may add visual_projection); transformers 5's
    # CLIPVisionModel names them without the prefix.
    bare = not any(name.startswith("vision_model.") for name in module.state_dict())
    state = {name[len("vision_model."):] if bare else name: tensor
             for name, tensor in read_tensors(index, torch.float32).items()
             if name.startswith("vision_model.") and not name.endswith("position_ids")}
    _load_strict(module, state, index.label, "CLIP vision tower")
    return module.eval()


def load_image_processor(source: FileSource):
    """Wan 2.1 I2V's CLIP image processor (Wan-AI's image_processor/: resize the short side, centre crop,
    OpenAI CLIP mean/std), at the tower's own image size."""
    from transformers import CLIPImageProcessor

    size = clip_config(read_index(source.component_location("image_encoder")))["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ------------------------------------------------------------------ tokenizer
class SentencePieceTokenizer:
    """The UMT5 tokenizer from a file's ``spiece_model`` bytes, as T5's tokenizer tokenizes plain text
    (and as ComfyUI does): sentencepiece pieces, ``</s>`` (1) appended, cut to ``max_length`` keeping
    ``</s>``, padded with 0. Takes the call ``WanTPUPipeline.encode`` makes."""

    def __init__(self, model_proto: bytes, eos_id: int = 1, pad_id: int = 0):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def ids(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def __call__(self, texts, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                 add_special_tokens=True, return_attention_mask=True, return_tensors="np"):
        import numpy as np

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), max_length), self.pad_id, np.int64)
        mask = np.zeros((len(texts), max_length), np.int64)
        for row, text in enumerate(texts):
            pieces = self.ids(text)
            if add_special_tokens:
                pieces = pieces[: max_length - 1] + [self.eos_id] if truncation else pieces + [self.eos_id]
            pieces = pieces[:max_length]
            ids[row, : len(pieces)] = pieces
            mask[row, : len(pieces)] = 1
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(source: FileSource) -> SentencePieceTokenizer:
    index = read_index(source.text_encoder)
    if index.format != "safetensors" or not index.has("spiece_model"):
        raise ModelFileError(f"{index.label} carries no tokenizer (a 'spiece_model' tensor, as Comfy-Org's "
                             f"umt5_xxl_*.safetensors do): pick one of those files")
    from safetensors import safe_open

    with safe_open(index.path, framework="np") as handle:
        proto = handle.get_tensor(index.names["spiece_model"]).tobytes()
    try:
        return SentencePieceTokenizer(proto)
    except Exception as error:
        raise _damaged(index.path, f"carrying an unreadable tokenizer ({error})") from None
