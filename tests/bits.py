"""Helpers to read the golden files' IEEE bit patterns and compare floats in ulp."""
from __future__ import annotations

import numpy as np
import torch


def f32_from_hex(values) -> torch.Tensor:
    """['0x3f800000', ...] → float32 tensor with exactly those bits."""
    return torch.from_numpy(np.array([int(h, 16) for h in values], dtype=np.uint32).view(np.float32).copy())


def u16_from_hex(values) -> torch.Tensor:
    """16-bit patterns (bf16/fp16) → int16 tensor of the same bits (view as the float dtype)."""
    return torch.from_numpy(np.array([int(h, 16) for h in values], dtype=np.uint16).view(np.int16).copy())


def bf16_from_hex(values) -> torch.Tensor:
    return u16_from_hex(values).view(torch.bfloat16)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in fp32 ulps (ordered-integer difference of the bit patterns)."""
    def ordered(x):
        i = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


def le_sha256(t: torch.Tensor) -> str:
    """sha256 of the little-endian byte image (fp32 as <f4; 16-bit dtypes as <u2 bit patterns)."""
    import hashlib

    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- host-independent fp32 oracle
def _margin_ulp64(y64: np.ndarray) -> np.ndarray:
    """Distance of each fp64 value from the nearest fp32 rounding boundary (midpoint), in fp64 ulps."""
    y32 = y64.astype(np.float32)
    lo = np.nextafter(y32, np.float32(-np.inf)).astype(np.float64)
    hi = np.nextafter(y32, np.float32(np.inf)).astype(np.float64)
    mid_lo = (y32.astype(np.float64) + lo) / 2  # exact: fp32 midpoints are fp64 numbers
    mid_hi = (y32.astype(np.float64) + hi) / 2
    return np.minimum(np.abs(y64 - mid_lo), np.abs(y64 - mid_hi)) / np.spacing(np.abs(y64) + 1e-300)


def box_muller_fp64_libm(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``normal(seed, n)`` (spec §3.4, split halves) recomputed in numpy: the exact fp32 uniforms, fp64
    log/cos/sin each rounded once to fp32, every other op in fp32 (clamp, -2*log, IEEE sqrt, 6.2831855f*u2,
    r*cos / r*sin). Returns (values fp32 [n], margin fp64 [n]): margin is the smallest distance, in fp64 ulps,
    of the element's fp64 transcendental results from an fp32 rounding boundary. Where margin > 2**10, any fp64
    libm accurate to 2**9 ulps gives the same fp32 bits, so bit-equality there holds on every host."""
    from cpoc_kernels.reference import uniform

    p = (n + 1) // 2
    u = uniform(seed, 2 * p).numpy()
    u1 = np.maximum(u[:p], np.float32(1e-10))
    u2 = u[p:]
    lg64 = np.log(u1.astype(np.float64))
    r = np.sqrt(np.float32(-2.0) * lg64.astype(np.float32))
    a = np.float32(6.2831855) * u2
    c64, s64 = np.cos(a.astype(np.float64)), np.sin(a.astype(np.float64))
    z = np.concatenate([r * c64.astype(np.float32), r * s64.astype(np.float32)])[:n]
    m_log = _margin_ulp64(lg64)
    margin = np.concatenate([np.minimum(m_log, _margin_ulp64(c64)), np.minimum(m_log, _margin_ulp64(s64))])[:n]
    return torch.from_numpy(z.astype(np.float32)), torch.from_numpy(margin)


def stronger_box_muller_fp64_libm(sub_seeds, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-segment concat of spec §3.5 over :func:`box_muller_fp64_libm` (segment s: ``normal(sub_seeds[s], m_s)``)."""
    seg = -(-n // len(sub_seeds))
    parts = [box_muller_fp64_libm(int(s), min(seg, n - k * seg)) for k, s in enumerate(sub_seeds) if k * seg < n]
    return torch.cat([v for v, _ in parts]), torch.cat([m for _, m in parts])
