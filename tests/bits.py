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
