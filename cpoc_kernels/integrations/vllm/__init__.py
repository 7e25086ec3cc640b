"""vLLM plugin: continuous PoC inside vLLM's own batches (supported: vLLM 0.32.x, 0.33.x).

Entry points (``pyproject.toml``): ``vllm.general_plugins: cpoc = cpoc_kernels.integrations.vllm:register``
(idempotent, cheap, safe in every process: it only checks the vLLM version and installs import hooks that
register the seams when vLLM imports the modules concerned) and the worker extension
``cpoc_kernels.integrations.vllm.worker.CpocWorkerExtension`` (``--worker-extension-cls``), which turns PoC on
for that engine and serves ``collective_rpc("cpoc_drain" | "cpoc_ready" | "cpoc_stats")``.

Client side: :class:`~cpoc_kernels.integrations.vllm.client.CpocLLM` (``LLM``) and
:class:`~cpoc_kernels.integrations.vllm.client.AsyncCpoc` (``AsyncLLM``); request pieces without vLLM:
:func:`~cpoc_kernels.integrations.vllm.requests.poc_request`.

This package imports vLLM only inside functions (the rest of ``cpoc_kernels`` never needs it).
"""
from __future__ import annotations

import os
import threading

from .requests import PoCRequestError, PoCRequestSpec, PoCRound, parse_poc_payload, poc_request
from .version import SUPPORTED_VLLM, WORKER_EXTENSION, UnsupportedVllmError, check_vllm_version

DISABLE_ENV = "CPOC_VLLM_DISABLE"

_lock = threading.Lock()
_status = {"registered": False, "vllm": None, "error": None}


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Unsupported vLLM → :class:`UnsupportedVllmError` (startup fails)."""
    with _lock:
        if _status["registered"]:
            return
        if os.environ.get(DISABLE_ENV) == "1":
            _status["error"] = f"disabled by {DISABLE_ENV}=1"
            return
        from .version import installed_vllm_version

        version = installed_vllm_version()
        _status["vllm"] = version
        try:
            check_vllm_version(version)
        except UnsupportedVllmError as exc:
            _status["error"] = str(exc)
            raise
        from .seams import install_seams

        install_seams()
        _status["registered"] = True


def plugin_status() -> dict:
    """``{"registered": bool, "vllm": version or None, "error": str or None}`` for this process."""
    with _lock:
        return dict(_status)


__all__ = [
    "DISABLE_ENV",
    "SUPPORTED_VLLM",
    "WORKER_EXTENSION",
    "PoCRequestError",
    "PoCRequestSpec",
    "PoCRound",
    "UnsupportedVllmError",
    "check_vllm_version",
    "parse_poc_payload",
    "plugin_status",
    "poc_request",
    "register",
]
