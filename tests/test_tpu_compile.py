"""The pack's programs compile for TPU with libtpu, on this machine with no TPU.

``jax.experimental.topologies`` describes a TPU slice (v6e:2x4 is a v6e-8) and
XLA:TPU compiles for it for real: Mosaic lowers the Splash kernel (a kernel it
rejects fails these tests), the SPMD partitioner splits the program over the
(dp, tp) mesh, and the compiled program reports its memory, FLOPs and
collectives. The programs are built as ``benchmarks/tpu_compile.py`` builds
them: the pipeline's own jitted stage functions, the modules on the meta
device with the loaders' dtypes, the sharding rules and the mesh rule.

The whole real-size step (1.3B at 480P, ~5 minutes on 2 cores) and two real-width 14B blocks with Splash
(~2.5 minutes) are marked ``slow_tpu_compile`` and deselected unless ``-m slow_tpu_compile``; the CI tests
compile the tiny and 2-layer programs, the Splash kernel at the 14B shapes, and the HBM plan is held to the
committed compiled peaks (tests/test_memory_plan.py).
"""

import dataclasses
import importlib.util
import json
import os
import sys

import pytest
from conftest import PACK_DIR, pack_module

env_manager = pack_module("env_manager")
memory_plan = pack_module("memory_plan")
latents = pack_module("models.wan.latents")
denoise_run = pack_module("sampling.denoise_run")
splash = pack_module("splash_attention")

_spec = importlib.util.spec_from_file_location("tpu_compile", os.path.join(PACK_DIR, "benchmarks", "tpu_compile.py"))
tpu_compile = sys.modules.setdefault("tpu_compile", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tpu_compile)

GiB = 2**30


@pytest.fixture
def manager(manager):
    manager.set_attention_backend("auto")
    yield manager
    manager.set_attention_backend(None)


@pytest.fixture(scope="module")
def v6e_8():
    return tpu_compile.Programs(pack_module, tpu_compile.parse_chip("v6e-8"))


# ------------------------------------------------------------------ slices and HLO parsing (no compiling)
def test_slice_names_map_to_the_topologies_libtpu_knows():
    assert tpu_compile.parse_chip("v6e-8").topology == "v6e:2x4"
    assert tpu_compile.parse_chip("v5e-8").topology == "v5e:2x4"
    assert tpu_compile.parse_chip("v6e-16").topology == "v6e:4x4"
    v5p = tpu_compile.parse_chip("v5p-8")  # 8 cores = 4 chips, one jax device per chip (megacore)
    assert (v5p.chips, v5p.topology) == (4, "v5p:2x2x1")
    assert tpu_compile.parse_chip("v5p-16").topology == "v5p:2x2x2"
    with pytest.raises(ValueError, match="v6e-8"):
        tpu_compile.parse_chip("v7-8")
    devices = tpu_compile.topology_devices(v5p)
    assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
    assert env_manager.build_mesh(devices).shape == {"dp": 2, "tp": 2}


def test_collectives_are_parsed_from_optimised_hlo():
    hlo = """
  %all-reduce.1 = bf16[1,32760,1536]{2,1,0} all-reduce(bf16[1,32760,1536]{2,1,0} %x), channel_id=1, to_apply=%add
  %ag-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %y), dimensions={0}
  %ag-done = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %ag-start)
  ROOT %cp = (f32[2]{0}, bf16[4]{0}) collective-permute(%z), source_target_pairs={{0,1}}
  %fusion.3 = bf16[8]{0} fusion(%all-reduce.1), kind=kLoop, calls=%fused
"""
    found = tpu_compile.collectives(hlo)
    assert found["all-reduce"] == {"count": 1, "bytes_per_device": 32760 * 1536 * 2}
    assert found["all-gather"] == {"count": 1, "bytes_per_device": 16 * 8 * 4}
    assert found["collective-permute"] == {"count": 1, "bytes_per_device": 2 * 4 + 4 * 2}
    assert found["reduce-scatter"]["count"] == found["all-to-all"]["count"] == 0


def test_target_platform_makes_the_dispatch_trace_for_tpu_only_inside_the_block(manager):
    q, k = (2, 40, 32760, 128), (2, 40, 32760, 128)
    assert manager.choose_attention(q, k) == "xla"  # this machine is a CPU
    with manager.target_platform("tpu"):
        assert manager.platform == "tpu"
        assert manager.choose_attention(q, k) == "splash"
        assert manager.choose_attention(q, k, planned=False) == "xla"  # e.g. the VAE's mid-block
    assert manager.platform == "cpu"
    with pytest.raises(ValueError, match="tpu"):
        with manager.target_platform("tensorcore"):
            pass


