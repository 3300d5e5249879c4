"""Write tiny diffusers models as the single files ComfyUI users have, for the model-file tests.

Each writer inverts the key mapping by rules of its own (diffusers names -> Wan's original names, which
diffusers' own ``convert_wan_*_to_diffusers`` and ComfyUI's modules are checked against in the tests):
transformers (bf16, fp16, fp8_e4m3fn, fp8_scaled, GGUF Q8_0/F16, optionally under
``model.diffusion_model.``), the UMT5 file (HF T5 names plus a ``spiece_model`` tensor), the Wan 2.1 and
2.2 VAE, and the CLIP vision file.
"""

from __future__ import annotations

import io
import re

CORPUS = ("a cat playing piano in a jazz club . a robot dancing in the rain . cinematic shot of a red fox running "
          "through snow , golden hour , 4k . blurry low quality static worst quality jpeg artifacts ugly deformed . "
          "the quick brown fox jumps over the lazy dog near a river at sunset .")

_TRANSFORMER = (  # diffusers -> original Wan, in order
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."), (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
)


def original_transformer(state: dict, prefix: str = "") -> dict:
    out = {}
    for name, tensor in state.items():
        for pattern, replacement in _TRANSFORMER:
            name = re.sub(pattern, replacement, name)
        out[prefix + name] = tensor.detach().clone().contiguous()
    return out


_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def original_vae(state: dict, num_res_blocks: int, wan22: bool) -> dict:
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
             "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
             "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
             "decoder.conv_out": "decoder.head.2"}
    out = {}
    for name, tensor in state.items():
        new = None
        for old, original in fixed.items():
            if name.startswith(old + "."):
                new = original + name[len(old):]
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$", name)
        if m:
            part, kind, i, rest = m.groups()
            new = f"{part}.middle.1.{rest}" if kind == "attentions" else f"{part}.middle.{2 * int(i)}.{_RES[rest]}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", name)
        if m:
            i, rest = m.groups()
            if wan22:
                r = re.match(r"resnets\.(\d+)\.(.+)$", rest)
                new = (f"encoder.downsamples.{i}.downsamples.{r.group(1)}.{_RES[r.group(2)]}" if r else
                       f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.{rest.split('.', 1)[1]}")
            else:  # the same flat list
                new = f"encoder.downsamples.{i}.{_RES.get(rest, rest)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(.+)$", name)
        if m:
            s, rest = int(m.group(1)), m.group(2)
            r = re.match(r"resnets\.(\d+)\.(.+)$", rest)
            if wan22:
                new = (f"decoder.upsamples.{s}.upsamples.{r.group(1)}.{_RES[r.group(2)]}" if r else
                       f"decoder.upsamples.{s}.upsamples.{num_res_blocks + 1}.{rest.split('.', 1)[1]}")
            else:  # one flat list: per stage num_res_blocks + 1 residual blocks, then the upsampler
                per_stage = num_res_blocks + 2
                if r:
                    new = f"decoder.upsamples.{s * per_stage + int(r.group(1))}.{_RES[r.group(2)]}"
                else:
                    new = f"decoder.upsamples.{s * per_stage + num_res_blocks + 1}.{rest.split('.', 2)[2]}"
        out[new or name] = tensor.detach().clone().contiguous()
    return out


def train_spiece(vocab_size: int = 64) -> bytes:
    """A unigram sentencepiece model as T5's: pad 0, eos 1, unk 2, no bos."""
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([CORPUS] * 4), model_writer=buffer, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False)
    return buffer.getvalue()


def save(path, state: dict) -> str:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return str(path)


def fp8(state: dict, scaled: bool, marker: bool = True) -> dict:
    """fp8_e4m3fn weights (2-D and up, as ComfyUI's files), others bf16; scaled: a per-tensor scale_weight
    and the scaled_fp8 marker."""
    import torch

    out = {}
    for name, tensor in state.items():
        if tensor.ndim >= 2 and name.endswith(".weight") and "patch_embedding" not in name:
            if scaled:
                scale = tensor.float().abs().max() / 448.0
                out[name] = (tensor.float() / scale).to(torch.float8_e4m3fn)
                out[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[name] = tensor.to(torch.float8_e4m3fn)
        else:
            out[name] = tensor.to(torch.bfloat16)
    if scaled and marker:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_gguf(path, state: dict, quantised: str = "Q8_0", raw_tensor=None) -> str:
    """A GGUF file as ComfyUI-GGUF writes Wan: arch "wan", 2-D weights in ``quantised`` (when their rows fit
    its blocks), the rest F16 or F32; 5-D shapes in ``comfy.gguf.orig_shape.*``. ``raw_tensor(name, array)``
    may give (raw bytes, GGML type) for a tensor instead (a bad file's)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "wan")
    qtype = getattr(gguf.GGMLQuantizationType, quantised)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, tensor in state.items():
        array = tensor.float().numpy()
        raw = raw_tensor(name, array) if raw_tensor else None
        if raw is not None:
            writer.add_tensor(name, raw[0], raw_dtype=raw[1])
            continue
        if array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(array.shape))
            array = array.reshape(array.shape[0], -1)
        if array.ndim == 2 and array.shape[-1] % block == 0 and quantised not in ("F16", "F32"):
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim >= 2:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
