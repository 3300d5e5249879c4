"""Compile HunyuanVideo 1.5's denoising step for a TPU slice, on a machine with no TPU.

    .venv/bin/python benchmarks/hunyuan_compile.py                              # v6e-8, v5p-8, v5e-8; 720P, 480P
    .venv/bin/python benchmarks/hunyuan_compile.py --chip v6e-8 --size 720p --json out.json
    .venv/bin/python benchmarks/hunyuan_compile.py --stage decode --chip v5e-8 --size 720p     # the tiled VAE decode
    .venv/bin/python benchmarks/hunyuan_compile.py --layout replicated_out --chip v6e-8 --size 720p

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
import itertools
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
        plan = sharding.plan_shardings({n: tuple(t.shape) for n, t in state.items()},
                                       components.TRANSFORMER_LAYOUTS[layout], dict(self.mesh.shape))
        named = sharding.to_named_shardings(plan, self.mesh)
        weights = {name: self.jax.ShapeDtypeStruct(tuple(t.shape), jnp.bfloat16, sharding=named[name])
                   for name, t in state.items()}
        transformer = pack("runtime.components").TransformerComponent(module, weights, plan, self.mesh,
                                                                     dict(module.config), {}, module.dtype)
        family = pack("models.hunyuan.family").HunyuanVideo15()
        step_program = pack("sampling.step_program")
        program = step_program.StepProgram(self.manager, family, transformer,
                                           step_program.StepKind(cfg, cache_mode, "tensor"))
        geometry = pack("models.hunyuan.family").HunyuanGeometry()
        return program.jitted, program.abstract_args(geometry.latent_shape(height, width, frames), 0, "bfloat16")


    def abstract_weights(self, module, rules, dtype) -> dict:
        """``module``'s parameters and buffers as abstract arrays placed by ``rules`` on the mesh."""
        sharding = self.pack("sharding")
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(dict(module.named_buffers(remove_duplicate=False)))
        named = sharding.to_named_shardings(sharding.plan_shardings(
            {n: tuple(t.shape) for n, t in state.items()}, rules, dict(self.mesh.shape)), self.mesh)
        return {name: self.jax.ShapeDtypeStruct(tuple(t.shape), dtype if t.is_floating_point() else
                                                self.jax.numpy.int32, sharding=named[name])
                for name, t in state.items()}

    def encoders(self, height: int, width: int) -> list:
        """[(name, jitted, args)]: the prompt's encoders (Qwen2.5-VL 7B's text model, ByT5) in bf16 and the
        image's (the VAE encode of one frame, SigLIP so400m) in fp32, as the pipeline jits them
        (``models.hunyuan.pipeline``'s ``*_encode_fn``), at the released models' configs."""
        import torch
        from diffusers import AutoencoderKLHunyuanVideo15
        from transformers import (Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipVisionConfig, SiglipVisionModel,
                                  T5Config, T5EncoderModel)

        pack, jnp, jax = self.pack, self.jax.numpy, self.jax
        pipeline, components, sharding = (pack("models.hunyuan.pipeline"), pack("models.hunyuan.components"),
                                          pack("sharding"))
        family = pack("models.hunyuan.family")
        placement = pack("runtime.placement")
        whole = placement.replicated(self.mesh)
        with torch.device("meta"):
            qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
                vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})).to(torch.bfloat16).eval()
            byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12,
                                           num_heads=6, feed_forward_proj="gated-gelu")).to(torch.bfloat16).eval()
            siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                                          num_hidden_layers=27, num_attention_heads=16,
                                                          image_size=384, patch_size=14)).eval()
            vae = AutoencoderKLHunyuanVideo15().to(torch.float32).eval()
        pack("models.hunyuan.vae_tiles").install_frame_causal_mask(vae)
        tokens = family.TEXT_TOKENS + family.TEMPLATE_CROP
        pair = placement.batch_sharding(self.mesh, 2)
        ids = jax.ShapeDtypeStruct((2, tokens), jnp.int32, sharding=pair)
        glyph = jax.ShapeDtypeStruct((1, family.GLYPH_TOKENS), jnp.int32, sharding=whole)
        glyph_mask = jax.ShapeDtypeStruct((1, family.GLYPH_TOKENS), jnp.float32, sharding=whole)
        pixels = jax.ShapeDtypeStruct((1, 3, 1, height, width), jnp.float32, sharding=whole)
        siglip_pixels = jax.ShapeDtypeStruct((1, 3, 384, 384), jnp.float32, sharding=whole)
        return [
            ("qwen_encode", jax.jit(pipeline.qwen_encode_fn(self.manager, qwen)),
             (self.abstract_weights(qwen, components.QWEN_RULES, jnp.bfloat16), ids, ids)),
            ("byt5_encode", jax.jit(pipeline.byt5_encode_fn(self.manager, byt5)),
             (self.abstract_weights(byt5, sharding.TEXT_ENCODER_RULES, jnp.bfloat16), glyph, glyph_mask)),
            ("vae_encode", jax.jit(pipeline.vae_encode_fn(self.manager, vae)),
             (self.abstract_weights(vae, sharding.VAE_RULES, jnp.float32), pixels)),
            ("siglip_encode", jax.jit(pipeline.siglip_encode_fn(self.manager, siglip)),
             (self.abstract_weights(siglip, components.SIGLIP_RULES, jnp.float32), siglip_pixels)),
        ]

    def vae_decode(self, height: int, width: int, frames: int, tile_pixels: int):
        """The tiled VAE decode (``models.hunyuan.vae_tiles``): [(jitted, args, calls)], one program per
        tile shape, each call one tile per device; the released VAE (diffusers' class defaults) in fp32."""
        import torch
        from diffusers import AutoencoderKLHunyuanVideo15

        pack, jnp = self.pack, self.jax.numpy
        with torch.device("meta"):
            module = AutoencoderKLHunyuanVideo15().to(torch.float32).eval()
        vae_tiles, sharding = pack("models.hunyuan.vae_tiles"), pack("sharding")
        vae_tiles.install_frame_causal_mask(module)
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        named = sharding.to_named_shardings(sharding.plan_shardings(
            {n: tuple(t.shape) for n, t in state.items()}, sharding.VAE_RULES, dict(self.mesh.shape)), self.mesh)
        weights = {name: self.jax.ShapeDtypeStruct(tuple(t.shape), jnp.float32, sharding=named[name])
                   for name, t in state.items()}
        geometry = pack("models.hunyuan.family").HunyuanGeometry()
        _, channels, latent_frames, latent_height, latent_width = geometry.latent_shape(height, width, frames)
        decoder = vae_tiles.TiledVAEDecoder(self.manager, module, self.mesh, geometry.spatial_factor, tile_pixels)
        groups: dict = {}
        for _, _, h, w in vae_tiles.tile_windows(latent_height, latent_width, decoder.latent_tile):
            groups[(h, w)] = groups.get((h, w), 0) + 1
        return [(decoder.jitted(), (weights, self.jax.ShapeDtypeStruct(
            (decoder.slots, channels, latent_frames, h, w), jnp.float32, sharding=decoder.tile_sharding())),
                 -(-count // decoder.slots)) for (h, w), count in groups.items()]


def compile_decode(chip_name: str, size: str, tile_pixels: int) -> dict:
    pack = tpu_compile.load_pack()
    chip = tpu_compile.parse_chip(chip_name)
    programs = HunyuanPrograms(pack, chip)
    height, width = SIZES[size]
    devices = len(programs.devices)
    record = {"model": "HunyuanVideo 1.5 VAE", "chip": chip.name, "size": f"{width}x{height}", "frames": FRAMES,
              "mesh": dict(programs.mesh.shape), "devices": devices, "layout": f"tiles {tile_pixels}px",
              "name": "vae_decode", "hbm_bytes_per_device": int(chip.spec.hbm_gib * chip.chips / devices * 2**30)}
    program_list = programs.vae_decode(height, width, FRAMES, tile_pixels)
    record["calls"] = sum(runs for _, _, runs in program_list)
    try:
        record.update(tpu_compile.compile_programs(programs, program_list, matmul_precision=False))
    except Exception as error:  # libtpu refuses a program larger than HBM: record what it needs
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        record.update(compiled=False, refused=str(error).splitlines()[0][:300])
    return record


def compile_encoders(chip_name: str, size: str) -> list[dict]:
    pack = tpu_compile.load_pack()
    chip = tpu_compile.parse_chip(chip_name)
    programs = HunyuanPrograms(pack, chip)
    height, width = SIZES[size]
    devices = len(programs.devices)
    records = []
    for name, jitted, args in programs.encoders(height, width):
        record = {"model": "HunyuanVideo 1.5 " + name.split("_")[0], "chip": chip.name, "size": f"{width}x{height}",
                  "mesh": dict(programs.mesh.shape), "devices": devices, "layout": "", "name": name,
                  "hbm_bytes_per_device": int(chip.spec.hbm_gib * chip.chips / devices * 2**30)}
        record.update(tpu_compile.compile_programs(programs, [(jitted, args, 1)], matmul_precision=False))
        records.append(record)
    return records


def compile_one(chip_name: str, size: str, probe_blocks=(2, 4), ignore_plan: bool = False,
                layout: str = "tensor") -> dict:
    pack = tpu_compile.load_pack()
    chip = tpu_compile.parse_chip(chip_name)
    programs = HunyuanPrograms(pack, chip)
    height, width = SIZES[size]
    config = transformer_config()
    memory = pack("models.hunyuan.memory")
    devices = len(programs.devices)
    device_hbm = int(chip.spec.hbm_gib * chip.chips / devices * 2**30)
    record = {"model": "HunyuanVideo 1.5 (8.3B)", "chip": chip.name, "size": f"{width}x{height}", "frames": FRAMES,
              "mesh": dict(programs.mesh.shape), "devices": devices, "layout": layout, "name": "step_cfg",
              "hbm_bytes_per_device": device_hbm, "peak_flops_per_device": chip.spec.peak_flops * chip.chips / devices}
    plan = memory.plan_step(config, dict(programs.mesh.shape), height, width, FRAMES, cfg=True, hbm_bytes=device_hbm,
                            layout=layout)
    record["plan_bytes_per_device"] = plan.total_bytes
    record["plan"] = plan.summary()
    if not plan.fits and not ignore_plan:
        record.update(compiled=False, refused=plan.message())
        return record

    def facts(blocks):
        jitted, args = programs.step(dict(config, num_layers=blocks), height, width, FRAMES, True, layout)
        return tpu_compile.compile_programs(programs, [(jitted, args, 1)], matmul_precision=False)

    low, high = probe_blocks
    record.update(tpu_compile.extrapolate_depth(facts(low), facts(high), (low, high), config["num_layers"]))
    record["projection"] = tpu_compile.projected_step_seconds(record, chip)
    return record


def row(record: dict) -> str:
    gib = lambda value: f"{value / 2**30:.1f}"  # noqa: E731
    if record.get("name", "").endswith("_encode"):
        return (f"{record['chip']:<6} {record['size']:>9} {record['name']:<14} peak "
                f"{gib(record['peak_bytes_per_device'])} GiB of {gib(record['hbm_bytes_per_device'])}, compile "
                f"{record['compile_seconds']:.0f} s, {record['flops_per_device'] / 1e12:.2f} TFLOP/dev")
    if record.get("name") == "vae_decode" and not record.get("compiled"):
        return f"{record['chip']:<6} {record['size']:>9} {record['layout']:<14} VAE decode refused: {record['refused']}"
    if record.get("name") == "vae_decode":
        fits = record["peak_bytes_per_device"] <= record["hbm_bytes_per_device"]
        return (f"{record['chip']:<6} {record['size']:>9} {record['layout']:<14} VAE decode: peak "
                f"{gib(record['peak_bytes_per_device'])} GiB of {gib(record['hbm_bytes_per_device'])} "
                f"({'fits' if fits else 'does not fit'}), {record['programs']} programs, {record['calls']} calls, "
                f"compile {record['compile_seconds']:.0f} s, {record['flops_per_device'] / 1e12:.0f} TFLOP/dev")
    if not record.get("compiled"):
        return f"{record['chip']:<6} {record['size']:>9}  refused by the plan: {record.get('refused', '')[:120]}"
    ratio = record["plan_bytes_per_device"] / record["peak_bytes_per_device"]
    projection = record["projection"]
    moved = projection["ici_bytes_moved_per_device"] / 2**30
    return (f"{record['chip']:<6} {record['size']:>9} {record['layout']:<14} peak {gib(record['peak_bytes_per_device']):>5} GiB  plan "
            f"{gib(record['plan_bytes_per_device']):>5} GiB ({ratio:.2f}x)  compile {record['compile_seconds']:>5.0f} s  "
            f"{record['flops_per_device'] / 1e12:.0f} TFLOP/dev  ICI {moved:.1f} GiB  "
            f"{projection['seconds_no_overlap']:.2f} s/step (38% MFU, no overlap)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chip", action="append", choices=CHIPS, help="repeatable; default all three")
    parser.add_argument("--size", action="append", choices=sorted(SIZES), help="repeatable; default both")
    parser.add_argument("--probe-blocks", default="2,4", help="the two depths compiled (default 2,4)")
    parser.add_argument("--ignore-plan", action="store_true", help="compile steps the HBM plan refuses")
    parser.add_argument("--layout", action="append", choices=("tensor", "replicated_out"),
                        help="the transformer's sharding rules (models.hunyuan.components.TRANSFORMER_LAYOUTS); "
                             "repeatable; default tensor")
    parser.add_argument("--stage", action="append", choices=("step", "decode", "encoders"),
                        help="repeatable; default step (decode: the tiled VAE decode; encoders: Qwen2.5-VL, ByT5, "
                             "the image's VAE encode and SigLIP)")
    parser.add_argument("--tile-pixels", type=int, default=256, help="the VAE decode's tile side (default 256)")
    parser.add_argument("--json", metavar="PATH", help="append each record to this JSON list")
    args = parser.parse_args(argv)
    probe = tuple(int(x) for x in args.probe_blocks.split(","))
    records = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as handle:
            records = json.load(handle)
    jobs = [("step", chip, size, layout) for chip, size, layout in itertools.product(
        args.chip or CHIPS, args.size or ("720p", "480p"), args.layout or ("tensor",)) if "step" in (args.stage or ["step"])]
    jobs += [("decode", chip, size, None) for chip, size in itertools.product(
        args.chip or CHIPS, args.size or ("720p", "480p")) if "decode" in (args.stage or ())]
    jobs += [("encoders", chip, size, None) for chip, size in itertools.product(
        args.chip or CHIPS, args.size or ("720p", "480p")) if "encoders" in (args.stage or ())]
    for stage, chip, size, layout in jobs:
        made = (compile_one(chip, size, probe, args.ignore_plan, layout) if stage == "step" else
                compile_decode(chip, size, args.tile_pixels) if stage == "decode" else compile_encoders(chip, size))
        for record in made if isinstance(made, list) else [made]:
            sys.stdout.write(row(record) + "\n")
            sys.stdout.flush()
            records.append(record)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(records, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
