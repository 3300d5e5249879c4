"""Time the Splash kernel against jax.nn.dot_product_attention at Wan's attention shapes.

    python benchmarks/bench_attention.py                  # small shapes off TPU, Wan shapes on TPU
    python benchmarks/bench_attention.py --shapes wan --runs 10
    python benchmarks/bench_attention.py --mesh 2x4       # shard both over a (dp, tp) mesh

Both sides run in the same process on the same inputs, each jitted, warmed up
(compilation excluded) and timed with time.perf_counter around
block_until_ready; the median of --runs is printed, with the ratio
ours/peer (below 1: Splash is faster) and the largest difference between
the two outputs. The peer gets its native [batch, seq, heads, head_dim]
layout; our time includes everything splash_attention does (K-smoothing,
query scaling, padding, the output transpose).

Off TPU the kernel runs in Pallas interpret mode: those timings say nothing
about the kernel's speed, only that the script works. Wan shapes unsharded
need the peer's full [heads, seq, seq] score matrix (about 100 GB at 480P for
the 1.3B model); a side that fails (e.g. out of memory) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, batch, heads, q_len, kv_len, head_dim). Batch 2 is the CFG pair; 480P is
# 21 latent frames x 30 x 52 patches = 32760 tokens, 720P 21 x 45 x 80 = 75600.
WAN_SHAPES = [
    ("Wan 1.3B 480P", 2, 12, 32760, 32760, 128),
    ("Wan 14B 480P", 2, 40, 32760, 32760, 128),
    ("Wan 14B 720P", 2, 40, 75600, 75600, 128),
]
# Interpret mode is slow: a few seconds per shape on a 2-core CPU.
SMALL_SHAPES = [
    ("1 latent frame", 1, 2, 1560, 1560, 128),
    ("2 frames, batch 2", 2, 2, 3120, 3120, 128),
    ("cross-attention", 1, 2, 1560, 512, 128),
]


def load_splash():
    """splash_attention.py by file path (it imports only jax), as wan_t2v.py loads the pack by folder."""
    path = os.path.join(REPO, "splash_attention.py")
    spec = importlib.util.spec_from_file_location("wan_tpu_bench_splash_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("small", "wan"), default=None,
                        help="small (default off TPU) or wan (default on TPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (median printed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first compiles)")
    parser.add_argument("--mesh", default=None,
                        help="'none' (one device), 'all' (dp=2 when even, tp the rest; the default on TPU, where "
                             "Wan shapes need it) or DPxTP, e.g. 2x4")
    parser.add_argument("--block-q", type=int, default=None)
    parser.add_argument("--block-kv", type=int, default=None)
    parser.add_argument("--block-kv-compute", type=int, default=None)
    return parser.parse_args(argv)


def build_mesh(jax, spec: str):
    if spec == "none":
        return None
    count = jax.device_count()
    if spec == "all":
        dp = 2 if count >= 2 and count % 2 == 0 else 1
        tp = count // dp
    else:
        try:
            dp, tp = (int(n) for n in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--mesh {spec!r}: give none, all or DPxTP such as 2x4") from None
    if dp * tp != count:
        raise SystemExit(f"--mesh {spec}: dp x tp = {dp * tp}, but {count} devices were found")
    return jax.make_mesh((dp, tp), ("dp", "tp"))


def time_median(fn, args, warmup: int, runs: int):
    """Median seconds of ``runs`` calls after ``warmup`` calls; and the last output."""
    out = None
    for _ in range(max(1, warmup)):
        out = fn(*args)
        out.block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn(*args)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    splash = load_splash()
    backend = jax.default_backend()
    interpret = splash.resolve_interpret(None)
    shapes = WAN_SHAPES if (args.shapes or ("wan" if backend == "tpu" else "small")) == "wan" else SMALL_SHAPES
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    defaults = splash.BlockSizes()
    block_sizes = splash.BlockSizes(
        block_q=args.block_q or defaults.block_q,
        block_kv=args.block_kv or defaults.block_kv,
        block_kv_compute=args.block_kv_compute or defaults.block_kv_compute,
    )
    mesh = build_mesh(jax, args.mesh or ("all" if backend == "tpu" else "none"))

    print(f"jax {jax.__version__} on {backend}: {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"mesh {dict(mesh.shape) if mesh is not None else 'none (one device)'}; {args.dtype}; {block_sizes}")
    if interpret:
        print("NOTE: not on TPU, so the kernel runs in Pallas interpret mode: its timings are NOT meaningful.")
    print(f"median of {args.runs} runs after {args.warmup} warm-up; ratio = ours / peer (jax.nn.dot_product_attention)")
    columns = ("ours ms", "peer ms", "ours/peer", "max|diff|")
    header = f"{'shape':<20} {'batch x heads x q x kv x dim':<30} " + " ".join(f"{c:>10}" for c in columns)
    print(header)
    print("-" * len(header))

    ours_fn = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, mesh=mesh, block_sizes=block_sizes))
    peer_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))

    for name, batch, heads, q_len, kv_len, head_dim in shapes:
        if mesh is not None:
            dp, tp = mesh.shape["dp"], mesh.shape["tp"]
            batch_axis = "dp" if batch % dp == 0 else None
            head_axis = "tp" if heads % tp == 0 else None
            place_ours = NamedSharding(mesh, PartitionSpec(batch_axis, head_axis))  # [B, H, S, D]
            place_peer = NamedSharding(mesh, PartitionSpec(batch_axis, None, head_axis))  # [B, S, H, D]
        else:
            place_ours = place_peer = jax.devices()[0]
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (batch, heads, q_len, head_dim), dtype)
        k = jax.random.normal(keys[1], (batch, heads, kv_len, head_dim), dtype)
        v = jax.random.normal(keys[2], (batch, heads, kv_len, head_dim), dtype)
        ours_in = [jax.device_put(x, place_ours) for x in (q, k, v)]
        peer_in = [jax.device_put(jnp.swapaxes(x, 1, 2), place_peer) for x in (q, k, v)]
        del q, k, v
        results = {}
        for side, fn, inputs in (("ours", ours_fn, ours_in), ("peer", peer_fn, peer_in)):
            try:
                results[side] = time_median(fn, inputs, args.warmup, args.runs)
            except Exception as error:  # e.g. the peer's score matrix out of memory
                results[side] = (math.nan, None)
                print(f"  {name}: {side} failed: {str(error).splitlines()[0][:150]}")
        ours_s, ours_out = results["ours"]
        peer_s, peer_out = results["peer"]
        if ours_out is not None and peer_out is not None:
            diff = np.abs(np.asarray(ours_out, np.float32) - np.swapaxes(np.asarray(peer_out, np.float32), 1, 2)).max()
        else:
            diff = math.nan
        dims = f"{batch} x {heads} x {q_len} x {kv_len} x {head_dim}"
        print(f"{name:<20} {dims:<30} {ours_s * 1e3:>10.2f} {peer_s * 1e3:>10.2f} "
              f"{ours_s / peer_s:>10.3f} {diff:>10.2e}")
        del ours_in, peer_in, results, ours_out, peer_out
    if interpret:
        print("(interpret mode: ratios above measure the Pallas interpreter, not the TPU kernel)")


if __name__ == "__main__":
    main()
