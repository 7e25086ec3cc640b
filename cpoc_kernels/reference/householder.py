"""Per-layer Householder reflection (spec §5.2) in plain torch: the normative definition."""
from __future__ import annotations

import torch

from .rng import normal
from .seeds import layer_seed


def layer_vector(block_hash: str, layer: int, hidden: int, device=None) -> torch.Tensor:
    """Unit reflection vector v_layer, shape [hidden], float32: normal(seed)/||normal(seed)|| (no eps).

    ``layer`` is the global decoder-layer index (0..L-1). No public key: the same for all participants.
    """
    v = normal(layer_seed(block_hash, layer), hidden, device=device)
    return v / torch.linalg.vector_norm(v)


def reflect(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """R(x) = x - 2 (x·v) v over the last dim, in x's dtype with the reference's rounding points.

    x: [..., H] (bf16/fp16/fp32); v: [H] float32 unit vector. Each op rounds to x.dtype:
    vb = v.to(dtype); p = x*vb; dot = sum(p) (fp32 accumulation, one rounding); t = (2*dot)*vb; y = x - t.
    Bit-exact given the dot; the fp32 summation order of the dot is not fixed.
    """
    if x.shape[-1] != v.shape[-1]:
        raise ValueError(f"hidden size mismatch: x has {x.shape[-1]}, v has {v.shape[-1]}")
    vb = v.to(device=x.device, dtype=x.dtype)
    dot = torch.sum(x * vb, dim=-1, keepdim=True)
    return x - (2 * dot) * vb
