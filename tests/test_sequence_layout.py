"""The sequence layout: tokens split over the devices, weights gathered per layer, heads swapped for
tokens around attention. Same frames as diffusers' PyTorch WanPipeline on the (2, 4), (1, 8) and (1, 1)
CPU meshes, and its choice, inputs and errors."""

import numpy as np
import pytest
import torch
from conftest import TINY_VIDEO, lowered_tiny_cfg_step, pack_module

pipeline_mod = pack_module("pipeline")
sharding = pack_module("sharding")
memory_plan = pack_module("memory_plan")
env_manager = pack_module("env_manager")

WAN_14B = pack_module("models.wan.configs").WAN21_CONFIGS["14B"]
WAN_1_3B = pack_module("models.wan.configs").WAN21_CONFIGS["1.3B"]


@pytest.fixture(scope="module")
def sequence_pipelines(tiny_model_dir, manager):
    """One fp32 pipeline per mesh, all in the sequence layout (they share the manager's cache by mesh)."""
    manager.release()
    manager.set_attention_backend(None)
    made = {}

    def get(dp, tp):
        if (dp, tp) not in made:
            made[dp, tp] = pipeline_mod.WanTPUPipeline(tiny_model_dir, precision="fp32", dp=dp, tp=tp,
                                                       layout="sequence")
        return made[dp, tp]

    yield get
    manager.release()


def test_the_sequence_step_splits_the_blocks_by_token_and_gathers_the_weights(sequence_pipelines):
    """What the traced step asks of XLA on (2, 4) with CFG: every block input [2, S, D] split as
    (dp, tp, -), and the tp-split weights constrained whole (gathered where the layer uses them)."""
    pipe = sequence_pipelines(2, 4)
    lowered = lowered_tiny_cfg_step(pipe, "sequence")
    transformer = pipe.transformer()
    constraints = [line for line in lowered.splitlines() if "sharding_constraint" in line]
    blocks = [line for line in constraints if "tensor<2x12x32xf32>" in line.split("->")[-1]]
    assert len(blocks) >= 2 and all('[{"dp"}, {"tp"}, {}]' in line for line in blocks), blocks
    split_weights = sum(bool(spec) for spec in transformer.plan.specs.values())
    assert split_weights >= 12
    whole = [line for line in constraints if "[{}, {}]" in line and "tensor<32x32xf32>" in line]
    assert len(whole) >= 8  # q, k, v, out of both attentions in each of the two blocks, at least


def test_a_second_layout_compiles_its_own_step_and_keeps_the_weights(sequence_pipelines, manager):
    pipe = sequence_pipelines(2, 4)
    run = dict(num_inference_steps=2, guidance_scale=5.0, seed=3, flow_shift=3.0, **TINY_VIDEO)
    sequence = pipe.generate("a boat", "blurry", **run)
    weights = pipe.transformer().weights
    tensor = pipe.generate("a boat", "blurry", layout="tensor", **run)
    assert pipe.last_run["layout"] == "tensor"
    assert pipe.transformer().weights is weights  # switching layout reloads nothing
    assert np.abs(sequence.numpy() - tensor.numpy()).max() <= 1e-4
    before = manager.compile_count()
    pipe.generate("another boat", "static", **run)  # the sequence step again: cached
    assert manager.compile_count() == before


# ------------------------------------------------------------------ choice and errors (no compiling)
def test_auto_picks_sequence_where_it_moves_fewer_bytes_and_tensor_on_one_device():
    tokens_720p = pack_module("models.wan.activations").transformer_tokens(WAN_14B, 720, 1280, 81)
    layout, why = sharding.choose_layout(WAN_14B, tokens_720p, {"dp": 2, "tp": 4}, batch=2)
    assert layout == "sequence" and "tensor layout" in why
    moved = sharding.layer_collective_bytes(WAN_14B, tokens_720p, {"dp": 2, "tp": 4}, batch=2)
    assert sum(moved["tensor"].values()) > 3 * sum(moved["sequence"].values())
    # Without CFG the tensor layout runs the same work on both dp halves; the sequence layout splits it.
    assert sharding.parallel_devices("tensor", {"dp": 2, "tp": 4}, 1) == 4
    assert sharding.parallel_devices("sequence", {"dp": 2, "tp": 4}, 1) == 8
    tokens_480p = pack_module("models.wan.activations").transformer_tokens(WAN_1_3B, 480, 832, 81)
    assert sharding.choose_layout(WAN_1_3B, tokens_480p, {"dp": 2, "tp": 4}, batch=1)[0] == "sequence"
    assert sharding.choose_layout(WAN_14B, tokens_720p, {"dp": 1, "tp": 1}, batch=2)[0] == "tensor"
    # A handful of tokens: gathering a 14B layer's weights costs more than summing its outputs.
    assert sharding.choose_layout(WAN_14B, 64, {"dp": 2, "tp": 4}, batch=2)[0] == "tensor"
    # v5e, where the compiled sequence step gathers ~3x the bytes and peaks higher (TENSOR_LAYOUT_CHIPS);
    # v6e and v5p ("TPU v5") keep the cost model's choice.
    layout, why = sharding.choose_layout(WAN_14B, tokens_720p, {"dp": 2, "tp": 4}, 2, device_kind="TPU v5 lite")
    assert layout == "tensor" and "TPU v5 lite" in why
    for kind in ("TPU v6 lite", "TPU v5", "cpu", None):
        assert sharding.choose_layout(WAN_14B, tokens_720p, {"dp": 2, "tp": 4}, 2, device_kind=kind)[0] == "sequence"


