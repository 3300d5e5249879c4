"""LoRA fused on the device equals diffusers' own load_lora_weights + fuse_lora, in every
format users download for Wan 2.1; switching LoRAs restores the base exactly and compiles
nothing; other files and other models' LoRAs are refused; inside ComfyUI only files under
models/loras are read.

``write_random_lora`` writes a random LoRA for a transformer in "peft", "comfyui" or
"musubi" format; other tests import it."""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import pack_module

lora = pack_module("lora")
loading = pack_module("loading")
sharding = pack_module("sharding")
env_manager = pack_module("env_manager")
pipeline_mod = pack_module("pipeline")

FORMATS = ("peft", "comfyui", "musubi")
_ORIGINAL = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "net.0.proj": "0", "net.2": "2"}


def lora_modules(module) -> list[str]:
    """The Linear layers a Wan LoRA trains: attn1/attn2 q, k, v, o and the FFN of every block."""
    blocks = len(module.blocks)
    names = []
    for i in range(blocks):
        for attn in ("attn1", "attn2"):
            names += [f"blocks.{i}.{attn}.{proj}" for proj in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.net.2"]
    return names


def _original_name(name: str, sep: str) -> str:
    """blocks.0.attn1.to_q -> blocks.0.self_attn.q (sep '.') or blocks_0_self_attn_q (sep '_')."""
    _, index, layer, *rest = name.split(".")
    if layer == "ffn":
        parts = ["blocks", index, "ffn", _ORIGINAL[".".join(rest)]]
    else:
        parts = ["blocks", index, _ORIGINAL[layer], _ORIGINAL[".".join(rest)]]
    return sep.join(parts)


def write_random_lora(path, fmt: str, module, rank: int = 4, alpha: float | None = None, seed: int = 0, *,
                      dtype=torch.float32, bias: bool = False, scale: float = 0.2) -> str:
    """Write a random LoRA of ``module`` (a WanTransformer3DModel, real or on meta) to ``path``.

    ``fmt``: "peft" (diffusers' ``transformer.*.lora_A/lora_B``; ``alpha`` goes into the
    ``lora_adapter_metadata`` header as diffusers saves it), "comfyui" (``diffusion_model.``
    + original Wan names, ``lora_down/lora_up/alpha``; ``bias`` adds ``diff_b``) or "musubi"
    (``lora_unet_blocks_N_...``, ``alpha`` always, rank if None). Targets attn1/attn2 q, k, v,
    o and both FFN layers of every block. Returns ``path`` as a string.
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: use one of {FORMATS}")
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    rng = np.random.default_rng(seed)
    tensors, header = {}, {}
    for name in lora_modules(module):
        out_features, in_features = shapes[f"{name}.weight"]
        down = torch.from_numpy(rng.standard_normal((rank, in_features), np.float32) * scale).to(dtype)
        up = torch.from_numpy(rng.standard_normal((out_features, rank), np.float32) * scale).to(dtype)
        b = torch.from_numpy(rng.standard_normal(out_features, np.float32) * scale).to(dtype) if bias else None
        if fmt == "peft":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
            if b is not None:
                tensors[f"transformer.{name}.lora_B.bias"] = b
        elif fmt == "comfyui":
            key = "diffusion_model." + _original_name(name, ".")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            if b is not None:
                tensors[f"{key}.diff_b"] = b
        else:
            key = "lora_unet_" + _original_name(name, "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    if fmt == "peft" and alpha is not None:
        config = {"r": rank, "lora_alpha": alpha, "target_modules": lora_modules(module), "lora_bias": bias,
                  "rank_pattern": {}, "alpha_pattern": {}}  # as LoraConfig.to_dict() gives them
        header["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    path = os.fspath(path)
    save_file(tensors, path, metadata=header or None)
    return path


# ------------------------------------------------------------------ references
needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="diffusers' load_lora_weights needs peft (requirements-test.txt)"
)


def fuse_with_diffusers(pipe, loras) -> None:
    """diffusers' own way: load_lora_weights each [(path, strength)], then fuse_lora at the strengths."""
    names = [f"adapter{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
    if len(loras) == 1:
        pipe.fuse_lora(lora_scale=loras[0][1])
    else:
        pipe.set_adapters(names, adapter_weights=[strength for _, strength in loras])
        pipe.fuse_lora()


def diffusers_fused(model_dir, loras, dtype=torch.float32) -> dict[str, np.ndarray]:
    """The transformer's parameters after diffusers' load_lora_weights + fuse_lora."""
    from diffusers import WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=dtype)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=None)
    fuse_with_diffusers(pipe, loras)
    return {
        name.replace(".base_layer", ""): _numpy(p)
        for name, p in transformer.named_parameters() if ".lora_" not in name
    }


