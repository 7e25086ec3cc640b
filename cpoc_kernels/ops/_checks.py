"""Argument checks of the public op wrappers (host side, before dispatch; never inside the custom ops).

Each raises ValueError naming the argument. ``check_unit_vector`` reads ``v``'s values once per tensor
version (cached by identity and ``_version``), so repeated calls with the same layer vector cost no sync, and it
skips the read while a CUDA graph is being captured or torch.compile traces.
"""
from __future__ import annotations

import weakref

import torch

from cpoc_kernels.reference.nonces import check_nonces

__all__ = ["check_flag", "check_int", "check_nonces", "check_round_strings", "check_unit_vector"]

UNIT_NORM_TOL = 1e-2  # accepts a unit vector rounded to bf16 (norm error <= 2^-9), refuses anything else
_checked: dict[int, tuple] = {}
_MAX_CACHED = 512


def check_round_strings(block_hash, public_key) -> None:
    for name, value in (("block_hash", block_hash), ("public_key", public_key)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")


def check_flag(name: str, value) -> bool:
    """A real bool (Python or numpy); strings such as "False", ints and None are refused."""
    if isinstance(value, bool):
        return value
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}"[:120])


def check_int(name: str, value) -> int:
    """An int (``operator.index``), bools refused."""
    import operator

    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}"[:120]) from None


def _capturing(device: torch.device) -> bool:
    """A CUDA graph capture or a torch.compile trace is running: no host read of tensor values."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_unit_vector(v: torch.Tensor) -> None:
    """v: floating [H] tensor, finite, ``| ||v||_2 - 1 | <= UNIT_NORM_TOL`` (zero, NaN, ±Inf, non-unit refused)."""
    if _capturing(v.device):
        return  # no host read during capture or tracing; eager calls before it validate v
    key = id(v)
    state = (v._version, v.data_ptr(), v.device, tuple(v.shape), v.dtype)
    hit = _checked.get(key)
    if hit is not None and hit[0]() is v and hit[1] == state:
        return
    norm = float(torch.linalg.vector_norm(v.detach().to(torch.float64)))
    if not torch.isfinite(v).all() or not abs(norm - 1.0) <= UNIT_NORM_TOL:
        raise ValueError(f"v must be a finite unit vector (||v|| = 1 within {UNIT_NORM_TOL}), got ||v|| = {norm:.6g}"
                         + ("" if torch.isfinite(v).all() else " with NaN/Inf entries"))
    if len(_checked) >= _MAX_CACHED:
        _checked.clear()
    _checked[key] = (weakref.ref(v), state)
