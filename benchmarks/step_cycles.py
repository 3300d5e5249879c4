"""libtpu's static cycle estimates for the pack's own denoising step, by op group, and the step they project.

    .venv/bin/python benchmarks/step_cycles.py --jobs 1                  # the README's step table (v6e-8, 14B)
    .venv/bin/python benchmarks/step_cycles.py --size 720x1280 --json out.json

The profiler (``LIBTPU_INIT_ARGS=--xla_jf_dump_static_llo_profile_to=DIR``, see ``tpu_cycles.py``) aborts on
multi-chip programs and runs past 15 minutes on a whole SPMD step, so this measures ONE chip's local program:

- **A depth probe of the step at one device's shapes.** The pack's step program (``sampling.StepProgram``, the
  diffusers transformer through torchax, the pack's attention dispatch) is compiled for one chip with a mesh
  of one device, the transformer cut to 1, 2 and 3 blocks, each block at the per-device widths of the tensor
  layout on the (dp, tp) mesh: batch 1 of the CFG pair (dp=2), 40/tp heads in self- and cross-attention
  (q, k, v column-split, the outputs row-split), FFN 13824/tp. The per-block cycles are the differences
  (checked linear: the 1->2 and 2->3 steps agree within 3%), the rest (patch embedding, time embedding,
  rotary tables, the head, the scheduler's update) is counted once.
- **The attention kernel is priced apart.** Inside the probe the Splash kernel is replaced by a stub Pallas
  call with the same operands and output (so XLA's fusions around it, the scaling, smoothing, pads and
  transposes, are those of the real call); the stub's own cycles are excluded. The kernel's cycles are
  ``tpu_cycles.py``'s per-grid-step figures times the grid at the same per-device shape.
- **Collectives** are not in a one-chip program. Their link time is the pack's cost model
  (``sharding.layer_collective_bytes``: the bytes a ring moves through a device's links) over the chip's
  published ICI bandwidth (``runtime.chips``), per block.

Op groups of the probe's programs (by the optimised HLO of each op libtpu prices): the attention kernel,
matmul fusions (a fusion or op holding a dot or convolution), collectives (cost model), and the rest
(norms, rotary embedding, modulation, transposes, pads, copies), plus the top ops by name. Matmul
fusions are also given as a fraction of the calibration matmul's FLOP rate (their dots' FLOPs per cycle).

The projection (seconds per step, v6e-8, Wan 14B with CFG):

    seconds = 40 x (kernel cycles + per-block cycles) / clock + fixed cycles / clock + (1 - overlap) x link seconds

with the clock v6e's published peak over its MXUs (1.75 GHz) and ``overlap`` (how much of the collectives'
link time hides under compute) the ONE fitted constant, fitted to the original pack's measured step at
1280x720 (4.60 s, its kernel as it ran) and validated on its 848x480 step (1.37 s).

These are the compiler's estimates and a cost model, not measurements on a TPU.

STATUS (work in progress, issue 20): the probe's program builds and compiles for one v6e chip (46 s, 1.4 GB
at 832x480, 81 frames, one block), but libtpu's profiler, run on it, exhausts a 14 GB address-space limit
(24 GB when unlimited) before it has priced half its ops: at 81 frames after ~36 ops, at 17 frames after
~51 (diffusers' rotary scatter is where it stops with diffusers' processor). So no per-op-group table and no
projection come out of this yet; the README's projection is still ``tpu_cycles.py``'s. What works: the
probe's program (``--probe``, ``WAN_TPU_STEP_CYCLES_HLO=DIR`` keeps its optimised HLO), the HLO's grouping
(``classify_hlo``), and the rotary embedding alone (``--rotary``; slow under the profiler too).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_cycles  # noqa: E402  (the cycle dump's machinery: one process per compile, cached)

logger = logging.getLogger("wan_tpu.step_cycles")

MODEL = "14B"
MESH = {"dp": 2, "tp": 4}  # v6e-8's (2, 4) mesh, CFG pair over dp
FRAMES = 81
SIZES = {"480x832": (480, 832), "480x848": (480, 848), "720x1280": (720, 1280)}
KERNEL_SHAPES = {"480x832": "14b-480p", "480x848": "14b-848x480", "720x1280": "14b-720p"}
ORIGINAL_SECONDS = {"720x1280": 4.60, "480x848": 1.37}  # the original pack on v6e-8, measured
FIT, CHECK = "720x1280", "480x848"
DEPTHS = (1, 2, 3)
LINEAR_TOLERANCE = 0.03
STUB_NAME = "wan_attention_stub"
# Pack files the probe's program is built from (its cache key).
PROGRAM_FILES = ("splash_attention.py", "sharding.py", "runtime/attention.py", "env_manager.py",
                 "runtime/torch_bridge.py", "sampling/step_program.py", "models/wan/modules.py",
                 "models/wan/attention_processor.py", "benchmarks/step_cycles.py")


# ------------------------------------------------------------------ the probe's program (worker process)
def _local_block_widths(config: dict, tp: int) -> dict:
    heads = config["num_attention_heads"]
    if heads % tp or config["ffn_dim"] % tp:
        raise ValueError(f"{heads} heads, FFN {config['ffn_dim']}: tp={tp} must divide both")
    return {"heads": heads // tp, "head_dim": config["attention_head_dim"], "ffn": config["ffn_dim"] // tp}


def local_module(pack, config: dict, layers: int, tp: int, precision: str = "bf16"):
    """The transformer as the pack loads it (``meta_module``), ``layers`` blocks deep, each block at one
    device's widths in the tensor layout: attention with heads/tp heads of the same head_dim on the full
    hidden size, FFN ffn_dim/tp. The RMS norms of q and k then run over one device's heads, as the local
    part of the SPMD program's norm across heads does (its partial sums' all-reduce is not counted)."""
    import torch
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_wan import WanAttention

    modules = pack("models.wan.modules")
    module = modules.meta_module("transformer", dict(config, num_layers=layers), precision)
    widths = _local_block_widths(config, tp)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    dtype = next(module.blocks[0].ffn.parameters()).dtype
    with torch.device("meta"):
        for block in module.blocks:
            for name, cross in (("attn1", None), ("attn2", widths["head_dim"])):
                old = getattr(block, name)
                new = WanAttention(dim=dim, heads=widths["heads"], dim_head=widths["head_dim"], eps=config["eps"],
                                   added_kv_proj_dim=config.get("added_kv_proj_dim") if cross else None,
                                   cross_attention_dim_head=cross, processor=type(old.processor)())
                setattr(block, name, new.to(dtype))
            block.ffn = FeedForward(dim, inner_dim=widths["ffn"], activation_fn="gelu-approximate").to(dtype)
    module.eval()
    return module


def _stub_flash_attention(q, k, v, *, kv_len, blocks, interpret, paths=None, lengths=None, **_):
    """Splash's Pallas call replaced: same operands (the fixed bounds included), same output, one grid step
    per (head, query block) that writes zeros. Its cycles are excluded; the kernel is priced apart."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    splash = sys.modules[_stub_flash_attention.splash_name]
    heads, q_pad, head_dim = q.shape
    head_dim_v = v.shape[2]
    block_q, block_kv, _ = blocks
    m0, fixed = splash.fixed_bounds(q, k, block_q) if lengths is None else splash.fixed_bounds(q, k, block_q, lengths)

    def kernel(fixed_ref, q_ref, k_ref, v_ref, m_ref, o_ref):
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(heads, q_pad // block_q),
            in_specs=[pl.BlockSpec((None, block_q, head_dim), lambda h, i, f: (h, i, 0)),
                      pl.BlockSpec((None, block_kv, head_dim), lambda h, i, f: (h, 0, 0)),
                      pl.BlockSpec((None, block_kv, head_dim_v), lambda h, i, f: (h, 0, 0)),
                      pl.BlockSpec((None, 1, block_q), lambda h, i, f: (h, 0, i))],
            out_specs=pl.BlockSpec((None, head_dim_v, block_q), lambda h, i, f: (h, 0, i))),
        out_shape=jax.ShapeDtypeStruct((heads, head_dim_v, q_pad), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        name=STUB_NAME,
    )(fixed, q, k, v, m0)


