"""HF transformers integration: built-in models, the pure-PoC runner and continuous PoC inside
transformers' continuous batching (``ContinuousPoC``). Imports are lazy: transformers loads on first use."""
from __future__ import annotations

_EXPORTS = {
    "build_model": "models",
    "MODEL_CONFIGS": "models",
    "PoCRunner": "runner",
    "decoder_layers": "runner",
    "reflection_hooks": "runner",
    "ContinuousPoC": "continuous",
    "UnsupportedEngineError": "continuous",
    "cb_config": "continuous",
    "SUPPORTED_TRANSFORMERS": "continuous",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
