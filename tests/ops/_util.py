"""Shared helpers for the ops tests (not a test module)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp32 ulps (ordered-integer distance of the bit patterns); int64, same shape."""
    def ordered(t):
        i = t.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (ordered(a) - ordered(b)).abs()


def f32_from_hex(hexes) -> torch.Tensor:
    return torch.tensor(np.array([int(h, 16) for h in hexes], dtype=np.uint32).view(np.float32))


def bits16(t: torch.Tensor) -> list[str]:
    """bf16/fp16 tensor -> ['0x3f80', ...] (the golden encoding)."""
    return [f"0x{v & 0xFFFF:04x}" for v in t.contiguous().view(torch.int16).flatten().tolist()]


def sha256_le(t: torch.Tensor) -> str:
    """sha256 of the little-endian byte image (fp32 '<f4', bf16/fp16 '<u2')."""
    if t.dtype in (torch.bfloat16, torch.float16):
        arr = t.contiguous().view(torch.int16).numpy().astype("<i2")
    else:
        arr = t.contiguous().numpy().astype("<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
