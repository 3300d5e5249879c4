"""libtpu's static cycle estimates for the attention kernel and its peers, on a machine with no TPU.

    .venv/bin/python benchmarks/tpu_cycles.py                       # the README's kernel table (v6e, v5e, v5p)
    .venv/bin/python benchmarks/tpu_cycles.py --chip v6e --shape 14b-720p --json out.json
    .venv/bin/python benchmarks/tpu_cycles.py --maxdiffusion PATH/custom_splash_attention.py

libtpu writes an ``estimated_cycles`` figure for every op of a program it compiles
when started with ``LIBTPU_INIT_ARGS=--xla_jf_dump_static_llo_profile_to=DIR``.
The flag is read once per process, so every measurement here is one child
process (``--worker``), and results are cached by what was compiled (the job, the
kernel's source, libtpu's version) under ``--cache``.

These are the compiler's estimates, not measurements on a TPU. The profiler has
limits, found by trying; each figure printed works around or checks them:

- It simulates every grid step and its memory grows with the grid (a 75,600-token
  kernel was killed at 22 GB), and whole-grid figures of long grids come out below
  the per-step figure times the grid. So a kernel is compiled at one query block
  with 1, 3 and 5 key blocks: the difference gives the cycles per key block
  (checked linear: the 1->3 and 3->5 steps must agree within 3%), the rest is the
  per-query-block cost (init, finish, the pipeline's first fetch). A shape's
  figure is that per grid step times its grid, counting in its last key block
  only the chunks that hold real keys (the kernel skips the rest at run time).
- It cannot tell the two sides of a runtime branch apart. Our kernel branches per
  (head, query block) between the fixed softmax bound and the online softmax, so
  each side is compiled alone (``paths``) and reported alone; "as compiled" is the
  figure for the kernel with both sides, which the profiler prices as the online one.
- A rate above the calibration matmul's is not credible: such rows are marked.

Rates are useful FLOPs (4 x queries x keys x head_dim per head, padding excluded)
per cycle, as a fraction of the calibration matmul's FLOPs per cycle on the same
chip: the best of ``a @ b`` at 4096^3 and 8192^3, bf16, compiled the same way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCE = os.path.join(REPO, "splash_attention.py")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "wan_tpu", "cycles")
HEAD_DIM = 128
LINEAR_TOLERANCE = 0.03  # the per-key-block cycles of 1->3 and 3->5 key blocks agree this closely

# The pack's chip table (runtime/chips.py, standard library only), loaded by path as the kernel is.
if "wan_tpu_runtime_chips" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("wan_tpu_runtime_chips", os.path.join(REPO, "runtime", "chips.py"))
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
PACK_CHIPS = sys.modules["wan_tpu_runtime_chips"]
# One chip of each generation (a 2x2 slice's first device: the programs are single-chip).
MEASURED_CHIPS = ("v6e", "v5e", "v5p")
CHIPS = {name: f"{name}:{'2x2x1' if PACK_CHIPS.BY_NAME[name].three_d else '2x2'}" for name in MEASURED_CHIPS}
# v5p's megacore splits a kernel's parallel grid over 2
CORES_PER_CHIP = {name: PACK_CHIPS.BY_NAME[name].cores_per_chip for name in MEASURED_CHIPS}
CALIBRATION_SIZES = (4096, 8192)

# The per-device attention calls the pack makes on a (2, 4) mesh with CFG (batch 2 over dp, heads over tp):
# (name, heads per device, tokens). 81 frames: 21 latent frames of 30x52 patches at 832x480, 45x80 at 1280x720.
SHAPES = {
    "16k": ("16,384 tokens, 1 head", 1, 16384),
    "14b-480p": ("14B 832x480 (10 of 40 heads)", 10, 21 * 30 * 52),
    "14b-848x480": ("14B 848x480 (10 of 40 heads)", 10, 21 * 30 * 53),
    "14b-720p": ("14B 1280x720 (10 of 40 heads)", 10, 21 * 45 * 80),
    "1.3b-480p": ("1.3B 832x480 (3 of 12 heads)", 3, 21 * 30 * 52),
}

logger = logging.getLogger("wan_tpu.tpu_cycles")


# ------------------------------------------------------------------ one measurement, one process
def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _compile_job(job: dict) -> dict | None:
    """Compile the program a job describes for its topology's first chip (in the worker process); what else
    it reports (a step probe: its optimised HLO's ops), or None."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(platform="tpu", topology_name=job["topology"]).devices[0]
    place = SingleDeviceSharding(device)
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=place)  # noqa: E731
    kind = job["kind"]
    if kind in ("step_probe", "rotary_probe"):  # the pack's step, or its rotary embedding (benchmarks/step_cycles.py)
        step_cycles = load_module(os.path.join(REPO, "benchmarks", "step_cycles.py"), "wan_tpu_step_cycles")
        return (step_cycles.compile_probe if kind == "step_probe" else step_cycles.compile_rotary)(job)
    if kind == "matmul":
        n = job["size"]
        jax.jit(lambda a, b: a @ b).lower(bf16(n, n), bf16(n, n)).compile()
        return
    if kind in ("ours", "maxdiffusion"):
        block_q, block_kv, block_kv_compute = job["blocks"]
        q_len, kv_len = job["q_blocks"] * block_q, job["kv_blocks"] * block_kv
        q, kv = bf16(1, q_len, HEAD_DIM), bf16(1, kv_len, HEAD_DIM)
        if kind == "maxdiffusion":  # maxdiffusion's custom Splash kernel, by path (read, never vendored)
            peer = load_module(job["source"], "wan_tpu_cycles_maxdiffusion")
            sizes = peer._BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute)
            # The VMEM budget ours asks for (v5e's 16 MiB default refuses these blocks).
            kernel = peer.make_splash_mha(block_sizes=sizes, use_fixed_m=job["fixed_m"], vmem_limit_bytes=32 * 2**20)
            with jax.default_device(device):  # its lowering asks Pallas for the chip's facts (default device)
                jax.jit(kernel).lower(q, kv, kv).compile()
            return
        splash = load_module(job["source"], "wan_tpu_cycles_splash")
        blocks = splash.EffectiveBlocks(block_q, block_kv, block_kv_compute)
        options = {"paths": tuple(job["paths"])} if job.get("paths") else {}  # a "before" kernel has one path

        def run(q, k, v):
            return splash.flash_attention(q, k, v, kv_len=kv_len, blocks=blocks, interpret=False, **options)

        with splash.force_interpret(False):
            jax.jit(run).lower(q, kv, kv).compile()
        return
    if kind == "stock":  # jax's own Splash kernel, whole call at one shape
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as stock
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

        heads, length = job["heads"], job["tokens"]
        mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(heads)])
        kernel = stock.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
        jax.jit(kernel).lower(*(bf16(heads, length, HEAD_DIM) for _ in range(3))).compile()
        return
    raise ValueError(f"job kind {kind!r}: give matmul, ours, stock or maxdiffusion")


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    start = time.perf_counter()
    extra = _compile_job(job) or {}
    sys.stdout.write(json.dumps(dict(extra, compile_seconds=round(time.perf_counter() - start, 2))) + "\n")