def _numpy(tensor) -> np.ndarray:
    return pack_module("utils").torch_to_numpy(tensor.detach())


@pytest.fixture(scope="module")
def mesh(manager):
    import jax

    mesh = env_manager.build_mesh(jax.devices())
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    return mesh


def placed(manager, model_dir, mesh, precision="fp32"):
    """(weights on the mesh, base weights as numpy, module) of a freshly loaded transformer."""
    module = loading.load_transformer(loading.resolve_model_source(model_dir), precision)
    base = {name: _numpy(p).copy() for name, p in module.named_parameters()}
    weights, _ = pack_module("runtime.placement").place_weights(manager, module, sharding.TRANSFORMER_RULES, mesh, "transformer")
    return weights, base, module


@pytest.fixture(scope="module")
def meta_module(tiny_model_dir):
    """The tiny transformer's structure, for write_random_lora."""
    return loading.load_transformer(loading.resolve_model_source(tiny_model_dir), "fp32").to("meta")


def _host(weights) -> dict[str, np.ndarray]:
    """The parameters (not the rope buffers) of a weights dict, on the host."""
    return {name: np.asarray(array) for name, array in weights.items() if not name.startswith("rope.")}


def _max_diff(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    return max(float(np.abs(ours[n].astype(np.float64) - theirs[n].astype(np.float64)).max()) for n in ours)


# ------------------------------------------------------------------ tests
@needs_peft
@pytest.mark.parametrize("fmt, rank, alpha, bias", [
    ("peft", 4, None, False),
    ("peft", 8, 5.0, True),  # alpha from diffusers' metadata header; lora_B.bias
    ("comfyui", 4, 3.0, True),  # alpha != rank; diff_b
    ("musubi", 8, 1.0, False),  # alpha/rank = 1/8: diffusers splits it between down and up
])
def test_each_format_equals_diffusers_fuse(manager, mesh, tiny_model_dir, meta_module, tmp_path, fmt, rank, alpha, bias):
    path = write_random_lora(tmp_path / f"{fmt}.safetensors", fmt, meta_module, rank, alpha, seed=1, bias=bias)
    strength = 0.8
    expected = diffusers_fused(tiny_model_dir, [(path, strength)])

    weights, base, _ = placed(manager, tiny_model_dir, mesh)
    factors = lora.read_lora(path)
    assert len(factors) == 20 + (20 if bias else 0)
    host = dict(base)
    for name, (down, up) in factors.items():
        assert down.dtype == up.dtype == np.float32 and down.shape[0] == up.shape[1]
        host[name] = base[name] + strength * (up @ down).reshape(base[name].shape)
    assert _max_diff(host, expected) <= 1e-6

    shardings = {name: array.sharding for name, array in weights.items()}
    loras = lora.DeviceLoras(manager, mesh)
    result = loras.apply(weights, [lora.LoraSpec(path, strength)])
    assert result is weights
    diff = _max_diff(_host(weights), expected)
    print(f"{fmt} rank {rank} alpha {alpha}: max |ours - diffusers| = {diff:.2e}")
    assert diff <= 1e-6
    for name in factors:
        assert weights[name].sharding == shardings[name], name
        assert not np.array_equal(np.asarray(weights[name]), base[name])
    assert loras.host_bytes == sum(base[name].nbytes for name in factors)


@needs_peft
def test_mixed_ranks_in_bf16_are_scaled_as_diffusers_scales_them(manager, mesh, tiny_model_dir, meta_module, tmp_path):
    # Without metadata diffusers takes lora_alpha from the first module's rank and the most common
    # rank as r, so here every rank-4 module is scaled by 8/4 and the rank-8 one by 1.
    from safetensors.torch import load_file, save_file

    path = write_random_lora(tmp_path / "mixed.safetensors", "peft", meta_module, 4, seed=7, dtype=torch.bfloat16)
    tensors = load_file(path)
    first = "transformer.blocks.0.attn1.to_k"  # sorted first in the file
    tensors[f"{first}.lora_A.weight"] = torch.randn(8, 32, dtype=torch.bfloat16) * 0.2
    tensors[f"{first}.lora_B.weight"] = torch.randn(32, 8, dtype=torch.bfloat16) * 0.2
    save_file(tensors, path)
    expected = diffusers_fused(tiny_model_dir, [(path, 1.0)])
    factors = lora.read_lora(path)
    for name, rank, scaling in (("blocks.0.attn1.to_q", 4, 2.0), (first.removeprefix("transformer."), 8, 1.0)):
        down, up = factors[f"{name}.weight"]
        assert down.shape[0] == rank
        np.testing.assert_array_equal(up, tensors[f"transformer.{name}.lora_B.weight"].float().numpy() * scaling)
    weights, _, _ = placed(manager, tiny_model_dir, mesh)
    lora.DeviceLoras(manager, mesh).apply(weights, [lora.LoraSpec(path)])
    assert _max_diff(_host(weights), expected) <= 1e-6


@needs_peft
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' second adapter
def test_two_loras_stacked_equal_diffusers_with_both_adapters(manager, mesh, tiny_model_dir, meta_module, tmp_path):
    first = write_random_lora(tmp_path / "a.safetensors", "comfyui", meta_module, 4, 2.0, seed=2)
    second = write_random_lora(tmp_path / "b.safetensors", "peft", meta_module, 8, seed=3)
    expected = diffusers_fused(tiny_model_dir, [(first, 0.7), (second, -0.4)])
    weights, _, _ = placed(manager, tiny_model_dir, mesh)
    lora.DeviceLoras(manager, mesh).apply(weights, [lora.LoraSpec(first, 0.7), lora.LoraSpec(second, -0.4)])
    diff = _max_diff(_host(weights), expected)
    print(f"stacked: max |ours - diffusers| = {diff:.2e}")
    assert diff <= 1e-6


def test_switching_restores_the_base_exactly_and_compiles_nothing(manager, mesh, tiny_model_dir, meta_module, tmp_path):
    a = write_random_lora(tmp_path / "a.safetensors", "musubi", meta_module, 4, 4.0, seed=4)
    b = write_random_lora(tmp_path / "b.safetensors", "peft", meta_module, 16, seed=5)  # same rank bucket
    weights, base, _ = placed(manager, tiny_model_dir, mesh)
    loras = lora.DeviceLoras(manager, mesh)
    loras.apply(weights, [lora.LoraSpec(a, 1.0)])
    before = manager.compile_count()
    loras.apply(weights, [lora.LoraSpec(b, 0.5)])
    assert manager.compile_count() - before == 0
    expected_b = dict(base)
    for name, (down, up) in lora.read_lora(b).items():
        expected_b[name] = base[name] + 0.5 * (up @ down)
    assert _max_diff(_host(weights), expected_b) <= 1e-6

    same = dict(weights)
    loras.apply(weights, [lora.LoraSpec(b, 0.5)])  # the same state again: nothing to do
    assert all(weights[name] is same[name] for name in weights)

    loras.apply(weights, [])
    assert manager.compile_count() - before == 0
    assert all(np.array_equal(np.asarray(weights[name]), base[name]) for name in base)
    assert loras.state == ()
    same = dict(weights)
    loras.apply(weights, [lora.LoraSpec(a, 0.0)])  # strength 0 is no LoRA
    assert all(weights[name] is same[name] for name in weights)

    # A reloaded transformer reuses the programs; a rank past the bucket compiles (the counter counts).
    reloaded, _, _ = placed(manager, tiny_model_dir, mesh)
    lora.DeviceLoras(manager, mesh).apply(reloaded, [lora.LoraSpec(b, 1.0)])
    assert manager.compile_count() - before == 0
    wide = write_random_lora(tmp_path / "wide.safetensors", "peft", meta_module, lora.RANK_BUCKET + 8, seed=6)
    loras.apply(weights, [lora.LoraSpec(wide, 1.0)])
    assert manager.compile_count() - before > 0


@needs_peft
def test_bf16_matches_diffusers_to_the_last_bit_almost_everywhere(manager, mesh, tiny_model_dir, meta_module, tmp_path):
    path = write_random_lora(tmp_path / "c.safetensors", "comfyui", meta_module, 4, 3.0, seed=6)
    expected = diffusers_fused(tiny_model_dir, [(path, 0.9)], dtype=torch.bfloat16)
    weights, base, _ = placed(manager, tiny_model_dir, mesh, precision="bf16")
    lora.DeviceLoras(manager, mesh).apply(weights, [lora.LoraSpec(path, 0.9)])
    ours = _host(weights)
    targets = lora.read_lora(path)
    differing = total = 0
    for name in targets:
        a, e, b = (x[name].astype(np.float32) for x in (ours, expected, base))
        # One bf16 rounding of the update apart: within an ulp of the larger of base and result.
        assert (np.abs(a - e) <= np.maximum(np.abs(b), np.abs(e)) * 2.0**-7).all(), name
        differing += int((a != e).sum())
        total += a.size
    print(f"bf16: {differing} of {total} elements differ from diffusers, max diff "
          f"{_max_diff({n: ours[n] for n in targets}, {n: expected[n] for n in targets}):.2e}")
    assert differing <= total // 100


def test_a_lora_for_another_model_is_refused(manager, mesh, tiny_model_dir, meta_module, tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
    }, sdxl)
    with pytest.raises(ValueError, match=r"'sdxl.safetensors' is not a LoRA for a Wan 2\.1 transformer"):
        lora.read_lora(sdxl)
    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, flux)
    with pytest.raises(ValueError, match=r"does not have \(single_transformer_blocks\.0\.attn\.to_q\.weight\)"):
        lora.read_lora(flux)
    text_only = tmp_path / "te.safetensors"
    save_file({"text_encoder.encoder.block.0.q.lora_A.weight": torch.zeros(4, 32),
               "text_encoder.encoder.block.0.q.lora_B.weight": torch.zeros(32, 4)}, text_only)
    with pytest.raises(ValueError, match="no transformer keys"):
        lora.read_lora(text_only)

    # A Wan LoRA for another size: refused before any weight changes.
    wider = tmp_path / "wide.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}, wider)
    weights, _, _ = placed(manager, tiny_model_dir, mesh)
    before = dict(weights)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1\.to_q\.weight is 64x64 in the LoRA but \(32, 32\)"):
        lora.DeviceLoras(manager, mesh).apply(weights, [lora.LoraSpec(str(wider))])
    assert all(weights[name] is before[name] and not before[name].is_deleted() for name in weights)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".txt"])
