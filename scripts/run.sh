#!/usr/bin/env bash
# Text to video from the command line (no ComfyUI): encode -> denoise -> decode -> MP4.
# Sets up .venv first. Try: bash scripts/run.sh --tiny --output tiny.mp4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec "${WAN_TPU_VENV:-.venv}/bin/python" wan_t2v.py "$@"
