"""Per-nonce input embeddings (spec §4.1) in plain torch: the normative definition."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .nonces import check_nonces
from .rng import normal, stronger_normal
from .seeds import input_seed_string, seed32, stronger_sub_seeds

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nonce_normals(
    block_hash: str, public_key: str, nonce: int, n: int, stronger_rng: bool = False, device=None
) -> torch.Tensor:
    """The flat fp32 normals of one nonce, shape [n] (legacy seed32 path or the 8-sub-seed path)."""
    if stronger_rng:
        return stronger_normal(stronger_sub_seeds(block_hash, public_key, nonce), n, device=device)
    return normal(seed32(input_seed_string(block_hash, public_key, nonce)), n, device=device)


def poc_inputs(
    block_hash: str,
    public_key: str,
    nonces: Sequence[int],
    seq_len: int,
    hidden: int,
    dtype: torch.dtype,
    stronger_rng: bool = False,
    device=None,
) -> torch.Tensor:
    """Input embeddings ``[B, seq_len, hidden]`` in ``dtype`` (RNE cast of the fp32 normals).

    Element (b, t, d) = normals(nonce_b)[t*hidden + d]. Integer parts bit-exact; fp32 values follow
    the rounding points of ``normal``; bf16/fp16 are the RNE cast of those.
    """
    if dtype not in SUPPORTED_INPUT_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_INPUT_DTYPES}, got {dtype}")
    if seq_len <= 0 or hidden <= 0:
        raise ValueError(f"seq_len and hidden must be positive, got {seq_len}, {hidden}")
    if not isinstance(stronger_rng, bool):
        raise ValueError(f"stronger_rng must be a bool, got {stronger_rng!r}")
    rows = [
        nonce_normals(block_hash, public_key, n, seq_len * hidden, stronger_rng, device).view(seq_len, hidden)
        for n in check_nonces(nonces)
    ]
    if not rows:
        return torch.empty(0, seq_len, hidden, dtype=dtype, device=device)
    return torch.stack(rows).to(dtype)