def test_only_safetensors_are_read(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=rf"'lora\{suffix}' is .*use a \.safetensors LoRA"):
        lora.read_lora(path)
    with pytest.raises(ValueError, match=r"use a \.safetensors LoRA"):
        lora.resolve_lora_path(str(path))


def test_lora_spec_checks_its_strength():
    assert lora.LoraSpec("a.safetensors", 1).strength == 1.0
    with pytest.raises(ValueError, match="not finite"):
        lora.LoraSpec("a.safetensors", float("nan"))
    with pytest.raises(ValueError, match="not a number"):
        lora.LoraSpec("a.safetensors", "strong")


# ------------------------------------------------------------------ paths
@pytest.fixture
def loras_folder(tmp_path, monkeypatch):
    """ComfyUI with models/loras holding wan/style.safetensors; a LoRA outside it; cwd elsewhere."""
    root = tmp_path / "ComfyUI" / "models" / "loras"
    (root / "wan").mkdir(parents=True)
    (root / "wan" / "style.safetensors").write_bytes(b"x")
    outside = tmp_path / "secret" / "other.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    fake = types.ModuleType("folder_paths")
    fake.get_folder_paths = lambda kind: [str(root)] if kind == "loras" else []

    def get_full_path(kind, name):
        for folder in fake.get_folder_paths(kind):
            candidate = os.path.join(folder, os.path.relpath(os.path.join("/", name), "/"))
            if os.path.isfile(candidate):
                return candidate
        return None

    fake.get_full_path = get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return types.SimpleNamespace(root=root, outside=outside, tmp=tmp_path)