def compile_probe(job: dict) -> dict:
    """Compile the probe ``job`` describes (in the worker, under the cycle dump); the optimised HLO's ops."""
    import jax

    tpu_compile = tpu_cycles.load_module(os.path.join(REPO, "benchmarks", "tpu_compile.py"), "wan_tpu_step_cycles_compile")
    pack = tpu_compile.load_pack()
    splash = pack("splash_attention")
    if job.get("stub", True):
        _stub_flash_attention.splash_name = splash.__name__
        splash.flash_attention = _stub_flash_attention
    configs = pack("models.wan.configs")
    _, config = configs.resolve_model(job["model"])
    chip = tpu_compile.Chip("local", job["chip"], 1, job["topology"])
    programs = tpu_compile.Programs.__new__(tpu_compile.Programs)
    programs.pack, programs.chip, programs.precision = pack, chip, "bf16"
    env_manager = pack("env_manager")
    programs.manager = env_manager.TorchaxEnvManager.instance()
    programs.jax = programs.manager.jax
    programs.devices = tpu_compile.topology_devices(chip)[:1]
    programs.mesh = env_manager.build_mesh(programs.devices, 1, 1)
    programs.mesh_shape = (1, 1)
    programs._modules = {}
    local = dict(config, num_layers=job["layers"])
    module = local_module(pack, config, job["layers"], job["tp"])
    if job.get("processor") == "pack":
        pack("models.wan.attention_processor").install(module)
    _register_module(programs, local, module)
    jitted, args = programs.step(local, job["height"], job["width"], job["frames"], cfg=False, layout="tensor")
    compiled, _, _ = programs.compile(jitted, args)
    text = compiled.as_text()
    if os.environ.get("WAN_TPU_STEP_CYCLES_HLO"):  # a folder to keep the optimised HLO in (for reading)
        with open(os.path.join(os.environ["WAN_TPU_STEP_CYCLES_HLO"], f"probe_{job['height']}x{job['width']}_"
                               f"{job['layers']}_{job.get('processor', 'diffusers')}.hlo"), "w", encoding="utf-8") as handle:
            handle.write(text)
    return {"hlo_ops": classify_hlo(text)}


