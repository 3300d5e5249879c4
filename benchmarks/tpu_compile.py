"""Compile the pack's TPU programs for a TPU slice, on a machine with no TPU.

    .venv/bin/python benchmarks/tpu_compile.py --model 14B --height 720 --width 1280 --frames 81 \\
        --chip v6e-8 --json out.json
    .venv/bin/python benchmarks/tpu_compile.py --table        # the README's table (all cells; resumable)

libtpu compiles for a TPU topology it is told about (``jax.experimental.
topologies``), with no TPU attached and nothing downloaded. The programs are
exactly the ones the pack runs, built the way the pack builds them:

- the functions ``WanTPUPipeline`` jits (``_make_encode_fn``, ``_make_step_fn``
  with CFG and without; the VAE decode's chunk programs, ``VAEChunkDecoder``);
- the diffusers / transformers modules built on torch's meta device with the
  dtypes the loaders give (``models.wan.modules.meta_module``);
- weights as abstract arrays carrying the shardings of ``sharding.py`` on the
  mesh of ``env_manager.build_mesh`` (dp=2, tp the rest);
- the real Mosaic Splash kernel (``splash.force_interpret(False)``), with the
  attention dispatch tracing for TPU (``TorchaxEnvManager.target_platform``).

Before compiling a stage, the HBM plan (``memory_plan.plan_memory(...).check()``)
is asked, as the pipeline asks it before loading; a configuration it refuses
is recorded as refused, with its message, and not compiled (``--ignore-plan``
compiles it anyway and records the plan's verdict beside the compiler's).

Per stage it prints a row and writes JSON: compiled or the compiler's error;
lower and compile seconds; per-device bytes (arguments, outputs, temporaries,
aliased, peak) against the chip's HBM; the plan's per-device estimate for the
stage; FLOPs per device; the collectives of the optimised HLO by kind (count,
bytes per device); for the denoising step, seconds per step at the chip's
peak bf16 FLOP/s and at 38% of it (the original's measured MFU on v6e-8), and
the cost model's projection adding the collectives' time over the chip's
published ICI bandwidth (``projected_step_seconds``).
These are compiler facts and projections, not measurements on a TPU.

``--layout tensor|sequence|auto|both`` picks the step's layout (see
``sharding.LAYOUTS``); auto is the pipeline's own choice, both compiles each.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
import traceback

# Compile for the named topology; never grab a TPU this machine may have, and
# time real compilations (not loads from JAX's persistent cache).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WAN_TPU_COMPILE_CACHE", "0")
# libtpu takes a lockfile per process; compiling for a topology opens no TPU, so
# a second process (a test run, a ComfyUI holding the TPU) may compile beside it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
MFU_ORIGINAL = 0.38  # the original pack's measured MFU, Wan 14B 720P on v6e-8
STAGES = ("text_encoder", "step_cfg", "step", "vae_decode")
IMAGE_STAGES = ("vae_encode", "image_encoder")  # image-to-video models add these (image_encoder: Wan 2.1 I2V)
TABLE_MODELS = ("1.3B", "14B")
TABLE_SIZES = ((480, 848), (480, 832), (720, 1280))
TABLE_CHIPS = ("v6e-8", "v5p-8", "v5e-8")
TABLE_FRAMES = 81

logger = logging.getLogger("wan_tpu.tpu_compile")


# ------------------------------------------------------------------ chips
def generation(name: str):
    """The pack's facts of a TPU generation ("v6e"): ``runtime.chips``' one table (peak bf16 FLOP/s, HBM and
    ICI bandwidth per chip as Google Cloud publishes them, cores per chip, 2-D or 3-D topology, jax's
    device_kind)."""
    return load_pack()("runtime.chips").BY_NAME[name]


def projected_step_seconds(record: dict, chip: "Chip", mfu: float = MFU_ORIGINAL) -> dict:
    """A projection (not a measurement) of one compiled step's seconds on ``chip``, from its compiled FLOPs
    and collective bytes per device and the chip's published peak FLOP/s and ICI bandwidth.

    compute = FLOPs / (peak x ``mfu``); communication = the bytes each collective moves through a device's
    links / ICI bandwidth, with a ring's traffic per byte of result: all-reduce 2(n-1)/n, all-gather,
    reduce-scatter and all-to-all (n-1)/n, collective-permute 1, n = the tensor-parallel group. Reported
    with no overlap (their sum: what a step whose collectives sit on the critical path costs) and with
    full overlap (the larger of the two)."""
    devices_per_chip = record["devices"] / chip.chips
    dp, tp = record["mesh"]["dp"], record["mesh"]["tp"]
    n = max(2, tp)  # weights split over tp: the all-reduces and the weight gathers
    # The sequence layout's all-to-alls run over the devices the tokens split over: tp when dp takes the
    # CFG pair, dp x tp for one video (sharding.token_split).
    batch = 2 if record.get("name", "step_cfg") == "step_cfg" else 1
    tokens_over = tp if batch % dp == 0 else dp * tp
    m = max(2, tokens_over) if record.get("layout") == "sequence" else n
    ring = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": (n - 1) / n,
            "all-to-all": (m - 1) / m, "collective-permute": 1.0}
    moved = sum(ring[kind] * entry["bytes_per_device"] for kind, entry in (record.get("collectives") or {}).items())
    ici_bytes_per_second = chip.spec.ici_gbps * 1e9 / 8 / devices_per_chip
    compute = record["flops_per_device"] / (record["peak_flops_per_device"] * mfu)
    communication = moved / ici_bytes_per_second
    return {"mfu": mfu, "compute_seconds": round(compute, 3), "ici_bytes_moved_per_device": int(moved),
            "communication_seconds": round(communication, 3),
            "seconds_no_overlap": round(compute + communication, 3),
            "seconds_full_overlap": round(max(compute, communication), 3)}


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # "v6e-8"
    generation: str  # "v6e"
    chips: int
    topology: str  # libtpu's topology name, "v6e:2x4"

    @property
    def spec(self):
        return generation(self.generation)


def _grid(chips: int, dims: int) -> str:
    """A near-square power-of-two grid of ``chips`` chips: 8 -> 2x4 (2-D) or 2x2x2 (3-D), 4 -> 2x2x1."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: give a slice of a power-of-two size (8, 16, 32, ...)")
    sides = [1] * dims
    for i in range(chips.bit_length() - 1):
        sides[i % dims] *= 2
    sides = sorted(sides) if dims == 2 else sorted(sides[:2]) + sides[2:]
    if dims == 3 and chips == 4:
        sides = [2, 2, 1]
    return "x".join(map(str, sides))


