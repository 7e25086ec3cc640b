"""Output stage (spec §6) in plain torch: the normative definition.

Exactness: pick indices and their order are bit-exact integers; the fp32 pipeline (normalise,
gather, 11 Householder steps in R^k, normalise) follows the reference expressions; the fp16 vector
is their RNE cast.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .nonces import check_nonces
from .rng import mmh, normal
from .seeds import haar_seed, pick_seed

K_DIM = 12
# An emitted artifact must be a unit vector: | ||v16||_2 - 1 | <= UNIT_TOL (fp16 rounding moves the norm by
# <= ~2^-11; rows whose picked coordinates vanish, overflow or are NaN fall far outside).
UNIT_TOL = 2.0**-7


def pick_indices(block_hash: str, public_key: str, nonce: int, hidden: int, k: int = K_DIM) -> list[int]:
    """The k coordinates with the smallest hash scores, in the CUDA ``topk(sorted=False)`` order.

    Order (spec §6 step 2): the k-1 smallest-score indices in ascending index order, then the index
    of the k-th smallest score. (mmh is a bijection of the key, so scores never tie.)
    """
    if not 0 < k <= hidden:
        raise ValueError(f"need 0 < k <= hidden, got k={k}, hidden={hidden}")
    scores = mmh(torch.arange(hidden, dtype=torch.int64), pick_seed(block_hash, public_key, nonce, k))
    by_score = torch.argsort(scores, stable=True)[:k].tolist()
    return sorted(by_score[: k - 1]) + [by_score[k - 1]]


def haar_vectors(block_hash: str, public_key: str, nonce: int, k: int = K_DIM, device=None) -> torch.Tensor:
    """The k-1 unit vectors u_j = n_j / (||n_j|| + 1e-30) of the Haar-like rotation, [k-1, k] float32."""
    rows = []
    for j in range(k - 1):
        u = normal(haar_seed(block_hash, public_key, nonce, k, j), k, device=device)
        rows.append(u / (torch.linalg.vector_norm(u) + 1e-30))
    return torch.stack(rows) if rows else torch.empty(0, k, device=device)


def rotate_picked(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Apply y <- y - (2 (y·u_j)) u_j for j in order, then y / (||y|| + 1e-8). y: [k], u: [k-1, k], fp32."""
    for j in range(u.shape[0]):
        dot = torch.sum(y * u[j])
        y = y - (2 * dot) * u[j]
    return y / (torch.linalg.vector_norm(y) + 1e-8)


def output_stage(
    hs: torch.Tensor, block_hash: str, public_key: str, nonces: Sequence[int], k: int = K_DIM
) -> torch.Tensor:
    """Final hidden states ``hs`` [B, H] (cast to fp32) → artifact vectors [B, k] float16.

    x = hs/(||hs||+1e-8); gather the picked coordinates; 11 seeded reflections; renormalise; fp16 RNE.
    Rows containing NaN stay NaN here, ±Inf/zero/overflowing rows give NaN or zero vectors; callers drop
    them (``is_emittable(vectors, hs)``).
    """
    nonces = check_nonces(nonces)
    if hs.dim() != 2 or hs.shape[0] != len(nonces):
        raise ValueError(f"hs must be [len(nonces), H], got {tuple(hs.shape)} for {len(nonces)} nonces")
    hs = hs.to(torch.float32)
    x = hs / (torch.linalg.vector_norm(hs, dim=-1, keepdim=True) + 1e-8)
    out = torch.empty(len(nonces), k, dtype=torch.float16, device=hs.device)
    for b, nonce in enumerate(nonces):
        idx = torch.tensor(pick_indices(block_hash, public_key, int(nonce), hs.shape[1], k), device=hs.device)
        u = haar_vectors(block_hash, public_key, int(nonce), k, device=hs.device)
        out[b] = rotate_picked(x[b, idx], u).to(torch.float16)
    return out


def is_emittable(vectors: torch.Tensor, hs: torch.Tensor | None = None) -> torch.Tensor:
    """Row mask [B] (bool, on ``vectors``' device) of the artifact vectors [B, k] that may be emitted: finite
    unit vectors (``| ||v|| - 1 | <= UNIT_TOL``, norm in fp32) computed from finite hidden states ``hs`` [B, H].

    The network's runner drops rows with a NaN in ``hs`` or in the fp16 vector, but emits the all-zero vector
    that a ±Inf state (no Inf coordinate picked), an all-zero state or an overflowing norm produce (the same
    zero for every nonce); those rows are not emitted here either.
    """
    v = vectors.to(torch.float32)
    ok = torch.isfinite(v).all(dim=-1)
    norm = torch.linalg.vector_norm(torch.where(ok[:, None], v, torch.zeros_like(v)), dim=-1)
    ok &= (norm - 1.0).abs() <= UNIT_TOL
    if hs is not None:
        if hs.shape[0] != vectors.shape[0]:
            raise ValueError(f"hs has {hs.shape[0]} rows for {vectors.shape[0]} vectors")
        ok &= torch.isfinite(hs).all(dim=-1).to(ok.device)
    return ok
