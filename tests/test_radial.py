"""Radial attention: its mask is the paper's rule cell by cell, and the kernel's block-sparse path
(Pallas interpret mode on CPU) equals softmax under that mask; with a whole mask it is the dense kernel."""

import math

import numpy as np
import pytest
from conftest import pack_module

radial = pack_module("models.wan.radial")
splash = pack_module("splash_attention")

FP32_TOLERANCE = 2e-3  # tests/test_splash_attention.py's bound for fp32 inputs


def paper_rule(query_frame, query_spatial, key_frame, key_spatial, tokens_per_frame, decay_factor, min_window):
    """One (query, key) cell of Radial attention, as the paper and its reference code state it."""
    distance = abs(query_frame - key_frame)
    if key_frame == 0 or distance <= 1:  # the first frame is a sink; neighbouring frames are dense
        return True
    band = distance.bit_length()  # distances in [2^(band-1), 2^band)
    undecayed = 2 ** tokens_per_frame.bit_length() / 2**band  # halves each time the distance doubles
    if undecayed < min_window and distance % int(min_window / undecayed) != 0:
        return False  # temporal subsampling once the band would be thinner than min_window
    return abs(query_spatial - key_spatial) <= max(undecayed * decay_factor, min_window)


def cell_by_cell(pattern):
    per_frame = pattern.tokens_per_frame
    n = pattern.num_tokens
    return np.array([[paper_rule(q // per_frame, q % per_frame, k // per_frame, k % per_frame, per_frame,
                                 pattern.decay_factor, pattern.min_window) for k in range(n)] for q in range(n)])


def tiles(mask, block_q, block_kv, reduce):
    n = mask.shape[0]
    return np.array([[reduce(mask[i:i + block_q, j:j + block_kv]) for j in range(0, n, block_kv)]
                     for i in range(0, n, block_q)])


# 18 frames of 24 tokens with a thin band (min_window 2): distances 2-3 keep |dl| <= 4, 4-7 <= 2, 8-15 <= 2,
# 16-17 every second frame only. 9 frames of 15 (odd): strides of 3 where the window would be 1.
PATTERNS = [radial.RadialPattern(18, 24, decay_factor=0.5, min_window=2),
            radial.RadialPattern(9, 15, decay_factor=1.0, min_window=3)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_token_mask_is_the_papers_rule_cell_by_cell(pattern):
    expected = cell_by_cell(pattern)
    assert np.array_equal(radial.token_mask(pattern), expected)
    assert 0.2 < expected.mean() < 0.8  # neither rule is trivial at these shapes
    assert math.isclose(radial.token_share(pattern), expected.mean())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("block_q, block_kv", [(8, 8), (16, 40), (24, 24), (56, 8), (72, 100)])
def test_block_mask_is_the_tiles_of_the_token_mask(pattern, block_q, block_kv):
    expected = cell_by_cell(pattern)
    mask = radial.block_mask(pattern, block_q, block_kv)
    assert np.array_equal(mask.active, tiles(expected, block_q, block_kv, np.any))
    assert np.array_equal(mask.full, tiles(expected, block_q, block_kv, np.all))
    lists = mask.kv_blocks()
    assert len(lists) == mask.active.shape[0]
    assert all(np.array_equal(np.flatnonzero(row), ids) for row, ids in zip(mask.active, lists))


def reference_code_window(query_frame, key_frame, tokens_per_frame, decay_factor):
    """mit-han-lab/radial-attention's radial_attn/attn_mask.py for Wan, per frame pair: its window
    (get_window_width, threshold = its block size 128) where its split mask (get_diagonal_split_mask,
    threshold hard-coded 128) keeps the pair, the sink frame 0 whole. Restated, not copied."""
    if key_frame == 0:
        return float(tokens_per_frame)
    distance = abs(query_frame - key_frame)
    group = distance.bit_length()
    undecayed = 2 ** tokens_per_frame.bit_length() / 2**group
    if undecayed < 128 and distance % int(128 / undecayed) != 0:
        return None
    if distance <= 1:
        return float(tokens_per_frame)
    return max(undecayed * decay_factor, 128)


@pytest.mark.parametrize("height, width, num_frames", [(720, 1280, 81), (480, 832, 81), (480, 848, 121)])
@pytest.mark.parametrize("decay_factor", [radial.DECAY_FACTOR, 1.0])
def test_windows_at_wans_shapes_are_the_reference_codes(height, width, num_frames, decay_factor):
    pattern = radial.RadialPattern.for_video(height, width, num_frames, decay_factor=decay_factor)
    per_frame = pattern.tokens_per_frame
    for i in range(pattern.num_frames):
        for j in range(pattern.num_frames):
            theirs = reference_code_window(i, j, per_frame, decay_factor)
            # |dl| <= a float window is |dl| <= its floor; no distance in a frame reaches its size.
            expected = radial.NO_KEYS if theirs is None else min(math.floor(theirs), per_frame)
            assert int(pattern.windows[i, j]) == expected
    assert len(np.unique(pattern.windows)) >= 3  # whole frames and at least two band widths


def test_masks_are_cached_per_video_shape_and_read_only():
    pattern = radial.RadialPattern.for_video(480, 832, 81)
    assert (pattern.num_frames, pattern.tokens_per_frame) == (21, 1560)  # 21 x 30 x 52 tokens
    assert radial.block_mask(pattern, 512, 512) is radial.block_mask(radial.RadialPattern(21, 1560), 512, 512)
    with pytest.raises(ValueError):
        radial.block_mask(pattern, 512, 512).active[0, 0] = False


def test_wan_720p_active_share_follows_the_block_size():
    # 1280x720, 81 frames: 21 x 45 x 80 tokens. Issue 25's research estimate: 0.30 at 128, 0.49 at 512, 1 at 2048.
    pattern = radial.RadialPattern.for_video(720, 1280, 81)
    shares = {block: radial.active_share(pattern, block, block) for block in (128, 512, 2048)}
    assert shares == pytest.approx({128: 0.30, 512: 0.49, 2048: 1.0}, abs=0.01)
    assert radial.token_share(pattern) < shares[128]


def test_dense_steps_and_blocks_follow_the_reference_defaults():
    assert radial.uses_dense(radial.DENSE_STEPS - 1, 20) and radial.uses_dense(30, 0)
    assert not radial.uses_dense(radial.DENSE_STEPS, radial.DENSE_BLOCKS)


# ------------------------------------------------------------------ the kernel's block-sparse path
def _inputs(heads, n, head_dim, seed=0, dtype="float32"):
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (1, heads, n, head_dim), jnp.float32)
    k = jax.random.normal(kk, (1, heads, n, head_dim), jnp.float32) + 2.0  # K-smoothing must undo the offset
    v = jax.random.normal(kv, (1, heads, n, head_dim), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


def masked_reference(q, k, v, mask):
    """Plain fp32 softmax(Q K^T / sqrt(d)) V with the token mask (keys outside it get no weight)."""
    import jax
    import jax.numpy as jnp

    highest = jax.lax.Precision.HIGHEST
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=highest) / math.sqrt(q.shape[-1])
    scores = jnp.where(jnp.asarray(mask)[None, None], scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v, precision=highest)


