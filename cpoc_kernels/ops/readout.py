"""poc_readout op family: the output stage of spec §6 for given rows (final hidden states -> artifacts).

Per row b: ``x = hs/(||hs||+1e-8)`` (fp32), gather the k picked coordinates (spec's CUDA order), 11 (k-1)
seeded Householder steps ``y = y - (2*(y·u_j))*u_j`` with ``u_j = n_j/(||n_j||+1e-30)``, ``y/(||y||+1e-8)``,
fp16 RNE -> ``[B, k]`` and the 24-byte little-endian payloads. Only finite unit vectors of finite states are
emitted (``reference.is_emittable``): rows with NaN/±Inf in ``hs``, a zero or overflowing norm, or a vector
that is not finite or not unit in fp16 are reported in ``nan_rows``, with payload None.

Host side (bit-exact integers): pick indices (``reference.pick_indices``), Haar seeds (SHA-256). The Haar
normals n_j come from the Triton normals kernel on the Triton path (libdevice on GPU) and from the torch
reference ``normal`` (batched over seeds: ``normal_rows``) on the torch path. Exactness: integer parts exact; the fp32 pipeline follows the
reference's rounding points (IEEE div/sqrt, no FMA) except the order of its three kinds of fp32 sums
(row norm, 12-element dots/norms), so fp16 vectors are bit-equal to ``reference.output_stage`` unless a
value lies within a few fp32 ulps of an fp16 rounding boundary (the golden cases keep >= 16 ulps margin).
The torch path (CPU ``auto``) *is* the reference computation: bit-equal.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cpoc_kernels.reference.codec import vector_bytes
from cpoc_kernels.reference.readout import K_DIM, is_emittable
from cpoc_kernels.reference.readout import output_stage as output_stage_reference  # noqa: F401 (reference beside it)
from cpoc_kernels.reference.rng import mmh, normal_rows
from cpoc_kernels.reference.seeds import haar_seed, pick_seed

from ._common import FLOAT_DTYPES, _load_f32, check_backend, dtype_kind, kernel_view, launch_opts
from ._checks import check_nonces, check_round_strings
from .inputs import normals_into_triton


class ReadoutResult(NamedTuple):
    """vectors: fp16 [B, k] (every row as computed, dropped ones included); emittable: bool [B] (CPU);
    payloads: per row the 2k-byte little-endian fp16 payload, or None for a row that must not be emitted."""

    vectors: torch.Tensor
    emittable: torch.Tensor
    payloads: list

    @property
    def nan_rows(self) -> list[int]:
        """Rows that are reported, not emitted: non-finite hidden state (NaN/±Inf), zero or overflowing norm,
        or an fp16 vector that is not a finite unit vector (``reference.is_emittable``)."""
        return [i for i, ok in enumerate(self.emittable.tolist()) if not ok]


# --------------------------------------------------------------------------------------------- host parts
def pick_table(block_hash: str, public_key: str, nonces: Sequence[int], hidden: int, k: int = K_DIM) -> torch.Tensor:
    """int64 [B, k]: the pick indices of each nonce in the spec's CUDA order (bit-exact; row b equals
    ``reference.pick_indices`` of nonce b, computed for all nonces at once)."""
    if not 0 < k <= hidden:
        raise ValueError(f"need 0 < k <= hidden, got k={k}, hidden={hidden}")
    if not len(nonces):
        return torch.empty(0, k, dtype=torch.int64)
    seeds = torch.tensor([pick_seed(block_hash, public_key, int(n), k) for n in nonces], dtype=torch.int64)
    scores = mmh(torch.arange(hidden, dtype=torch.int64).view(1, -1), seeds.view(-1, 1))
    by_score = torch.argsort(scores, dim=-1, stable=True)[:, :k]
    first, _ = torch.sort(by_score[:, : k - 1], dim=-1)
    return torch.cat([first, by_score[:, k - 1 :]], dim=1)


def haar_seed_table(block_hash: str, public_key: str, nonces: Sequence[int], k: int = K_DIM) -> torch.Tensor:
    """int64 [B*(k-1), 1]: seed of u_j for nonce b at row b*(k-1)+j (bit-exact)."""
    seeds = [haar_seed(block_hash, public_key, int(n), k, j) for n in nonces for j in range(k - 1)]
    return torch.tensor(seeds, dtype=torch.int64).view(-1, 1)


def haar_normals_torch(seeds: torch.Tensor, k: int, device) -> torch.Tensor:
    """Raw Haar normals [B*(k-1), k] fp32 through the torch reference on ``device`` (``normal_rows``: bit-equal
    to the per-seed ``normal`` calls of ``reference.haar_vectors``)."""
    return normal_rows(seeds.flatten(), k, device=device)


def haar_normals_triton(seeds: torch.Tensor, k: int, device) -> torch.Tensor:
    out = torch.empty(seeds.shape[0], k, dtype=torch.float32, device=device)
    normals_into_triton(out, seeds.to(device), seq_len=1)
    return out


# --------------------------------------------------------------------------------------------- Triton
@triton.jit
def _readout_kernel(
    hs_ptr, idx_ptr, haar_ptr, out_ptr, H, hs_stride,
    K: tl.constexpr, KP: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    """One program per row: norm (fixed block order), gather, K-1 reflections, normalise, fp16."""
    b = tl.program_id(0)
    base = hs_ptr + b.to(tl.int64) * hs_stride
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        x = _load_f32(base + offs, offs < H, KIND)
        ss = tl.sum(x * x, axis=0)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            x = _load_f32(base + start + offs, start + offs < H, KIND)
            acc += x * x
        ss = tl.sum(acc, axis=0)
    denom = tl.sqrt_rn(ss) + 1e-8
    kk = tl.arange(0, KP)
    km = kk < K
    ix = tl.load(idx_ptr + b * K + kk, mask=km, other=0)
    y = tl.div_rn(_load_f32(base + ix, km, KIND), denom)
    for j in tl.static_range(K - 1):
        u = tl.load(haar_ptr + (b * (K - 1) + j) * K + kk, mask=km, other=0.0)
        u = tl.div_rn(u, tl.sqrt_rn(tl.sum(u * u, axis=0)) + 1e-30)
        dot = tl.sum(y * u, axis=0)
        y = y - (2.0 * dot) * u
    y = tl.div_rn(y, tl.sqrt_rn(tl.sum(y * y, axis=0)) + 1e-8)
    tl.store(out_ptr + b * K + kk, y.to(tl.float16), mask=km)


def readout_triton(hs: torch.Tensor, idx: torch.Tensor, haar: torch.Tensor) -> torch.Tensor:
    """Triton launch (no validation): hs [B, H] (unit column stride), idx int64 [B, k], haar fp32 [B, k-1, k]."""
    nb, hidden = hs.shape
    k = idx.shape[1]
    out = torch.empty(nb, k, dtype=torch.float16, device=hs.device)
    if nb == 0:
        return out
    p2 = triton.next_power_of_2(hidden)
    block, single = (p2, True) if p2 <= 8192 else (2048, False)
    _readout_kernel[(nb,)](
        kernel_view(hs), idx.contiguous(), haar.contiguous(), out, hidden, hs.stride(0),
        K=k, KP=max(2, triton.next_power_of_2(k)), KIND=dtype_kind(hs.dtype), BLOCK=block, SINGLE=single,
        num_warps=4, **launch_opts(hs.device),
    )
    return out


# --------------------------------------------------------------------------------------------- torch path
def readout_torch(hs: torch.Tensor, idx: torch.Tensor, haar: torch.Tensor) -> torch.Tensor:
    """The reference output stage (``reference.output_stage`` expressions) with given picks and raw normals,
    all rows at once: every row sees the reference's ops in its order (u_j = n_j/(||n_j||+1e-30); k-1 steps
    ``y - (2·(y·u_j))·u_j``; ``y/(||y||+1e-8)``), batched over rows; bit-equal to the per-row reference
    (``rotate_picked``), which the tests check."""
    hs = hs.to(torch.float32)
    x = hs / (torch.linalg.vector_norm(hs, dim=-1, keepdim=True) + 1e-8)
    u = haar / (torch.linalg.vector_norm(haar, dim=-1, keepdim=True) + 1e-30)
    y = torch.gather(x, 1, idx)
    for j in range(idx.shape[1] - 1):
        uj = u[:, j]
        dot = torch.sum(y * uj, dim=-1, keepdim=True)
        y = y - (2 * dot) * uj
    return (y / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + 1e-8)).to(torch.float16)


# --------------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("cpoc::poc_readout", mutates_args=())
def poc_readout_op(hs: torch.Tensor, idx: torch.Tensor, haar: torch.Tensor) -> torch.Tensor:
    """hs [B, H] (fp32/fp16/bf16), idx int64 [B, k] (pick order), haar fp32 [B, k-1, k] raw normals -> fp16 [B, k].

    CUDA -> Triton; CPU -> the reference expressions.
    """
    if hs.device.type == "cuda":
        return readout_triton(hs, idx, haar)
    return readout_torch(hs, idx, haar)


@poc_readout_op.register_fake
def _(hs, idx, haar):
    return hs.new_empty((hs.shape[0], idx.shape[1]), dtype=torch.float16)


# --------------------------------------------------------------------------------------------- public API
def poc_readout(
    hs: torch.Tensor,
    block_hash: str,
    public_key: str,
    nonces: Sequence[int],
    k: int = K_DIM,
    backend: str = "auto",
) -> ReadoutResult:
    """Artifacts of final hidden states ``hs`` [B, H] (one row per nonce), as ``reference.output_stage``.

    Returns ``ReadoutResult(vectors fp16 [B, k], emittable bool [B], payloads)``; payloads[b] is the 2k-byte
    LE fp16 vector (24 B for k = 12) or None for a NaN/Inf row (reported in ``nan_rows``, not emitted).
    backend: "auto" (Triton on CUDA, the reference on CPU), "triton", "torch".
    """
    if not isinstance(hs, torch.Tensor) or hs.dim() != 2:
        raise ValueError(f"hs must be a 2-D [B, H] tensor, got {getattr(hs, 'shape', type(hs))}")
    if hs.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hs dtype must be one of {FLOAT_DTYPES}, got {hs.dtype}")
    check_round_strings(block_hash, public_key)
    nonces = check_nonces(nonces)
    if hs.shape[0] != len(nonces):
        raise ValueError(f"hs must be [len(nonces), H], got {tuple(hs.shape)} for {len(nonces)} nonces")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= hs.shape[1]:
        raise ValueError(f"need 0 < k <= hidden, got k={k}, hidden={hs.shape[1]}")
    path = check_backend(backend, hs.device)
    if hs.stride(1) != 1:
        hs = hs.contiguous()
    idx = pick_table(block_hash, public_key, nonces, hs.shape[1], k).to(hs.device)
    seeds = haar_seed_table(block_hash, public_key, nonces, k)
    if path == "triton":
        haar = haar_normals_triton(seeds, k, hs.device)
    else:
        haar = haar_normals_torch(seeds, k, hs.device)
    haar = haar.view(len(nonces), k - 1, k)
    if backend == "auto":
        vec = torch.ops.cpoc.poc_readout(hs, idx, haar)
    elif path == "triton":
        vec = readout_triton(hs, idx, haar)
    else:
        vec = readout_torch(hs, idx, haar)
    vec_cpu = vec.cpu()
    if len(nonces):  # the state check is one reduction on hs's device, then [B] bools to the host
        ok = is_emittable(vec_cpu) & torch.isfinite(hs).all(dim=-1).cpu()
    else:
        ok = torch.zeros(0, dtype=torch.bool)
    payloads = [vector_bytes(vec_cpu[b], k) if ok[b] else None for b in range(len(nonces))]
    return ReadoutResult(vec, ok, payloads)