def parse_chip(name: str) -> Chip:
    """'v6e-8' -> Chip(v6e, 8 chips, 'v6e:2x4'); 'v5p-8' is 4 chips (8 cores), 'v5p:2x2x1'."""
    match = re.fullmatch(r"(v5e|v6e|v5p|v4)-(\d+)", name.strip().lower())
    if not match:
        raise ValueError(f"chip={name!r}: give a TPU slice such as v6e-8, v5e-8, v5p-8, v4-8, v6e-16 or v5p-16")
    kind, size = match.group(1), int(match.group(2))
    spec = generation(kind)
    if size % spec.cores_per_chip:
        raise ValueError(f"chip={name!r}: a {kind} slice counts {spec.cores_per_chip} cores per chip")
    chips = size // spec.cores_per_chip
    return Chip(name, kind, chips, f"{kind}:{_grid(chips, 3 if spec.three_d else 2)}")


def topology_devices(chip: Chip) -> list:
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=chip.topology).devices)


# ------------------------------------------------------------------ the pack
def load_pack():
    """The pack imported by folder path, as ComfyUI does (``pack_loader``): a function from a module name
    to the module."""
    if REPO not in sys.path:
        sys.path.append(REPO)  # last: nothing the environment already provides is shadowed
    from pack_loader import pack_module

    return pack_module


# ------------------------------------------------------------------ HLO facts
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
    "c64": 8, "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
# "%name = <shape> all-reduce(" (synchronous) or "... all-gather-done(" (the result of an async pair).
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(COLLECTIVE_KINDS)
    + r")(?P<suffix>-start|-done)?\("
)


