"""The Splash kernel (Pallas interpret mode on CPU) equals plain attention,
sharded or not, alone or inside the tiny Wan transformer, and lowers for TPU."""

import logging

import numpy as np
import pytest
from conftest import pack_module

splash = pack_module("splash_attention")
env_manager = pack_module("env_manager")
pipeline_mod = pack_module("pipeline")
sharding = pack_module("sharding")
loading = pack_module("loading")

FP32_TOLERANCE = 2e-3
SMALL = splash.BlockSizes(block_q=512, block_kv=512, block_kv_compute=128)
LANE = splash.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128)


def _inputs(batch, heads, q_len, kv_len, head_dim, dtype="float32", seed=0, key_offset=2.0):
    """q, k, v [batch, heads, seq, head_dim]; the keys get a common offset, which K-smoothing must undo exactly."""
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, heads, q_len, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, heads, kv_len, head_dim), jnp.float32) + key_offset
    v = jax.random.normal(kv, (batch, heads, kv_len, head_dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


def _max_error(actual, expected):
    return float(np.abs(np.asarray(actual, np.float32) - np.asarray(expected, np.float32)).max())


def _splash_jit(**kwargs):
    import jax

    return jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, **kwargs))


@pytest.fixture
def splash_forced(manager):
    """Splash for every attention call (interpret mode on CPU), restored afterwards."""
    manager.set_attention_backend("splash", splash_min_kv_len=1)
    try:
        yield manager
    finally:
        manager.set_attention_backend(None)


@pytest.fixture
def splash_calls(monkeypatch):
    """Records the (query shape, key shape, mesh shape) of every call the manager sends to Splash."""
    calls = []
    original = splash.splash_attention

    def recording(query, key, value, **kwargs):
        mesh = kwargs.get("mesh")
        calls.append((tuple(query.shape), tuple(key.shape), None if mesh is None else dict(mesh.shape)))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(splash, "splash_attention", recording)
    return calls


# ------------------------------------------------------------------ block sizes
def test_default_block_sizes_are_the_v6e_tuning():
    # Chosen with libtpu's cycle model (benchmarks/tpu_cycles.py): 512-key chunks on v6e, 256 on v5e/v5p.
    assert splash.BlockSizes() == splash.BlockSizes(block_q=3328, block_kv=2560, block_kv_compute=512)
    assert splash.block_sizes_for("TPU v6 lite") == splash.BlockSizes()
    assert splash.block_sizes_for("TPU v5 lite").block_kv_compute == 256
    assert splash.block_sizes_for("TPU v5").block_kv_compute == 256
    assert splash.block_sizes_for("cpu") == splash.BlockSizes()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_kv=384, block_kv_compute=256), "block_kv=384 is not a multiple of block_kv_compute=256"),
        (dict(block_q=100), "block_q=100: block sizes are whole numbers of at least 128"),
        (dict(block_q=200), "block_q=200: block sizes must be multiples of 128"),
        (dict(block_kv_compute=0), "block_kv_compute=0"),
        (dict(block_kv=2816.0), "block_kv=2816.0"),
    ],
)
def test_bad_block_sizes_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        splash.BlockSizes(**kwargs)