_ESTIMATE = re.compile(r'hlo_op_name:\s*"(?P<name>[^"]+)"\s*estimated_cycles:\s*(?P<cycles>\d+)')


def read_profile(folder: str) -> dict[str, int]:
    """{hlo op name: estimated cycles} from a dump folder's ``*_static_llo_profile.textproto`` files."""
    cycles = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith("_static_llo_profile.textproto"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                for match in _ESTIMATE.finditer(handle.read()):
                    cycles[match.group("name")] = cycles.get(match.group("name"), 0) + int(match.group("cycles"))
    return cycles


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _job_key(job: dict) -> str:
    identity = dict(job, libtpu=_libtpu_version())
    source = job.get("source", KERNEL_SOURCE if job["kind"] == "ours" else None)
    if source:
        with open(source, "rb") as handle:
            identity["source_sha"] = hashlib.sha256(handle.read()).hexdigest()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def profile(job: dict, cache: str | None = DEFAULT_CACHE, timeout: float = 1800) -> dict:
    """Compile ``job`` in a child process with the cycle dump; {"ops": {name: cycles}, "compile_seconds"}."""
    path = os.path.join(cache, _job_key(job) + ".json") if cache else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    with tempfile.TemporaryDirectory(prefix="wan_tpu_cycles_") as folder:
        env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                   LIBTPU_INIT_ARGS=f"--xla_jf_dump_static_llo_profile_to={folder}")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"compiling {job} for the cycle dump failed: {' | '.join(tail)}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["ops"] = read_profile(folder)
    if not result["ops"]:
        raise RuntimeError(f"{job}: libtpu wrote no cycle estimate (is libtpu installed? jax[tpu] at the pinned jax)")
    if path:
        os.makedirs(cache, exist_ok=True)
        partial = path + f".{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        os.replace(partial, path)
    return result


