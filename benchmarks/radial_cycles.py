"""Radial attention on TPU: the share of attention tiles its mask keeps, and libtpu's static cycle
estimate of the block-sparse kernel against the dense one, on a machine with no TPU.

    .venv/bin/python benchmarks/radial_cycles.py --shares-only        # the tile shares; nothing compiled
    .venv/bin/python benchmarks/radial_cycles.py                      # shares and cycles, v6e, 14B at 720P and 480P
    .venv/bin/python benchmarks/radial_cycles.py --blocks 512,512,256 1024,512,256 --paths fixed online

The cycle figures are the compiler's estimates (``tpu_cycles.py`` explains the dump and its limits), not
measurements on a TPU. The sparse kernel's grid is one step per visited tile, driven by scalar prefetch;
whether the profiler prices such a grid right is checked here, not assumed (issue 20 found jax's stock
Splash kernel, also driven by scalar prefetch, priced below the FLOP floor):

- per tile: one query block against 3, 5 and 7 key tiles, each tile body (whole; band: the mask of a key block
  in one frame; partial: the general element
  mask) and softmax path compiled alone, since the profiler cannot tell a runtime branch's sides apart;
  the 3->5 and 5->7 differences must agree within 3% (linear in the grid);
- a whole tile must cost what the dense kernel's key block costs at the same blocks (the same work);
- no tile may run faster than the calibration matmul's FLOP rate.

A shape's figure is then: heads x (per query block + whole tiles x their cost + partial tiles x theirs),
against the dense kernel at the chip's own blocks (``tpu_cycles.shape_estimate``). The mask is Radial's
at the reference's defaults (``models/wan/radial.py``); the first steps and blocks run dense, which the
per-call figures here leave out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import tpu_cycles  # noqa: E402  the dump, its cache, the calibration and the dense kernel's probes

logger = logging.getLogger("wan_tpu.radial_cycles")

RADIAL_SOURCE = os.path.join(REPO, "models", "wan", "radial.py")
RESOLUTIONS = {"720p": (720, 1280), "480p": (480, 832)}
HEADS_PER_DEVICE = 10  # 14B's 40 heads over tp=4; the CFG pair over dp=2 (the (2, 4) mesh of a v6e-8)
NUM_FRAMES = 81
SHARE_BLOCKS = (128, 256, 512, 768, 1024, 1536, 2048, 3072)
DEFAULT_BLOCKS = ("512,512,256", "1024,512,256", "2048,512,512", "1024,1024,512")
TOLERANCE = 0.10  # a whole tile against the dense kernel's key block at the same blocks
# Whole tiles, partial tiles whose keys lie in one frame (the band mask), the other partial tiles.
TILE_KINDS = ("whole", "band", "partial")


def _radial():
    return tpu_cycles.load_module(RADIAL_SOURCE, "wan_tpu_radial_cycles_mask")


# ------------------------------------------------------------------ one sparse probe, one process
def _compile_sparse(job: dict) -> None:
    """One query block against ``kv_blocks`` key tiles, every one of kind ``tiles`` (in the worker)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(platform="tpu", topology_name=job["topology"]).devices[0]
    place = SingleDeviceSharding(device)
    block_q, block_kv, block_kv_compute = job["blocks"]
    count = job["kv_blocks"]
    splash = tpu_cycles.load_module(job["source"], "wan_tpu_radial_cycles_splash")
    partial = job["tiles"] != "whole"
    one_kv_frame = job["tiles"] == "band"
    steps = (np.arange(count) << splash._ID_BITS | (np.arange(count) == 0) << splash._FIRST_BIT
             | (np.arange(count) == count - 1) << splash._LAST_BIT | int(partial) << splash._PARTIAL_BIT
             | int(one_kv_frame) << splash._ONE_KV_FRAME_BIT)
    # The descriptors' values are run-time data (SMEM); only their shapes reach the compiler.
    layout = splash.SparseLayout(steps.astype(np.int32), np.zeros(3, np.int32), np.zeros(3 * count, np.int32),
                                 np.zeros(4, np.int32), 1, not partial, 1.0)
    blocks = splash.EffectiveBlocks(block_q, block_kv, block_kv_compute)
    q = jax.ShapeDtypeStruct((1, block_q, tpu_cycles.HEAD_DIM), jnp.bfloat16, sharding=place)
    kv = jax.ShapeDtypeStruct((1, count * block_kv, tpu_cycles.HEAD_DIM), jnp.bfloat16, sharding=place)

    def run(q, k, v):
        return splash.sparse_flash_attention(q, k, v, kv_len=count * block_kv, blocks=blocks, layout=layout,
                                             interpret=False, paths=tuple(job["paths"]), tiles=(job["tiles"],))

    with splash.force_interpret(False):
        jax.jit(run).lower(q, kv, kv).compile()