def _max_error(actual, expected):
    return float(np.abs(np.asarray(actual, np.float32) - np.asarray(expected, np.float32)).max())


@pytest.mark.parametrize("pattern, blocks, heads, head_dim", [
    # 5 frames of 500 with thin bands (12 at distances 2-4): blocks straddle frames, the last of each
    # axis is ragged (2500 -> 2560 queries and keys), two compute chunks per key block; 91% of tiles visited.
    (radial.RadialPattern(5, 500, decay_factor=0.1, min_window=8), splash.BlockSizes(128, 256, 128), 2, 64),
    # 480P's frame of 30 x 52 tokens, 3 frames, the reference's defaults: a band of 128 at distance 2.
    (radial.RadialPattern.for_video(480, 832, 9), splash.BlockSizes(512, 512, 256), 1, 128),
    # 9 frames of 320, distances 5 and 7 dropped: banded key blocks in one frame whose query block
    # straddles a frame pair with no keys on one side.
    (radial.RadialPattern(9, 320, decay_factor=0.5, min_window=128), splash.BlockSizes(256, 128, 128), 1, 64),
], ids=["odd", "480p-slice", "no-keys"])
def test_sparse_kernel_equals_masked_softmax(pattern, blocks, heads, head_dim):
    import jax

    mask = radial.token_mask(pattern)
    effective = splash.effective_block_sizes(blocks, pattern.num_tokens, pattern.num_tokens)
    layout = splash.sparse_layout(pattern, effective.block_q, effective.block_kv)
    tiles_active = radial.block_mask(pattern, effective.block_q, effective.block_kv).active
    assert not layout.whole and layout.steps.size == tiles_active.sum() < tiles_active.size  # tiles skipped
    q, k, v = _inputs(heads, pattern.num_tokens, head_dim)
    if heads > 1:  # head 1's bound (~500) is past the fixed gate: the online softmax under the mask too
        q = q.at[:, 1].multiply(40.0)
        scaled, smoothed = q[0] * (splash.LOG2_E / math.sqrt(head_dim)), k[0] - k[0].mean(axis=1, keepdims=True)
        _, fixed = splash.fixed_bounds(scaled, smoothed, pattern.num_tokens, gate=splash.SPARSE_FIXED_BOUND_GATE)
        assert np.array_equal(np.asarray(fixed), [[1], [0]])
    out = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, block_sizes=blocks, sparsity=pattern))(q, k, v)
    expected = masked_reference(q, k, v, mask)
    assert out.shape == q.shape
    assert _max_error(out, expected) <= FP32_TOLERANCE
    # The mask matters: dense attention is far from it.
    assert _max_error(splash.reference_attention(q, k, v), expected) > 20 * FP32_TOLERANCE


