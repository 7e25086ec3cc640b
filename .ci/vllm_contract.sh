#!/usr/bin/env bash
# CI job (a): contract tests against real vLLM 0.33 imports (every private symbol the plugin touches).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/vllm_install.sh
VENV="$(vllm033_venv)"
export VLLM_TARGET_DEVICE=cpu
"$VENV/bin/python" -m pytest -q tests/integrations/vllm/test_contract_vllm033.py