def _stub_pallas_calls() -> None:
    """Every ``pallas_call`` of this (worker) process becomes a stand-in that makes its operands (behind
    an optimisation barrier, so the layouts feeding it are materialised as they would be) and returns zeros
    of its output shapes: what is left in the program is the call's glue."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas

    def stub(kernel, *, out_shape, **_):
        def call(*operands):
            operands = jax.lax.optimization_barrier(operands)
            touch = sum(jnp.ravel(x)[0].astype(jnp.float32) for x in operands if getattr(x, "ndim", 0))
            shapes = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)
            outs = tuple(jnp.zeros(shape.shape, shape.dtype) + touch.astype(shape.dtype) for shape in shapes)
            return outs if isinstance(out_shape, (tuple, list)) else outs[0]
        return call

    pallas.pallas_call = stub


def _compile_frame(job: dict) -> None:
    """One part of a whole 14B self-attention call at a real shape (in the worker): the frame path's
    whole-frame or band kernel (one softmax path alone), or either call's glue through
    ``splash_attention`` (smoothing, bounds, layouts, the merge), its kernels stubbed out."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(platform="tpu", topology_name=job["topology"]).devices[0]
    place = SingleDeviceSharding(device)
    splash = tpu_cycles.load_module(job["source"], "wan_tpu_radial_cycles_splash")
    height, width = RESOLUTIONS[job["resolution"]]
    pattern = _radial().RadialPattern.for_video(height, width, NUM_FRAMES)
    frames, per_frame, tokens = pattern.num_frames, pattern.tokens_per_frame, pattern.num_tokens
    frame_blocks = splash.FrameBlocks(*job["frame_blocks"])
    plan = splash.frame_plan(pattern, frame_blocks)
    heads, paths, part = job["heads"], tuple(job["paths"]), job["part"]

    def array(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=place)

    if part == "whole":
        blocks = splash.EffectiveBlocks(plan.whole_q, per_frame, plan.whole_kv_compute)

        def run(q, k, v):
            return splash.sparse_flash_attention(q, k, v, kv_len=tokens, blocks=blocks, layout=plan.whole_layout,
                                                 interpret=False, tiles=("whole",), paths=paths, with_lse=True)
        args = (array(heads, frames * plan.whole_pad, tpu_cycles.HEAD_DIM), *[array(heads, tokens, tpu_cycles.HEAD_DIM)] * 2)
    elif part == "band":
        def run(q, k, v):
            return splash.band_attention(q, k, v, plan=plan, per_frame=per_frame, num_frames=frames,
                                         interpret=False, paths=paths)
        args = [array(heads, tokens, tpu_cycles.HEAD_DIM)] * 3
    else:  # "radial glue" or "dense glue": the whole call with its kernels stubbed out
        _stub_pallas_calls()
        sizes = frame_blocks if part == "radial glue" else splash.BlockSizes(*job["dense_blocks"])
        sparsity = pattern if part == "radial glue" else None

        def run(q, k, v):
            return splash.splash_attention(q, k, v, block_sizes=sizes, sparsity=sparsity, interpret=False)
        args = [array(1, heads, tokens, tpu_cycles.HEAD_DIM)] * 3
    with splash.force_interpret(False), jax.default_device(device):  # Element block specs want the device
        jax.jit(run).lower(*args).compile()


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    start = time.perf_counter()
    (_compile_frame if job["kind"] == "frame" else _compile_sparse)(job)
    sys.stdout.write(json.dumps({"compile_seconds": round(time.perf_counter() - start, 2)}) + "\n")


