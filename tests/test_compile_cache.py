"""A second process finds its programs in the persistent compilation cache."""

import json
import os
import subprocess
import sys

from conftest import PACK_DIR


def _first_step(models_dir, cache_dir):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), WAN_TPU_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user without an accelerator has
    command = [sys.executable, os.path.join(PACK_DIR, "benchmarks", "bench.py"), "--first-step-only",
               "--config", "tiny", "--models-dir", str(models_dir)]
    output = subprocess.run(command, env=env, capture_output=True, text=True)
    assert output.returncode == 0, output.stderr[-3000:]
    return json.loads(output.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path):
    cold = _first_step(tmp_path / "models", tmp_path / "jax-cache")
    warm = _first_step(tmp_path / "models", tmp_path / "jax-cache")
    assert cold["compilations"] > 0 and cold["cache_hits"] == 0
    assert warm["compilations"] == 0 and warm["cache_hits"] == cold["compilations"]
    assert os.listdir(tmp_path / "jax-cache")  # JAX_COMPILATION_CACHE_DIR was used
