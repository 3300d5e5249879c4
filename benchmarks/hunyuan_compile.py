"""Compile HunyuanVideo 1.5's denoising step for a TPU slice, on a machine with no TPU.

    .venv/bin/python benchmarks/hunyuan_compile.py                              # v6e-8, v5p-8, v5e-8; 720P, 480P
    .venv/bin/python benchmarks/hunyuan_compile.py --chip v6e-8 --size 720p --json out.json

The program is the pack's own (``sampling.StepProgram`` with the HunyuanVideo family and its
prefix-masked joint attention on the Mosaic Splash kernel), on the 8.3B transformer built on torch's meta
device from the released 720P config, with its weights as abstract arrays carrying the family's sharding
rules on the (dp=2, tp) mesh; 121 frames, CFG. As ``benchmarks/tpu_compile.py`` does for Wan, each step is
compiled ``--probe-blocks`` deep (default 2 and 4 of 54 blocks) and extrapolated to the model's depth,
and the HBM plan (``models.hunyuan.memory.plan_step``) is asked first: a step it refuses is recorded as
refused with its message (``--ignore-plan`` compiles it anyway).

Per step: the compiled peak per device against the plan's, compile seconds, FLOPs per device, the
collectives, and seconds per step at 38% of the chip's peak FLOP/s plus the collectives over its ICI
(``tpu_compile.projected_step_seconds``). These are the compiler's figures and a projection, not
measurements on a TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import tpu_compile  # the Wan compile command: chips, topologies, the compiled facts, the projection

SIZES = {"720p": (720, 1280), "480p": (480, 848)}
CHIPS = ("v6e-8", "v5p-8", "v5e-8")
FRAMES = 121


def transformer_config() -> dict:
    """HunyuanVideo 1.5's 720P transformer: diffusers' class defaults are the released 8.3B model's."""
    import inspect

    from diffusers import HunyuanVideo15Transformer3DModel

    defaults = {name: parameter.default for name, parameter in
                inspect.signature(HunyuanVideo15Transformer3DModel.__init__).parameters.items() if name != "self"}
    return dict(defaults, target_size=960, task_type="t2v")


class HunyuanPrograms(tpu_compile.Programs):
    """The step of one HunyuanVideo 1.5 config with abstract weights, on one chip's mesh."""

    def step(self, config: dict, height: int, width: int, frames: int, cfg: bool, layout: str = "tensor",
             whole_weights: bool = False, cache_mode: str | None = None):
        import torch
        from diffusers import HunyuanVideo15Transformer3DModel

        pack, jnp = self.pack, self.jax.numpy
        components = pack("models.hunyuan.components")
        with torch.device("meta"):
            module = HunyuanVideo15Transformer3DModel(**{k: v for k, v in config.items()
                                                         if not k.startswith("_")}).to(torch.bfloat16).eval()
        pack("models.hunyuan.attention").install(module, self.manager)
        sharding = pack("sharding")
        state = dict(module.named_parameters())
        plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()}, components.TRANSFORMER_RULES,
                                       dict(self.mesh.shape))
        named = sharding.to_named_shardings(plan, self.mesh)
        weights = {name: self.jax.ShapeDtypeStruct(tuple(t.shape), jnp.bfloat16, sharding=named[name])
                   for name, t in state.items()}
        transformer = pack("runtime.components").TransformerComponent(module, weights, plan, self.mesh,
                                                                     dict(module.config), {}, module.dtype)
        family = pack("models.hunyuan.family").HunyuanVideo15()
        step_program = pack("sampling.step_program")
        program = step_program.StepProgram(self.manager, family, transformer,
                                           step_program.StepKind(cfg, cache_mode, layout))
        geometry = pack("models.hunyuan.family").HunyuanGeometry()
        return program.jitted, program.abstract_args(geometry.latent_shape(height, width, frames), 0, "bfloat16")


def compile_one(chip_name: str, size: str, probe_blocks=(2, 4), ignore_plan: bool = False) -> dict:
    pack = tpu_compile.load_pack()
    chip = tpu_compile.parse_chip(chip_name)
    programs = HunyuanPrograms(pack, chip)
    height, width = SIZES[size]
    config = transformer_config()
    memory = pack("models.hunyuan.memory")
    devices = len(programs.devices)
    device_hbm = int(chip.spec.hbm_gib * chip.chips / devices * 2**30)
    record = {"model": "HunyuanVideo 1.5 (8.3B)", "chip": chip.name, "size": f"{width}x{height}", "frames": FRAMES,
              "mesh": dict(programs.mesh.shape), "devices": devices, "layout": "tensor", "name": "step_cfg",
              "hbm_bytes_per_device": device_hbm, "peak_flops_per_device": chip.spec.peak_flops * chip.chips / devices}
    plan = memory.plan_step(config, dict(programs.mesh.shape), height, width, FRAMES, cfg=True, hbm_bytes=device_hbm)
    record["plan_bytes_per_device"] = plan.total_bytes
    record["plan"] = plan.summary()
    if not plan.fits and not ignore_plan:
        record.update(compiled=False, refused=plan.message())
        return record

    def facts(blocks):
        jitted, args = programs.step(dict(config, num_layers=blocks), height, width, FRAMES, True)
        return tpu_compile.compile_programs(programs, [(jitted, args, 1)], matmul_precision=False)

    low, high = probe_blocks
    record.update(tpu_compile.extrapolate_depth(facts(low), facts(high), (low, high), config["num_layers"]))
    record["projection"] = tpu_compile.projected_step_seconds(record, chip)
    return record


def row(record: dict) -> str:
    gib = lambda value: f"{value / 2**30:.1f}"  # noqa: E731
    if not record.get("compiled"):
        return f"{record['chip']:<6} {record['size']:>9}  refused by the plan: {record.get('refused', '')[:120]}"
    ratio = record["plan_bytes_per_device"] / record["peak_bytes_per_device"]
    projection = record["projection"]
    moved = projection["ici_bytes_moved_per_device"] / 2**30
    return (f"{record['chip']:<6} {record['size']:>9}  peak {gib(record['peak_bytes_per_device']):>5} GiB  plan "
            f"{gib(record['plan_bytes_per_device']):>5} GiB ({ratio:.2f}x)  compile {record['compile_seconds']:>5.0f} s  "
            f"{record['flops_per_device'] / 1e12:.0f} TFLOP/dev  ICI {moved:.1f} GiB  "
            f"{projection['seconds_no_overlap']:.2f} s/step (38% MFU, no overlap)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chip", action="append", choices=CHIPS, help="repeatable; default all three")
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default both")
    parser.add_argument("--probe-blocks", default="2,4", help="the two depths compiled (default 2,4)")
    parser.add_argument("--ignore-plan", action="store_true", help="compile steps the HBM plan refuses")
    parser.add_argument("--json", metavar="PATH", help="append each record to this JSON list")
    args = parser.parse_args(argv)
    probe = tuple(int(x) for x in args.probe_blocks.split(","))
    records = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as handle:
            records = json.load(handle)
    for chip in args.chip or CHIPS:
        for size in args.size or ("720p", "480p"):
            record = compile_one(chip, size, probe, args.ignore_plan)
            sys.stdout.write(row(record) + "\n")
            sys.stdout.flush()
            records.append(record)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(records, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
