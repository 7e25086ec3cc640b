"""PoC v2 RNG primitives in plain torch (spec §3): the normative definition.

Exactness: ``mmh`` and ``uniform`` are bit-exact on every device. ``normal`` follows the
reference's fp32 rounding points (one rounding per torch op, 2π as fp32 6.2831855, split halves);
its values pass through torch's log/cos/sin, so CPU (SLEEF) and CUDA (libdevice) differ by a few ulp.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed <= _M32:
        raise ValueError(f"seed must be a uint32, got {seed}")
    return seed


def _check_seed_tensor(seeds: torch.Tensor) -> torch.Tensor:
    if seeds.dtype not in (torch.int32, torch.int64, torch.uint32) or seeds.is_floating_point():
        raise ValueError(f"seeds must be an integer tensor, got {seeds.dtype}")
    seeds = seeds.to(torch.int64)
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) > _M32):
        raise ValueError("seeds must be uint32 values")
    return seeds


def mmh(keys: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """Murmur3_32 variant of spec §3.2 (one block, no tail, no length mix).

    keys: integer tensor (values taken mod 2**32); seed: a uint32, or an integer tensor of uint32 seeds
    broadcast against ``keys``. Returns int64 holding uint32 values.
    """
    seed = _check_seed_tensor(seed) if isinstance(seed, torch.Tensor) else _check_seed(seed)
    k = keys.to(torch.int64) & _M32
    k = (k * 0xCC9E2D51) & _M32
    k = ((k << 15) | (k >> 17)) & _M32
    k = (k * 0x1B873593) & _M32
    h = k ^ seed
    h = ((h << 13) | (h >> 19)) & _M32
    h = (h * 5 + 0xE6546B64) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    h = h ^ (h >> 16)
    return h


def uniform(seed: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32(mmh(i, seed)) / 2**32 for i in 0..n-1 (values in [0, 1]). Bit-exact. Shape [n], float32."""
    keys = torch.arange(int(n), dtype=torch.int64, device=device)
    return mmh(keys, seed).to(torch.float32) / 4294967296.0


def normal(seed: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Split-halves Box–Muller normals (spec §3.4). Shape [n], float32.

    P = ceil(n/2); element i < P uses keys (i, P+i) with cos, element i >= P keys (i-P, i) with sin.
    """
    return normal_rows(torch.tensor([_check_seed(seed)], dtype=torch.int64), n, device=device)[0]


def normal_rows(seeds: torch.Tensor, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row b = ``normal(seeds[b], n)`` (:func:`normal` is this with one seed). Shape [B, n], float32.

    Elementwise ops only, so a row does not depend on the batch (tested against one-seed calls on random
    seeds); ~1000× faster than a call per seed for short rows such as the output stage's Haar normals.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seeds = _check_seed_tensor(torch.as_tensor(seeds)).reshape(-1, 1).to(device)
    half = (n + 1) // 2
    keys = torch.arange(2 * half, dtype=torch.int64, device=seeds.device).view(1, -1)
    u = mmh(keys, seeds).to(torch.float32) / 4294967296.0
    u1 = torch.clamp(u[:, :half], min=1e-10)
    u2 = u[:, half:]
    r = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2  # fp32 tensor times a Python scalar: 6.2831855f * u2, rounded once
    return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=1)[:, :n]


def stronger_normal(sub_seeds: list[int], n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Concat-murmur normals (spec §3.5): segment k = normal(sub_seeds[k], min(L, n - kL)), L = ceil(n/8)."""
    if len(sub_seeds) != 8:
        raise ValueError(f"need 8 sub-seeds, got {len(sub_seeds)}")
    seg = -(-int(n) // 8)
    parts = [normal(s, min(seg, n - k * seg), device=device) for k, s in enumerate(sub_seeds) if k * seg < n]
    return torch.cat(parts)[:n] if parts else torch.empty(0, dtype=torch.float32, device=device)