@pytest.mark.parametrize(
    "q_len, kv_len, expected",
    [
        (32760, 32760, (3328, 2560, 512)),  # Wan 832x480: 10 query blocks of 3328, 13 key blocks of 2560
        (33390, 33390, (3072, 2560, 512)),  # 848x480: 11 query blocks of 3072 (33,792), not of 3328 (36,608)
        (75600, 75600, (3328, 2560, 512)),  # 1280x720
        (300, 300, (384, 384, 384)),  # the compute chunk clamps to the keys; block_kv stays a multiple of it
        (4680, 130, (2432, 256, 256)),  # two query blocks of 2432 rather than 3328
        (12, 12, (16, 16, 16)),  # tiny: whole sequence, 8-sublane aligned
    ],
)
def test_block_sizes_are_balanced_to_pad_least(q_len, kv_len, expected):
    blocks = splash.effective_block_sizes(splash.BlockSizes(), q_len, kv_len)
    assert tuple(blocks) == expected
    if q_len > 1000:  # at most one alignment step of padding per block
        padded_q = -(-q_len // blocks.block_q) * blocks.block_q
        assert padded_q - q_len < (padded_q // blocks.block_q) * 128


def test_interpret_mode_everywhere_but_tpu():
    assert splash.resolve_interpret(None) is True  # CPU
    with splash.force_interpret(False):
        assert splash.resolve_interpret(None) is False
        assert splash.resolve_interpret(True) is True  # an explicit argument wins
    assert splash.resolve_interpret(None) is True


def test_bad_shapes_are_reported():
    q, k, v = _inputs(1, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="4-D"):
        splash.splash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="batch and heads must match"):
        splash.splash_attention(q, k[:, :1], v[:, :1])


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "batch, heads, q_len, kv_len, head_dim, block_sizes",
    [
        # 3 latent frames x 1560 tokens: 9 full 512-blocks and a ragged 72-token tail, on both axes.
        (1, 2, 4680, 4680, 128, SMALL),
        # q != kv; the last kv block holds 88 real keys, so 3 of its 4 compute chunks are skipped.
        (2, 2, 1000, 600, 128, SMALL),
        (2, 3, 200, 1100, 64, SMALL),
        # The default (v6e) block sizes: 2 x 2 blocks of 2432 x 2560, ragged.
        (1, 1, 4680, 4680, 128, None),
        # The defaults clamped to short sequences; and the tiny model's 12 tokens.
        (2, 2, 300, 300, 128, None),
        (2, 4, 12, 12, 8, None),
    ],
)
def test_matches_reference_attention_fp32(batch, heads, q_len, kv_len, head_dim, block_sizes):
    q, k, v = _inputs(batch, heads, q_len, kv_len, head_dim)
    out = _splash_jit(block_sizes=block_sizes)(q, k, v)
    assert out.shape == (batch, heads, q_len, head_dim) and out.dtype == q.dtype
    assert _max_error(out, splash.reference_attention(q, k, v)) <= FP32_TOLERANCE


def test_explicit_scale():
    q, k, v = _inputs(1, 2, 260, 260, 64)
    out = _splash_jit(block_sizes=LANE, scale=0.3)(q, k, v)
    assert _max_error(out, splash.reference_attention(q, k, v, scale=0.3)) <= FP32_TOLERANCE


def test_matches_reference_attention_bf16():
    import jax
    import jax.numpy as jnp

    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3); the fp32 reference
    # sees the same rounded inputs. The kernel rounds again where XLA's own bf16
    # attention does (the scaled query, the softmax weights fed to the PV matmul, the
    # output) and once more for the smoothed keys, so its error is of the order of
    # XLA's: bound it by twice that. A sharp softmax (queries x3, outputs of order 1,
    # scores up to ~20) is the hard case: measured ~0.024 for us, ~0.015 for XLA.
    q, k, v = _inputs(2, 2, 700, 700, 128, dtype="bfloat16")
    q = q * 3
    expected = splash.reference_attention(q, k, v)
    out = _splash_jit(block_sizes=SMALL)(q, k, v)
    assert out.dtype == q.dtype
    xla = jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), implementation="xla")
    xla_error = _max_error(jnp.swapaxes(xla, 1, 2), expected)
    assert _max_error(out, expected) <= 2 * xla_error
    assert _max_error(out, expected) <= 0.02 * float(jnp.abs(expected).max())


def test_padded_keys_are_masked():
    import jax.numpy as jnp

    # 130 keys in blocks of 128: the second block holds 2 real keys and 126 of padding.
    q, k, v = _inputs(1, 2, 130, 130, 64)
    out = _splash_jit(block_sizes=LANE)(q, k, v)
    expected = splash.reference_attention(q, k, v)
    assert _max_error(out, expected) <= FP32_TOLERANCE
    # What a kernel without the mask computes: the 126 zero (smoothed) keys and zero
    # values join the softmax, and the result is far off.
    pad = ((0, 0), (0, 0), (0, 126), (0, 0))
    smoothed = k - k.mean(axis=2, keepdims=True)
    unmasked = splash.reference_attention(q, jnp.pad(smoothed, pad), jnp.pad(v, pad))
    assert _max_error(unmasked, expected) > 50 * FP32_TOLERANCE