def profile_sparse(job: dict, cache: str | None, timeout: float = 1800) -> dict:
    """``tpu_cycles.profile`` for a sparse probe: one child process with the dump, cached by the job, the
    kernel's source and libtpu's version."""
    path = os.path.join(cache, "sparse-" + tpu_cycles._job_key(job) + ".json") if cache else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    with tempfile.TemporaryDirectory(prefix="wan_tpu_radial_cycles_") as folder:
        env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                   LIBTPU_INIT_ARGS=f"--xla_jf_dump_static_llo_profile_to={folder}")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"compiling {job} for the cycle dump failed: {' | '.join(tail)}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["ops"] = tpu_cycles.read_profile(folder)
    if not result["ops"]:
        raise RuntimeError(f"{job}: libtpu wrote no cycle estimate")
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        os.replace(path + ".tmp", path)
    return result


def _kernel_cycles(result: dict, name: str) -> int:
    matched = [cycles for op, cycles in result["ops"].items() if name in op]
    if not matched:
        raise RuntimeError(f"no {name!r} op in the dump: {sorted(result['ops'])}")
    return max(matched)


# ------------------------------------------------------------------ figures
def share_table(radial, resolutions, blocks=SHARE_BLOCKS) -> list[dict]:
    rows = []
    for name in resolutions:
        height, width = RESOLUTIONS[name]
        pattern = radial.RadialPattern.for_video(height, width, NUM_FRAMES)
        for block in blocks:
            mask = radial.block_mask(pattern, block, block)
            rows.append({"resolution": name, "block": block, "active": mask.active_share,
                         "whole_of_active": float(mask.full.sum() / mask.active.sum()),
                         "fits_kernel": block <= pattern.tokens_per_frame})
        rows.append({"resolution": name, "block": "token", "active": radial.token_share(pattern)})
    return rows


# One query block against 3, 5 and 7 key tiles. Not 1: a one-tile probe starts and finishes its query block
# in the same grid step, which the profiler prices apart (1->3 and 3->5 differ by 6-20% at 512-blocks).
PROBE_TILES = (3, 5, 7)


def _linear_fit(probes, counts=PROBE_TILES) -> dict:
    """Cycles per tile (the slope) and per query block (the rest), and whether the two slopes agree."""
    (n0, n1, n2), (c0, c1, c2) = counts, probes
    first, second = (c1 - c0) / (n1 - n0), (c2 - c1) / (n2 - n1)
    per_tile = (c2 - c0) / (n2 - n0)
    return {"per_tile": per_tile, "per_q_block": c0 - n0 * per_tile, "probes": list(probes),
            "linear": abs(first - second) <= tpu_cycles.LINEAR_TOLERANCE * max(first, second)}


def tile_costs(chip: str, blocks: tuple[int, int, int], path: str, cache) -> dict:
    """Per-tile cycles of the sparse kernel (whole and partial tiles) and the dense kernel's per key block."""
    topology = tpu_cycles.CHIPS[chip]
    source = tpu_cycles.KERNEL_SOURCE
    figures = {}
    for tiles in TILE_KINDS:
        results = [profile_sparse({"kind": "sparse", "topology": topology, "blocks": list(blocks), "kv_blocks": n,
                                   "tiles": tiles, "paths": [path], "source": source}, cache) for n in PROBE_TILES]
        figures[tiles] = _linear_fit([_kernel_cycles(r, "wan_splash_attention_sparse") for r in results])
    side = tpu_cycles.KernelSide(f"dense {path}", (path,), tuple(blocks))
    results = tpu_cycles.run_jobs(tpu_cycles.grid_jobs(chip, side, kv_blocks=PROBE_TILES), cache, 1)
    figures["dense"] = _linear_fit([max(r["ops"].values()) for r in results])
    return figures