def _cycles_of(result: dict, contains: str) -> int:
    matched = [cycles for name, cycles in result["ops"].items() if contains in name]
    if not matched:
        raise RuntimeError(f"no op named like {contains!r} in the cycle dump: {sorted(result['ops'])}")
    return sum(matched)


def run_jobs(jobs: list[dict], cache: str | None, parallel: int, keep_going: bool = False) -> list[dict]:
    """``profile`` for each job, ``parallel`` processes at a time (libtpu compiles are single-threaded).
    ``keep_going``: a job that fails gives {"error": message} instead of raising (a peer that does not compile)."""
    def one(job):
        try:
            return profile(job, cache)
        except RuntimeError as error:
            if not keep_going:
                raise
            logger.warning("%s", error)
            return {"error": str(error).split(" failed: ")[-1][:300].replace("|", "/")}

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, jobs))


# ------------------------------------------------------------------ figures
def calibration_jobs(chip: str, sizes=CALIBRATION_SIZES) -> list[dict]:
    return [{"kind": "matmul", "topology": CHIPS[chip], "size": n} for n in sizes]


def matmul_rate(results: list[dict], sizes=CALIBRATION_SIZES) -> dict:
    """The calibration: the best FLOPs per cycle of ``a @ b`` among ``sizes`` (the strictest reference)."""
    rates = {n: 2 * n**3 / _cycles_of(result, "") for n, result in zip(sizes, results)}
    return {"flop_per_cycle": max(rates.values()), "by_size": {str(n): round(r) for n, r in rates.items()}}


@dataclasses.dataclass(frozen=True)
class KernelSide:
    name: str  # "fixed bound", "online softmax", "as compiled", "before", "maxdiffusion ..."
    paths: tuple[str, ...]  # ours: the bodies compiled; () for a kernel without the choice
    blocks: tuple[int, int, int]
    source: str = KERNEL_SOURCE
    kind: str = "ours"  # or "maxdiffusion"
    fixed_m: bool = False  # maxdiffusion's use_fixed_m
    original: bool = False  # the original pack's use: blocks as given, padded keys computed (it did not mask)


def grid_jobs(chip: str, side: KernelSide, kv_blocks=(1, 3, 5)) -> list[dict]:
    """One query block against 1, 3 and 5 key blocks: the per-grid-step probes of ``per_step``."""
    jobs = []
    for n in kv_blocks:
        job = {"kind": side.kind, "topology": CHIPS[chip], "blocks": list(side.blocks), "q_blocks": 1,
               "kv_blocks": n, "source": side.source}
        job.update({"paths": list(side.paths)} if side.kind == "ours" else {"fixed_m": side.fixed_m})
        jobs.append(job)
    return jobs