def _register_module(programs, config: dict, module) -> None:
    """``Programs.component``'s cache entry for the transformer, with ``module`` as given (one device)."""
    sharding = programs.pack("sharding")
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, sharding.RULES["transformer"],
                                   dict(programs.mesh.shape))
    named = sharding.to_named_shardings(plan, programs.mesh)
    jnp = programs.jax.numpy
    weights = {name: programs.jax.ShapeDtypeStruct(tuple(t.shape), jnp.dtype(str(t.dtype).removeprefix("torch.")),
                                                   sharding=named[name]) for name, t in state.items()}
    key = ("transformer", json.dumps(config, sort_keys=True, default=list))
    programs._modules[key] = (module, weights, plan)


# ------------------------------------------------------------------ the optimised HLO, by op
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s(?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$")
_SHAPE = re.compile(r"\b(?P<dtype>[a-z]+[0-9a-z]*)\[(?P<dims>[0-9,]*)\]")
_CALLS = re.compile(r"calls=%?(?P<callee>[\w.\-]+)")
_OP_NAME = re.compile(r'op_name="(?P<op>[^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')
_KERNEL_NAME = re.compile(r'"name"\s*:\s*"(?P<kernel>[^"\\]+)')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{(?P<dims>[0-9,]*)\}")
_COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _dot_flops(line_shape: str, rest: str) -> int:
    """2 x output elements x contracted size of a ``dot`` instruction's text."""
    out = _SHAPE.search(line_shape)
    operands = _SHAPE.findall(rest.split(")")[0])
    contracting = _CONTRACTING.search(rest)
    if not out or not operands or not contracting:
        return 0
    lhs = _dims(operands[0][1])
    k = 1
    for d in _dims(contracting.group("dims")):
        k *= lhs[d]
    n = 1
    for d in _dims(out.group("dims")):
        n *= d
    return 2 * n * k


def classify_hlo(text: str) -> dict[str, dict]:
    """{op name: {"group", "flops", "op_name", "shape"}} for every instruction of the optimised HLO's
    computations that are not fused bodies: group "matmul" (a dot or convolution, in a fusion or alone),
    "kernel" (a Mosaic custom call, named), "collective", "other". ``flops``: the dots' FLOPs; ``op_name``:
    the first jax op name of the metadata (where the op came from)."""
    computations: dict[str, list[dict]] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = computations.setdefault(header.group("name"), [])
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            rest = instruction.group("rest")
            callee = _CALLS.search(rest)
            op_name = _OP_NAME.search(rest)
            current.append({"name": instruction.group("name"), "opcode": instruction.group("opcode"),
                            "shape": instruction.group("shape").strip(), "rest": rest,
                            "callee": callee.group("callee") if callee else None,
                            "op_name": op_name.group("op") if op_name else ""})

    def flops_of(computation: str, seen=()) -> tuple[int, bool]:
        total, matmul = 0, False
        for ins in computations.get(computation, []):
            if ins["opcode"] == "dot":
                total, matmul = total + _dot_flops(ins["shape"], ins["rest"]), True
            elif ins["opcode"] == "convolution":
                matmul = True
            if ins["callee"] and ins["callee"] not in seen:
                sub, sub_matmul = flops_of(ins["callee"], seen + (computation,))
                total, matmul = total + sub, matmul or sub_matmul
        return total, matmul

    fused = {ins["callee"] for body in computations.values() for ins in body if ins["opcode"] == "fusion"}
    ops = {}
    for computation, body in computations.items():
        if computation in fused:
            continue
        for ins in body:
            opcode = ins["opcode"]
            if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                continue
            record = {"opcode": opcode, "shape": _SHAPE.search(ins["shape"]).group(0) if _SHAPE.search(ins["shape"]) else "",
                      "op_name": ins["op_name"], "flops": 0}
            if opcode == "custom-call":
                target = _CUSTOM_TARGET.search(ins["rest"])
                kernel = _KERNEL_NAME.search(ins["rest"])
                record["group"] = "kernel" if target and target.group("target") == "tpu_custom_call" else "other"
                record["kernel"] = kernel.group("kernel") if kernel else ""
            elif any(opcode.startswith(kind) for kind in _COLLECTIVE_OPS):
                record["group"] = "collective"
            else:
                flops, matmul = (_dot_flops(ins["shape"], ins["rest"]), True) if opcode == "dot" else (
                    flops_of(ins["callee"]) if ins["callee"] else (0, opcode == "convolution"))
                record["group"], record["flops"] = ("matmul" if matmul else "other"), flops
            ops[ins["name"]] = record
    return ops


# ------------------------------------------------------------------ jobs and figures
def code_hash() -> str:
    digest = hashlib.sha256()
    for path in PROGRAM_FILES:
        full = os.path.join(REPO, path)
        if os.path.exists(full):
            with open(full, "rb") as handle:
                digest.update(path.encode() + handle.read())
    for package in ("diffusers", "torchax", "jax"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()[:16]


def probe_jobs(size: str, frames: int, chip: str = "v6e", processor: str = "diffusers", depths=DEPTHS,
               tp: int = MESH["tp"]) -> list[dict]:
    height, width = SIZES[size]
    return [{"kind": "step_probe", "chip": chip, "topology": tpu_cycles.CHIPS[chip], "model": MODEL,
             "height": height, "width": width, "frames": frames, "layers": layers, "tp": tp,
             "processor": processor, "code": code_hash()} for layers in depths]


# ------------------------------------------------------------------ the rotary embedding alone
def compile_rotary(job: dict) -> dict:
    """q's rotary embedding on one device, [1, tokens, heads, head_dim] bf16 with fp32 (cos, sin) tables, as
    torchax lowers diffusers' version ("scatter": fp32 values written into a bf16 tensor at every other
    lane) or the pack's (``models/wan/attention_processor.py``: both halves stacked)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(platform="tpu", topology_name=job["topology"]).devices[0]
    place = SingleDeviceSharding(device)
    tokens, heads, head_dim = job["tokens"], job["heads"], job["head_dim"]
    x = jax.ShapeDtypeStruct((1, tokens, heads, head_dim), jnp.bfloat16, sharding=place)
    table = jax.ShapeDtypeStruct((1, tokens, 1, head_dim), jnp.float32, sharding=place)

    def rotary(x, cos_table, sin_table):
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        cos, sin = cos_table[..., 0::2], sin_table[..., 1::2]
        even, odd = x1 * cos - x2 * sin, x1 * sin + x2 * cos  # fp32
        if job["variant"] == "scatter":
            out = jnp.empty_like(x)
            out = out.at[..., 0::2].set(even.astype(x.dtype)).at[..., 1::2].set(odd.astype(x.dtype))
            return out
        return jnp.stack((even.astype(x.dtype), odd.astype(x.dtype)), axis=-1).reshape(x.shape)

    jax.jit(rotary).lower(x, table, table).compile()
    return {}


def rotary_jobs(tokens_list=(4096, 8192), chip: str = "v6e", heads: int = 10, head_dim: int = 128) -> list[dict]:
    return [{"kind": "rotary_probe", "topology": tpu_cycles.CHIPS[chip], "tokens": tokens, "heads": heads,
             "head_dim": head_dim, "variant": variant} for variant in ("scatter", "stack") for tokens in tokens_list]


# ------------------------------------------------------------------ command line
def group_cycles(result: dict) -> dict[str, int]:
    """A probe's profiled cycles summed by op group (ops the HLO grouping does not know count as "other"),
    the stub kernel's excluded."""
    groups: dict[str, int] = {}
    hlo = result.get("hlo_ops", {})
    for name, cycles in result["ops"].items():
        if STUB_NAME in name:
            continue
        group = hlo.get(name, {}).get("group", "other")
        groups[group] = groups.get(group, 0) + cycles
    return groups


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--probe", action="store_true", help="profile the step's depth probe (see STATUS)")
    parser.add_argument("--size", choices=sorted(SIZES), default="480x832")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--depth", type=int, action="append", help="blocks; repeatable (default 1, 2, 3)")
    parser.add_argument("--processor", choices=("diffusers", "pack"), default="diffusers",
                        help="diffusers' Wan attention processor or the pack's (models/wan/attention_processor.py)")
    parser.add_argument("--rotary", metavar="TOKENS", help="profile the rotary embedding alone at these token "
                        "counts (comma-separated), diffusers' scatter against the pack's stack")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at a time (default 1)")
    parser.add_argument("--cache", default=tpu_cycles.DEFAULT_CACHE, help="result cache; '' for none")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    jobs = []
    if args.rotary:
        jobs += rotary_jobs(tuple(int(t) for t in args.rotary.split(",")))
    if args.probe:
        jobs += probe_jobs(args.size, args.frames, processor=args.processor, depths=tuple(args.depth or DEPTHS))
    if not jobs:
        logger.error("nothing to do: give --probe and/or --rotary TOKENS")
        return 2
    results = tpu_cycles.run_jobs(jobs, args.cache or None, args.jobs, keep_going=True)
    lines = ["| job | cycles by group |", "|---|---|"]
    for job, result in zip(jobs, results):
        label = (f"rotary {job['variant']}, {job['tokens']} tokens" if job["kind"] == "rotary_probe" else
                 f"{job['height']}x{job['width']}, {job['frames']} frames, {job['layers']} blocks, {job['processor']}")
        cell = result["error"] if "error" in result else ", ".join(
            f"{group} {cycles:,}" for group, cycles in sorted(group_cycles(result).items()))
        lines.append(f"| {label} | {cell} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([dict(job=job, result=result) for job, result in zip(jobs, results)], handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
