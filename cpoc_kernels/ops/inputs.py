"""poc_inputs op family: per-nonce input embeddings written straight into a (flat) token buffer.

Backends: the Triton kernel ``_normals_kernel`` (CUDA, or the interpreter on CPU tensors), the native
C++ RNG (``_C``, CPU), and the plain-torch reference (``cpoc_kernels.reference.poc_inputs`` /
``reference.rng.normal``), which the tests compare against.

Exactness (spec §3, §11): seeds (host SHA-256), murmur keys/hashes and uniforms are bit-exact integers /
exact fp32; the Box–Muller normals follow the reference's fp32 rounding points (clamp, ``-2*log``,
IEEE sqrt, ``6.2831855f*u2`` with no FMA, ``r*cos``/``r*sin``), so they differ from the reference only
through the log/cos/sin implementation: CUDA libdevice precise ``logf/cosf/sinf`` on GPU (torch CUDA
uses the same), fp64 numpy rounded once to fp32 under the interpreter, the C library in ``_C``, SLEEF in
CPU torch (a few fp32 ulp apart). bf16/fp16 outputs are the RNE cast of the fp32 normals.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton
import triton.language as tl

from cpoc_kernels._native import native
from cpoc_kernels.reference.inputs import SUPPORTED_INPUT_DTYPES
from cpoc_kernels.reference.inputs import poc_inputs as poc_inputs_reference  # noqa: F401  (the reference beside it)
from cpoc_kernels.reference.rng import normal as normal_reference
from cpoc_kernels.reference.rng import stronger_normal as stronger_normal_reference
from cpoc_kernels.reference.seeds import input_seed_string, seed32, stronger_sub_seeds

from ._checks import check_flag, check_int, check_nonces, check_round_strings
from ._common import (_store_from_f32, _unit_column_stride, check_backend, dtype_kind, kernel_view, launch_opts,
                      math_mode)

NSEG_STRONGER = 8


# --------------------------------------------------------------------------------------------- seeds
def input_seeds(block_hash: str, public_key: str, nonces: Sequence[int], stronger_rng: bool = False) -> torch.Tensor:
    """Per-nonce seed table on the host: int64 ``[B, 1]`` (legacy seed32) or ``[B, 8]`` (stronger sub-seeds).

    Values are uint32 (bit-exact SHA-256 words, spec §3.1/§3.5).
    """
    if stronger_rng:
        rows = [stronger_sub_seeds(block_hash, public_key, int(n)) for n in nonces]
    else:
        rows = [[seed32(input_seed_string(block_hash, public_key, int(n)))] for n in nonces]
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), NSEG_STRONGER if stronger_rng else 1)


# --------------------------------------------------------------------------------------------- CPU (C++)
def _fill_seeds(lib, flat: np.ndarray, seeds: Sequence[int]) -> None:
    n = flat.shape[0]
    seg = -(-n // len(seeds))
    for k, sub_seed in enumerate(seeds):
        if k * seg < n:
            lib.normal_into(flat[k * seg : k * seg + min(seg, n - k * seg)], int(sub_seed))


def normals_from_seeds_cpu(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 normals ``[B, n]`` of a seed table ``[B, 1|8]`` on the CPU (C++ RNG; torch reference if not built).

    One seed column: ``normal(seed, n)``; eight: the concat-murmur segments of spec §3.5.
    """
    table = seeds.to("cpu", torch.int64).tolist()
    lib = native()
    if lib is None:
        rows = [normal_reference(s[0], n) if len(s) == 1 else stronger_normal_reference(s, n) for s in table]
        return torch.stack(rows) if rows else torch.empty(0, n)
    buf = np.empty((len(table), n), dtype=np.float32)
    workers = min(len(table), torch.get_num_threads())
    if workers <= 1:  # one row or one thread: no pool to start and join
        for b, seeds_b in enumerate(table):
            _fill_seeds(lib, buf[b], seeds_b)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda b: _fill_seeds(lib, buf[b], table[b]), range(len(table))))
    return torch.from_numpy(buf)