def per_step(results: list[dict]) -> dict:
    """Cycles per key block and per query block from the 1/3/5-key-block probes, and whether they are linear."""
    # The kernel is the program's largest op; the rest (ours: the fixed bounds' norms) is not the kernel's.
    c1, c3, c5 = (max(result["ops"].values()) for result in results)
    first, second = (c3 - c1) / 2, (c5 - c3) / 2
    linear = abs(first - second) <= LINEAR_TOLERANCE * max(first, second)
    kv_block = (c5 - c1) / 4
    return {"cycles_per_kv_block": round(kv_block), "cycles_per_q_block": round(c1 - kv_block),
            "linear": linear, "probes": [c1, c3, c5]}


def shape_estimate(steps: dict, blocks: tuple[int, int, int], heads: int, tokens: int, cores: int = 1,
                   skips_padding: bool = True) -> dict:
    """Cycles for one self-attention call of ``heads`` x ``tokens`` at ``blocks``, from the per-step figures.
    ``skips_padding``: the last key block runs only its chunks with real keys (ours), or all (the original)."""
    block_q, block_kv, block_kv_compute = blocks
    q_blocks, kv_blocks = -(-tokens // block_q), -(-tokens // block_kv)
    tail = tokens - (kv_blocks - 1) * block_kv
    last_fraction = -(-tail // block_kv_compute) * block_kv_compute / block_kv if skips_padding else 1.0
    per_q_block = steps["cycles_per_q_block"] + (kv_blocks - 1 + last_fraction) * steps["cycles_per_kv_block"]
    grid_steps = heads * q_blocks
    # A chip with several cores splits the parallel grid axes (heads x query blocks) among them.
    cycles = math.ceil(grid_steps / cores) * per_q_block
    return {"cycles": round(cycles), "useful_flops": 4 * heads * tokens * tokens * HEAD_DIM,
            "grid": [heads, q_blocks, kv_blocks]}


def kernel_sides(chip: str, splash, before: str | None = None, maxdiffusion: str | None = None) -> list[KernelSide]:
    chip_blocks = dataclasses.astuple(splash.block_sizes_for(splash_device_kind(chip)))
    sides = [
        KernelSide("fixed bound", ("fixed",), chip_blocks),
        KernelSide("online softmax", ("online",), chip_blocks),
        KernelSide("as compiled (both sides)", tuple(splash.KERNEL_PATHS), chip_blocks),
        # The original pack's kernel as it ran: online softmax at 3328/2816/256 on every sequence, padded
        # keys computed. Its measured steps on v6e-8 are what the step projection is fitted to and checked on.
        KernelSide("the original's use (online, 3328/2816/256 unbalanced)", ("online",), (3328, 2816, 256),
                   original=True),
    ]
    if before:  # another splash_attention.py (e.g. an older revision's) at its own default blocks
        old = load_module(before, "wan_tpu_cycles_splash_before")
        sides.append(KernelSide("before", (), tuple(dataclasses.astuple(old.BlockSizes())), os.path.abspath(before)))
    if maxdiffusion:  # the blocks maxdiffusion's Wan configs use
        for fixed_m in (False, True):
            sides.append(KernelSide(f"maxdiffusion's, use_fixed_m={fixed_m}", (), (3072, 2048, 1024),
                                    os.path.abspath(maxdiffusion), "maxdiffusion", fixed_m))
    return sides


def splash_device_kind(chip: str) -> str:
    return PACK_CHIPS.BY_NAME[chip].device_kind


def _effective(splash, side, tokens, blocks=None):
    """A call's blocks: ours balance them to the sequence (``effective_block_sizes``); maxdiffusion's do not."""
    blocks = tuple(blocks or side.blocks)
    if side.kind != "ours" or side.original:
        return blocks
    return tuple(splash.effective_block_sizes(splash.BlockSizes(*blocks), tokens, tokens))


def kernel_table(chips, shapes, cache, parallel, maxdiffusion=None, before=None, stock=True) -> dict:
    """Every side at every shape on every chip: cycles and fractions of the chip's calibration matmul."""
    splash = load_module(KERNEL_SOURCE, "wan_tpu_cycles_splash_host")
    jobs, plan = [], []
    for chip in chips:
        jobs += calibration_jobs(chip)
        plan.append(("calibration", chip, None, None, len(jobs)))
        for side in kernel_sides(chip, splash, before, maxdiffusion):
            # A shape's clamped blocks may differ from the side's; probe each distinct set once.
            for blocks in sorted({_effective(splash, side, SHAPES[s][2]) for s in shapes}):
                jobs += grid_jobs(chip, dataclasses.replace(side, blocks=blocks))
                plan.append(("side", chip, side, blocks, len(jobs)))
        if stock:
            for shape in shapes:
                _, heads, tokens = SHAPES[shape]
                if tokens <= 16384:  # its whole-grid figure; longer ones exhaust the profiler's memory
                    jobs.append({"kind": "stock", "topology": CHIPS[chip], "heads": 1, "tokens": tokens})
                    plan.append(("stock", chip, shape, None, len(jobs)))
    started = time.perf_counter()
    results = run_jobs(jobs, cache, parallel, keep_going=True)
    logger.info("%d compiles with the cycle dump in %.0f s (cached ones are free)", len(jobs),
                time.perf_counter() - started)
    table = {"chips": {}, "shapes": {s: SHAPES[s] for s in shapes}, "libtpu": _libtpu_version()}
    start = 0
    for kind, chip, what, blocks, end in plan:
        chunk, start = results[start:end], end
        entry = table["chips"].setdefault(chip, {"sides": {}, "peers": {}})
        if kind == "calibration":
            entry["matmul"] = matmul_rate(chunk)
        elif any("error" in result for result in chunk):
            error = next(result["error"] for result in chunk if "error" in result)
            if kind == "side":
                entry["sides"].setdefault(what.name, {"side": what, "probes": {}})["error"] = error
            else:
                entry["peers"].setdefault(kind, {})[what] = {"error": error}
        elif kind == "side":
            entry["sides"].setdefault(what.name, {"side": what, "probes": {}})["probes"][
                ",".join(map(str, blocks))] = per_step(chunk)
        else:
            _, heads, tokens = SHAPES[what]
            entry["peers"].setdefault(kind, {})[what] = {
                "cycles": _cycles_of(chunk[0], ""), "useful_flops": 4 * heads * tokens * tokens * HEAD_DIM,
                "whole_grid": True}
    for chip, entry in table["chips"].items():
        rate = entry["matmul"]["flop_per_cycle"] / CORES_PER_CHIP[chip]  # per core
        for side in entry["sides"].values():
            side["shapes"] = {}
            if "error" in side:
                side["side"] = dataclasses.asdict(side["side"])
                continue
            for shape in shapes:
                _, heads, tokens = SHAPES[shape]
                blocks = _effective(splash, side["side"], tokens)
                steps = side["probes"][",".join(map(str, blocks))]
                estimate = shape_estimate(steps, blocks, heads, tokens, cores=CORES_PER_CHIP[chip],
                                          skips_padding=not side["side"].original)
                core_cycles = estimate["cycles"] * CORES_PER_CHIP[chip]
                estimate["fraction_of_matmul"] = round(estimate["useful_flops"] / core_cycles / rate, 3)
                estimate["valid"] = steps["linear"] and estimate["fraction_of_matmul"] <= 1.0
                side["shapes"][shape] = estimate
            side["side"] = dataclasses.asdict(side["side"])
        for peer in entry["peers"].values():
            for record in peer.values():
                if "error" in record:
                    continue
                core_cycles = record["cycles"] * CORES_PER_CHIP[chip]
                record["fraction_of_matmul"] = round(record["useful_flops"] / core_cycles / rate, 3)
                record["valid"] = record["fraction_of_matmul"] <= 1.0
    return table


# ------------------------------------------------------------------ the step
# Wan 2.1 T2V 14B with CFG on v6e-8, tensor layout (sharding.choose_layout's pick on v6e; the original's):
# per device, batch 1 of the CFG pair (dp=2) and 10 of 40 heads (tp=4). Projection:
#   seconds = 40 x attention cycles / clock + (FLOPs outside self-attention) / (matmul rate x clock x e)
# with e the one fitted constant: how close everything that is not self-attention comes to the calibration
# matmul's rate, norms, rotary, modulation and the all-reduces included (those scale with the tokens too).
# It is fitted to the original's 1280x720 step and checked on its 848x480 one.
V6E_CLOCK_HZ = PACK_CHIPS.V6E.peak_flops / (4 * 256 * 256 * 2)  # published peak / (4 MXUs x 256 x 256 MACs x 2 FLOP) = 1.75 GHz
ORIGINAL_SECONDS = {"14b-720p": 4.60, "14b-848x480": 1.37}  # measured on v6e-8 (the original's profile)
WAN_14B = {"dim": 5120, "ffn": 13824, "layers": 40, "text_tokens": 512}


def other_flops_per_device(tokens: int, batch: int = 2, devices: int = 8, model=WAN_14B) -> float:
    """A step's FLOPs outside the self-attention kernel, per device: the projections, the FFN and the
    cross-attention (its scores against the 512 text tokens, and its keys and values of them)."""
    dim, ffn, text = model["dim"], model["ffn"], model["text_tokens"]
    per_token = 2 * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 4 * text * dim
    per_layer = tokens * per_token + 2 * 2 * dim * dim * text
    return model["layers"] * per_layer * batch / devices


def project_step(table: dict, fit: str = "14b-720p", check: str = "14b-848x480") -> dict:
    entry = table["chips"]["v6e"]
    rate = entry["matmul"]["flop_per_cycle"]
    layers = WAN_14B["layers"]
    original = next(side for name, side in entry["sides"].items() if name.startswith("the original"))

    def attention_seconds(side, shape):
        return layers * side["shapes"][shape]["cycles"] / V6E_CLOCK_HZ

    def other_ideal(shape):
        return other_flops_per_device(SHAPES[shape][2]) / (rate * V6E_CLOCK_HZ)

    efficiency = other_ideal(fit) / (ORIGINAL_SECONDS[fit] - attention_seconds(original, fit))
    predicted = attention_seconds(original, check) + other_ideal(check) / efficiency
    rows = {}
    for name, side in entry["sides"].items():
        for shape in side.get("shapes", {}):
            if not shape.startswith("14b"):
                continue
            attention, other = attention_seconds(side, shape), other_ideal(shape) / efficiency
            rows.setdefault(name, {})[shape] = {"attention_s": round(attention, 3), "other_s": round(other, 3),
                                                "step_s": round(attention + other, 3),
                                                "attention_share": round(attention / (attention + other), 3)}
    return {"clock_hz": V6E_CLOCK_HZ, "fitted_other_efficiency": round(efficiency, 3), "fitted_on": fit,
            "checked_on": check, "check_predicted_s": round(predicted, 3), "check_measured_s": ORIGINAL_SECONDS[check],
            "check_error": round(predicted / ORIGINAL_SECONDS[check] - 1, 3), "rows": rows}


def projection_markdown(projection: dict) -> str:
    shapes = sorted({shape for row in projection["rows"].values() for shape in row})
    lines = ["| kernel | " + " | ".join(SHAPES[s][0].split(" (")[0] for s in shapes) + " |",
             "|" + "---|" * (1 + len(shapes))]
    for name, row in projection["rows"].items():
        cells = [f"{row[s]['step_s']:.2f} s ({100 * row[s]['attention_share']:.0f}% attention)" if s in row else "-"
                 for s in shapes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Wan 14B with CFG on v6e-8, tensor layout, s/step projected: 40 x the kernel's cycles at "
        f"{projection['clock_hz'] / 1e9:.2f} GHz, plus the FLOPs outside self-attention at "
        f"{projection['fitted_other_efficiency']:.2f} of the calibration matmul's rate (fitted to the original's "
        f"{ORIGINAL_SECONDS[projection['fitted_on']]} s at {SHAPES[projection['fitted_on']][0].split(' (')[0]}). "
        f"Check: the original at {SHAPES[projection['checked_on']][0].split(' (')[0]} projects to "
        f"{projection['check_predicted_s']:.2f} s against {projection['check_measured_s']} s measured "
        f"({100 * projection['check_error']:+.0f}%).")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def markdown(table: dict) -> str:
    shapes = list(table["shapes"])
    head = "| chip | kernel | " + " | ".join(table["shapes"][s][0] for s in shapes) + " |"
    lines = [head, "|" + "---|" * (2 + len(shapes))]
    for chip, entry in table["chips"].items():
        matmul = entry["matmul"]
        lines.append(f"| {chip} | calibration matmul ({', '.join(f'{n}^3: {r / 1e3:.0f}k' for n, r in matmul['by_size'].items())}"
                     f" FLOP/cycle) | " + " | ".join("1.00" for _ in shapes) + " |")
        for name, side in entry["sides"].items():
            cells = []
            for shape in shapes:
                if "error" in side:
                    cells.append(f"no estimate: {side['error'][:70]}")
                    continue
                record = side["shapes"][shape]
                mark = "" if record["valid"] else " (not valid)"
                cells.append(f"{record['fraction_of_matmul']:.2f}{mark} ({record['cycles'] / 1e6:.2f} M)")
            lines.append(f"| {chip} | {name if name.startswith('maxdiffusion') else 'ours, ' + name} | " + " | ".join(cells) + " |")
        for peer, records in entry["peers"].items():
            label = {"stock": "jax's stock Splash (whole grid, 1 head)"}[peer]
            cells = []
            for shape in shapes:
                record = records.get(shape)
                if record is None:
                    cells.append("-")
                elif "error" in record:
                    cells.append(f"no estimate: {record['error'][:70]}")
                else:
                    mark = "" if record["valid"] else " (not valid: faster than the matmul)"
                    cells.append(f"{record['fraction_of_matmul']:.2f}{mark} ({record['cycles'] / 1e6:.2f} M)")
            lines.append(f"| {chip} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each cell: useful FLOP per cycle as a fraction of the calibration matmul's, and the estimated "
                 "cycles (M = million) for one call on one chip. libtpu's estimates, not TPU measurements.")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--chip", action="append", choices=sorted(CHIPS), help="repeatable; default all three")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default all")
    parser.add_argument("--maxdiffusion", metavar="PATH",
                        help="maxdiffusion's src/maxdiffusion/kernels/custom_splash_attention.py, to compile beside ours")
    parser.add_argument("--before", metavar="PATH",
                        help="another splash_attention.py to measure beside ours (e.g. git show REV:splash_attention.py)")
    parser.add_argument("--no-stock", action="store_true", help="skip jax's stock Splash kernel")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time (default: cores)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"result cache (default {DEFAULT_CACHE}); '' for none")
    parser.add_argument("--json", metavar="PATH", help="write the table as JSON")
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    table = kernel_table(args.chip or list(CHIPS), args.shape or list(SHAPES), args.cache or None, args.jobs,
                         maxdiffusion=args.maxdiffusion, before=args.before, stock=not args.no_stock)
    sys.stdout.write(markdown(table) + "\n")
    if "v6e" in table["chips"] and {"14b-720p", "14b-848x480"} <= set(table["shapes"]):
        projection = project_step(table)
        table["step_projection"] = projection
        sys.stdout.write("\n" + projection_markdown(projection) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