def radial_estimate(radial, resolution: str, blocks, costs: dict, heads: int = HEADS_PER_DEVICE,
                    cores: int = 1) -> dict:
    """Cycles of one call from the per-tile figures; a chip's cores split the heads (the parallel axis)."""
    height, width = RESOLUTIONS[resolution]
    pattern = radial.RadialPattern.for_video(height, width, NUM_FRAMES)
    block_q, block_kv, _ = blocks
    mask = radial.block_mask(pattern, block_q, block_kv)
    # The kernel's own rule (sparse_layout): a partial tile takes the band mask where no frame starts
    # inside its key block.
    starts = np.arange(mask.active.shape[1]) * block_kv
    one_kv_frame = (np.minimum(block_kv, pattern.tokens_per_frame - starts % pattern.tokens_per_frame) == block_kv)
    if "band" not in costs:  # a kernel without the band mask
        one_kv_frame[:] = False
    partial_tiles = mask.active & ~mask.full
    whole = int((mask.active & mask.full).sum())
    band = int((partial_tiles & one_kv_frame[None, :]).sum())
    partial = int(partial_tiles.sum()) - band
    q_blocks = mask.active.shape[0]
    cycles = math.ceil(heads / cores) * (q_blocks * costs["partial"]["per_q_block"] + whole * costs["whole"]["per_tile"]
                                         + band * costs.get("band", costs["partial"])["per_tile"]
                                         + partial * costs["partial"]["per_tile"])
    tokens = pattern.num_tokens
    return {"cycles": round(cycles), "active_share": mask.active_share, "whole_tiles": whole, "band_tiles": band,
            "partial_tiles": band + partial,
            "tokens": tokens, "useful_flops_dense": 4 * heads * tokens * tokens * tpu_cycles.HEAD_DIM}


# ------------------------------------------------------------------ the frame-banded path, whole shapes
# The projected step (README, "The step, projected"): 14B with CFG on v6e-8, tensor layout: 40 calls of
# self-attention at the clock below, plus what is not self-attention, fitted there (tpu_cycles.py) to the
# original's measured 4.60 s at 720P with the kernel of its time.
V6E_CLOCK_HZ = 1.75e9
CALLS_PER_STEP = 40
NOT_ATTENTION_SECONDS = {"720p": 1.07, "480p": 0.46}  # 3.13 s less 66%; 0.85 s less 46%
FRAME_KERNELS = {"whole": "wan_splash_attention_sparse", "band": "wan_splash_attention_bands"}


def _glue(result: dict) -> int:
    """A call's cycles outside its Pallas kernels (smoothing, bounds, layouts, the merge)."""
    return sum(cycles for op, cycles in result["ops"].items() if "wan_splash_attention" not in op)


def _run_one_at_a_time(jobs: list[dict], cache) -> list[dict]:
    """``profile_sparse`` for each job in turn: libtpu's profiler takes several GiB per whole-shape kernel
    (one at 480P ran out of 24 GiB), so they never run side by side."""
    return [profile_sparse(job, cache) for job in jobs]


