"""The one attention dispatch: its choices, overrides and the chunked XLA path."""

import numpy as np
import pytest
from conftest import pack_module

env_manager = pack_module("env_manager")
attention = pack_module("runtime.attention")
splash = pack_module("splash_attention")


@pytest.fixture
def manager(manager):
    yield manager
    manager.set_attention_backend(None)


def test_query_chunked_attention_equals_the_reference(monkeypatch):
    import jax

    monkeypatch.setattr(attention, "XLA_SCORE_BLOCK_BYTES", 2 * 3 * 600 * 4 * 64)  # 64-row chunks, ragged tail
    rng = np.random.default_rng(0)
    query, key, value = (rng.standard_normal((2, 3, n, 16)).astype(np.float32) for n in (1000, 600, 600))
    ours = jax.jit(lambda q, k, v: attention.query_chunked_attention(q, k, v, scale=0.3))(query, key, value)
    expected = splash.reference_attention(query, key, value, scale=0.3)
    assert ours.shape == (2, 3, 1000, 16)
    assert np.abs(np.asarray(ours) - np.asarray(expected)).max() < 1e-5


def test_long_xla_attention_goes_through_query_chunks(manager, monkeypatch):
    calls = []
    original = attention.query_chunked_attention
    monkeypatch.setattr(attention, "query_chunked_attention", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    long = np.zeros((2, 4, 4096, 8), np.float32)  # 2*4*4096*4096*4 bytes of scores: 512 MiB
    short = np.zeros((2, 4, 64, 8), np.float32)
    manager.attention(long, long, long)
    manager.attention(short, short, short)
    assert calls == [(2, 4, 4096, 8)]
    # A CPU measure: a program traced for TPU keeps XLA's own attention (the VAE's mid-block, for one).
    with manager.target_platform("tpu"):
        manager.jax.eval_shape(lambda q: manager.attention(q, q, q), long)
    assert calls == [(2, 4, 4096, 8)]


def test_choices_and_overrides(manager, monkeypatch):
    q, short_kv, long_kv = (1, 2, 20_000, 8), (1, 2, 512, 8), (1, 2, 20_000, 8)
    assert manager.platform == "cpu"
    assert manager.choose_attention(q, long_kv) == "xla"  # CPU: never Splash unless forced
    manager.set_attention_backend("splash", splash_min_kv_len=1000)
    assert manager.choose_attention(q, long_kv) == "splash"
    assert manager.choose_attention(q, short_kv) == "xla"  # cross-attention stays on XLA
    assert manager.choose_attention(q, long_kv, planned=False) == "xla"  # e.g. the VAE's mid-block attention
    manager.set_attention_backend(None)
    monkeypatch.setenv("WAN_TPU_ATTENTION", "splash")
    monkeypatch.setenv("WAN_TPU_SPLASH_MIN_KV_LEN", "600")
    assert manager.choose_attention(q, long_kv) == "splash"
    monkeypatch.setenv("WAN_TPU_ATTENTION", "flash")
    with pytest.raises(ValueError, match="WAN_TPU_ATTENTION='flash' is unknown"):
        manager.choose_attention(q, long_kv)
    with pytest.raises(ValueError, match="attention backend 'fast' is unknown"):
        manager.set_attention_backend("fast")


def test_only_attention_traced_under_the_transformer_mesh_reaches_splash(manager, monkeypatch):
    """On TPU, long attention outside ``active_mesh`` (the VAE's) must stay on XLA: a Mosaic
    kernel with no shard_map cannot be partitioned by XLA:TPU."""
    import jax

    monkeypatch.setattr(type(manager), "platform", property(lambda self: "tpu"))
    manager.set_attention_backend("auto", splash_min_kv_len=64)
    calls = []
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **k: calls.append(k["mesh"]) or a[0])
    x = np.zeros((1, 1, 128, 8), np.float32)
    manager.attention(x, x, x)
    assert calls == []
    mesh = env_manager.build_mesh(jax.devices()[:1])
    with manager.active_mesh(mesh):
        manager.attention(x, x, x)
    assert calls == [mesh]
