"""HBM plan before loading: weights from abstract shapes, activation estimates, per-chip HBM."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PACK_DIR, PACK_NAME, pack_module

memory_plan = pack_module("memory_plan")
sharding = pack_module("sharding")
configs = pack_module("models.wan.configs")
activations = pack_module("models.wan.activations")
modules = pack_module("models.wan.modules")

GiB = 2**30
V6E, V5E = "TPU v6 lite", "TPU v5 lite"  # what jax reports for v6e and v5e chips


def plan(model="14B", mesh=(2, 4), height=720, width=1280, num_frames=81, device_kind=V6E, **kwargs):
    kwargs.setdefault("environ", {})  # not the tester's WAN_TPU_HBM_GIB
    return memory_plan.plan_memory(model, mesh, height, width, num_frames, device_kind=device_kind, **kwargs)


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "component, config, low, high",
    [
        ("transformer", configs.WAN21_CONFIGS["14B"], 14.0e9, 14.3e9),
        ("transformer", configs.WAN21_CONFIGS["1.3B"], 1.4e9, 1.6e9),
        ("text_encoder", configs.UMT5_XXL_CONFIG, 5.6e9, 5.8e9),
        ("vae", configs.WAN21_VAE_CONFIG, 0.1e9, 0.15e9),
    ],
)
def test_parameter_counts_of_the_real_configs(component, config, low, high):
    assert low <= modules.parameter_count(component, config) <= high


def test_every_real_parameter_has_a_sharding_rule():
    for component, config in (
        ("transformer", configs.WAN21_CONFIGS["14B"]),
        ("text_encoder", configs.UMT5_XXL_CONFIG),
        ("vae", configs.WAN21_VAE_CONFIG),
    ):
        shapes, _ = modules.abstract_weights(component, config)
        result = sharding.plan_shardings(shapes, sharding.RULES[component], {"dp": 2, "tp": 4})
        assert result.unmatched == [] and result.indivisible == [], component


def test_bf16_transformer_keeps_diffusers_fp32_modules_in_fp32():
    _, itemsizes = modules.abstract_weights("transformer", configs.WAN21_CONFIGS["1.3B"], "bf16")
    assert itemsizes["blocks.0.attn1.to_q.weight"] == 2
    assert itemsizes["blocks.0.scale_shift_table"] == 4
    assert itemsizes["condition_embedder.time_embedder.linear_1.weight"] == 4
    assert itemsizes["blocks.0.norm2.weight"] == 4
    assert itemsizes["rope.freqs_cos"] == 4  # a non-persistent buffer: never cast


# ----------------------------------------------------------------- the acceptance cases
def test_14b_720p_fits_a_v6e_8_with_the_vae_split_and_a14b_is_refused_on_a_v5e_8():
    """libtpu compiles the VAE decode's chunk programs at 1280x720, split 8 ways over space, to a 4.79 GiB peak
    per device (24.0 GiB whole); with the text encoder and transformer resident the run fits a v6e chip
    (benchmarks/tpu_compile.py)."""
    result = plan("14B", (2, 4), 720, 1280, 81, precision="bf16", cfg=True)
    assert result.hbm_bytes == 32 * GiB
    # 14.3e9 parameters, bf16, 4-way tensor parallel, plus ~0.5 GB replicated.
    assert 6.8e9 < result.transformer_weights_bytes < 7.8e9
    # UMT5-XXL, 11.4e9 bytes in bf16, split over all 8 devices.
    assert 1.3e9 < result.text_encoder_weights_bytes < 1.5e9
    assert 0.45e9 < result.vae_weights_bytes < 0.55e9  # replicated, fp32
    assert 0.75 * 4.79 * GiB <= result.stage_peak_bytes("vae") <= 1.25 * 4.79 * GiB  # the compiled split chunk peak
    assert result.fits and result.check() is result
    assert result.peak_bytes == result.weights_bytes + max(
        result.transformer_activation_bytes, result.vae_activation_bytes, result.text_encoder_activation_bytes
    )
    whole = activations.vae_decode_activation_bytes(configs.WAN21_VAE_CONFIG, 720, 1280, 81)
    assert result.vae_activation_bytes == int(whole / 8 * activations.VAE_SPLIT_OVERHEAD)
    a14b_on_v5e = plan("A14B", (2, 4), 720, 1280, 81, device_kind=V5E)  # both experts resident: 2 x 7.2 GB
    assert a14b_on_v5e.second_expert_weights_bytes == a14b_on_v5e.transformer_weights_bytes
    with pytest.raises(memory_plan.HBMPlanError, match="16 devices|lower the resolution"):
        a14b_on_v5e.check()
    lower = plan("14B", (2, 4), 480, 848, 81, precision="bf16", cfg=True)
    assert lower.fits and lower.check() is lower
    line = lower.summary()
    assert "\n" not in line and "fits" in line and "32.0 GiB" in line and "14B" in line


def test_14b_on_one_v5e_chip_is_refused_naming_the_transformer_and_a_fix():
    result = plan("14B", (1, 1), 720, 1280, 81, device_kind=V5E)
    assert result.hbm_bytes == 16 * GiB
    assert not result.fits
    with pytest.raises(memory_plan.HBMPlanError) as caught:
        result.check()
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert f"transformer weights {result.transformer_weights_bytes / GiB:.1f} GiB" in message
    assert f"~{result.peak_bytes / GiB:.1f} GiB" in message and "16.0 GiB" in message
    assert "more chips" in message and "resolution" in message


def test_refusing_14b_suggests_the_1_3b_model_where_it_fits():
    with pytest.raises(memory_plan.HBMPlanError, match=r"use the 1\.3B model \(~2\d\.\d GiB per device on this mesh\)"):
        plan("14B", (1, 1), 480, 832, 81).check()


def test_1_3b_480p_on_one_v6e_chip_fits_but_not_on_one_v5e():
    on_v6e = plan("1.3B", (1, 1), 480, 832, 81)
    # bf16 UMT5 (11.4e9 bytes) and 1.3B (2.8e9), whole on one chip, + the VAE decode.
    assert 13e9 < on_v6e.weights_bytes < 16e9
    assert on_v6e.fits, on_v6e.summary()
    on_v5e = plan("1.3B", (1, 1), 480, 832, 81, device_kind=V5E)
    assert not on_v5e.fits
    with pytest.raises(memory_plan.HBMPlanError, match="more chips"):
        on_v5e.check()


def test_more_chips_and_bf16_lower_the_weights_per_device():
    one, eight = plan("14B", (1, 1)), plan("14B", (2, 4))
    assert eight.transformer_weights_bytes < one.transformer_weights_bytes / 3
    assert eight.text_encoder_weights_bytes * 7 < one.text_encoder_weights_bytes
    assert eight.vae_weights_bytes == one.vae_weights_bytes  # replicated
    fp32 = plan("14B", (2, 4), precision="fp32")
    assert 1.9 < fp32.transformer_weights_bytes / eight.transformer_weights_bytes <= 2.0
    assert fp32.vae_weights_bytes == eight.vae_weights_bytes  # the VAE is fp32 either way


def test_fp32_refusal_suggests_bf16():
    with pytest.raises(memory_plan.HBMPlanError, match="bf16 instead of fp32"):
        plan("14B", (1, 8), precision="fp32", device_kind=V5E).check()


# ----------------------------------------------------------------- activation formulas
def test_sequence_length_and_activation_scaling():
    config = configs.WAN21_CONFIGS["14B"]
    assert activations.transformer_tokens(config, 720, 1280, 81) == 21 * 45 * 80
    assert activations.transformer_tokens(config, 480, 832, 81) == 21 * 30 * 52
    big = activations.transformer_activation_bytes(config, (2, 4), 720, 1280, 81)
    small = activations.transformer_activation_bytes(config, (2, 4), 480, 832, 81)
    assert 2.0 < big / small < 2.6  # ~linear in tokens: no S x S term (flash attention)
    # CFG's batch of 2 splits over dp=2; without CFG the one video repeats on both dp halves, and XLA spreads
    # part of that work over them (TENSOR_REPEATED_BATCH_SHARE of the token term).
    assert 0.65 < activations.transformer_activation_bytes(config, (2, 4), 720, 1280, 81, cfg=False) / big < 0.75
    one_dp = activations.transformer_activation_bytes(config, (1, 4), 720, 1280, 81)
    assert 1.8 < one_dp / big < 2.05
    assert activations.transformer_activation_bytes(config, (2, 8), 720, 1280, 81) < big
    vae = configs.WAN21_VAE_CONFIG
    vae_720p = activations.vae_decode_activation_bytes(vae, 720, 1280, 81)
    assert 2.0 < vae_720p / activations.vae_decode_activation_bytes(vae, 480, 832, 81) < 2.6


# ----------------------------------------------------------------- HBM per chip
@pytest.mark.parametrize(
    "kind, gib",
    [
        ("TPU v6 lite", 32), ("TPU v6e", 32), ("TPU v5 lite", 16), ("TPU v5e", 16), ("TPU v5p", 95),
        ("TPU v5", 95), ("TPU v4", 32), ("tpu V5 LITE", 16), ("cpu", None), ("NVIDIA H100 80GB HBM3", None),
    ],
)
def test_hbm_table_by_device_kind(kind, gib):
    assert memory_plan.hbm_from_device_kind(kind) == (None if gib is None else gib * GiB)


class FakeDevice:
    def __init__(self, kind, stats):
        self.device_kind, self._stats = kind, stats

    def memory_stats(self):
        return self._stats


def test_hbm_from_the_device_then_table_then_overrides():
    measured = FakeDevice(V6E, {"bytes_limit": 31 * GiB, "bytes_in_use": 0})
    assert memory_plan.hbm_bytes_per_device(measured, environ={}) == (31 * GiB, f"{V6E} memory_stats")
    assert memory_plan.hbm_bytes_per_device(FakeDevice(V5E, None), environ={})[0] == 16 * GiB
    assert memory_plan.hbm_bytes_per_device(FakeDevice("cpu", None), environ={}) == (None, "unknown")
    # WAN_TPU_HBM_GIB beats the device; the argument beats both.
    env = {memory_plan.ENV_HBM_GIB: "24.5"}
    assert memory_plan.hbm_bytes_per_device(measured, environ=env) == (int(24.5 * GiB), memory_plan.ENV_HBM_GIB)
    assert memory_plan.hbm_bytes_per_device(measured, hbm_bytes=10 * GiB, environ=env) == (10 * GiB, "given")
    with pytest.raises(ValueError, match="WAN_TPU_HBM_GIB"):
        memory_plan.hbm_bytes_per_device(measured, environ={memory_plan.ENV_HBM_GIB: "lots"})


def test_plan_memory_overrides_and_unknown_hbm():
    assert plan("14B", (1, 1), device_kind=V5E, hbm_bytes=200 * GiB).fits
    assert plan("14B", (1, 1), device_kind=V5E, environ={"WAN_TPU_HBM_GIB": "200"}).hbm_bytes == 200 * GiB
    # No device kind: jax's first device, here a CPU without memory stats. Unknown HBM is not checked.
    unknown = memory_plan.plan_memory("14B", (1, 1), environ={})
    assert unknown.hbm_bytes is None and unknown.fits and unknown.check() is unknown
    assert plan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").model == "1.3B"
    with pytest.raises(ValueError, match="num_frames=80"):
        plan(num_frames=80)
    with pytest.raises(ValueError, match="precision"):
        plan(precision="fp16")


def test_the_ti2v_plan_refuses_a_height_its_16x_vae_cannot_make():
    """Wan 2.2 TI2V 5B's VAE downsamples 16x and the transformer patches 2x2: a multiple of 16 that is
    not one of 32 is refused, naming 32, where the 8x VAE's models take it."""
    assert plan("1.3B", (2, 4), 720, 1280).height == 720
    with pytest.raises(ValueError, match=r"height=720: .*multiple of 32"):
        plan("5B", (2, 4), 720, 1280)
    with pytest.raises(ValueError, match=r"width=1296: .*multiple of 32"):
        plan("Wan-AI/Wan2.2-TI2V-5B-Diffusers", (2, 4), 704, 1296)
    assert plan("5B", (2, 4), 704, 1280).height == 704
    # Its latents are 16x smaller per side: the step's tokens and latents count them so.
    five_b = configs.WAN21_CONFIGS["5B"]
    assert activations.transformer_tokens(five_b, 704, 1280, 121) == 31 * 22 * 40