# ------------------------------------------------------------------ the Splash kernel, compiled by Mosaic
# v6e-8 at 480P (832x480, and 848x480's balanced blocks of 3072 queries) and 720P; v5e-8 (the smallest
# VMEM) at 480P, its size; v5p-8 (4 chips: more heads per device) at 720P.
@pytest.mark.parametrize("chip, tokens", [("v6e-8", 32760), ("v6e-8", 75600), ("v6e-8", 33390), ("v5e-8", 32760),
                                          ("v5p-8", 75600)],
                         ids=lambda value: {32760: "14B-832x480", 33390: "14B-848x480", 75600: "14B-720P"}.get(value, value))
def test_splash_kernel_compiles_for_tpu_at_the_14b_shapes(chip, tokens):
    """Batch 2 (CFG), 40 heads, head_dim 128 under shard_map on the chip's mesh; Mosaic must accept it."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = env_manager.build_mesh(tpu_compile.topology_devices(tpu_compile.parse_chip(chip)))
    spec = NamedSharding(mesh, PartitionSpec("dp", "tp"))
    x = jax.ShapeDtypeStruct((2, 40, tokens, 128), jnp.bfloat16, sharding=spec)
    with splash.force_interpret(False):
        lowered = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, mesh=mesh)).lower(x, x, x)
    compiled = lowered.compile()  # raises if Mosaic rejects the kernel (block shapes, VMEM)
    text = compiled.as_text()
    assert tpu_compile.custom_call_count(text) == 1
    assert sum(entry["count"] for entry in tpu_compile.collectives(text).values()) == 0  # heads stay local
    per_device = x.size * 2 // (mesh.shape["dp"] * mesh.shape["tp"])  # one of q, k, v or the output
    assert tpu_compile.memory_facts(compiled)["peak_bytes_per_device"] < 16 * per_device  # never the S x S scores (hundreds of GiB)
    flops = compiled.cost_analysis()["flops"]
    heads_per_device = 2 * 40 // (mesh.shape["dp"] * mesh.shape["tp"])
    assert flops >= 4 * heads_per_device * tokens * tokens * 128  # QK^T and PV on this device's heads


# ------------------------------------------------------------------ the tiny model's three stages
def _tiny_configs(tiny_model_dir):
    def read(component):
        with open(os.path.join(tiny_model_dir, component, "config.json")) as handle:
            return json.load(handle)

    return read("transformer"), read("text_encoder"), read("vae")


def test_the_tiny_models_three_stages_compile_for_v6e_8(tiny_model_dir, manager, v6e_8):
    transformer, text_encoder, vae = _tiny_configs(tiny_model_dir)
    video = dict(height=32, width=48, frames=5)
    programs = [
        ("text_encoder", *v6e_8.text_encoder(text_encoder)),
        ("step_cfg", *v6e_8.step(transformer, cfg=True, **video)),
        ("step", *v6e_8.step(transformer, cfg=False, **video)),
    ]
    chunks = v6e_8.vae_decode(vae, **video)  # the VAE decode: one program per kind of latent frame
    assert [runs for _, _, runs in chunks] == [1, 1]  # 5 frames are 2 latent frames: first and second
    programs += [("vae_decode", jitted, args) for jitted, args, _ in chunks]
    frames = 0
    for name, jitted, args in programs:
        compiled, _, _ = v6e_8.compile(jitted, args, matmul_precision=name != "vae_decode")
        outputs = compiled.out_info
        if name.startswith("step"):
            assert [o.shape for o in outputs] == [latents.WAN21.latent_shape(32, 48, 5)] * 4
        elif name == "vae_decode":
            frames += outputs[0].shape[0]
            assert outputs[0].shape[1:] == (32, 48, 3)
        else:
            assert outputs.shape == (2, 512, text_encoder["d_model"])
        assert tpu_compile.memory_facts(compiled)["peak_bytes_per_device"] > 0
    assert frames == 5  # 1 frame from the first latent frame, 4 from the second


def test_the_tiny_models_sequence_parallel_step_compiles_for_v6e_8(tiny_model_dir, manager, v6e_8):
    """The sequence layout with CFG on (2, 4): the pair over dp, the 12 tokens over tp. Heads and tokens
    swap with all-to-alls around attention (two per block at least), the split weights are gathered, and
    the blocks' outputs are not all-reduced as in the tensor layout. With whole weights no weight is gathered."""
    transformer, _, _ = _tiny_configs(tiny_model_dir)
    video = dict(height=32, width=48, frames=5)
    found, arguments = {}, {}
    for layout, whole in (("tensor", False), ("sequence", False), ("sequence", True)):
        jitted, args = v6e_8.step(transformer, cfg=True, layout=layout, whole_weights=whole, **video)
        compiled, _, _ = v6e_8.compile(jitted, args)
        assert [o.shape for o in compiled.out_info] == [latents.WAN21.latent_shape(32, 48, 5)] * 4
        memory = tpu_compile.memory_facts(compiled)
        assert memory["peak_bytes_per_device"] > 0
        found[layout, whole] = tpu_compile.collectives(compiled.as_text())
        arguments[layout, whole] = memory["argument_bytes_per_device"]
    tensor, sequence, whole = found["tensor", False], found["sequence", False], found["sequence", True]
    weight = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    # Whole weights (runtime.placement.whole_weight_copies): the step gathers no weight; the copies are its arguments.
    weights_gathered = 6 * transformer["num_layers"] * weight * weight * 2  # bf16: see below
    assert whole["all-gather"]["bytes_per_device"] <= sequence["all-gather"]["bytes_per_device"] - weights_gathered
    assert whole["all-gather"]["bytes_per_device"] < weight * weight * 4, found  # what is left: the tokens' output
    assert whole["all-to-all"]["count"] == sequence["all-to-all"]["count"], found
    assert arguments["sequence", True] > arguments["sequence", False] == arguments["tensor", False]
    assert tensor["all-to-all"]["count"] == tensor["all-gather"]["count"] == 0, tensor
    assert sequence["all-to-all"]["count"] >= 2 * transformer["num_layers"], sequence
    # bf16 (the command compiles what the default precision runs): q, k, v, out, cross q and out per block
    assert sequence["all-gather"]["bytes_per_device"] >= weights_gathered, sequence
    assert sequence["all-reduce"]["bytes_per_device"] < tensor["all-reduce"]["bytes_per_device"], found