def frame_report(radial, args, cache, rate: float) -> list[dict]:
    """Dense against the frame-banded path at each resolution, each part compiled at its whole shape for
    one head (the heads are the kernels' outer parallel axis), with the checks the figures must pass."""
    splash = tpu_cycles.load_module(tpu_cycles.KERNEL_SOURCE, "wan_tpu_radial_cycles_frame_host")
    dense_blocks = list(dataclasses.astuple(splash.block_sizes_for(tpu_cycles.splash_device_kind(args.chip))))
    frame_blocks = list(splash.FrameBlocks(*args.frame_blocks))
    rows = []
    for resolution in args.resolutions:
        base = {"kind": "frame", "topology": tpu_cycles.CHIPS[args.chip], "source": tpu_cycles.KERNEL_SOURCE,
                "resolution": resolution, "frame_blocks": frame_blocks, "dense_blocks": dense_blocks,
                "paths": [args.frame_path], "heads": 1}
        # The dense kernel from its per-step probes (tpu_cycles.shape_estimate): libtpu's profiler simulates
        # every grid step of a whole-shape kernel, and past about 100 of them runs out of 24 GiB.
        parts = [("whole", 1), ("band", 1), ("radial glue", 1), ("dense glue", 1)]
        jobs = [dict(base, part=part, heads=heads) for part, heads in parts]
        try:
            results = dict(zip(parts, _run_one_at_a_time(jobs, cache)))
        except RuntimeError as error:  # e.g. the profiler out of memory
            print(f"\n{resolution}: no figure: {str(error)[-300:]}")
            rows.append({"resolution": resolution, "error": str(error)[-300:]})
            continue
        kernel = {key: _kernel_cycles(result, FRAME_KERNELS[key[0]]) for key, result in results.items()
                  if key[0] in FRAME_KERNELS}
        dense_side = tpu_cycles.KernelSide(f"dense {args.frame_path}", (args.frame_path,), tuple(dense_blocks))
        dense_steps = tpu_cycles.per_step(tpu_cycles.run_jobs(tpu_cycles.grid_jobs(args.chip, dense_side), cache, 1))
        height, width = RESOLUTIONS[resolution]
        pattern = radial.RadialPattern.for_video(height, width, NUM_FRAMES)
        plan = splash.frame_plan(pattern, splash.FrameBlocks(*frame_blocks))
        tokens = pattern.num_tokens
        effective = tuple(splash.effective_block_sizes(splash.BlockSizes(*dense_blocks), tokens, tokens))
        kernel[("dense", 1)] = tpu_cycles.shape_estimate(dense_steps, effective, 1, tokens)["cycles"]
        lanes = plan.band_group * plan.band_q
        band_rows = plan.band_blocks * plan.band_frames * plan.band_q  # queries, spatial-major and padded
        band_keys = plan.band_steps * plan.band_chunks_per_step * pattern.num_frames * plan.band_chunk
        whole_pairs = int((pattern.windows >= pattern.tokens_per_frame).sum()) * plan.whole_pad * pattern.tokens_per_frame
        flops = {"whole": 4 * whole_pairs * tpu_cycles.HEAD_DIM, "band": 4 * band_rows * band_keys * tpu_cycles.HEAD_DIM,
                 "dense": 4 * tokens * tokens * tpu_cycles.HEAD_DIM}
        rates = {name: flops[name] / kernel[(name, 1)] / rate for name in flops}
        linear = dense_steps["linear"]
        heads = HEADS_PER_DEVICE
        dense_call = heads * (kernel[("dense", 1)] + _glue(results[("dense glue", 1)]))
        radial_call = heads * (kernel[("whole", 1)] + kernel[("band", 1)] + _glue(results[("radial glue", 1)]))
        seconds = {"dense": dense_call / V6E_CLOCK_HZ, "radial": radial_call / V6E_CLOCK_HZ}
        dense_blocks_kept = radial.DENSE_BLOCKS
        step_dense = NOT_ATTENTION_SECONDS[resolution] + CALLS_PER_STEP * seconds["dense"]
        step_radial = (NOT_ATTENTION_SECONDS[resolution] + dense_blocks_kept * seconds["dense"]
                       + (CALLS_PER_STEP - dense_blocks_kept) * seconds["radial"])
        valid = linear and max(rates.values()) <= 1.0
        row = {"resolution": resolution, "frame_blocks": frame_blocks, "path": args.frame_path,
               "kernel_cycles_per_head": {f"{k[0]} x{k[1]}": v for k, v in kernel.items()},
               "glue_cycles_per_head": {k[0]: _glue(r) for k, r in results.items() if "glue" in k[0]},
               "rates": rates, "dense_linear_in_the_grid": linear, "valid": valid,
               "dense_call_cycles": dense_call, "radial_call_cycles": radial_call,
               "kernels_over_dense": (kernel[("whole", 1)] + kernel[("band", 1)]) / kernel[("dense", 1)],
               "call_over_dense": radial_call / dense_call, "step_dense_s": step_dense, "step_radial_s": step_radial,
               "step_speedup": step_dense / step_radial, "band_lanes": lanes,
               "compile_seconds": {f"{k[0]} x{k[1]}": r.get("compile_seconds") for k, r in results.items()}}
        rows.append(row)
        print(f"\n{resolution}, frame-banded path {tuple(frame_blocks)}, {args.frame_path} softmax, cycles per head: "
              f"dense kernel {kernel[('dense', 1)]:,}; whole-frame kernel {kernel[('whole', 1)]:,}, band kernel "
              f"{kernel[('band', 1)]:,} ({lanes} lanes, {band_keys} keys per block): "
              f"{row['kernels_over_dense']:.3f} of dense")
        print(f"  glue per head: dense call {row['glue_cycles_per_head']['dense glue']:,}, radial call "
              f"{row['glue_cycles_per_head']['radial glue']:,}; whole calls x{heads} heads: dense {dense_call:,}, "
              f"radial {radial_call:,}: {row['call_over_dense']:.3f} of dense")
        print(f"  rates (of the matmul's): whole {rates['whole']:.2f}, band {rates['band']:.2f}, dense "
              f"{rates['dense']:.2f} (none may exceed 1); the dense probes linear in the grid: "
              f"{'yes' if linear else 'no'}; {'VALID' if valid else 'NOT VALID'}")
        print(f"  projected step (14B, CFG, v6e-8, first {dense_blocks_kept} block dense): dense {step_dense:.2f} s, "
              f"radial {step_radial:.2f} s: x{row['step_speedup']:.2f}")
    return rows


