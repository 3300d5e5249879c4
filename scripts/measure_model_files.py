"""Load time and host memory of each kind of ComfyUI transformer file, on a model built here.

  .venv/bin/python scripts/measure_model_files.py OUT_DIR [--layers N]

Writes a random Wan transformer (the 1.3B architecture, N of its 30 blocks; default 4) as bf16, fp16,
fp8_e4m3fn, fp8_scaled, GGUF Q8_0 and GGUF F16 files, then loads each into bf16 in a fresh process and
prints the seconds and the process's peak resident memory over the file's bf16 size. The tests'
file writers (tests/comfy_files.py) make the files.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests"))


def write(out, layers):
    import torch
    from diffusers import WanTransformer3DModel

    import comfy_files

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=layers,
                                  text_dim=4096, freq_dim=256, in_channels=16, out_channels=16,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads").to(torch.bfloat16)
    original = comfy_files.original_transformer(model.state_dict(), "model.diffusion_model.")
    files = {"bf16": comfy_files.save(f"{out}/t_bf16.safetensors", original),
             "fp16": comfy_files.save(f"{out}/t_fp16.safetensors", {k: v.half() for k, v in original.items()}),
             "fp8_e4m3fn": comfy_files.save(f"{out}/t_fp8.safetensors", comfy_files.fp8(original, scaled=False)),
             "fp8_scaled": comfy_files.save(f"{out}/t_fp8s.safetensors", comfy_files.fp8(original, scaled=True)),
             "gguf_q8_0": comfy_files.write_gguf(f"{out}/t_q8.gguf", original, "Q8_0"),
             "gguf_f16": comfy_files.write_gguf(f"{out}/t_f16.gguf", original, "F16")}
    return files, sum(v.numel() for v in original.values()) * 2


def _status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))


def _rss():
    return _status("VmRSS:")


def _peak():
    return _status("VmHWM:")


def load(path):
    import torch

    from conftest import pack_module

    import diffusers  # noqa: F401  (imported before the clock starts)
    import gguf  # noqa: F401

    mf = pack_module("model_files")
    source = mf.FileSource(path, path, path)  # only the transformer is read
    before = _rss()
    started = time.perf_counter()
    module = mf.load_transformer(source, torch.bfloat16)
    seconds = time.perf_counter() - started
    peak = _peak()
    print(json.dumps({"seconds": seconds, "peak_rss_growth_bytes": peak - before,
                      "params": sum(p.numel() for p in module.parameters())}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--load")
    args = parser.parse_args()
    if args.load:
        load(args.load)
        sys.exit()
    files, bf16_bytes = write(args.out, args.layers)
    print(f"{args.layers} blocks of Wan 1.3B: {bf16_bytes / 2**30:.2f} GiB in bf16")
    for kind, path in files.items():
        result = json.loads(subprocess.run([sys.executable, __file__, args.out, "--load", path], check=True,
                                           capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{kind:11s} file {os.path.getsize(path) / 2**30:.2f} GiB  load {result['seconds']:.2f} s  "
              f"peak RSS growth {result['peak_rss_growth_bytes'] / bf16_bytes:.2f}x the bf16 weights")