def test_layout_visits_each_active_tile_once_in_order():
    # 1280x720, 81 frames, blocks of 512: the kernel's grid is the active tiles, no more.
    pattern = radial.RadialPattern.for_video(720, 1280, 81)
    layout = splash.sparse_layout(pattern, 512, 512)
    mask = radial.block_mask(pattern, 512, 512)
    q_block, kv_block = layout.steps & 0xFFF, (layout.steps >> 12) & 0xFFF
    first, last, partial = ((layout.steps >> bit) & 1 for bit in (24, 25, 26))
    assert np.array_equal(np.stack([q_block, kv_block]), np.stack(np.nonzero(mask.active)))
    assert layout.active_share == pytest.approx(0.485, abs=0.005)
    assert first.sum() == last.sum() == mask.active.shape[0]  # one start and one finish per query block
    assert np.array_equal(partial == 1, ~mask.full[q_block, kv_block])
    # 480P's frames hold 1560 tokens: 2560-key blocks would span three of them.
    with pytest.raises(ValueError, match="1560 tokens"):
        splash.sparse_layout(radial.RadialPattern.for_video(480, 832, 81), 1536, 2560)


class WholeMask:
    """Every pair attended, as a sparsity object: the sparse kernel must then be the dense one."""

    def __init__(self, num_frames, tokens_per_frame):
        self.num_frames, self.tokens_per_frame = num_frames, tokens_per_frame
        self.num_tokens = num_frames * tokens_per_frame
        self.windows = np.full((num_frames, num_frames), tokens_per_frame, np.int32)

    def block_mask(self, block_q, block_kv):
        shape = (-(-self.num_tokens // block_q), -(-self.num_tokens // block_kv))
        return np.ones(shape, bool), np.ones(shape, bool)


def test_whole_mask_sparse_kernel_is_the_dense_kernel():
    import jax

    mask = WholeMask(2, 150)  # 300 tokens: 3 x 3 blocks of 128, the last ragged
    blocks = splash.effective_block_sizes(splash.BlockSizes(128, 128, 128), 300, 300)
    layout = splash.sparse_layout(mask, blocks.block_q, blocks.block_kv)
    assert layout.whole and layout.steps.size == 9
    q, k, v = (x[0] for x in _inputs(2, 384, 64, seed=1))
    q = q.at[1].multiply(40.0)  # head 1's bound (~500) is past the fixed gate: it runs the online softmax
    k = k - k[:, :300].mean(axis=1, keepdims=True)
    k = k.at[:, 300:].set(0.0)
    v = v.at[:, 300:].set(0.0)
    common = dict(kv_len=300, blocks=blocks, interpret=True)
    assert np.array_equal(np.asarray(splash.fixed_bounds(q, k, blocks.block_q)[1]), [[1] * 3, [0] * 3])
    dense = jax.jit(lambda q, k, v: splash.flash_attention(q, k, v, **common))(q, k, v)
    sparse = jax.jit(lambda q, k, v: splash.sparse_flash_attention(q, k, v, layout=layout, **common))(q, k, v)
    assert np.array_equal(np.asarray(sparse), np.asarray(dense))
    # The element mask (compiled alone for the cycle model) keeps every pair of a whole mask: same numbers.
    masked = jax.jit(lambda q, k, v: splash.sparse_flash_attention(q, k, v, layout=layout, tiles=("partial",),
                                                                   **common))(q, k, v)
    assert np.array_equal(np.asarray(masked), np.asarray(dense))
    assert not np.any(np.isnan(np.asarray(dense)[:, :, :300]))


def test_splash_attention_routes_a_whole_mask_to_the_dense_kernel(monkeypatch):
    import jax

    calls = []
    for name in ("flash_attention", "sparse_flash_attention"):
        original = getattr(splash, name)
        monkeypatch.setattr(splash, name, lambda *a, _name=name, _fn=original, **k: calls.append(_name) or _fn(*a, **k))
    q = jax.ShapeDtypeStruct((1, 2, 900, 64), "float32")
    blocks = splash.BlockSizes(256, 256, 128)
    jax.eval_shape(lambda q: splash.splash_attention(q, q, q, block_sizes=blocks, sparsity=WholeMask(3, 300)), q)
    assert calls == ["flash_attention"]
    pattern = radial.RadialPattern(3, 300, decay_factor=0.1, min_window=8)  # distance 2: a band of 12
    q = jax.ShapeDtypeStruct((1, 2, pattern.num_tokens, 64), "float32")
    jax.eval_shape(lambda q: splash.splash_attention(q, q, q, block_sizes=blocks, sparsity=pattern), q)
    assert calls == ["flash_attention", "sparse_flash_attention"]


def test_sparse_mask_is_refused_where_it_cannot_hold():
    q, k, v = _inputs(1, 1000, 64)
    with pytest.raises(ValueError, match="1000 tokens"):
        splash.splash_attention(q[:, :, :999], k, v, sparsity=radial.RadialPattern(5, 200))
    with pytest.raises(ValueError, match="kv_lengths"):
        splash.splash_attention(q, k, v, sparsity=radial.RadialPattern(5, 200), kv_lengths=np.array([1000]))


# ------------------------------------------------------------------ the frame-banded path
@pytest.mark.parametrize("pattern, frame_blocks, heads, head_dim", [
    # 5 frames of 200, bands of 8-20: slices clipped at both frame ends, two query blocks per padded frame
    # (256), a frame (2) with a single band; head 1 past the fixed gate (the online softmax).
    # Key rows per grid step capped at 320: a block's 6 chunks take 3 steps (the softmax carried across).
    (radial.RadialPattern(5, 200, decay_factor=0.1, min_window=8), splash.FrameBlocks(128, 128, 40, 32, 1024, 320),
     2, 64),
    # 9 frames of 320, distances 5 and 7 dropped (no keys): slots of unequal windows.
    (radial.RadialPattern(9, 320, decay_factor=0.5, min_window=128), splash.FrameBlocks(128, 256, 160, 64, 256), 1, 64),
    # 480P's frame of 30 x 52 tokens, 4 frames at the reference's defaults: frame 2 has no band at all.
    (radial.RadialPattern.for_video(480, 832, 13), splash.FrameBlocks(256, 2048, 520), 1, 128),
], ids=["odd", "no-keys", "480p-slice"])
def test_frame_path_equals_masked_softmax(pattern, frame_blocks, heads, head_dim):
    import jax

    assert splash.frame_path_refusal(pattern, frame_blocks) is None
    q, k, v = _inputs(heads, pattern.num_tokens, head_dim)
    if heads > 1:
        q = q.at[:, 1].multiply(40.0)
    out = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, block_sizes=frame_blocks, sparsity=pattern))(q, k, v)
    expected = masked_reference(q, k, v, radial.token_mask(pattern))
    assert out.shape == q.shape
    assert _max_error(out, expected) <= FP32_TOLERANCE
    assert _max_error(splash.reference_attention(q, k, v), expected) > 20 * FP32_TOLERANCE


