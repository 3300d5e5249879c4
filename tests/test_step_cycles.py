"""The step cycle report's pieces that need no compile: the optimised HLO's op grouping, and the Wan
attention processor's rotary embedding (bit-identical to diffusers', without its scatter)."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


step_cycles = _load("benchmarks/step_cycles.py", "wan_tpu_test_step_cycles")
processor = _load("models/wan/attention_processor.py", "wan_tpu_test_attention_processor")

HLO = """HloModule jit__step

%fused_computation.1 (param_0: bf16[64,512], param_1: bf16[512,128]) -> bf16[64,128] {
  %param_0 = bf16[64,512]{1,0} parameter(0)
  %param_1 = bf16[512,128]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,128]{1,0} dot(bf16[64,512]{1,0} %param_0, bf16[512,128]{1,0} %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: bf16[64,128]) -> f32[64,128] {
  %param_0.1 = bf16[64,128]{1,0} parameter(0)
  ROOT %convert.1 = f32[64,128]{1,0} convert(bf16[64,128]{1,0} %param_0.1)
}

ENTRY %main.1 (a: bf16[64,512], b: bf16[512,128]) -> f32[64,128] {
  %a = bf16[64,512]{1,0} parameter(0)
  %b = bf16[512,128]{1,0} parameter(1)
  %fusion.1 = bf16[64,128]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(_step)/linear/dot_general"}
  %wan_attention_stub.1 = bf16[64,128]{1,0} custom-call(%fusion.1), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"name": "wan_attention_stub"}}
  %all-reduce.1 = bf16[64,128]{1,0} all-reduce(%wan_attention_stub.1), replica_groups={}, to_apply=%add
  ROOT %fusion.2 = f32[64,128]{1,0} fusion(%all-reduce.1), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(_step)/convert_element_type"}
}
"""


def test_the_optimised_hlo_is_grouped_by_op():
    ops = step_cycles.classify_hlo(HLO)
    assert set(ops) == {"fusion.1", "wan_attention_stub.1", "all-reduce.1", "fusion.2"}  # fused bodies, parameters out
    assert ops["fusion.1"]["group"] == "matmul" and ops["fusion.1"]["flops"] == 2 * 64 * 128 * 512
    assert ops["fusion.1"]["op_name"] == "jit(_step)/linear/dot_general"
    assert ops["wan_attention_stub.1"]["group"] == "kernel"
    assert ops["all-reduce.1"]["group"] == "collective"
    assert ops["fusion.2"]["group"] == "other" and ops["fusion.2"]["flops"] == 0


def test_the_probe_blocks_have_one_devices_widths():
    config = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824}
    assert step_cycles._local_block_widths(config, 4) == {"heads": 10, "head_dim": 128, "ffn": 3456}
    with pytest.raises(ValueError):
        step_cycles._local_block_widths(config, 3)


def _diffusers_rotary(hidden_states, freqs_cos, freqs_sin):
    """diffusers' WanAttnProcessor's apply_rotary_emb, as written there (the reference)."""
    import torch

    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_rotary_embedding_is_bit_identical_to_diffusers(dtype):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, 4, 128, generator=generator).to(getattr(torch, dtype))
    angles = torch.randn(1, 300, 1, 64, generator=generator).repeat_interleave(2, -1)
    ours = processor.apply_rotary_emb(x, angles.cos(), angles.sin())
    assert ours.dtype == x.dtype
    assert torch.equal(ours, _diffusers_rotary(x, angles.cos(), angles.sin()))


def test_the_processor_is_installed_on_every_wan_attention():
    torch = pytest.importorskip("torch")
    transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    with torch.device("meta"):
        model = transformer_wan.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                      out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32,
                                                      num_layers=2, rope_max_seq_len=32)
    assert processor.install(model) == 4  # two blocks, self- and cross-attention
    assert all(type(block.attn1.processor).__name__ == "WanTPUAttnProcessor" for block in model.blocks)
    assert processor.install(model) == 0  # already ours: left alone


def test_the_processor_gives_diffusers_output():
    torch = pytest.importorskip("torch")
    transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    torch.manual_seed(0)
    model = transformer_wan.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32,
                                                  num_layers=1, rope_max_seq_len=32).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 6, 8), return_dict=False)
    with torch.no_grad():
        reference = model(**inputs)[0]
        processor.install(model)
        ours = model(**inputs)[0]
    assert torch.equal(ours, reference)


def test_profiled_cycles_are_summed_by_group_without_the_stub():
    result = {"ops": {"fusion.1": 100, "wan_attention_stub.1": 50, "copy.3": 7, "all-reduce.1": 9},
              "hlo_ops": {"fusion.1": {"group": "matmul"}, "wan_attention_stub.1": {"group": "kernel"},
                          "all-reduce.1": {"group": "collective"}}}
    assert step_cycles.group_cycles(result) == {"matmul": 100, "other": 7, "collective": 9}