@pytest.mark.parametrize("lengths, min_len, block_sizes", [
    ((300, 217), 200, LANE),  # HunyuanVideo's shape: valid video keys, then each prompt's own text length
    ((131, 527), 0, SMALL),  # a length inside the first chunk, and one at the end; no floor
])
def test_key_lengths_mask_each_rows_invalid_keys(lengths, min_len, block_sizes):
    """Per batch row, only the first kv_lengths[b] keys count; keys past them (garbage, large) get no weight;
    sharded over the mesh too."""
    import jax
    import jax.numpy as jnp

    q, k, v = _inputs(2, 4, 300, max(lengths) + 7, 64)
    garbage = (jnp.arange(k.shape[2]) >= jnp.asarray(lengths)[:, None])[:, None, :, None]
    k, v = jnp.where(garbage, 40.0, k), jnp.where(garbage, 1e4, v)  # would dominate if they counted
    run = jax.jit(lambda q, k, v, n: splash.splash_attention(q, k, v, kv_lengths=n, min_kv_len=min_len,
                                                             block_sizes=block_sizes))
    lengths = jnp.asarray(lengths, jnp.int32)
    expected = splash.reference_attention(q, k, v, kv_lengths=lengths)
    assert _max_error(run(q, k, v, lengths), expected) <= FP32_TOLERANCE
    mesh = env_manager.build_mesh(jax.devices(), dp=2, tp=4)
    sharded = jax.jit(lambda q, k, v, n: splash.splash_attention(q, k, v, kv_lengths=n, min_kv_len=min_len,
                                                                 block_sizes=block_sizes, mesh=mesh))
    assert _max_error(sharded(q, k, v, lengths), expected) <= FP32_TOLERANCE