@pytest.mark.parametrize("height, width, band_q", [(720, 1280, 128), (720, 1280, 256), (480, 832, 128)])
def test_frame_plan_covers_every_band_at_wans_shapes(height, width, band_q):
    # Host side at the real shapes (81 frames): a band block's lanes carry their query frame's windows, and
    # its key chunks hold every key any of its queries attends.
    pattern = radial.RadialPattern.for_video(height, width, 81)
    plan = splash.frame_plan(pattern, splash.FrameBlocks(band_q, 4096, 512))
    per_frame, frames, windows = pattern.tokens_per_frame, pattern.num_frames, pattern.windows
    band = (windows >= 0) & (windows < per_frame)
    assert np.array_equal(plan.band_counts, band.sum(axis=1))
    group, lanes = plan.band_group, plan.band_group * band_q
    assert lanes <= splash.FrameBlocks().band_lanes and plan.band_frames % group == 0
    assert 0 <= plan.band_frames - frames < group
    table = plan.band_windows  # [groups, key frames, lanes]
    assert table.shape == (plan.band_frames // group, frames, lanes)
    for lane_group in range(table.shape[0]):
        for lane in range(0, lanes, band_q):
            query_frame = lane_group * group + lane // band_q
            expected = (np.where(band[query_frame], windows[query_frame], -1) if query_frame < frames
                        else np.full(frames, -1))
            assert np.all(table[lane_group, :, lane:lane + band_q] == expected[:, None])
    widest = windows[band].max()
    fetched = plan.band_steps * plan.band_chunks_per_step * plan.band_chunk  # spatial positions per block
    assert plan.band_front == widest and plan.band_spatial >= plan.band_front + per_frame
    for block in range(plan.band_blocks):
        first = block * band_q - plan.band_front  # the block's first fetched key, spatial
        assert first <= block * band_q - widest
        assert first + fetched - 1 >= min(block * band_q + band_q, per_frame) - 1 + widest
        assert block * band_q + fetched <= plan.band_spatial
    assert plan.band_blocks * band_q >= per_frame > (plan.band_blocks - 1) * band_q
    # Whole frame pairs: each query block visits exactly its frame's whole key frames.
    steps = plan.whole_layout.steps
    q_ids, kv_ids = steps & 0xFFF, (steps >> 12) & 0xFFF  # the packing test_layout_visits_... reads
    per_block = plan.whole_pad // plan.whole_q
    assert np.array_equal(np.bincount(q_ids // per_block, minlength=frames) // per_block,
                          (windows >= per_frame).sum(axis=1))
    assert np.all(windows[q_ids // per_block, kv_ids] >= per_frame)


def test_spatial_major_layouts_place_every_token():
    # Keys: row (g * frames + f) * chunk + r holds frame f's spatial g * chunk + r - front (zeros outside
    # the frame). Queries: block (a, group) holds spatial [a, a + band_q) of the group's frames, and the
    # outputs' inverse puts every query back in frame order.
    import jax.numpy as jnp

    pattern = radial.RadialPattern(5, 200, decay_factor=0.1, min_window=8)
    plan = splash.frame_plan(pattern, splash.FrameBlocks(128, 128, 40, 32, 256))
    frames, per_frame = pattern.num_frames, pattern.tokens_per_frame
    token = np.arange(frames * per_frame)
    ids = jnp.asarray((1 + token)[None, :, None].astype(np.float32))  # [1, n, 1]: token id + 1, 0 is padding
    keys = np.asarray(splash.spatial_major_keys(ids, frames, per_frame, plan))[0, :, 0]
    chunk = plan.band_chunk
    for row in range(keys.size):
        g, f, r = row // (frames * chunk), (row // chunk) % frames, row % chunk
        spatial = g * chunk + r - plan.band_front
        assert keys[row] == (1 + f * per_frame + spatial if 0 <= spatial < per_frame else 0)
    queries = np.asarray(splash.spatial_major_queries(ids, frames, per_frame, plan))[0, :, 0]
    band_q, group = plan.band_q, plan.band_group
    assert queries.size == plan.band_blocks * plan.band_frames * band_q
    for row in range(queries.size):
        a, f, r = row // (plan.band_frames * band_q), (row // band_q) % plan.band_frames, row % band_q
        spatial = a * band_q + r
        assert queries[row] == (1 + f * per_frame + spatial if f < frames and spatial < per_frame else 0)
    back = splash._frame_major_outputs(jnp.swapaxes(jnp.asarray(queries[None, :, None]), 1, 2), frames, per_frame, plan)
    assert np.array_equal(np.asarray(back)[0, 0], 1 + token)
    assert group == 2 and plan.band_frames == 6  # 256 lanes: two frames a block, one padding frame


def test_frame_path_is_refused_where_a_frame_is_not_whole_rows():
    pattern = radial.RadialPattern.for_video(480, 848, 81)  # 30 x 53 = 1590 tokens a frame
    assert "1590" in splash.frame_path_refusal(pattern)
    with pytest.raises(ValueError, match="1590"):
        splash.frame_plan(pattern)


def test_the_frame_banded_path_is_chosen_where_it_runs():
    # The pipeline's choice (runtime/attention.sparse_block_sizes): FrameBlocks at both 14B shapes; the
    # tile path where a frame is not whole rows of 8 (848x480); none where a frame is under one lane.
    attention = pack_module("runtime.attention")
    chip = splash.block_sizes_for("TPU v6 lite")
    for height, width in ((720, 1280), (480, 832)):
        pattern = radial.RadialPattern.for_video(height, width, 81)
        assert attention.sparse_block_sizes(splash, pattern, chip) == splash.FrameBlocks()
    tiles = attention.sparse_block_sizes(splash, radial.RadialPattern.for_video(480, 848, 81), chip)
    assert isinstance(tiles, splash.BlockSizes) and tiles.block_q == tiles.block_kv == 1024
    assert attention.sparse_block_sizes(splash, radial.RadialPattern(4, 100), chip) is None