def _parse_blocks(text: str) -> tuple[int, int, int]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give block_q,block_kv,block_kv_compute, e.g. 512,512,256")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chip", default="v6e", choices=tpu_cycles.MEASURED_CHIPS)
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--blocks", nargs="+", type=_parse_blocks, default=[_parse_blocks(b) for b in DEFAULT_BLOCKS],
                        help="sparse kernel block sizes to measure: block_q,block_kv,block_kv_compute (default: %(default)s)")
    parser.add_argument("--paths", nargs="+", default=["fixed"], choices=["fixed", "online"],
                        help="softmax paths to measure, each compiled alone (default: fixed)")
    parser.add_argument("--shares-only", action="store_true", help="print the tile shares only; compile nothing")
    parser.add_argument("--cache", default=tpu_cycles.DEFAULT_CACHE, help="cycle results cache ('' for none)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--frame", action="store_true",
                        help="the frame-banded path (FrameBlocks) at whole shapes against dense, and the step")
    parser.add_argument("--frame-blocks", type=lambda text: tuple(int(x) for x in text.split(",")), default=(),
                        help="FrameBlocks fields in order, e.g. 128,2048,512,64,1024 (default: its defaults)")
    parser.add_argument("--frame-path", default="fixed", choices=["fixed", "online"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    radial = _radial()
    report = {"shares": share_table(radial, args.resolutions)}
    print(f"Radial attention's tiles (14B, {NUM_FRAMES} frames; reference defaults: decay "
          f"{radial.DECAY_FACTOR}, min window {radial.MIN_WINDOW}); square blocks")
    print(f"{'resolution':<10} {'block':>6} {'active':>7} {'whole of active':>16}  note")
    for row in report["shares"]:
        if row["block"] == "token":
            print(f"{row['resolution']:<10} {'token':>6} {row['active']:>7.3f} {'':>16}  the floor: pairs attended")
            continue
        note = "" if row["fits_kernel"] else "larger than a frame: not a sparse kernel block"
        print(f"{row['resolution']:<10} {row['block']:>6} {row['active']:>7.3f} {row['whole_of_active']:>16.3f}  {note}")
    if args.shares_only:
        return _write(args.json, report)
    cache = args.cache or None
    calibration = tpu_cycles.matmul_rate(tpu_cycles.run_jobs(tpu_cycles.calibration_jobs(args.chip), cache, 1))
    cores = tpu_cycles.CORES_PER_CHIP[args.chip]
    rate = calibration["flop_per_cycle"] / cores  # per core: a kernel's grid step runs on one
    report["calibration"] = calibration
    print(f"\n{args.chip}: calibration matmul {calibration['flop_per_cycle']:,.0f} FLOP/cycle (bf16 a @ b, best of "
          f"{tpu_cycles.CALIBRATION_SIZES}){f'; {cores} cores share the kernel grid' if cores > 1 else ''}")
    if args.frame:
        report["frame"] = frame_report(radial, args, cache, rate)
        return _write(args.json, report)
    splash = tpu_cycles.load_module(tpu_cycles.KERNEL_SOURCE, "wan_tpu_radial_cycles_host")
    chip_blocks = tuple(dataclasses.astuple(splash.block_sizes_for(tpu_cycles.splash_device_kind(args.chip))))
    report["rows"] = []
    for path in args.paths:
        dense_side = tpu_cycles.KernelSide(f"dense {path}", (path,), chip_blocks)
        dense_steps = tpu_cycles.per_step(tpu_cycles.run_jobs(tpu_cycles.grid_jobs(args.chip, dense_side), cache, 1))
        for blocks in args.blocks:
            try:
                costs = tile_costs(args.chip, blocks, path, cache)
            except RuntimeError as error:  # v5e's profiler aborts on the sparse grid's DMAs (libtpu 0.0.42.1)
                print(f"\n{path} softmax, sparse blocks {blocks}: no figure: {str(error).split(' failed: ')[-1][:200]}")
                report["rows"].append({"path": path, "blocks": blocks, "error": str(error)[-300:]})
                continue
            tile_flops = 4 * blocks[0] * blocks[1] * tpu_cycles.HEAD_DIM
            checks = {
                "linear": all(costs[k]["linear"] for k in (*TILE_KINDS, "dense")),
                "whole_vs_dense": costs["whole"]["per_tile"] / costs["dense"]["per_tile"],
                "whole_rate": tile_flops / costs["whole"]["per_tile"] / rate,
                "band_rate": tile_flops / costs["band"]["per_tile"] / rate,
                "partial_rate": tile_flops / costs["partial"]["per_tile"] / rate,
            }
            valid = (checks["linear"] and abs(checks["whole_vs_dense"] - 1) <= TOLERANCE
                     and max(checks["whole_rate"], checks["band_rate"], checks["partial_rate"]) <= 1.0)
            print(f"\n{path} softmax, sparse blocks {blocks}: cycles per tile whole {costs['whole']['per_tile']:,.0f} "
                  f"(dense kernel's key block {costs['dense']['per_tile']:,.0f}: x{checks['whole_vs_dense']:.3f}), "
                  f"band {costs['band']['per_tile']:,.0f}, partial {costs['partial']['per_tile']:,.0f}; per query block {costs['partial']['per_q_block']:,.0f}")
            unlinear = [k for k in (*TILE_KINDS, "dense") if not costs[k]["linear"]]
            print(f"  rates (of the matmul's): whole {checks['whole_rate']:.2f}, band {checks['band_rate']:.2f}, "
                  f"partial {checks['partial_rate']:.2f}; "
                  f"linear in the grid: {'yes' if not unlinear else 'no (' + ', '.join(unlinear) + ')'}; "
                  f"{'VALID' if valid else 'NOT VALID'}")
            for resolution in args.resolutions:
                height, width = RESOLUTIONS[resolution]
                frames, per_frame = radial.video_tokens(height, width, NUM_FRAMES)
                tokens = frames * per_frame
                dense_blocks = tuple(splash.effective_block_sizes(splash.BlockSizes(*chip_blocks), tokens, tokens))
                dense = tpu_cycles.shape_estimate(dense_steps, dense_blocks, HEADS_PER_DEVICE, tokens, cores=cores)
                eff = tuple(splash.effective_block_sizes(splash.BlockSizes(*blocks), tokens, tokens))
                if eff[0] > per_frame or eff[1] > per_frame:
                    print(f"  {resolution}: blocks {eff} exceed a frame's {per_frame} tokens; skipped")
                    continue
                sparse = radial_estimate(radial, resolution, eff, costs, cores=cores)
                ratio = sparse["cycles"] / dense["cycles"]
                print(f"  {resolution} ({HEADS_PER_DEVICE} heads x {tokens} tokens): dense at {dense_blocks} "
                      f"{dense['cycles']:,} cycles ({dense['useful_flops'] / (dense['cycles'] * cores) / rate:.2f} of the matmul); "
                      f"radial at {eff} {sparse['cycles']:,} ({sparse['active_share']:.3f} of tiles, "
                      f"{sparse['partial_tiles']} of {sparse['whole_tiles'] + sparse['partial_tiles']} partial, "
                      f"{sparse['band_tiles']} of them banded in one key frame): "
                      f"{ratio:.3f} of dense")
                report["rows"].append({"path": path, "blocks": blocks, "resolution": resolution, "costs": costs,
                                       "checks": checks, "valid": valid, "dense": dense, "dense_blocks": dense_blocks,
                                       "radial": sparse, "radial_over_dense": ratio})
    return _write(args.json, report)


def _write(path, report) -> int:
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