# ------------------------------------------------------------------ real-width blocks: the step as designed
@pytest.mark.slow_tpu_compile  # 140 s on 2 cores: out of CI's 20 minutes; run it with -m slow_tpu_compile
def test_real_width_step_compiles_with_splash_and_one_all_reduce_per_sublayer(manager, v6e_8):
    """Two blocks of the real 14B architecture, CFG, on v6e-8 (2, 4), at 832x480 and 25 frames
    (10,920 tokens: long enough for Splash, short enough to compile in CI).

    As the sharding plan implies: Splash for every self-attention; no weight
    is ever all-gathered (nothing is gathered at all); each block all-reduces
    its three row-parallel outputs (self-attention, cross-attention, FFN),
    [1, S, D] bf16 per device with the CFG pair split over dp, plus small
    reductions (the q/k RMS norms across the split heads)."""
    config = dict(pack_module("models.wan.configs").WAN21_CONFIGS["14B"], num_layers=2)
    height, width, frames = 480, 832, 25
    jitted, args = v6e_8.step(config, height, width, frames, cfg=True)
    compiled, _, _ = v6e_8.compile(jitted, args)
    text = compiled.as_text()
    found = tpu_compile.collectives(text)
    assert tpu_compile.custom_call_count(text) == 2, found
    assert found["all-gather"]["count"] == 0, found
    assert found["reduce-scatter"]["count"] == found["all-to-all"]["count"] == 0, found
    tokens = pack_module("models.wan.activations").transformer_tokens(config, height, width, frames)
    sublayer = tokens * 5120 * 2  # bf16 [1, S, D] per device
    all_reduce = found["all-reduce"]
    assert 3 * 2 <= all_reduce["count"], found
    assert 3 * 2 * sublayer <= all_reduce["bytes_per_device"] < 3 * 2 * sublayer * 1.1, (found, sublayer)
    assert found["collective-permute"]["bytes_per_device"] < 0.01 * all_reduce["bytes_per_device"], found
    # The HBM plan's estimate for the step agrees with the compiler (+-25%).
    peak = tpu_compile.memory_facts(compiled)["peak_bytes_per_device"]
    plan = memory_plan.plan_memory(config, (2, 4), height, width, frames, "bf16", cfg=True, hbm_bytes=32 * GiB,
                                   layout="tensor", device_kind="TPU v6 lite")
    assert 0.75 <= plan.stage_peak_bytes("transformer") / peak <= 1.25, (plan.stage_peak_bytes("transformer"), peak)


