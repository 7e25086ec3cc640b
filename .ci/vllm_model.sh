#!/usr/bin/env bash
# CI job (b): vLLM 0.33's real Qwen3 model object on CPU with the plugin's seams (eager and compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/vllm_install.sh
VENV="$(vllm033_venv)"
export VLLM_TARGET_DEVICE=cpu
"$VENV/bin/python" -m pytest -q tests/integrations/vllm/test_model_object.py