def _path_refused(name, *hidden) -> str:
    with pytest.raises(ValueError) as caught:
        lora.resolve_lora_path(name)
    message = str(caught.value)
    for path in hidden:
        assert str(path) not in message, f"the error reveals {path}: {message}"
    assert "models/loras" in message  # it says the fix
    return message


def test_a_lora_under_models_loras_is_accepted(loras_folder):
    real = os.path.realpath(loras_folder.root / "wan" / "style.safetensors")
    assert lora.resolve_lora_path("wan/style.safetensors") == real
    assert lora.resolve_lora_path(str(loras_folder.root / "wan" / "style.safetensors")) == real


def test_lora_paths_out_of_the_folders_are_refused(loras_folder, monkeypatch):
    secret = loras_folder.tmp / "secret"
    relative = os.path.relpath(loras_folder.outside, loras_folder.root)
    assert "'..' may not be used" in _path_refused(relative, secret)
    exists = _path_refused(str(loras_folder.outside))  # echoes the name given, says nothing more
    missing = _path_refused(str(secret / "none.safetensors"))
    assert exists.replace(str(loras_folder.outside), "X") == missing.replace(str(secret / "none.safetensors"), "X")
    home = loras_folder.tmp / "home"
    home.mkdir()
    (home / "h.safetensors").write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    assert "'~'" in _path_refused("~/h.safetensors", home)
    (loras_folder.root / "linked.safetensors").symlink_to(loras_folder.outside)
    assert "is a link to a file outside" in _path_refused("linked.safetensors", secret)
    _path_refused(str(loras_folder.root / "linked.safetensors"), secret)
    assert "no such LoRA file" in _path_refused("absent.safetensors")


def test_outside_comfyui_any_file_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # `import folder_paths` raises ImportError
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"x")
    assert lora.resolve_lora_path(str(path)) == str(path)
    with pytest.raises(ValueError, match="no such file"):
        lora.resolve_lora_path(str(tmp_path / "y.safetensors"))