@pytest.mark.slow_tpu_compile
def test_the_whole_1_3b_step_compiles_for_v6e_8(manager, v6e_8):
    """The real 1.3B step at 832x480, 81 frames, CFG: 30 Splash calls, 3 all-reduces of [1, S, D] per block."""
    config = pack_module("models.wan.configs").WAN21_CONFIGS["1.3B"]
    jitted, args = v6e_8.step(config, 480, 832, 81, cfg=True)
    compiled, _, _ = v6e_8.compile(jitted, args)
    text = compiled.as_text()
    assert tpu_compile.custom_call_count(text) == config["num_layers"]
    found = tpu_compile.collectives(text)
    assert found["all-gather"]["count"] == 0
    sublayer = pack_module("models.wan.activations").transformer_tokens(config, 480, 832, 81) * 1536 * 2
    assert 3 * 30 * sublayer <= found["all-reduce"]["bytes_per_device"] < 3 * 30 * sublayer * 1.1


def test_the_magcache_record_and_reuse_steps_compile_for_v6e_8(tiny_model_dir, manager, v6e_8):
    """MagCache's two extra step programs (full step keeping the blocks' residual, and the skip step), for
    text-to-video and for Wan 2.1 I2V (the skip step takes the image's conditioning and CLIP tokens too);
    and the two small programs beside them: a calibration's ratio and a preview's middle frame."""
    transformer_config, _, _ = _tiny_configs(tiny_model_dir)
    wan21_i2v = dict(transformer_config, in_channels=36, image_dim=32, added_kv_proj_dim=32)
    latent_shape = latents.WAN21.latent_shape(32, 48, 5)
    for config in (transformer_config, wan21_i2v):
        for mode in ("record", "reuse"):
            jitted, args = v6e_8.step(config, cfg=True, height=32, width=48, frames=5, cache_mode=mode)
            trailing = args[6:]  # MagCache's residual (a "reuse" step takes it), then the image conditioning
            if mode == "reuse":
                residual = trailing[0]
                assert residual.shape == (2, 12, 32)  # [batch, tokens, inner dim]
            if config is wan21_i2v:
                assert len(trailing) == 2 and (trailing[0] is None) == (mode == "record")
                condition, image_embeds = trailing[1]
                assert condition.shape == (2, 20, 2, 4, 6) and image_embeds.shape == (2, 257, 32)
            else:
                assert len(trailing) == (mode == "reuse")
            compiled, _, _ = v6e_8.compile(jitted, args)
            outputs = compiled.out_info
            state = outputs[0] if mode == "record" else outputs
            assert [o.shape for o in state] == [latent_shape] * 4
            if mode == "record":
                assert outputs[1].shape == (2, 12, 32)
    jax = manager.jax
    compiled, _, _ = v6e_8.compile(denoise_run.residual_norm_ratio(jax), (residual, residual))
    assert compiled.out_info.shape == (2,)  # a ratio per CFG half: only scalars leave the device
    latent = jax.ShapeDtypeStruct(latent_shape, jax.numpy.float32, sharding=args[1][0].sharding)
    compiled, _, _ = v6e_8.compile(denoise_run.middle_frame(jax), (latent,))
    assert compiled.out_info.shape == (16, 4, 6)