# ------------------------------------------------------------------ the fixed softmax bound
def _kernel_inputs(q, k, v, blocks):
    """What _attention_local hands the kernel: scaled queries, smoothed keys, heads flattened, padded."""
    import jax.numpy as jnp

    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scaled = q * (splash.LOG2_E / np.sqrt(head_dim))
    smoothed = k - k.mean(axis=2, keepdims=True)
    q_pad = -(-q_len // blocks.block_q) * blocks.block_q
    kv_pad = -(-kv_len // blocks.block_kv) * blocks.block_kv
    flat = lambda x, length: jnp.pad(x.reshape(batch * heads, x.shape[2], x.shape[3]),  # noqa: E731
                                     ((0, 0), (0, length - x.shape[2]), (0, 0)))
    return flat(scaled, q_pad), flat(smoothed, kv_pad), flat(v, kv_pad)


def test_each_query_block_takes_the_fixed_bound_only_where_it_is_safe():
    import jax
    import jax.numpy as jnp

    # Head 0 has ordinary scores (bound ~20 in log2 units): the fixed bound. Head 1's second query
    # block has queries 80x as long (bound ~1,500): exp2(s - ceil(bound) + 88) would flush every weight
    # of those rows to zero, so that block alone runs the online softmax.
    q, k, v = _inputs(1, 2, 700, 700, 128)
    q = q.at[:, 1, 512:].multiply(80.0)
    blocks = splash.effective_block_sizes(SMALL, 700, 700)
    qk, kk, vk = _kernel_inputs(q, k, v, blocks)
    m0, fixed = splash.fixed_bounds(qk, kk, blocks.block_q)
    assert fixed.tolist() == [[1, 1], [1, 0]]
    assert float(m0[1, 0, 600]) == np.float32(splash.MASK_VALUE) and -88 <= float(m0[0, 0, 600]) < 0

    expected = splash.reference_attention(q, k, v)

    def run(paths):
        out = jax.jit(lambda a, b, c: splash.flash_attention(
            a, b, c, kv_len=700, blocks=blocks, interpret=True, paths=paths))(qk, kk, vk)
        return jnp.swapaxes(out[:, :, :700], 1, 2).reshape(1, 2, 700, 128)

    assert _max_error(run(splash.KERNEL_PATHS), expected) <= FP32_TOLERANCE
    assert _max_error(run(("online",)), expected) <= FP32_TOLERANCE
    # The gate is what keeps it exact: the fixed bound forced on the long queries loses them.
    forced = np.asarray(run(("fixed",)))
    assert _max_error(forced[:, 0], expected[:, 0]) <= FP32_TOLERANCE
    assert not np.allclose(forced[:, 1, 512:], np.asarray(expected)[:, 1, 512:], atol=0.1)
    with pytest.raises(ValueError, match="paths=.*give"):
        splash.flash_attention(qk, kk, vk, kv_len=700, blocks=blocks, interpret=True, paths=("fast",))


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize(
    "query_shape, key_shape, mesh_shape, batch_axes, head_axes, seq_axes",
    [
        ((2, 40, 32760, 128), (2, 40, 32760, 128), {"dp": 2, "tp": 4}, ("dp",), ("tp",), ()),
        ((1, 40, 32760, 128), (1, 40, 32760, 128), {"dp": 2, "tp": 4}, (), ("dp", "tp"), ()),
        ((3, 40, 32760, 128), (3, 40, 32760, 128), {"dp": 2, "tp": 4}, (), ("dp", "tp"), ()),
        # Cross-attention: 512 keys, the queries are split.
        ((2, 40, 32760, 128), (2, 40, 512, 128), {"dp": 2, "tp": 4}, ("dp",), (), ("tp",)),
        ((1, 40, 32760, 128), (1, 40, 512, 128), {"dp": 2, "tp": 4}, (), (), ("dp", "tp")),
        # Wan 1.3B's 12 heads: the largest dividing axes take the heads, the rest the queries.
        ((2, 12, 32760, 128), (2, 12, 32760, 128), {"dp": 1, "tp": 8}, (), (), ("tp",)),
        ((1, 12, 32760, 128), (1, 12, 32760, 128), {"dp": 2, "tp": 4}, (), ("tp",), ("dp",)),
        ((2, 12, 32760, 128), (2, 12, 32760, 128), {"dp": 2, "tp": 8}, ("dp",), (), ("tp",)),
        ((1, 12, 32760, 128), (1, 12, 32760, 128), {"dp": 2, "tp": 8}, (), ("dp",), ("tp",)),
    ],
)
def test_sharding_plan(query_shape, key_shape, mesh_shape, batch_axes, head_axes, seq_axes):
    plan = splash.plan_sharding(query_shape, key_shape, mesh_shape)
    assert (plan.batch_axes, plan.head_axes, plan.seq_axes) == (batch_axes, head_axes, seq_axes)
    assert plan.fallback == (key_shape[2] >= query_shape[2] and bool(seq_axes))  # logged as a warning
    # Every device does a distinct share: the used axes are the whole mesh (size-1 axes aside).
    used = plan.batch_axes + plan.head_axes + plan.seq_axes
    assert sorted(used) == sorted(a for a, n in mesh_shape.items() if n > 1)


def test_sharding_plan_rejects_other_meshes():
    with pytest.raises(ValueError, match=r"mesh axes \('data', 'model'\).*build_mesh"):
        splash.plan_sharding((1, 4, 64, 8), (1, 4, 64, 8), {"data": 2, "model": 4})


def _sharded_equals_unsharded(mesh, q, k, v, block_sizes=LANE):
    """Splash sharded on ``mesh`` inside a jit whose inputs are sharded on head_dim (forcing a
    reshard), against Splash on one device and against the reference."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, None, None, "tp"))) for x in (q, k, v)]
    sharded = _splash_jit(mesh=mesh, block_sizes=block_sizes)(*placed)
    single = _splash_jit(block_sizes=block_sizes)(q, k, v)
    assert sharded.shape == single.shape
    assert _max_error(sharded, single) <= 1e-5
    assert _max_error(sharded, splash.reference_attention(q, k, v)) <= FP32_TOLERANCE
    return sharded


@pytest.mark.parametrize("batch", [1, 2])
def test_sharded_equals_unsharded_on_the_2x4_mesh(batch):
    import jax

    mesh = env_manager.build_mesh(jax.devices())
    assert dict(mesh.shape) == {"dp": 2, "tp": 4}
    q, k, v = _inputs(batch, 8, 300, 300, 64)
    out = _sharded_equals_unsharded(mesh, q, k, v)
    expected_spec = ("dp", "tp") if batch == 2 else (None, ("dp", "tp"))
    assert tuple(out.sharding.spec)[: len(expected_spec)] == expected_spec


@pytest.mark.parametrize("batch, dp", [(2, 1), (1, 2)])
def test_twelve_heads_fall_back_and_say_so(batch, dp, caplog):
    import jax

    mesh = env_manager.build_mesh(jax.devices(), dp=dp)
    q, k, v = _inputs(batch, 12, 200, 200, 64)
    splash.logged_plans.clear()
    with caplog.at_level(logging.INFO, logger="wan_tpu"):
        _sharded_equals_unsharded(mesh, q, k, v)
        _sharded_equals_unsharded(mesh, q, k, v)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not per call
    assert "12 heads do not divide" in warnings[0] and "query sequence over the rest" in warnings[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_cross_attention_splits_the_queries(batch):
    import jax

    mesh = env_manager.build_mesh(jax.devices())
    # 1001 queries do not divide over 8 (or 4) devices: padded, then sliced off.
    q, k, v = _inputs(batch, 4, 1001, 512, 64)
    _sharded_equals_unsharded(mesh, q, k, v, block_sizes=SMALL)


@pytest.mark.parametrize("batch, heads, q_len, kv_len", [(1, 12, 200, 200), (2, 4, 1001, 512)])
def test_mesh_with_explicit_axes(batch, heads, q_len, kv_len):
    import jax
    from jax.sharding import AxisType

    # jax.make_mesh's default: arrays carry their sharding in their type, and shard_map
    # wants its inputs to match in_specs exactly.
    mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    q, k, v = _inputs(batch, heads, q_len, kv_len, 64)
    _sharded_equals_unsharded(mesh, q, k, v)


# ------------------------------------------------------------------ the tiny Wan transformer
def test_tiny_transformer_on_splash_equals_xla_attention(manager, tiny_model_dir, splash_calls):
    import jax
    from test_core_parity import transformer_forward_on_mesh

    mesh = env_manager.build_mesh(jax.devices())
    manager.set_attention_backend("xla")
    try:
        xla, pytorch, _, _ = transformer_forward_on_mesh(manager, tiny_model_dir, mesh)
        assert not splash_calls
        # Every attention (self: 12 tokens, cross: 512 text tokens) on Splash, interpret mode.
        manager.set_attention_backend("splash", splash_min_kv_len=1)
        ours, _, _, _ = transformer_forward_on_mesh(manager, tiny_model_dir, mesh)
    finally:
        manager.set_attention_backend(None)
    assert len(splash_calls) == 4  # 2 blocks x (self, cross), traced once
    assert {call[2]["tp"] for call in splash_calls} == {4}
    scale = np.abs(xla).max()
    assert np.abs(ours - xla).max() <= 1e-4 * scale
    assert np.abs(ours - pytorch).max() <= 1e-4 * scale


# ------------------------------------------------------------------ TPU lowering
def _exported_text(fn, *args):
    import jax

    with splash.force_interpret(False):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    return exported.mlir_module()


def test_sharded_kernel_lowers_for_tpu_at_wan_14b_480p():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = env_manager.build_mesh(jax.devices())
    # Batch 2 (the CFG pair), 40 heads, 21 x 30 x 52 latent tokens, head_dim 128: nothing is allocated.
    layout = NamedSharding(mesh, PartitionSpec("dp", "tp"))
    shape = jax.ShapeDtypeStruct((2, 40, 32760, 128), jnp.bfloat16, sharding=layout)
    text = _exported_text(
        lambda q, k, v: splash.splash_attention(q, k, v, mesh=mesh, interpret=False), shape, shape, shape
    )
    assert text.count("tpu_custom_call") == 1
    # Each device runs the kernel on its batch element and 10 heads, padded to whole blocks
    # (32760 -> 10 x 3328 queries, 13 x 2560 keys).
    assert "tensor<10x33280x128xbf16>" in text


def test_tiny_transformer_step_lowers_for_tpu_with_splash(splash_forced, tiny_model_dir, splash_calls):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    manager = splash_forced
    mesh = env_manager.build_mesh(jax.devices())
    with manager.loading():
        module = loading.load_transformer(loading.resolve_model_source(tiny_model_dir), "fp32")
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, sharding.TRANSFORMER_RULES,
                                   dict(mesh.shape))
    named = sharding.to_named_shardings(plan, mesh)
    weights = {
        name: jax.ShapeDtypeStruct(tuple(t.shape), jnp.dtype(str(t.dtype).removeprefix("torch.")),
                                   sharding=named[name])
        for name, t in state.items()
    }
    batch = NamedSharding(mesh, PartitionSpec("dp"))
    hidden = jax.ShapeDtypeStruct((2, 16, 2, 4, 6), jnp.float32, sharding=batch)  # the CFG pair's latents
    timestep = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=batch)
    context = jax.ShapeDtypeStruct((2, 512, 32), jnp.float32, sharding=batch)

    def step(weights, hidden, timestep, context):
        return pack_module("runtime.torch_bridge").call_transformer(manager, module, weights, mesh, hidden, timestep, context)

    text = _exported_text(step, weights, hidden, timestep, context)
    assert len(splash_calls) == 4
    assert text.count("tpu_custom_call") == 4