def test_the_token_split_follows_the_cfg_pair_and_the_mesh():
    assert sharding.token_split({"dp": 2, "tp": 4}, 2).spec() == ("dp", "tp", None)
    assert sharding.token_split({"dp": 2, "tp": 4}, 1).spec() == (None, ("dp", "tp"), None)
    assert sharding.token_split({"dp": 1, "tp": 8}, 2).spec() == (None, "tp", None)
    assert sharding.token_split({"dp": 2, "tp": 4}, 2).spec(token_dim=2, ndim=4) == ("dp", None, "tp", None)


def test_an_unknown_layout_is_refused_before_anything_loads(tiny_model_dir, monkeypatch, manager):
    with pytest.raises(ValueError, match=r"layout='diagonal' is unknown: use one of \('auto', 'tensor', 'sequence'\)"):
        pipeline_mod.WanTPUPipeline(tiny_model_dir, layout="diagonal")
    monkeypatch.setenv(sharding.ENV_LAYOUT, "Sequence")
    assert pipeline_mod.WanTPUPipeline(tiny_model_dir).layout == "sequence"
    monkeypatch.setenv(sharding.ENV_LAYOUT, "rows")
    with pytest.raises(ValueError, match="WAN_TPU_LAYOUT='rows' is unknown: use one of"):
        pipeline_mod.WanTPUPipeline(tiny_model_dir)
    monkeypatch.delenv(sharding.ENV_LAYOUT)
    pipe = pipeline_mod.WanTPUPipeline(tiny_model_dir)
    loaded = manager.cached_keys()
    embeddings = pack_module("models.wan.conditioning").WanEmbeddings(torch.zeros(1, 512, 32), torch.zeros(1, 512, 32), tiny_model_dir)
    with pytest.raises(ValueError, match="layout='columns'"):
        pipe.denoise(embeddings, layout="columns", **TINY_VIDEO)
    assert manager.cached_keys() == loaded  # refused before loading


@pytest.mark.parametrize("mesh, guidance_scale", [((2, 4), 5.0), ((1, 8), 1.0)])
def test_whole_weights_where_the_plan_holds_them_match_diffusers_and_are_freed(
        sequence_pipelines, diffusers_frames, manager, monkeypatch, mesh, guidance_scale):
    """With the devices' memory known (here WAN_TPU_HBM_GIB) the HBM plan keeps the tiny model's gathered
    weights whole for the run: copied onto every device once, no step gathers them, the same frames, and
    the copies deleted when the run ends."""
    monkeypatch.setenv(memory_plan.ENV_HBM_GIB, "16")
    made = []
    copy = pack_module("runtime.placement").whole_weight_copies
    monkeypatch.setattr(pack_module("sampling.denoise_run"), "whole_weight_copies", lambda *args: made.append(copy(*args)) or made[-1])
    prompt, negative = "a red fox running through snow", "blurry"
    expected = diffusers_frames(prompt, negative, 0, guidance_scale, 4)
    pipe = sequence_pipelines(*mesh)
    frames = pipe.generate(prompt, negative, num_inference_steps=4, guidance_scale=guidance_scale, seed=0,
                           flow_shift=3.0, **TINY_VIDEO)
    assert pipe.last_run["whole_weights"] is True and len(made) == 1
    weights, copies = made[0]
    gathered = sharding.sequence_gathered_weights(pipe.transformer().plan.specs)
    assert len(copies) == len(gathered) >= 12
    assert all(weights[name].sharding.is_fully_replicated for name in gathered)
    assert all(array.is_deleted() for array in copies)  # the run's copies, not the cached shards
    assert not any(array.is_deleted() for array in pipe.transformer().weights.values())
    assert np.abs(frames.numpy() - expected).max() <= 1e-3