def nonce_normals_cpu(
    block_hash: str, public_key: str, nonces: Sequence[int], n: int, stronger_rng: bool = False
) -> torch.Tensor:
    """fp32 normals of each nonce, [B, n], on the CPU through the C++ RNG (torch fallback if not built).

    Integer parts bit-exact; fp32 values within a few ulp of the torch reference (C library log/cos/sin).
    """
    return normals_from_seeds_cpu(input_seeds(block_hash, public_key, nonces, stronger_rng), n)


# --------------------------------------------------------------------------------------------- Triton
@triton.jit
def _mmh(key, seed):
    """Spec §3.2 murmur variant on uint32 tensors (all arithmetic mod 2^32)."""
    k = key * tl.full([], 0xCC9E2D51, tl.uint32)
    k = (k << 15) | (k >> 17)
    k = k * tl.full([], 0x1B873593, tl.uint32)
    h = seed ^ k
    h = (h << 13) | (h >> 19)
    h = h * tl.full([], 5, tl.uint32) + tl.full([], 0xE6546B64, tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _uniform(key, seed):
    """fp32(mmh) (RNE) * 2^-32: bit-exact."""
    return _mmh(key, seed).to(tl.float32) * 2.3283064365386963e-10


@triton.jit
def _log(x, MATH: tl.constexpr):
    if MATH == 1:
        return tl.extra.cuda.libdevice.log(x)
    else:
        return tl.log(x.to(tl.float64)).to(tl.float32)


@triton.jit
def _cos(x, MATH: tl.constexpr):
    if MATH == 1:
        return tl.extra.cuda.libdevice.cos(x)
    else:
        return tl.cos(x.to(tl.float64)).to(tl.float32)


@triton.jit
def _sin(x, MATH: tl.constexpr):
    if MATH == 1:
        return tl.extra.cuda.libdevice.sin(x)
    else:
        return tl.sin(x.to(tl.float64)).to(tl.float32)


@triton.jit
def _normals_kernel(
    out_ptr, seeds_ptr, n, seg_len, seg_pairs, seq_len, hidden, row_stride, row_offset, n_nonces,
    NSEG: tl.constexpr, KIND: tl.constexpr, MATH: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr,
    CONTIG: tl.constexpr,
):
    """Box–Muller pairs -> output elements. Grid: (pair blocks, segment, nonce), or, when a segment has fewer
    than BLOCK pairs (FLAT), 1-D over the flattened (nonce, segment, pair) space.

    Pair j of segment s makes elements s*L + j (cos) and s*L + P_s + j (sin) of the flat [seq_len*hidden]
    normals, L = seg_len, P_s = ceil(m_s/2), m_s = min(L, n - s*L); keys (j, P_s + j), seed seeds[b, s].
    Flat element f lands at out[row_offset + b*seq_len + f // hidden, f % hidden] (CONTIG: rows are
    contiguous, so that address is linear in f and no division is needed).
    """
    pid = tl.program_id(0)
    if FLAT:
        flat_q = pid * BLOCK + tl.arange(0, BLOCK)
        b = flat_q // (NSEG * seg_pairs)
        q = flat_q - b * (NSEG * seg_pairs)
        in_range = b < n_nonces
        if NSEG == 1:
            seg = tl.zeros_like(q)
            j = q
        else:
            seg = q // seg_pairs
            j = q - seg * seg_pairs
    else:
        seg = tl.program_id(1)
        b = tl.program_id(2)
        j = pid * BLOCK + tl.arange(0, BLOCK)
        in_range = j < seg_pairs
    seg_start = seg * seg_len
    m = tl.minimum(tl.maximum(n - seg_start, 0), seg_len)
    half = (m + 1) // 2
    valid = in_range & (j < half)
    if FLAT:
        seed = tl.load(seeds_ptr + b * NSEG + seg, mask=valid, other=0).to(tl.uint32)
    else:
        seed = tl.load(seeds_ptr + b * NSEG + seg).to(tl.uint32)
    u1 = _uniform(j.to(tl.uint32), seed)
    u2 = _uniform((half + j).to(tl.uint32), seed)
    u1 = tl.maximum(u1, 1e-10)
    r = tl.sqrt_rn(-2.0 * _log(u1, MATH))
    a = 6.2831855 * u2
    z0 = r * _cos(a, MATH)
    z1 = r * _sin(a, MATH)

    base_row = row_offset + b * seq_len
    f0 = seg_start + j
    f1 = f0 + half
    if CONTIG:
        base = out_ptr + base_row.to(tl.int64) * hidden
        p0 = base + f0
        p1 = base + f1
    else:
        t0 = f0 // hidden
        p0 = out_ptr + (base_row + t0).to(tl.int64) * row_stride + (f0 - t0 * hidden)
        t1 = f1 // hidden
        p1 = out_ptr + (base_row + t1).to(tl.int64) * row_stride + (f1 - t1 * hidden)
    _store_from_f32(p0, z0, valid, KIND)
    _store_from_f32(p1, z1, valid & (half + j < m), KIND)


_BLOCK = 1024
_MAX_GRID_YZ = 65535


def normals_into_triton(out: torch.Tensor, seeds: torch.Tensor, seq_len: int, row_offset: int = 0) -> None:
    """Triton: write the normals of each seed row into ``out[row_offset + b*seq_len + t, :]`` (RNE cast).

    out: [rows, H] fp32/fp16/bf16 with unit column stride; seeds: int64 [B, 1|8] on out's device.
    No validation here (the public wrappers validate).
    """
    nb, nseg = seeds.shape
    hidden = out.shape[1]
    n = seq_len * hidden
    if nb == 0 or n == 0:
        return
    seeds = seeds.contiguous()
    seg_len = -(-n // nseg)
    seg_pairs = (seg_len + 1) // 2
    flat = seg_pairs < _BLOCK
    common = dict(NSEG=nseg, KIND=dtype_kind(out.dtype), MATH=math_mode(out.device), FLAT=flat,
                  CONTIG=out.stride(0) == hidden, num_warps=4, **launch_opts(out.device))
    if flat:
        total = nb * nseg * seg_pairs
        block = min(_BLOCK, triton.next_power_of_2(total))
        _normals_kernel[(triton.cdiv(total, block),)](
            kernel_view(out), seeds, n, seg_len, seg_pairs, seq_len, hidden, out.stride(0), row_offset, nb,
            BLOCK=block, **common)
        return
    for b0 in range(0, nb, _MAX_GRID_YZ):  # grid axis 2 is limited to 65535 nonces per launch
        chunk = seeds[b0 : b0 + _MAX_GRID_YZ]
        _normals_kernel[(triton.cdiv(seg_pairs, _BLOCK), nseg, chunk.shape[0])](
            kernel_view(out), chunk, n, seg_len, seg_pairs, seq_len, hidden, out.stride(0),
            row_offset + b0 * seq_len, chunk.shape[0], BLOCK=_BLOCK, **common)


# --------------------------------------------------------------------------------------------- torch paths
def normals_into_torch(out: torch.Tensor, seeds: torch.Tensor, seq_len: int, row_offset: int = 0) -> None:
    """Non-Triton path: C++ RNG on CPU, the plain-torch reference expressions on other devices; RNE cast."""
    nb = seeds.shape[0]
    hidden = out.shape[1]
    n = seq_len * hidden
    if nb == 0:
        return
    if out.device.type == "cpu":
        normals = normals_from_seeds_cpu(seeds, n)
    else:
        table = seeds.to("cpu").tolist()
        normals = torch.stack([
            normal_reference(s[0], n, device=out.device) if len(s) == 1
            else stronger_normal_reference(s, n, device=out.device)
            for s in table
        ])
    out[row_offset : row_offset + nb * seq_len].copy_(normals.view(nb * seq_len, hidden))


# --------------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("cpoc::poc_inputs_", mutates_args=("out",))
def poc_inputs_op(out: torch.Tensor, seeds: torch.Tensor, seq_len: int, row_offset: int) -> None:
    """In place: out[row_offset + b*seq_len + t, d] = dtype(normals(seeds[b])[t*H + d]).

    out: [rows, H] fp32/fp16/bf16, unit column stride; seeds: int64 [B, 1] (legacy) or [B, 8] (stronger).
    CUDA -> Triton kernel; CPU -> C++ RNG.
    """
    if out.device.type == "cuda":
        normals_into_triton(out, seeds, seq_len, row_offset)
    else:
        normals_into_torch(out, seeds, seq_len, row_offset)


@poc_inputs_op.register_fake
def _(out, seeds, seq_len, row_offset):
    return None


# --------------------------------------------------------------------------------------------- public API
def poc_inputs(
    block_hash: str,
    public_key: str,
    nonces: Sequence[int],
    seq_len: int,
    hidden: int,
    dtype: torch.dtype,
    device=None,
    stronger_rng: bool = False,
    out: torch.Tensor | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Input embeddings of ``nonces`` (spec §4.1), same values as ``reference.poc_inputs``.

    Without ``out``: returns a new ``[B, seq_len, hidden]`` tensor of ``dtype``. With ``out`` (``[rows, hidden]``
    of ``dtype``, unit column stride): writes nonce b's token t into row ``row_offset + b*seq_len + t`` in
    place, leaves every other row untouched, and returns ``out``.
    Exact: integer parts; bf16/fp16 are RNE casts of the fp32 normals; fp32 normals within a few ulp of the
    CPU torch reference (bit-equal to torch CUDA expected on GPU, both libdevice).
    backend: "auto" (Triton on CUDA, C++ on CPU), "triton" (CPU only under TRITON_INTERPRET=1), "torch".
    """
    check_round_strings(block_hash, public_key)
    stronger_rng = check_flag("stronger_rng", stronger_rng)
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_INPUT_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_INPUT_DTYPES}, got {dtype!r}")
    seq_len, hidden, row_offset = (check_int("seq_len", seq_len), check_int("hidden", hidden),
                                   check_int("row_offset", row_offset))
    if seq_len <= 0 or hidden <= 0:
        raise ValueError(f"seq_len and hidden must be positive, got {seq_len}, {hidden}")
    if seq_len * hidden >= 2**31:
        raise ValueError(f"seq_len*hidden must be < 2**31 (int32 element keys), got {seq_len * hidden}")
    if row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    nonces = check_nonces(nonces)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must name a torch device, got {device!r}"[:120]) from None
    nb = len(nonces)
    if out is None:
        if row_offset != 0:
            raise ValueError("row_offset needs an out buffer")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        target = torch.empty(nb * seq_len, hidden, dtype=dtype, device=dev)
    else:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != hidden:
            raise ValueError(f"out must be a [rows, {hidden}] tensor, got {getattr(out, 'shape', type(out))}")
        if out.dtype != dtype:
            raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
        if not _unit_column_stride(out):
            raise ValueError("out must have unit stride along the hidden dimension")
        if out.shape[0] > 1 and out.stride(0) < hidden:
            raise ValueError(f"out rows overlap in memory (row stride {out.stride(0)} < hidden {hidden})")
        if device is not None and torch.device(device) != out.device:
            if not (torch.device(device).type == out.device.type and torch.device(device).index is None):
                raise ValueError(f"device {device} does not match out.device {out.device}")
        if row_offset + nb * seq_len > out.shape[0]:
            raise ValueError(
                f"out has {out.shape[0]} rows, needs row_offset + B*seq_len = {row_offset + nb * seq_len}"
            )
        target = out
    path = check_backend(backend, target.device)
    seeds = input_seeds(block_hash, public_key, nonces, stronger_rng).to(target.device)
    if nb:
        if backend == "auto":
            torch.ops.cpoc.poc_inputs_(target, seeds, seq_len, row_offset)
        elif path == "triton":
            normals_into_triton(target, seeds, seq_len, row_offset)
        else:
            normals_into_torch(target, seeds, seq_len, row_offset)
    return target.view(nb, seq_len, hidden) if out is None else out