def shape_bytes(text: str) -> int:
    """Bytes of the array shape(s) in HLO shape text: 'bf16[2,128]{1,0}' or a tuple of them."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total += elements * _DTYPE_BYTES[dtype]
    return int(total)


def collectives(hlo_text: str) -> dict:
    """{kind: {count, bytes_per_device}} over the optimised (SPMD-partitioned, per-device) HLO.

    A synchronous collective counts with its result shape; an async pair
    (``-start`` / ``-done``) counts once, at ``-done``, whose result is the
    collective's result.
    """
    out = {kind: {"count": 0, "bytes_per_device": 0} for kind in COLLECTIVE_KINDS}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.match(line)
        if not match or match.group("suffix") == "-start":
            continue
        entry = out[match.group("kind")]
        entry["count"] += 1
        entry["bytes_per_device"] += shape_bytes(match.group("shape"))
    return out


def custom_call_count(hlo_text: str, target: str = "tpu_custom_call") -> int:
    """Mosaic kernels in the optimised HLO (each Splash call is one)."""
    return len(re.findall(r'custom_call_target="' + re.escape(target) + '"', hlo_text))


def memory_facts(compiled) -> dict:
    stats = compiled.memory_analysis()
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    reported = getattr(stats, "peak_memory_in_bytes", 0) or 0
    return {
        "argument_bytes_per_device": int(argument),
        "output_bytes_per_device": int(output),
        "temp_bytes_per_device": int(temp),
        "alias_bytes_per_device": int(alias),
        "generated_code_bytes_per_device": int(stats.generated_code_size_in_bytes),
        # The compiler's own peak where it reports one; else the sum.
        "peak_bytes_per_device": int(reported) if reported > 0 else int(argument + output + temp - alias),
        "peak_source": "memory_analysis().peak_memory_in_bytes" if reported > 0 else "argument + output + temp - alias",
    }


# ------------------------------------------------------------------ programs
class Programs:
    """The pack's jitted stage functions for one (model, precision, chip, mesh), with abstract arguments."""

    def __init__(self, pack, chip: Chip, precision: str = "bf16", dp=None, tp=None):
        self.pack, self.chip, self.precision = pack, chip, precision
        env_manager = pack("env_manager")
        self.manager = env_manager.TorchaxEnvManager.instance()
        self.jax = self.manager.jax
        self.devices = topology_devices(chip)
        self.mesh = env_manager.build_mesh(self.devices, dp, tp)
        self.mesh_shape = tuple(self.mesh.shape.values())
        self._modules: dict = {}

    # -- abstract weights, as runtime.placement.place_weights would place them
    def component(self, component: str, config: dict):
        sharding = self.pack("sharding")
        key = (component, json.dumps(config, sort_keys=True, default=list))
        if key not in self._modules:
            precision = "fp32" if component in ("vae", "image_encoder") else self.precision
            module = self.pack("models.wan.modules").meta_module(component, config, precision)
            state = dict(module.named_parameters(remove_duplicate=False))
            state.update(dict(module.named_buffers(remove_duplicate=False)))
            plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, sharding.RULES[component],
                                           dict(self.mesh.shape))
            named = sharding.to_named_shardings(plan, self.mesh)
            jnp = self.jax.numpy
            weights = {
                name: self.jax.ShapeDtypeStruct(tuple(t.shape), jnp.dtype(str(t.dtype).removeprefix("torch.")),
                                                sharding=named[name])
                for name, t in state.items()
            }
            self._modules[key] = (module, weights, plan)
        return self._modules[key]

    def _sharding(self, *spec):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _abstract(self, shape, dtype, sharding):
        return self.jax.ShapeDtypeStruct(tuple(shape), self.jax.numpy.dtype(dtype), sharding=sharding)

    def text_encoder(self, te_config: dict):
        module, weights, _ = self.component("text_encoder", te_config)
        text_tokens = self.pack("models.wan.configs").TEXT_TOKENS
        ids = self._abstract((2, text_tokens), "int32", self.pack("runtime.placement").batch_sharding(self.mesh, 2))
        return self.pack("models.wan.components").text_encode_fn(self.manager, module), (weights, ids, ids)

    def step(self, config: dict, height: int, width: int, frames: int, cfg: bool, layout: str = "tensor",
             whole_weights: bool = False, cache_mode: str | None = None):
        """The denoising step (``sampling.StepProgram``, as the pipeline runs it) and its abstract arguments.
        ``whole_weights`` (sequence layout): the weights it would gather per layer come whole on every
        device, as ``runtime.placement.whole_weight_copies`` makes them."""
        module, weights, plan = self.component("transformer", config)
        if whole_weights:
            gathered = self.pack("sharding").sequence_gathered_weights(plan.specs)
            weights = {name: self._abstract(w.shape, w.dtype, self._sharding()) if name in gathered else w
                       for name, w in weights.items()}
        transformer = self.pack("runtime.components").TransformerComponent(module, weights, plan, self.mesh,
                                                                         dict(module.config), {}, module.dtype)
        family = self.pack("models.wan.families").family_of_config(config)
        step_program = self.pack("sampling.step_program")
        program = step_program.StepProgram(self.manager, family, transformer,
                                           step_program.StepKind(cfg, cache_mode, layout))
        shape = self.pack("models.wan.latents").LatentGeometry.from_transformer_config(config).latent_shape(
            height, width, frames)
        context_dtype = "bfloat16" if self.precision == "bf16" else "float32"
        return program.jitted, program.abstract_args(shape, self.pack("models.wan.configs").TEXT_TOKENS, context_dtype)

    def vae_decode(self, vae_config: dict, height: int, width: int, frames: int):
        """The VAE decode's chunk programs (``sampling.vae_chunks.VAEChunkDecoder``): [(jitted, args, runs per decode)],
        first latent frame, second, and the steady one that runs for every later frame."""
        module, weights, _ = self.component("vae", vae_config)
        decoder = self.pack("sampling.vae_chunks").VAEChunkDecoder(self.manager, module, self.mesh)
        shape = self.pack("models.wan.latents").LatentGeometry.from_vae_config(vae_config).latent_shape(
            height, width, frames)
        with self.manager.target_platform("tpu"):
            kinds = decoder.chunk_kinds(weights, shape)
        runs = [1, 1, shape[2] - 2][:len(kinds)]
        return [(decoder.jitted, args + (markers,), count) for (markers, args), count in zip(kinds, runs)]

    def vae_encode(self, vae_config: dict, height: int, width: int, frames: int):
        """Image-to-video's VAE encode chunk programs (``sampling.vae_chunks.VAEChunkEncoder``): the first frame, the
        first 4-frame chunk and the steady one."""
        module, weights, _ = self.component("vae", vae_config)
        encoder = self.pack("sampling.vae_chunks").VAEChunkEncoder(self.manager, module, self.mesh)
        if vae_config.get("patch_size"):  # TI2V encodes the image alone (one frame), not a clip
            frames = 1
        with self.manager.target_platform("tpu"):
            kinds = encoder.chunk_kinds(weights, (1, 3, frames, height, width))
        runs = [1, 1, (frames - 1) // 4 - 1][:len(kinds)]
        return [(encoder.jitted, args + (markers,), count) for (markers, args), count in zip(kinds, runs)]

    def image_encoder(self, clip_config: dict):
        """Wan 2.1 I2V's CLIP vision tower on one 224x224 image, as ``WanTPUPipeline.image_encoder`` jits it."""
        module, weights, _ = self.component("image_encoder", clip_config)
        size = clip_config.get("image_size", 224)
        pixels = self._abstract((1, 3, size, size), "float32", self._sharding())
        return self.pack("models.wan.components").image_encode_fn(self.manager, module), (weights, pixels)

    def compile(self, jitted, args, matmul_precision: bool = True):
        """(compiled, lower seconds, compile seconds): traced for TPU with the Mosaic Splash kernel."""
        splash = self.pack("splash_attention")
        precision = (self.pack("models.wan.components").matmul_precision(self.manager, self.precision)
                     if matmul_precision else self.jax.default_matmul_precision(None))
        started = time.perf_counter()
        with self.manager.target_platform("tpu"), splash.force_interpret(False), precision:
            lowered = jitted.lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        return compiled, lowered_at - started, time.perf_counter() - lowered_at


# ------------------------------------------------------------------ one configuration
@dataclasses.dataclass
class Config:
    model: str
    height: int
    width: int
    frames: int
    chip: str
    precision: str = "bf16"
    dp: int | None = None
    tp: int | None = None
    layout: str = "auto"  # the step's: tensor, sequence, auto (the cost model's) or both
    probe_blocks: tuple[int, int] | None = None  # compile the step at these depths and extrapolate (extrapolate_depth)
    whole_weights: str = "auto"  # the sequence step's gathered weights whole where the HBM plan holds them, or "never"


def stage_record(name: str, cfg_run: Config, chip: Chip, mesh_shape, devices: int) -> dict:
    spec = chip.spec
    return {
        "name": name, "model": cfg_run.model, "height": cfg_run.height, "width": cfg_run.width,
        "frames": cfg_run.frames, "chip": chip.name, "topology": chip.topology, "devices": devices,
        "mesh": {"dp": mesh_shape[0], "tp": mesh_shape[1]}, "precision": cfg_run.precision,
        "hbm_bytes_per_device": int(spec.hbm_gib * chip.chips / devices * GiB),
        "peak_flops_per_device": spec.peak_flops * chip.chips / devices,
        "layout": None,  # the step's layout (sharding.LAYOUTS); None for the other stages
        "compiled": False, "refused": False, "error": None,
        "lower_seconds": None, "compile_seconds": None, "peak_bytes_per_device": None,
        "flops_per_device": None, "collectives": None,
    }


def _plan_for(memory_plan, cfg_run: Config, mesh_shape, hbm_bytes: int, cfg: bool, layout: str | None,
              chip: "Chip", whole_weights: bool | None = None):
    # Two-expert models (A14B) are planned with both experts resident, as the pipeline keeps them. The step's
    # layout as compiled (None: the one "auto" picks on this chip); whole weights as compiled (None: where the
    # plan holds them, as the pipeline does; --whole-weights never: False).
    if cfg_run.whole_weights == "never":
        whole_weights = False
    return memory_plan.plan_memory(cfg_run.model, mesh_shape, cfg_run.height, cfg_run.width, cfg_run.frames,
                                   cfg_run.precision, cfg, hbm_bytes=hbm_bytes, layout=layout,
                                   device_kind=chip.spec.device_kind, whole_weights=whole_weights)


PLAN_COMPONENT = {"text_encoder": "text_encoder", "step_cfg": "transformer", "step": "transformer",
                  "vae_decode": "vae", "vae_encode": "vae", "image_encoder": None}


def step_layout(programs: Programs, cfg_run: Config, transformer_config: dict, batch: int) -> str:
    """The step's layout: the one asked for, or for "auto" the one the pipeline would choose
    (``sharding.choose_layout``)."""
    mesh = {"dp": programs.mesh_shape[0], "tp": programs.mesh_shape[1]}
    return programs.pack("memory_plan").resolve_layout(
        cfg_run.layout, transformer_config, mesh, cfg_run.height, cfg_run.width, cfg_run.frames, batch == 2,
        programs.devices[0].device_kind)[0]


def default_stages(model: str) -> tuple[str, ...]:
    """The stages a model runs: every model the four of STAGES; image-to-video also the VAE encode and, for
    Wan 2.1 I2V, the CLIP image encoder."""
    pack = load_pack()
    _, config = pack("models.wan.configs").resolve_model(model)
    family = pack("models.wan.families").family_of_config(config)
    if not family.takes_image:
        return STAGES
    return STAGES + (IMAGE_STAGES if family.clip_images else IMAGE_STAGES[:1])


def run_config(programs: Programs, cfg_run: Config, stages=STAGES, ignore_plan: bool = False,
               shared: dict | None = None, on_stage=None) -> list[dict]:
    """Compile (or refuse) each stage of one configuration. ``shared`` reuses results of programs
    that do not depend on the model or size (the text encoder; the VAE decode per size)."""
    shared = {} if shared is None else shared
    _, transformer_config = programs.pack("models.wan.configs").resolve_model(cfg_run.model)
    records = []
    for name in stages:
        record = stage_record(name, cfg_run, programs.chip, programs.mesh_shape, len(programs.devices))
        refusal = _plan_stage(programs, cfg_run, name, record, transformer_config)
        if refusal is not None and not ignore_plan:
            record.update(refused=True, error=refusal)
        else:
            _compile_stage(programs, cfg_run, name, record, transformer_config, shared)
            if record["compiled"]:
                _memory_fields(programs, cfg_run, name, record, transformer_config)
        records.append(record)
        _report(record, on_stage)
    return records


def _plan_stage(programs: Programs, cfg_run: Config, name: str, record: dict, transformer_config: dict) -> str | None:
    """The HBM plan's fields of a stage's record; its refusal (None when it fits)."""
    memory_plan = programs.pack("memory_plan")
    cfg = name == "step_cfg"
    if name.startswith("step"):
        record["layout"] = step_layout(programs, cfg_run, transformer_config, batch=2 if cfg else 1)
    plan = _plan_for(memory_plan, cfg_run, programs.mesh_shape, record["hbm_bytes_per_device"], cfg,
                     record["layout"] or cfg_run.layout, programs.chip)
    component = PLAN_COMPONENT[name]
    record["whole_weights"] = bool(name.startswith("step") and plan.whole_weights)
    record["plan_bytes_per_device"] = plan.stage_peak_bytes(component) if component else None
    record["plan_run_peak_bytes_per_device"] = plan.peak_bytes
    record["plan_fits"] = plan.fits
    record["plan_summary"] = plan.summary()
    try:
        plan.check()
    except memory_plan.HBMPlanError as error:
        record["plan_error"] = str(error)
        return str(error)
    return None


def _compile_stage(programs: Programs, cfg_run: Config, name: str, record: dict, transformer_config: dict,
                   shared: dict) -> None:
    """The compiler's fields of a stage's record (or the compiler's refusal, which is a result too);
    programs that do not depend on the model are compiled once per size and shared."""
    configs = programs.pack("models.wan.configs")
    key = {"text_encoder": ("text_encoder", cfg_run.precision),
           "vae_decode": ("vae_decode", cfg_run.height, cfg_run.width, cfg_run.frames)}.get(name)
    if key is not None and key in shared:
        record.update({k: v for k, v in shared[key].items() if k in _COMPILER_FIELDS})
        record["reused_from"] = shared[key]["model"]
        return
    try:
        if name.startswith("step"):
            record.update(compile_step(programs, cfg_run, transformer_config, name == "step_cfg", record["layout"],
                                       record["whole_weights"]))
        else:
            vae_config = configs.vae_config_for(transformer_config)
            video = (cfg_run.height, cfg_run.width, cfg_run.frames)
            program_list = {
                "text_encoder": lambda: [(*programs.text_encoder(dict(configs.UMT5_XXL_CONFIG)), 1)],
                "vae_decode": lambda: programs.vae_decode(vae_config, *video),
                "vae_encode": lambda: programs.vae_encode(vae_config, *video),
                "image_encoder": lambda: [(*programs.image_encoder(dict(configs.CLIP_VIT_H_CONFIG)), 1)],
            }[name]()
            record.update(compile_programs(programs, program_list,
                                           matmul_precision=name not in ("vae_decode", "vae_encode")))
    except Exception as error:  # the compiler's refusal is a result
        record.update(compiled=False, error=f"{type(error).__name__}: {error}"[:4000])
        logger.debug("%s", traceback.format_exc())
    if key is not None:
        shared[key] = dict(record)


def _memory_fields(programs: Programs, cfg_run: Config, name: str, record: dict, transformer_config: dict) -> None:
    """A compiled stage's resident peak (beside the experts or shards it does not take), its fit, the
    plan's ratio to it, and for steps the time at the chip's peak and at the original's MFU."""
    peak = record["peak_bytes_per_device"]
    experts = programs.pack("models.wan.configs").MODEL_EXPERTS.get(cfg_run.model, 1)
    if name.startswith("step") and experts > 1:
        # The step takes one expert's weights; the other stays resident beside it.
        _, weights, _ = programs.component("transformer", transformer_config)
        record["resident_experts"] = experts
        record["resident_peak_bytes_per_device"] = peak + (experts - 1) * abstract_bytes_per_device(weights)
    compared = peak
    if record.get("whole_weights"):
        # The step takes whole copies of the weights it would gather; their shards stay cached beside
        # them (the pipeline makes the copies for a run), and the plan counts both.
        _, weights, plan_specs = programs.component("transformer", transformer_config)
        gathered = programs.pack("sharding").sequence_gathered_weights(plan_specs.specs)
        shards = abstract_bytes_per_device({n: w for n, w in weights.items() if n in gathered})
        record["resident_peak_bytes_per_device"] = compared = peak + shards
    record["fits_hbm"] = record.get("resident_peak_bytes_per_device", peak) <= record["hbm_bytes_per_device"]
    planned = record["plan_bytes_per_device"]
    record["plan_ratio"] = round(planned / compared, 3) if compared and planned else None
    if name.startswith("step"):
        ideal = record["flops_per_device"] / record["peak_flops_per_device"]
        record["seconds_per_step_at_peak"] = round(ideal, 3)
        record["seconds_per_step_at_38pct_mfu"] = round(ideal / MFU_ORIGINAL, 3)
    # The same cost model for every program (a VAE decode's seconds per video, a step's per step).
    record["projection"] = {f"at_{round(100 * m)}pct_mfu": projected_step_seconds(record, programs.chip, m)
                            for m in (1.0, MFU_ORIGINAL)}


def compile_step(programs: Programs, cfg_run: Config, transformer_config: dict, cfg: bool, layout: str,
                 whole_weights: bool = False) -> dict:
    """The denoising step's compiled facts: the whole model's step, or with ``cfg_run.probe_blocks`` two
    shallower copies of it (same widths, fewer blocks) compiled and extrapolated to the model's depth."""

    def facts(config):
        step = programs.step(config, cfg_run.height, cfg_run.width, cfg_run.frames, cfg, layout=layout,
                             whole_weights=whole_weights)
        return compile_programs(programs, [(*step, 1)], matmul_precision=True)

    blocks = transformer_config["num_layers"]
    if not cfg_run.probe_blocks or max(cfg_run.probe_blocks) >= blocks:
        return facts(transformer_config)
    low, high = cfg_run.probe_blocks
    shallow = facts(dict(transformer_config, num_layers=low))
    deep = facts(dict(transformer_config, num_layers=high))
    return extrapolate_depth(shallow, deep, (low, high), blocks)


def abstract_bytes_per_device(weights: dict) -> int:
    """Bytes one device holds of abstract sharded arrays (tied weights counted once)."""
    total = 0
    for array in {id(a): a for a in weights.values()}.values():
        shard = array.sharding.shard_shape(array.shape)
        elements = 1
        for dim in shard:
            elements *= dim
        total += elements * array.dtype.itemsize
    return total


def compile_programs(programs: Programs, program_list, matmul_precision: bool) -> dict:
    """Compile each (jitted, args, runs) of a stage; the stage's facts: the largest program's memory
    (they run one after another), FLOPs and collectives times how often each program runs."""
    facts, flops, accessed, lower_total, compile_total, kernels = None, 0.0, 0.0, 0.0, 0.0, 0
    merged: dict = {}
    for jitted, args, runs in program_list:
        compiled, lower_s, compile_s = programs.compile(jitted, args, matmul_precision=matmul_precision)
        text = compiled.as_text()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = memory_facts(compiled)
        if facts is None or memory.get("peak_bytes_per_device", 0) > facts.get("peak_bytes_per_device", 0):
            facts = memory
        flops += runs * float(cost.get("flops", 0.0))
        accessed += runs * float(cost.get("bytes accessed", 0.0))
        lower_total, compile_total = lower_total + lower_s, compile_total + compile_s
        kernels = max(kernels, custom_call_count(text))
        for kind, entry in collectives(text).items():
            total = merged.setdefault(kind, {"count": 0, "bytes_per_device": 0})
            total["count"] += runs * entry["count"]
            total["bytes_per_device"] += runs * entry["bytes_per_device"]
        del compiled, text
    return dict(facts, compiled=True, lower_seconds=round(lower_total, 1), compile_seconds=round(compile_total, 1),
                flops_per_device=flops, bytes_accessed_per_device=accessed, collectives=merged,
                mosaic_kernels=kernels, programs=len(program_list))


# Fields of compile_programs that grow with the number of transformer blocks (linearly: every block is
# the same program on the same shapes).
_DEPTH_LINEAR_FIELDS = ("argument_bytes_per_device", "output_bytes_per_device", "temp_bytes_per_device",
                        "alias_bytes_per_device", "generated_code_bytes_per_device", "peak_bytes_per_device",
                        "flops_per_device", "bytes_accessed_per_device", "mosaic_kernels")
_FLOAT_FIELDS = ("flops_per_device", "bytes_accessed_per_device")  # cost_analysis() floats; the rest are counts


def extrapolate_depth(shallow: dict, deep: dict, depths: tuple[int, int], blocks: int) -> dict:
    """The facts of a ``blocks``-deep step from the compiled facts of the same step ``depths[0]`` and
    ``depths[1]`` blocks deep: each figure is a + (b - a) / (depths[1] - depths[0]) x (blocks - depths[0]).

    Every transformer block is the same program on the same shapes, so what a block adds (its weights,
    FLOPs, collectives, kernels) is the difference of the two compiles, and what does not grow (the
    activations' peak, the embeddings, the head) is in both. The compiles are real; their sum is the
    record's compile time, and ``depth_probe`` says the figures are extrapolated from them."""
    low, high = depths
    if not 0 < low < high:
        raise ValueError(f"probe depths {depths}: give two block counts, the second larger, e.g. (2, 4)")
    scale = (blocks - low) / (high - low)

    def grow(a, b):
        return a + (b - a) * scale

    facts = dict(deep)
    for field in _DEPTH_LINEAR_FIELDS:
        value = grow(shallow[field], deep[field])
        facts[field] = value if field in _FLOAT_FIELDS else int(round(value))
    merged = {}
    for kind in sorted(set(shallow["collectives"]) | set(deep["collectives"])):
        a = shallow["collectives"].get(kind, {"count": 0, "bytes_per_device": 0})
        b = deep["collectives"].get(kind, {"count": 0, "bytes_per_device": 0})
        merged[kind] = {"count": int(round(grow(a["count"], b["count"]))),
                        "bytes_per_device": int(round(grow(a["bytes_per_device"], b["bytes_per_device"])))}
    facts["collectives"] = merged
    facts["lower_seconds"] = round(shallow["lower_seconds"] + deep["lower_seconds"], 1)
    facts["compile_seconds"] = round(shallow["compile_seconds"] + deep["compile_seconds"], 1)
    facts["depth_probe"] = {"blocks": blocks, "compiled_blocks": [low, high],
                            "peak_bytes_per_device": [shallow["peak_bytes_per_device"], deep["peak_bytes_per_device"]],
                            "compile_seconds": [shallow["compile_seconds"], deep["compile_seconds"]]}
    return facts


_COMPILER_FIELDS = (
    "compiled", "error", "lower_seconds", "compile_seconds", "argument_bytes_per_device", "output_bytes_per_device",
    "temp_bytes_per_device", "alias_bytes_per_device", "generated_code_bytes_per_device", "peak_bytes_per_device",
    "peak_source", "flops_per_device", "bytes_accessed_per_device", "collectives", "mosaic_kernels",
)


# ------------------------------------------------------------------ output
# A step's stage name carries its layout: /T tensor, /S sequence.
HEADER = (f"{'stage':<12} {'model':<8} {'size':>9} {'chip':<6} {'result':<9} {'peak GiB':>8} {'plan GiB':>8} "
          f"{'HBM GiB':>7} {'compile s':>9} {'TFLOP/dev':>9} {'s/step@peak':>11} {'@38%':>6}  collectives")


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _collectives_text(record) -> str:
    found = record.get("collectives") or {}
    return ", ".join(f"{kind} {entry['count']} ({entry['bytes_per_device'] / GiB:.2f} GiB)"
                     for kind, entry in found.items() if entry["count"]) or "-"


def row(record: dict) -> str:
    result = "compiled" if record["compiled"] else ("refused" if record["refused"] else "FAILED")
    flops = record.get("flops_per_device")
    name = record["name"] + ({"tensor": "/T", "sequence": "/S"}.get(record.get("layout"), ""))
    return (f"{name:<12} {record['model']:<8} {record['width']:>4}x{record['height']:<4} "
            f"{record['chip']:<6} {result:<9} {_gib(record.get('peak_bytes_per_device')):>8} "
            f"{_gib(record.get('plan_bytes_per_device')):>8} {record['hbm_bytes_per_device'] / GiB:>7.1f} "
            f"{record['compile_seconds'] if record.get('compile_seconds') is not None else '-':>9} "
            f"{flops / 1e12 if flops else 0:>9.1f} {record.get('seconds_per_step_at_peak', '-'):>11} "
            f"{record.get('seconds_per_step_at_38pct_mfu', '-'):>6}  {_collectives_text(record)}")


def _report(record, on_stage):
    print(row(record), flush=True)
    for label, projection in (record.get("projection") or {}).items():
        per = "s/step" if record["name"].startswith("step") else "s"
        print(f"    projected {per} {label.replace('_', ' ')}: compute {projection['compute_seconds']} s + "
              f"collectives {projection['communication_seconds']} s "
              f"({projection['ici_bytes_moved_per_device'] / GiB:.1f} GiB through each chip's ICI) = "
              f"{projection['seconds_no_overlap']} s without overlap, {projection['seconds_full_overlap']} s "
              f"with full overlap (a projection, not a measurement)", flush=True)
    if record.get("resident_peak_bytes_per_device"):  # other experts, or the shards of gathered weights, beside it
        beside = (f"all {record['resident_experts']} experts" if record.get("resident_experts") else
                  "the gathered weights' shards")
        print(f"    with {beside} resident: {record['resident_peak_bytes_per_device'] / GiB:.2f} GiB per device",
              flush=True)
    if not record["compiled"] and record.get("error"):
        print(f"    {'refused' if record['refused'] else 'error'}: {record['error'][:600]}", flush=True)
    if on_stage is not None:
        on_stage(record)


def machine() -> dict:
    import jax

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str, stages: list[dict], extra: dict | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"machine": machine(), "stages": stages, **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, path)


