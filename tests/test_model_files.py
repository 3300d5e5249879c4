"""ComfyUI's single files (diffusion_models, text_encoders, vae, clip_vision), written from the tiny diffusers
models by tests/comfy_files.py, load as the same models from the diffusers folders: every weight exactly equal
(after the file's own rounding: bf16, fp16, fp8, fp8 times its scale, GGUF Q8_0/F16, dequantized here
independently), the configs and family equal, and a run from files gives the folder's frames. Bad files are
refused naming the file and the fix, leave nothing cached, and the next good run works."""

import os
import sys
import types

import numpy as np
import pytest

import comfy_files
from conftest import TINY_VIDEO, pack_module

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mf():
    return pack_module("model_files")


def _modules(folder):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    return (WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32),
            UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32),
            AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32))


def _write_set(folder, out, *, transformer_state=None, wan22_vae=False, prefix="", name="wan"):
    """Transformer (fp32 unless a state is given), UMT5 (fp32 + spiece_model) and VAE files of ``folder``."""
    transformer, text_encoder, vae = _modules(folder)
    os.makedirs(out, exist_ok=True)
    paths = {}
    state = transformer_state or comfy_files.original_transformer(transformer.state_dict(), prefix)
    paths["transformer"] = comfy_files.save(os.path.join(out, f"{name}_t.safetensors"), state)
    umt5 = {k: v.contiguous() for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    umt5["spiece_model"] = torch.frombuffer(bytearray(comfy_files.train_spiece()), dtype=torch.uint8)
    paths["text_encoder"] = comfy_files.save(os.path.join(out, f"{name}_umt5.safetensors"), umt5)
    original = comfy_files.original_vae(vae.state_dict(), vae.config.num_res_blocks, wan22_vae)
    paths["vae"] = comfy_files.save(os.path.join(out, f"{name}_vae.safetensors"), original)
    return paths, (transformer, text_encoder, vae)


@pytest.fixture(scope="module")
def t2v(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy") / "t2v"
    paths, modules = _write_set(tiny_model_dir, str(out), prefix="model.diffusion_model.")
    return paths, modules


def _states_equal(module, reference: dict, exact=True):
    state = module.state_dict()
    assert set(state) == set(reference)
    for name, tensor in state.items():
        want = reference[name]
        assert tensor.dtype == want.dtype, name
        assert torch.equal(tensor, want), name


def _quantised(kind: str, original: dict):
    """(the file's tensors, what each weight must load as in fp32)."""
    import gguf

    if kind in ("bf16", "fp16"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        state = {k: v.to(dtype) for k, v in original.items()}
        return state, {k: v.float() for k, v in state.items()}
    if kind.startswith("fp8"):
        state = comfy_files.fp8(original, scaled=kind == "fp8_scaled")
        expected = {}
        for k, v in state.items():
            if k == "scaled_fp8" or k.endswith("scale_weight"):
                continue
            scale = state.get(k[: -len("weight")] + "scale_weight")
            expected[k] = v.float() * scale.float() if scale is not None else v.float()
        return state, expected
    qtype = kind.split("_", 1)[1].upper()
    expected = {}
    block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)][0]
    for k, v in original.items():
        array = v.float().numpy()
        flat = array.reshape(array.shape[0], -1) if array.ndim > 4 else array  # as ComfyUI-GGUF stores 5-D
        if flat.ndim == 2 and flat.shape[-1] % block == 0 and qtype != "F16":
            q = gguf.quants.quantize(flat, getattr(gguf.GGMLQuantizationType, qtype))
            expected[k] = torch.from_numpy(gguf.quants.dequantize(q, getattr(gguf.GGMLQuantizationType, qtype))
                                           .reshape(array.shape).astype(np.float32))
        elif array.ndim >= 2:
            expected[k] = torch.from_numpy(array.astype(np.float16).astype(np.float32))
        else:
            expected[k] = v.float()
    return original, expected


@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp8_e4m3fn", "fp8_scaled", "gguf_q8_0", "gguf_f16"])
def test_each_kind_of_transformer_file_loads_as_the_folder(kind, t2v, mf, tmp_path, tiny_model_dir):
    paths, (transformer, _, _) = t2v
    original = comfy_files.original_transformer(transformer.state_dict())
    state, expected = _quantised(kind, original)
    if kind.startswith("gguf"):
        path = comfy_files.write_gguf(tmp_path / f"t_{kind}.gguf", state, kind.split("_", 1)[1].upper())
    else:
        path = comfy_files.save(tmp_path / f"t_{kind}.safetensors", state)
    source = mf.FileSource(path, paths["text_encoder"], paths["vae"])
    mf.check_files(source)
    reference = {mf.transformer_key(k): v for k, v in expected.items()}
    _states_equal(mf.load_transformer(source, torch.float32), reference)
    # In bf16 every weight is that value rounded once; diffusers' fp32 modules stay fp32, as from_pretrained has them.
    folder_bf16 = type(transformer).from_pretrained(tiny_model_dir, subfolder="transformer",
                                                    torch_dtype=torch.bfloat16).state_dict()
    loaded = mf.load_transformer(source, torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        want = folder_bf16[name]
        assert tensor.dtype == want.dtype, name
        assert torch.equal(tensor, reference[name].to(want.dtype)), name


def test_original_names_are_diffusers_and_comfyuis(t2v, mf):
    """Our Wan names are the ones diffusers' own single-file converters read (transformer, Wan 2.1 VAE)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

    _, (transformer, _, vae) = t2v
    original = comfy_files.original_transformer(transformer.state_dict(), "model.diffusion_model.")
    assert set(convert_wan_transformer_to_diffusers(dict(original))) == set(transformer.state_dict())
    assert {mf.transformer_key(k[len("model.diffusion_model."):]) for k in original} == set(transformer.state_dict())
    # diffusers' VAE converter hard-codes the released layout (2 residual blocks a stage), so it reads the
    # tiny VAE's files only for the stages' fixed parts; ours follows the file's own layout.
    vae_original = comfy_files.original_vae(vae.state_dict(), vae.config.num_res_blocks, wan22=False)
    theirs = convert_wan_vae_to_diffusers(dict(vae_original))
    assert {k for k in theirs if not k.startswith("decoder.up")} == {k for k in vae.state_dict() if not k.startswith("decoder.up")}
    assert set(mf.vae_keys(vae_original).values()) == set(vae.state_dict())


def test_text_encoder_vae_and_tokenizer_files(t2v, mf, tiny_model_dir):
    paths, (_, text_encoder, vae) = t2v
    source = mf.FileSource(**paths)
    assert mf.text_encoder_config(mf.read_index(paths["text_encoder"])).items() <= {
        **text_encoder.config.to_dict(), "relative_attention_max_distance": 16}.items()
    _states_equal(mf.load_text_encoder(source, torch.float32), text_encoder.state_dict())
    from transformers import UMT5EncoderModel

    folder_bf16 = UMT5EncoderModel.from_pretrained(tiny_model_dir, subfolder="text_encoder", torch_dtype=torch.bfloat16)
    _states_equal(mf.load_text_encoder(source, torch.bfloat16), folder_bf16.state_dict())
    _states_equal(mf.load_vae(source), vae.state_dict())
    config = mf.vae_config(mf.read_index(paths["vae"]))
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean", "latents_std"):
        assert list(np.atleast_1d(config[key])) == list(np.atleast_1d(vae.config[key])), key
    # The tokenizer: sentencepiece's pieces, then T5's </s> (1), cut to the length keeping </s>, padded with 0.
    import sentencepiece

    tokenizer = mf.load_tokenizer(source)
    spm = sentencepiece.SentencePieceProcessor(model_proto=comfy_files.train_spiece())
    tokens = tokenizer(["a red fox in snow", "the lazy dog " * 20], max_length=16)
    ids = spm.encode("a red fox in snow") + [1]
    assert tokens["input_ids"][0].tolist() == ids + [0] * (16 - len(ids))
    assert tokens["attention_mask"][0].tolist() == [1] * len(ids) + [0] * (16 - len(ids))
    assert tokens["input_ids"][1].tolist() == spm.encode("the lazy dog " * 20)[:15] + [1]


def _build(path, config_name):
    tiny_wan = pack_module("tiny_wan")
    return tiny_wan.build_tiny_wan(path, getattr(tiny_wan, config_name))


@pytest.mark.parametrize("family", ["Wan 2.1 I2V", "Wan 2.2 T2V A14B", "Wan 2.2 TI2V 5B"])
def test_the_families_load_from_their_files(family, mf, tmp_path, a14b_dir):
    from diffusers import WanTransformer3DModel

    pipeline = pack_module("pipeline")
    if family == "Wan 2.2 T2V A14B":
        folder = a14b_dir
    else:
        folder = _build(tmp_path / "folder", "TINY_I2V" if family == "Wan 2.1 I2V" else "TINY_TI2V")
    paths, (transformer, _, vae) = _write_set(folder, str(tmp_path / "files"), wan22_vae=family.endswith("5B"))
    extra = {}
    if family == "Wan 2.2 T2V A14B":
        second = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer_2", torch_dtype=torch.float32)
        extra["transformer_2"] = comfy_files.save(tmp_path / "low.gguf.safetensors",
                                                  comfy_files.original_transformer(second.state_dict()))
        extra["boundary_ratio"] = 0.6  # the tiny model's; files of the release take 0.875
    if family == "Wan 2.1 I2V":
        from transformers import CLIPVisionModel

        clip = CLIPVisionModel.from_pretrained(folder, subfolder="image_encoder", torch_dtype=torch.float32)
        extra["image_encoder"] = comfy_files.save(tmp_path / "clip_vision.safetensors",
                                                  {("" if k.startswith("vision_model.") else "vision_model.") + k:
                                                   v.contiguous() for k, v in clip.state_dict().items()})
    source = mf.FileSource(**paths, **extra)
    mf.check_files(source)
    from_files = pipeline.WanTPUPipeline(source, precision="fp32")
    from_folder = pipeline.WanTPUPipeline(str(folder), precision="fp32")
    assert from_files.family == from_folder.family
    loading = pack_module("loading")
    for component in ("transformer", "vae") + tuple(k for k in ("transformer_2", "image_encoder") if k in extra):
        mine, theirs = loading.load_json_config(source, component), loading.load_json_config(
            loading.resolve_model_source(str(folder)), component)
        for key, value in mine.items():
            if key in theirs and not key.startswith("_") and key not in ("attn_scales", "dropout"):
                assert list(np.atleast_1d(value)) == list(np.atleast_1d(theirs[key])) or family.endswith("5B") \
                    and key.startswith("latents_"), (component, key)
    _states_equal(mf.load_vae(source), vae.state_dict())
    if family == "Wan 2.2 T2V A14B":
        _states_equal(mf.load_transformer(source, torch.float32, "transformer_2"), second.state_dict())
    if family == "Wan 2.1 I2V":
        _states_equal(mf.load_image_encoder(source), clip.state_dict())
        processor = mf.load_image_processor(source)
        assert processor.crop_size == {"height": 32, "width": 32}


def test_a_run_from_files_gives_the_folders_frames(t2v, tiny_model_dir, manager):
    """Denoise and decode from the files equal the folder's (the same embeddings in)."""
    pipeline = pack_module("pipeline")
    mf = pack_module("model_files")
    paths, _ = t2v
    folder = pipeline.WanTPUPipeline(tiny_model_dir, precision="fp32")
    files = pipeline.WanTPUPipeline(mf.FileSource(**paths), precision="fp32")
    embeddings = folder.encode("a cat", "blurry")
    video = dict(num_inference_steps=2, guidance_scale=1.0, seed=0, flow_shift=3.0, **TINY_VIDEO)
    want = folder.decode(folder.denoise(embeddings, **video))
    got = files.decode(files.denoise(embeddings, **video))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    files.encode("a cat", "blurry")  # the UMT5 file and its own tokenizer run too
    kinds = {key[0]: os.path.basename(key[1]) for key in manager.cached_keys() if key[1] in paths.values()}
    assert kinds == {"transformer": "wan_t.safetensors", "vae": "wan_vae.safetensors",
                     "text_encoder": "wan_umt5.safetensors"}


# ------------------------------------------------------------------ bad files
def _bad_gguf_type(path, state):
    """A GGUF whose first FFN weight is IQ4_NL, a type the loader does not dequantize."""
    import gguf

    def iq4_nl(name, array):
        if not name.endswith("ffn.0.weight"):
            return None
        qtype = gguf.GGMLQuantizationType.IQ4_NL
        size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((array.shape[0], array.shape[1] // size * block_bytes), np.uint8), qtype

    return comfy_files.write_gguf(path, state, quantised="F16", raw_tensor=iq4_nl)


def test_bad_files_name_the_file_and_the_fix_and_the_next_run_works(t2v, mf, tmp_path, manager):
    pipeline = pack_module("pipeline")
    paths, (transformer, _, _) = t2v
    original = comfy_files.original_transformer(transformer.state_dict())
    truncated = tmp_path / "truncated.safetensors"
    with open(paths["transformer"], "rb") as handle:
        truncated.write_bytes(handle.read()[: os.path.getsize(paths["transformer"]) // 2])
    unscaled = comfy_files.fp8(original, scaled=True)
    unscaled = {k: v for k, v in unscaled.items() if not k.endswith("scale_weight")}
    wan22_vae_dir = tmp_path / "vae22"
    ti2v = _build(tmp_path / "ti2v", "TINY_TI2V")
    vae22 = _write_set(ti2v, str(wan22_vae_dir), wan22_vae=True, name="w22")[0]["vae"]
    cases = {
        "another part": (dict(transformer=paths["vae"]), ["wan_vae.safetensors", "the Wan 2.1 VAE", "vae input"]),
        "another family's VAE": (dict(vae=vae22), ["w22_vae.safetensors", "wan_2.1_vae.safetensors"]),
        "truncated": (dict(transformer=str(truncated)), ["truncated.safetensors", "truncated", "download it again"]),
        "unsupported GGUF type": (dict(transformer=_bad_gguf_type(tmp_path / "iq4.gguf", original)),
                                  ["iq4.gguf", "IQ4_NL", "Q8_0"]),
        "fp8 scales missing": (dict(transformer=comfy_files.save(tmp_path / "noscale.safetensors", unscaled)),
                               ["noscale.safetensors", "scale_weight", "Download the file again"]),
    }
    for case, (bad, words) in cases.items():
        source = mf.FileSource(**{**paths, **bad})
        with pytest.raises(ValueError) as checked:
            mf.check_files(source)
        with pytest.raises(ValueError) as ran:  # the pipeline refuses it too, before anything is cached
            pipe = pipeline.WanTPUPipeline(source, precision="fp32")
            pipe.generate("a cat", "", num_inference_steps=1, guidance_scale=1.0, seed=0, **TINY_VIDEO)
        for error in (checked, ran):
            for word in words:
                assert word in str(error.value), (case, str(error.value))
        assert not any((key[0], key[1]) in bad.items() for key in manager.cached_keys()), case
    good = pipeline.WanTPUPipeline(mf.FileSource(**paths), precision="fp32")
    frames = good.generate("a cat", "", num_inference_steps=2, guidance_scale=1.0, seed=0, flow_shift=3.0,
                           **TINY_VIDEO)
    assert np.isfinite(np.asarray(frames)).all()


def test_inside_comfyui_files_come_from_its_folders_only(t2v, mf, monkeypatch, tmp_path):
    paths, _ = t2v
    folders = {"diffusion_models": os.path.dirname(paths["transformer"]), "text_encoders":
               os.path.dirname(paths["text_encoder"]), "vae": os.path.dirname(paths["vae"])}
    fake = types.ModuleType("folder_paths")
    fake.get_folder_paths = lambda kind: [folders[kind]] if kind in folders else []
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.delenv("WAN_TPU_MODEL_ROOTS", raising=False)
    source = mf.resolve_model_files("wan_t.safetensors", "wan_umt5.safetensors", "wan_vae.safetensors")
    assert source.transformer == os.path.realpath(paths["transformer"])
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(open(paths["transformer"], "rb").read())
    for name in (str(outside), "../" + os.path.basename(str(tmp_path)) + "/elsewhere.safetensors",
                 "wan_t.ckpt", "~/wan.safetensors"):
        with pytest.raises(ValueError) as error:
            mf.resolve_model_files(name, "wan_umt5.safetensors", "wan_vae.safetensors")
        assert str(tmp_path) not in str(error.value) or name == str(outside)


def test_the_model_files_node(t2v, monkeypatch, tiny_model_dir):
    """The node lists ComfyUI's folders, refuses a wrong file before the run, and its output drives the
    other nodes (here the decoder, on files the run above loaded)."""
    nodes = pack_module("nodes")
    paths, _ = t2v
    folder = os.path.dirname(paths["transformer"])
    fake = types.ModuleType("folder_paths")
    folders = {"diffusion_models", "text_encoders", "vae", "clip_vision"}
    fake.get_folder_paths = lambda kind: [folder] if kind in folders else []
    fake.get_filename_list = lambda kind: sorted(os.listdir(folder)) + ["old.ckpt"] if kind in folders else []
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    spec = nodes.WanTPUModelFiles.INPUT_TYPES()
    assert "wan_t.safetensors" in spec["required"]["transformer"][0] and "old.ckpt" not in spec["required"]["vae"][0]
    assert spec["optional"]["transformer_2"][0][0] == "none"
    assert "vae input" in nodes.WanTPUModelFiles.VALIDATE_INPUTS("wan_vae.safetensors", "wan_umt5.safetensors",
                                                                   "wan_vae.safetensors")
    assert nodes.WanTPUModelFiles.VALIDATE_INPUTS("wan_t.safetensors", "wan_umt5.safetensors",
                                                  "wan_vae.safetensors") is True
    (files,) = nodes.WanTPUModelFiles().select("wan_t.safetensors", "wan_umt5.safetensors", "wan_vae.safetensors")
    for node in (nodes.Wan21TextEncoder, nodes.Wan21TPUSampler, nodes.Wan21TPUVAEDecoder, nodes.Wan21TPUPipeline,
                 nodes.WanTPUImageToVideo):
        # After every other input; only inputs added later follow it (the Sampler's and Full Pipeline's
        # settings, the Image to Video node's end_image).
        optional = list(node.INPUT_TYPES()["optional"])
        assert optional[optional.index("model_files") + 1:] in ([], ["settings"], ["end_image"])
    latents = torch.zeros(pack_module("models.wan.latents").WAN21.latent_shape(**TINY_VIDEO))
    frames, _ = nodes.Wan21TPUVAEDecoder().decode({"samples": latents}, precision="fp32", model_files=files)
    assert tuple(frames.shape) == (TINY_VIDEO["num_frames"], TINY_VIDEO["height"], TINY_VIDEO["width"], 3)