# ----------------------------------------------------------------- abstract plan == placed bytes
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_abstract_plan_equals_the_bytes_placed_for_the_tiny_model(tiny_model_dir, precision):
    """The meta-device plan against the real loaded modules, placed on the 8 test devices as (2, 4)."""
    import jax
    import numpy as np

    loading, utils = pack_module("loading"), pack_module("utils")
    source = loading.resolve_model_source(tiny_model_dir)
    configs = {}
    for component in ("transformer", "text_encoder", "vae"):
        with open(os.path.join(tiny_model_dir, component, "config.json"), encoding="utf-8") as handle:
            configs[component] = json.load(handle)
    planned = memory_plan.plan_memory(
        configs["transformer"], (2, 4), 32, 48, 5, precision, text_encoder_config=configs["text_encoder"],
        vae_config=configs["vae"], hbm_bytes=GiB, environ={},
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    modules = {
        "transformer": loading.load_transformer(source, precision),
        "text_encoder": loading.load_text_encoder(source, precision),
        "vae": loading.load_vae(source),
    }
    for component, module in modules.items():
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(dict(module.named_buffers(remove_duplicate=False)))
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        shardings = sharding.to_named_shardings(
            sharding.plan_shardings(shapes, sharding.RULES[component], dict(mesh.shape)), mesh
        )
        placed = {id(t): jax.device_put(utils.torch_to_numpy(t), shardings[n]) for n, t in state.items()}
        per_device = {d: 0 for d in mesh.devices.flat}
        for array in placed.values():
            for shard in array.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
        assert len(set(per_device.values())) == 1, component
        assert getattr(planned, f"{component}_weights_bytes") == per_device[mesh.devices.flat[0]], component


# ----------------------------------------------------------------- import hygiene
def test_importing_memory_plan_imports_no_framework():
    code = (
        "import sys, importlib, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location({PACK_NAME!r}, {PACK_DIR + '/__init__.py'!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        f"importlib.import_module({PACK_NAME + '.memory_plan'!r})\n"
        "print(','.join(m for m in ('jax', 'torchax', 'torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# ----------------------------------------------------------------- the compiled program's own memory
def _compiled_doubling():
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda x: jnp.concatenate([x, x * 2])).lower(jnp.ones((1024, 1024), jnp.float32)).compile()


def test_compiled_memory_is_checked_against_the_device_before_running():
    compiled = _compiled_doubling()
    facts = memory_plan.compiled_memory(compiled)
    assert facts["argument"] == 4 * 2**20 and facts["output"] == 8 * 2**20 and facts["peak"] >= 8 * 2**20
    assert memory_plan.check_compiled_memory(compiled, "The step", "Lower it.", hbm_bytes=GiB) == facts
    assert memory_plan.check_compiled_memory(compiled, "The step", "Lower it.", environ={}) is not None  # CPU: unchecked
    with pytest.raises(memory_plan.HBMPlanError) as caught:
        memory_plan.check_compiled_memory(compiled, "The VAE decode", "Lower the resolution.", hbm_bytes=6 * 2**20)
    message = str(caught.value)
    assert message.startswith("The VAE decode needs") and "compiler" in message and message.endswith("Lower the resolution.")
    assert "0.0 GiB" in message and "(given)" in message


def test_the_pipeline_compiles_once_per_shape_and_checks_before_each_run(monkeypatch):
    import jax
    import jax.numpy as jnp

    compiled = pack_module("runtime.compiled")
    checked = []
    monkeypatch.setattr(memory_plan, "check_compiled_memory", lambda compiled, what, fix, device=None: checked.append(what))
    jitted, cache = jax.jit(lambda x: x + 1), {}
    args = (jnp.ones(4),)
    first = compiled.compiled_program(cache, ("k",), jitted, args, None, "the VAE decode")
    assert compiled.compiled_program(cache, ("k",), jitted, args, None, "the VAE decode") is first
    assert checked == ["The VAE decode"] * 2 and list(cache) == [("k",)]

    def refuse(compiled, what, fix, device=None):
        raise memory_plan.HBMPlanError(f"{what} needs more. {fix}")

    monkeypatch.setattr(memory_plan, "check_compiled_memory", refuse)
    with pytest.raises(memory_plan.HBMPlanError, match="The denoising step needs more. Lower"):
        compiled.compiled_program(cache, ("k",), jitted, args, None, "the denoising step")


# ----------------------------------------------------------------- the plan against the compiler
COMPILED_PEAKS = os.path.join(os.path.dirname(__file__), "data", "compiled_peaks.json")
DEVICE_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v5p": "TPU v5", "v4": "TPU v4"}
STAGE_COMPONENT = {"step_cfg": "transformer", "step": "transformer", "vae_decode": "vae",
                   "text_encoder": "text_encoder"}


def test_the_plan_is_within_25_percent_of_every_compiled_peak():
    """The peaks libtpu compiled for every cell of the README table (benchmarks/tpu_compile.py --table
    --layout both, written by --export-peaks): every stage, both layouts, with and without CFG."""
    with open(COMPILED_PEAKS) as handle:
        peaks = json.load(handle)["peaks"]
    gathered = [p for p in peaks if not p["whole_weights"]]
    cells = {(p["model"], p["width"], p["height"], p["chip"]) for p in gathered}
    assert len(cells) == 18 and len(gathered) == 108  # 1.3B, 14B x 3 sizes x v5e-8, v6e-8, v5p-8; 6 programs each
    assert len(peaks) - len(gathered) >= 3  # sequence steps on whole weights (their peak counts the cached shards)
    ratios = {}
    for entry in peaks:
        mesh = (entry["mesh"]["dp"], entry["mesh"]["tp"])
        planned = memory_plan.plan_memory(
            entry["model"], mesh, entry["height"], entry["width"], entry["frames"], entry["precision"],
            cfg=entry["name"] != "step", hbm_bytes=entry["hbm_bytes_per_device"], layout=entry["layout"] or "auto",
            device_kind=DEVICE_KINDS[entry["chip"].split("-")[0]], whole_weights=entry["whole_weights"])
        assert planned.whole_weights == entry["whole_weights"]
        assert planned.layout == (entry["layout"] or planned.layout)
        key = (entry["name"], entry["model"], f"{entry['width']}x{entry['height']}", entry["chip"], entry["layout"])
        ratios[key] = planned.stage_peak_bytes(STAGE_COMPONENT[entry["name"]]) / entry["peak_bytes_per_device"]
    outside = {key: round(ratio, 2) for key, ratio in ratios.items() if not 0.75 <= ratio <= 1.25}
    assert not outside, outside


def test_the_plan_follows_the_layout_and_the_chip():
    tensor = plan("14B", layout="tensor")
    sequence = plan("14B", layout="sequence")
    assert (tensor.layout, sequence.layout) == ("tensor", "sequence")
    assert "sequence layout" in sequence.summary()
    # Tokens split 4 ways (the CFG pair over dp): fewer activations, plus two blocks' gathered weights.
    assert sequence.transformer_activation_bytes < 0.8 * tensor.transformer_activation_bytes
    # v5e's schedule holds about 8 gathered blocks (0.56 GiB each for 14B) where v6e holds 2.
    on_v5e = plan("14B", layout="sequence", device_kind=V5E, hbm_bytes=16 * GiB)
    extra = on_v5e.transformer_activation_bytes - sequence.transformer_activation_bytes
    assert 3.0 * GiB < extra < 3.6 * GiB
    # "auto" (and None) plan the layout the pipeline will choose on that chip.
    assert plan("14B", layout="auto").layout == plan("14B", layout=None).layout == "sequence"
    assert plan("14B", layout="auto", device_kind=V5E, hbm_bytes=16 * GiB).layout == "tensor"
    with pytest.raises(ValueError, match="layout='ring'.*auto"):
        plan("14B", layout="ring")


def test_whole_weights_where_the_plan_holds_them():
    """The sequence layout copies its gathered weights whole for a run where the run's peak with them stays
    within WHOLE_WEIGHTS_HBM_SHARE of HBM: 1.3B anywhere, 14B on v5p, never 14B on a 32-GiB v6e."""
    small = plan("1.3B", (2, 4), 480, 832, layout="sequence", hbm_bytes=32 * GiB)
    copies = activations.whole_copies_bytes(configs.WAN21_CONFIGS["1.3B"], (2, 4))
    assert 2.2 * GiB < copies < 2.4 * GiB  # 30 blocks of q, k, v, out, cross q, out and the FFN, bf16
    assert small.whole_weights and "with whole weights" in small.summary()
    gathered = plan("1.3B", (2, 4), 480, 832, layout="sequence", hbm_bytes=32 * GiB, whole_weights=False)
    assert not gathered.whole_weights
    # The step holds the copies instead of two gathered blocks.
    grown = small.transformer_activation_bytes - gathered.transformer_activation_bytes
    block = 6 * 1536 * 1536 + 2 * 1536 * 8960
    assert grown == copies - 2 * block * 2
    assert not plan("14B", (2, 4), 720, 1280, layout="sequence", hbm_bytes=32 * GiB).whole_weights
    assert plan("14B", (2, 2), 720, 1280, layout="sequence", hbm_bytes=95 * GiB, device_kind="TPU v5").whole_weights
    assert not plan("14B", (2, 4), 720, 1280, layout="tensor", hbm_bytes=95 * GiB).whole_weights
    assert not plan("A14B", (2, 4), 480, 832, layout="sequence", hbm_bytes=95 * GiB).whole_weights  # two experts
    assert not plan("1.3B", (2, 4), 480, 832, layout="sequence", device_kind="cpu").whole_weights  # HBM unknown
    assert plan("1.3B", (2, 4), 480, 832, layout="sequence", device_kind="cpu", whole_weights=True).whole_weights