def test_image_to_video_programs_compile_for_v6e_8(tiny_model_dir, manager, v6e_8):
    """Image-to-video on v6e-8: the step with the first-frame conditioning beside the noise (Wan 2.2 I2V A14B)
    and with CLIP tokens too (Wan 2.1 I2V), the VAE encode's chunk programs and the CLIP tower."""
    transformer, _, vae = _tiny_configs(tiny_model_dir)
    video = dict(height=32, width=48, frames=5)
    wan22 = dict(transformer, in_channels=36)
    wan21 = dict(wan22, image_dim=32, added_kv_proj_dim=32)
    for config in (wan22, wan21):
        jitted, args = v6e_8.step(config, cfg=True, **video)
        condition, *image_embeds = args[-1]
        assert condition.shape == (2, 20, 2, 4, 6) and (not image_embeds) == (config is wan22)
        compiled, _, _ = v6e_8.compile(jitted, args)
        assert [o.shape for o in compiled.out_info] == [latents.WAN21.latent_shape(**{
            "height": 32, "width": 48, "num_frames": 5})] * 4
    chunks = v6e_8.vae_encode(vae, **video)
    assert [args[1].shape for _, args, _ in chunks] == [(1, 3, 1, 32, 48), (1, 3, 4, 32, 48)]
    for jitted, args, _ in chunks:
        compiled, _, _ = v6e_8.compile(jitted, args, matmul_precision=False)
        assert compiled.out_info[0].shape == (1, 16, 1, 4, 6)
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)
    compiled, _, _ = v6e_8.compile(*v6e_8.image_encoder(clip))
    assert compiled.out_info.shape == (1, 17, 32)


def test_the_ti2v_step_compiles_for_v6e_8_with_a_timestep_per_token(ti2v_configs, manager, v6e_8):
    """Wan 2.2 TI2V 5B-style: 48 latent channels at 16x, the first-frame mask as data (one program for text and
    image), the Wan 2.2 VAE's encode and decode chunk programs (patchified)."""
    transformer, vae = ti2v_configs
    video = dict(height=64, width=64, frames=5)
    jitted, args = v6e_8.step(transformer, cfg=True, **video)
    given, keep = args[-1]
    assert given.shape == (1, 48, 2, 4, 4) and keep.shape == (1, 1, 2, 4, 4)
    compiled, _, _ = v6e_8.compile(jitted, args)
    assert [o.shape for o in compiled.out_info] == [(1, 48, 2, 4, 4)] * 4
    for jitted, args, _ in v6e_8.vae_decode(vae, **video) + v6e_8.vae_encode(vae, **video):
        v6e_8.compile(jitted, args, matmul_precision=False)


@pytest.fixture(scope="module")
def ti2v_configs(tmp_path_factory):
    tiny_wan = pack_module("tiny_wan")
    folder = tiny_wan.build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-ti2v", tiny_wan.TINY_TI2V)
    transformer, _, vae = _tiny_configs(folder)
    return transformer, vae


def test_the_step_projection_adds_collective_time_from_the_published_ici_bandwidth():
    """The 14B 720P CFG step as compiled at e5db2fc on v6e-8: 1.65e15 FLOP and 120 all-reduces of 774 MB per
    device. At peak: 1.80 s compute; each all-reduce over tp=4 moves 1.5x its bytes through a chip's
    3,584 Gbit/s of ICI: 139 GB, 0.31 s."""
    chip = tpu_compile.parse_chip("v6e-8")
    record = {"devices": 8, "mesh": {"dp": 2, "tp": 4}, "flops_per_device": 1.65e15, "peak_flops_per_device": 918e12,
              "collectives": {"all-reduce": {"count": 120, "bytes_per_device": 120 * 774e6}}}
    at_peak = tpu_compile.projected_step_seconds(record, chip, mfu=1.0)
    assert at_peak["compute_seconds"] == pytest.approx(1.797, abs=1e-3)
    assert at_peak["communication_seconds"] == pytest.approx(1.5 * 120 * 774e6 / 448e9, abs=1e-3)
    assert at_peak["seconds_no_overlap"] == pytest.approx(at_peak["compute_seconds"] + at_peak["communication_seconds"],
                                                          abs=2e-3)
    at_38 = tpu_compile.projected_step_seconds(record, chip)
    assert at_38["compute_seconds"] == pytest.approx(1.797 / 0.38, abs=1e-2)
    # The sequence layout's all-to-alls: over the tp devices with CFG, over dp x tp without.
    sequence = dict(record, layout="sequence", collectives={"all-to-all": {"count": 1, "bytes_per_device": 448e9}})
    assert tpu_compile.projected_step_seconds(dict(sequence, name="step_cfg"), chip, 1.0)[
        "communication_seconds"] == pytest.approx(0.75, abs=1e-3)
    assert tpu_compile.projected_step_seconds(dict(sequence, name="step"), chip, 1.0)[
        "communication_seconds"] == pytest.approx(0.875, abs=1e-3)
    v5p = tpu_compile.parse_chip("v5p-8")  # 4 chips, one device each
    record_v5p = dict(record, devices=4, mesh={"dp": 2, "tp": 2}, peak_flops_per_device=459e12)
    assert tpu_compile.projected_step_seconds(record_v5p, v5p, 1.0)["communication_seconds"] == pytest.approx(
        1.0 * 120 * 774e6 / 600e9, abs=1e-3)


