"""Helpers shared by the op families: Triton math selection, exact bf16/fp16 rounding, dtype codes.

Exactness helpers (used inside kernels, identical on GPU and under ``TRITON_INTERPRET=1``):

* ``_round_to(x, KIND)`` rounds an fp32 tensor to the activation dtype and back (RNE), KIND 0 = fp32
  (identity), 1 = fp16 (native cast: ``cvt.rn`` on GPU, numpy RNE in the interpreter), 2 = bf16
  (integer bit trick, exactly torch's ``round_to_nearest_even``; NaN -> 0x7FC0). The interpreter's
  own fp32->bf16 cast truncates, so bf16 never goes through ``tl.cast``.
* bf16 tensors enter kernels as ``int16`` views and are widened by a 16-bit shift (exact).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2
_KINDS = {torch.float32: KIND_F32, torch.float16: KIND_F16, torch.bfloat16: KIND_BF16}
FLOAT_DTYPES = tuple(_KINDS)
BACKENDS = ("auto", "triton", "torch")


def dtype_kind(dtype: torch.dtype) -> int:
    return _KINDS[dtype]


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def math_mode(device: torch.device) -> int:
    """0: interpreter (fp64 numpy transcendental, then one RNE to fp32); 1: CUDA libdevice (precise)."""
    return 0 if interpreting() or device.type != "cuda" else 1


def check_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` to ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return backend


def launch_opts(device: torch.device) -> dict:
    """Compile options of every PoC kernel launch.

    * ``enable_fp_fusion=False``: no FMA contraction (also ``ptxas --fmad=false``); every fp32 op rounds
      once, as the torch reference's separate kernels do.
    * ``enable_reflect_ftz=False``: libdevice without flush-to-zero (Triton's default selects the FTZ
      variants of ``__nv_logf/__nv_cosf/__nv_sinf``; torch CUDA is compiled without FTZ).
    """
    return {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def _unit_column_stride(t: torch.Tensor) -> bool:
    """[N, H] with consecutive columns adjacent; a stride along a dimension of size <= 1 (or of an empty tensor,
    e.g. ``(1, 0)`` for [0, 1]) never addresses memory, so it does not count."""
    return t.stride(1) == 1 or t.shape[1] <= 1 or t.numel() == 0


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are handed to kernels as int16 views (exact bit access)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def _bf16_round_bits(x):
    """fp32 -> uint32 holding the bf16 bit pattern (RNE, NaN -> 0x7FC0), as torch's c10 conversion."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    r = (bits + 0x7FFF + lsb) >> 16
    return tl.where(x != x, 0x7FC0, r)


@triton.jit
def _round_to(x, KIND: tl.constexpr):
    """Round fp32 ``x`` to fp32 (KIND 0), fp16 (1) or bf16 (2), returned widened back to fp32 (exact)."""
    if KIND == 1:
        return x.to(tl.float16).to(tl.float32)
    elif KIND == 2:
        return (_bf16_round_bits(x) << 16).to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _load_f32(ptrs, mask, KIND: tl.constexpr):
    """Load fp32/fp16 values or bf16 values from an int16 view, widened exactly to fp32."""
    if KIND == 2:
        raw = tl.load(ptrs, mask=mask, other=0)
        return ((raw.to(tl.uint16, bitcast=True)).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _store_from_f32(ptrs, x, mask, KIND: tl.constexpr):
    """Store fp32 ``x`` RNE-cast to the destination kind (bf16 destinations are int16 views)."""
    if KIND == 2:
        tl.store(ptrs, _bf16_round_bits(x).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif KIND == 1:
        tl.store(ptrs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, x, mask=mask)
