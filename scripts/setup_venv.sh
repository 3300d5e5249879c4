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
#   WAN_TPU_VENV_FROM=path   start a new venv as hard links to this one (seconds, no disk), then install
#                            only what differs; pip replaces files rather than writing into them, so the
#                            other venv is left as it was
if [ ! -x "$venv/bin/python" ] && [ -n "${WAN_TPU_VENV_FROM:-}" ] && [ -x "$WAN_TPU_VENV_FROM/bin/python" ]; then
  cp -al "$WAN_TPU_VENV_FROM" "$venv"
  rm -f "$venv/.wan-tpu-requirements"  # its own stamp follows; this one is the other venv's file
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