def replan(pack, records: list[dict]) -> list[dict]:
    """The plan's fields of ``records`` recomputed with the current ``memory_plan`` (compiler facts kept):
    how the README table follows a change to the plan without compiling again."""
    memory_plan = pack("memory_plan")
    for record in records:
        config = Config(record["model"], record["height"], record["width"], record["frames"], record["chip"],
                        record["precision"])
        mesh = (record["mesh"]["dp"], record["mesh"]["tp"])
        plan = _plan_for(memory_plan, config, mesh, record["hbm_bytes_per_device"], record["name"] == "step_cfg",
                         record.get("layout"), parse_chip(record["chip"]), record.get("whole_weights", False))
        record.update(plan_bytes_per_device=plan.stage_peak_bytes(PLAN_COMPONENT[record["name"]]),
                      plan_run_peak_bytes_per_device=plan.peak_bytes, plan_fits=plan.fits, plan_summary=plan.summary())
        try:
            plan.check()
            record.pop("plan_error", None)
            if record["refused"]:
                record.update(refused=False, error=None)  # the plan now admits it: compile it again
        except memory_plan.HBMPlanError as error:
            record.update(plan_error=str(error), refused=True, error=str(error))
        compared = record.get("resident_peak_bytes_per_device") if record.get("whole_weights") else None
        compared = compared or record.get("peak_bytes_per_device")
        if compared:
            record["plan_ratio"] = round(record["plan_bytes_per_device"] / compared, 3)
    return records


