#!/usr/bin/env bash
# The test suite on CPU, with 8 fake devices standing in for a TPU v6e-8.
# Sets up .venv (transformers 5.x) and runs everything there, then sets up
# .venv-transformers4 (transformers 4.x and huggingface-hub 0.x, the other
# generation a ComfyUI venv may hold) and runs again there what transformers
# and the hub touch: the text encoder, two end-to-end runs, the node chain,
# loading and its errors, and Wan 2.1 I2V (whose CLIP differs between the two), the UMT5 and CLIP
# single files, and HunyuanVideo 1.5's text-to-video (Qwen2.5-VL's mask differs between the two).
# Extra arguments go to both pytest runs.
# Tests run in WAN_TPU_TEST_WORKERS processes (default 2, pytest-xdist), a file per process at a time:
# most of the time is single-threaded tracing and compiling. 1 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${WAN_TPU_TEST_WORKERS:-2}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
bash scripts/setup_venv.sh
"${WAN_TPU_VENV:-.venv}/bin/python" -m pytest "${parallel[@]}" tests "$@"
WAN_TPU_VENV=.venv-transformers4 WAN_TPU_VENV_FROM="${WAN_TPU_VENV:-.venv}" \
    WAN_TPU_REQUIREMENTS=requirements-test-transformers4.txt bash scripts/setup_venv.sh
# Few tests: in one process (a second would build every shared fixture again).
exec .venv-transformers4/bin/python -m pytest tests/test_core_parity.py::test_text_encoder_matches_diffusers_encode_prompt \
    "tests/test_core_parity.py::test_end_to_end_matches_diffusers_wan_pipeline[5.0-0]" \
    "tests/test_core_parity.py::test_end_to_end_matches_diffusers_wan_pipeline[1.0-7]" \
    tests/test_nodes.py::test_three_node_chain_matches_diffusers tests/test_loading_errors.py \
    "tests/test_image_to_video.py::test_wan21_i2v_matches_diffusers[0]" \
    tests/test_model_files.py::test_text_encoder_vae_and_tokenizer_files \
    tests/test_model_files.py::test_the_families_load_from_their_files \
    tests/test_hunyuan.py::test_text_to_video_matches_diffusers_for_two_seeds_and_a_second_prompt_compiles_nothing "$@"
