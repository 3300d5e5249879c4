#!/usr/bin/env bash
# The test suite on CPU, with 8 fake devices standing in for a TPU v6e-8.
# Sets up .venv first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec "${WAN_TPU_VENV:-.venv}/bin/python" -m pytest tests "$@"