def test_whole_weights_that_run_out_of_memory_say_so_free_their_copies_and_leave_the_cache_usable(
        sequence_pipelines, manager, monkeypatch):
    """A copy that does not fit (here the third one fails as XLA fails) is refused naming what ran out and
    the fix; the copies made before it are deleted, and the cached weights still run the next run."""
    utils = pack_module("utils")
    monkeypatch.setenv(memory_plan.ENV_HBM_GIB, "16")
    pipe = sequence_pipelines(2, 4)
    pipe.transformer()  # loaded before the fault, as a run before this one would have
    jax, made, calls = manager.jax, [], []
    real_device_put = jax.device_put

    def failing_device_put(value, sharding=None, **kwargs):
        calls.append(value)
        if len(calls) == 3:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.50GiB.")
        made.append(real_device_put(value, sharding, **kwargs))
        return made[-1]

    copy = pack_module("runtime.placement").whole_weight_copies

    def copy_with_fault(*args):
        monkeypatch.setattr(jax, "device_put", failing_device_put)
        try:
            return copy(*args)
        finally:
            monkeypatch.setattr(jax, "device_put", real_device_put)

    monkeypatch.setattr(pack_module("sampling.denoise_run"), "whole_weight_copies", copy_with_fault)
    run = dict(num_inference_steps=2, guidance_scale=5.0, seed=3, flow_shift=3.0, **TINY_VIDEO)
    with pytest.raises(utils.DeviceMemoryError, match=r"copying the weights whole onto every device ran out of "
                                                      r"device memory \(XLA asked for 2.50 GiB\)\. Use layout='tensor'"):
        pipe.generate("a boat", "blurry", **run)
    assert len(made) == 2 and all(array.is_deleted() for array in made)
    weights = pipe.transformer().weights
    assert not any(array.is_deleted() for array in weights.values())
    monkeypatch.setattr(pack_module("sampling.denoise_run"), "whole_weight_copies", copy)
    frames = pipe.generate("a boat", "blurry", **run)  # the cache as it was: the next run loads nothing
    assert pipe.transformer().weights is weights and pipe.last_run["whole_weights"] is True
    assert frames.shape[0] == TINY_VIDEO["num_frames"]


# Last: the (1, 1) case replaces the (2, 4) components the tests above share.
@pytest.mark.parametrize("mesh, guidance_scale", [((2, 4), 5.0), ((2, 4), 1.0), ((1, 8), 5.0), ((1, 1), 5.0)])
def test_sequence_layout_end_to_end_matches_diffusers(sequence_pipelines, diffusers_frames, manager, monkeypatch,
                                                      mesh, guidance_scale):
    """CFG splits over dp and tokens over tp; without CFG (one video) the tokens split over dp x tp;
    on (1, 8) the 4 heads do not divide over 8 devices and the 12 tokens do not either; (1, 1) is one
    device of the eight (a single-chip VM), where the layout splits nothing."""
    import jax

    if mesh == (1, 1):
        one_device = env_manager.build_mesh(jax.devices()[:1], 1, 1)
        monkeypatch.setattr(manager, "mesh", lambda dp=None, tp=None: one_device)
    prompt, negative = "a red fox running through snow", "blurry"
    expected = diffusers_frames(prompt, negative, 0, guidance_scale, 4)
    pipe = sequence_pipelines(*mesh)
    frames = pipe.generate(prompt, negative, num_inference_steps=4, guidance_scale=guidance_scale, seed=0,
                           flow_shift=3.0, **TINY_VIDEO)
    assert pipe.last_run["layout"] == "sequence"
    assert pipe.last_run["whole_weights"] is False  # the CPU's memory is unknown: the weights are gathered per layer
    assert dict(pipe.transformer().mesh.shape) == {"dp": mesh[0], "tp": mesh[1]}
    assert np.abs(frames.numpy() - expected).max() <= 1e-3


def test_the_sampler_nodes_take_the_layout_after_their_other_widgets():
    nodes = pack_module("nodes")
    for node in (nodes.Wan21TPUSampler, nodes.Wan21TPUPipeline):
        optional = list(node.INPUT_TYPES()["optional"])
        assert optional.index("layout") > optional.index("guidance_scale_2")
        choices, options = node.INPUT_TYPES()["optional"]["layout"]
        assert choices == ["auto", "tensor", "sequence"] and options["default"] == "auto"
    assert nodes.step_options(layout="sequence")["layout"] == "sequence"
    assert nodes.step_options(layout="auto")["layout"] is None  # the pipeline's: WAN_TPU_LAYOUT, else auto