def markdown(stages: list[dict]) -> str:
    """The README table: one row per (model, size, chip): the step with CFG, the VAE decode, the text encoder."""
    by = {}
    for record in stages:  # step records from before the sequence layout existed are the tensor layout's
        if record.get("whole_weights"):
            continue  # the table's sequence cells gather their weights (--whole-weights never)
        layout = record.get("layout") or ("tensor" if record["name"].startswith("step") else None)
        by[(record["model"], record["width"], record["height"], record["chip"], record["name"], layout)] = record

    def cell(record):
        if record is None or (not record["compiled"] and not record["refused"] and not record.get("error")):
            return "not compiled yet"
        if record["refused"]:
            return "refused by the HBM plan"
        if not record["compiled"]:
            return "**compiler error**"
        return (f"{record['peak_bytes_per_device'] / GiB:.1f} (plan {record['plan_bytes_per_device'] / GiB:.1f}) "
                f"of {record['hbm_bytes_per_device'] / GiB:.0f}; {record['compile_seconds']:.0f} s{probed(record)}")

    def probed(record):  # a step extrapolated from shallower compiles (--probe-blocks) is marked
        return "†" if record.get("depth_probe") else ""

    def peak(record):
        if record is None or not record["compiled"]:
            return {"not compiled yet": "not yet", "refused by the HBM plan": "refused"}.get(cell(record), cell(record))
        return (f"{record['peak_bytes_per_device'] / GiB:.1f} (plan {record['plan_bytes_per_device'] / GiB:.1f})"
                f"{probed(record)}")

    def sequence_cell(record):
        if record is None or not record["compiled"]:
            return cell(record)
        moved = record["projection"]["at_38pct_mfu"]
        return (f"{record['peak_bytes_per_device'] / GiB:.1f} (plan {record['plan_bytes_per_device'] / GiB:.1f}) "
                f"of {record['hbm_bytes_per_device'] / GiB:.0f}; {record['compile_seconds']:.0f} s{probed(record)}; "
                f"ICI {moved['ici_bytes_moved_per_device'] / GiB:.0f} "
                f"GiB, {moved['seconds_no_overlap']:.2f} s/step")

    lines = ["| model | size | chip | step with CFG (tensor layout): peak GiB/device (plan) of HBM; compile s "
             "| TFLOP/step/device | s/step at peak | at 38% MFU "
             "| step with CFG (sequence layout): peak GiB (plan) of HBM; "
             "compile s; ICI GiB/step; projected s/step at 38% MFU, no overlap "
             "| step without CFG: peak GiB (plan), tensor / sequence layout "
             "| VAE decode: peak GiB (plan) of HBM; compile s | text encoder: peak GiB (plan); compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in TABLE_MODELS:
        for height, width in TABLE_SIZES:
            for chip in TABLE_CHIPS:
                get = lambda name, layout=None: by.get((model, width, height, chip, name, layout))  # noqa: E731
                step = get("step_cfg", "tensor")
                compiled = step is not None and step["compiled"] and not step["refused"]
                flops = (f"{step['flops_per_device'] / 1e12:.0f} | {step['seconds_per_step_at_peak']:.2f} | "
                         f"{step['seconds_per_step_at_38pct_mfu']:.2f}") if compiled else "- | - | -"
                lines.append(f"| {model} | {width}x{height} | {chip} | {cell(step)} | {flops} | "
                             f"{sequence_cell(get('step_cfg', 'sequence'))} | "
                             f"{peak(get('step', 'tensor'))} / {peak(get('step', 'sequence'))} | "
                             f"{cell(get('vae_decode'))} | {cell(get('text_encoder'))} |")
    return "\n".join(lines)


# What tests/test_memory_plan.py holds the HBM plan against: each compiled program's peak and what it was.
PEAK_FIELDS = ("name", "model", "height", "width", "frames", "chip", "mesh", "precision", "layout",
               "whole_weights", "hbm_bytes_per_device", "peak_bytes_per_device", "depth_probe")


def compiled_peaks(records: list[dict]) -> list[dict]:
    """The compiled programs' peaks, per stage and configuration (``--export-peaks``): compiler facts only,
    so the plan can be checked against them in CI without compiling again."""
    peaks = []
    for record in records:
        if record["compiled"] and record.get("peak_bytes_per_device"):
            entry = {name: record.get(name) for name in PEAK_FIELDS}
            entry["depth_probe"] = bool(entry["depth_probe"])
            entry["whole_weights"] = bool(entry["whole_weights"])  # records from before whole weights: gathered
            if entry["whole_weights"]:  # with the cached shards the copies were made from (the plan counts both)
                entry["peak_bytes_per_device"] = record["resident_peak_bytes_per_device"]
            peaks.append(entry)
    return sorted(peaks, key=lambda entry: [str(entry[name]) for name in PEAK_FIELDS[:10]])


# ------------------------------------------------------------------ main
def _key(record) -> tuple:
    return (record["name"], record["model"], record["height"], record["width"], record["frames"], record["chip"],
            record["precision"], record.get("layout") or ("tensor" if record["name"].startswith("step") else None),
            bool(record.get("whole_weights")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compile the pack's TPU programs (text encoding, denoising step with and without CFG, "
                    "VAE decode) for a TPU slice with libtpu, on a machine with no TPU. Prints and writes "
                    "per-device memory, FLOPs and collectives: compiler facts and projections, not measurements.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="14B",
                        help="1.3B or 14B (Wan 2.1 T2V), 14B-I2V (Wan 2.1 I2V), A14B or A14B-I2V (Wan 2.2, both "
                             "experts resident), 5B (Wan 2.2 TI2V)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--chip", default="v6e-8",
                        help="TPU slice: v5e-8, v6e-8, v5p-8 (4 chips), v4-8 (4 chips), or a larger one libtpu "
                             "knows (v6e-16, v5p-16, ...)")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {','.join(STAGES + IMAGE_STAGES)} (default: the model's "
                             f"stages; image-to-video models add {','.join(IMAGE_STAGES)})")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--dp", type=int, default=None, help="mesh override (default: env_manager's rule)")
    parser.add_argument("--tp", type=int, default=None)
    parser.add_argument("--layout", default="auto", choices=("auto", "tensor", "sequence", "both"),
                        help="the denoising step's layout: tensor (weights split, all-reduces), sequence (tokens "
                             "split, weights gathered per layer, all-to-alls around attention), auto (the one "
                             "sharding.choose_layout picks, as the pipeline does) or both")
    parser.add_argument("--whole-weights", default="auto", choices=("auto", "never"),
                        help="the sequence layout's step: its gathered weights whole on every device where the "
                             "HBM plan holds them, as the pipeline does (auto), or gathered per layer (never)")
    parser.add_argument("--probe-blocks", default=None, metavar="A,B",
                        help="compile the denoising step with A and with B of the model's transformer blocks "
                             "(e.g. 2,4) and extrapolate its memory, FLOPs and collectives linearly to all of them: "
                             "every block is the same program on the same shapes, and on 2 cores the two compile "
                             "in a third to a half of the whole step's time. The JSON marks such records "
                             "(depth_probe); default: compile the whole step")
    parser.add_argument("--ignore-plan", action="store_true",
                        help="compile stages the HBM plan refuses too (records the plan's verdict beside them)")
    parser.add_argument("--table", action="store_true",
                        help=f"every cell of the README table: {'/'.join(TABLE_MODELS)} x "
                             f"{', '.join(f'{w}x{h}' for h, w in TABLE_SIZES)} x {', '.join(TABLE_CHIPS)}, "
                             f"{TABLE_FRAMES} frames; skips cells already in --json (resumable)")
    parser.add_argument("--chips", default=",".join(TABLE_CHIPS), help="with --table: the chips, in order")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for h, w in TABLE_SIZES),
                        help="with --table: the sizes (WIDTHxHEIGHT), in order")
    parser.add_argument("--markdown", action="store_true", help="print the README table from --json and exit")
    parser.add_argument("--export-peaks", default=None, metavar="PATH",
                        help="write the compiled peaks of --json to PATH (tests/data/compiled_peaks.json, which CI "
                             "holds the HBM plan against) and exit")
    parser.add_argument("--replan", action="store_true",
                        help="with --markdown: recompute the HBM plan's figures with the current memory_plan")
    parser.add_argument("--json", default=None, help="write the results here (default with --table: "
                                                     "benchmarks/results/tpu_compile_table.json)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _parse_lists(parser, args) -> tuple:
    """(probe blocks or None, sizes [(width, height)], stages) from the command line, refused with the fix."""
    probe = None
    if args.probe_blocks:
        try:
            probe = tuple(int(part) for part in args.probe_blocks.split(","))
            if len(probe) != 2 or not 0 < probe[0] < probe[1]:
                raise ValueError
        except ValueError:
            parser.error(f"--probe-blocks {args.probe_blocks}: give two block counts, the second larger, e.g. 2,4")
    try:
        sizes = [tuple(int(side) for side in size.lower().split("x")) for size in args.sizes.split(",")]
        if any(len(size) != 2 for size in sizes):
            raise ValueError
    except ValueError:
        parser.error(f"--sizes {args.sizes}: give WIDTHxHEIGHT sizes separated by commas, e.g. 832x480,1280x720")
    stages = [s.strip() for s in (args.stages or ",".join(default_stages(args.model))).split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES + IMAGE_STAGES))
    if unknown:
        parser.error(f"--stages {','.join(unknown)}: use a subset of {','.join(STAGES + IMAGE_STAGES)}")
    return probe, sizes, stages


def _from_json(args) -> int:
    """--markdown and --export-peaks: from the results already in --json."""
    with open(args.json) as handle:
        table = json.load(handle)
    records = table["stages"]
    if args.export_peaks:  # one program a line, with the machine and libtpu that compiled them
        with open(args.export_peaks, "w") as handle:
            handle.write('{"compiled_on": ' + json.dumps(table.get("machine")) + ',\n "peaks": [\n')
            handle.write(",\n".join(json.dumps(entry) for entry in compiled_peaks(records)) + "\n]}\n")
        return 0
    print(markdown(replan(load_pack(), records) if args.replan else records))
    return 0


def _configs(args, probe, sizes) -> list[Config]:
    layouts = ["tensor", "sequence"] if args.layout == "both" else [args.layout]
    if args.table:
        return [Config(model, h, w, TABLE_FRAMES, chip, args.precision, args.dp, args.tp, layout, probe,
                       args.whole_weights)
                for chip in args.chips.split(",") for (w, h) in sizes
                for model in TABLE_MODELS for layout in layouts]
    return [Config(args.model, args.height, args.width, args.frames, args.chip, args.precision, args.dp,
                   args.tp, layout, probe, args.whole_weights) for layout in layouts]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if (args.table or args.markdown or args.export_peaks) and args.json is None:
        args.json = os.path.join(REPO, "benchmarks", "results", "tpu_compile_table.json")
    if args.markdown or args.export_peaks:
        return _from_json(args)
    probe, sizes, stages = _parse_lists(parser, args)
    done: list[dict] = []
    if args.table and os.path.exists(args.json):
        with open(args.json) as handle:
            # Compiled and refused cells are kept; failed ones are tried again.
            done = [r for r in json.load(handle)["stages"] if r["compiled"] or r["refused"]]
    results = list(done)

    def save(record):
        results.append(record)
        if args.json:
            write_json(args.json, results)

    print(HEADER, flush=True)
    failed = run_configs(_configs(args, probe, sizes), stages, done, args.ignore_plan, save)
    if args.table:
        print(markdown(results))
    return 1 if failed else 0


def run_configs(configs: list[Config], stages: list[str], done: list[dict], ignore_plan: bool, save) -> bool:
    """Every stage of every configuration not in ``done`` (an earlier, interrupted table run), one chip's
    programs at a time; True when any failed to compile."""
    pack = load_pack()
    finished = {_key(r) for r in done}
    programs_by_chip, shared_by_chip = {}, {}
    for record in done:  # reuse what an earlier (interrupted) table run compiled
        if record["compiled"] and record["name"] in ("text_encoder", "vae_decode"):
            key = (("text_encoder", record["precision"]) if record["name"] == "text_encoder"
                   else ("vae_decode", record["height"], record["width"], record["frames"]))
            shared_by_chip.setdefault(record["chip"], {})[key] = record
    failed = False
    memory_plan = pack("memory_plan")
    for config in configs:
        chip = parse_chip(config.chip)
        if chip.name not in programs_by_chip:
            programs_by_chip.clear()  # one chip's modules at a time
            programs_by_chip[chip.name] = Programs(pack, chip, config.precision, config.dp, config.tp)
        programs = programs_by_chip[chip.name]
        transformer_config = pack("models.wan.configs").resolve_model(config.model)[1]
        todo = [stage for stage in stages
                if _stage_key(programs, memory_plan, config, transformer_config, stage) not in finished]
        # a second layout compiles only its steps
        finished |= {_stage_key(programs, memory_plan, config, transformer_config, stage) for stage in todo}
        if not todo:
            continue
        records = run_config(programs, config, todo, ignore_plan, shared_by_chip.setdefault(chip.name, {}),
                             on_stage=save)
        failed |= any(not r["compiled"] and not r["refused"] for r in records)
    return failed


def _stage_key(programs: Programs, memory_plan, config: Config, transformer_config: dict, stage: str) -> tuple:
    """What a stage's record is found by (``_key``): its layout and whole weights as run_config decides them."""
    chip, layout, whole = programs.chip, None, False
    if stage.startswith("step"):
        layout = step_layout(programs, config, transformer_config, 2 if stage == "step_cfg" else 1)
        if layout == "sequence" and config.whole_weights != "never":  # the HBM plan's, unless --whole-weights never
            hbm = stage_record(stage, config, chip, programs.mesh_shape, len(programs.devices))["hbm_bytes_per_device"]
            whole = _plan_for(memory_plan, config, programs.mesh_shape, hbm, stage == "step_cfg", layout,
                              chip).whole_weights
    return (stage, config.model, config.height, config.width, config.frames, chip.name, config.precision, layout,
            whole)


if __name__ == "__main__":
    sys.exit(main())
