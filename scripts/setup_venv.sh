#!/usr/bin/env bash
# Make (or update) the project's virtual environment, .venv by default.
#   WAN_TPU_VENV=path        another location
#   WAN_TPU_REQUIREMENTS=f   requirements file; default: requirements.txt on a
#                            TPU VM (jax[tpu]), requirements-test.txt elsewhere
# torch is installed first as the CPU build 2.13.0: on a TPU VM and in CI the
# CUDA build would only cost gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${WAN_TPU_VENV:-.venv}
if [ -z "${WAN_TPU_REQUIREMENTS:-}" ]; then
  if ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then requirements=requirements.txt; else requirements=requirements-test.txt; fi
else
  requirements=$WAN_TPU_REQUIREMENTS
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.wan-tpu-requirements"
wanted=$(cat "$requirements" requirements.txt "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setting up $venv from $requirements" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" "torch==2.13.0"
  echo "$wanted" > "$stamp"
fi