@pytest.mark.parametrize("layout", ["tensor", "sequence"])
def test_a_depth_probe_predicts_the_deeper_step_the_compiler_builds(tiny_model_dir, manager, v6e_8, layout):
    """``--probe-blocks``: the step compiled 1 and 2 blocks deep, extrapolated to 3 blocks, against the
    3-block step compiled whole. Every block is the same program, so the FLOPs, the Splash calls and the
    collectives are exact and the peak bytes close."""
    transformer, _, _ = _tiny_configs(tiny_model_dir)
    transformer = dict(transformer, num_layers=3)
    run = tpu_compile.Config("tiny", 32, 48, 5, "v6e-8", layout=layout, probe_blocks=(1, 2))
    probed = tpu_compile.compile_step(v6e_8, run, transformer, cfg=True, layout=layout)
    whole = tpu_compile.compile_step(v6e_8, dataclasses.replace(run, probe_blocks=None), transformer, cfg=True,
                                     layout=layout)
    assert probed["depth_probe"]["blocks"] == 3 and probed["depth_probe"]["compiled_blocks"] == [1, 2]
    assert "depth_probe" not in whole
    assert probed["flops_per_device"] == pytest.approx(whole["flops_per_device"], rel=1e-3)
    assert probed["mosaic_kernels"] == whole["mosaic_kernels"]
    assert {kind: entry["count"] for kind, entry in probed["collectives"].items() if entry["count"]} == {
        kind: entry["count"] for kind, entry in whole["collectives"].items() if entry["count"]}, (probed, whole)
    for kind, entry in whole["collectives"].items():
        assert probed["collectives"][kind]["bytes_per_device"] == pytest.approx(entry["bytes_per_device"], rel=0.01)
    assert probed["argument_bytes_per_device"] == whole["argument_bytes_per_device"]
    assert probed["peak_bytes_per_device"] == pytest.approx(whole["peak_bytes_per_device"], rel=0.05)


def test_depth_extrapolation_is_linear_in_the_blocks_and_refuses_bad_depths():
    def facts(blocks):
        return {**{field: 100 * blocks + 7 for field in tpu_compile._DEPTH_LINEAR_FIELDS},
                "collectives": {"all-reduce": {"count": 3 * blocks, "bytes_per_device": 1000 * blocks}},
                "lower_seconds": 1.0, "compile_seconds": 10.0 * blocks, "compiled": True}

    whole = tpu_compile.extrapolate_depth(facts(2), facts(4), (2, 4), 40)
    assert whole["peak_bytes_per_device"] == 4007 and whole["flops_per_device"] == 4007
    assert whole["collectives"] == {"all-reduce": {"count": 120, "bytes_per_device": 40000}}
    assert whole["compile_seconds"] == 60.0  # what was really compiled, not the whole step's time
    with pytest.raises(ValueError, match="second larger"):
        tpu_compile.extrapolate_depth(facts(4), facts(2), (4, 2), 40)


@pytest.mark.parametrize("argv, message", [
    (["--probe-blocks", "4,2"], "--probe-blocks 4,2: give two block counts, the second larger"),
    (["--probe-blocks", "two"], "--probe-blocks two: give two block counts"),
    (["--sizes", "832by480"], "--sizes 832by480: give WIDTHxHEIGHT sizes"),
])
def test_the_compile_command_names_a_bad_probe_or_size_and_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpu_compile.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_report_names_what_stays_resident_beside_a_whole_weights_step(capsys, monkeypatch):
    """A sequence-layout step with whole weights (v5p) keeps the gathered weights' shards beside it; a
    two-expert step keeps the other expert. The report says which (it used to fail on the first)."""
    base = dict(compiled=True, resident_peak_bytes_per_device=3 * 2**30)
    for extra, words in (({}, "with the gathered weights' shards resident: 3.00 GiB"),
                         ({"resident_experts": 2}, "with all 2 experts resident: 3.00 GiB")):
        monkeypatch.setattr(tpu_compile, "row", lambda record: "row")
        tpu_compile._report(dict(base, **extra), None)
        assert words in capsys.readouterr().out
