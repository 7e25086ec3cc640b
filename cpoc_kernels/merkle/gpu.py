"""SMST root on the device: Triton SHA-256 kernels, the tree built level by level where the artifacts are.

Input: nonces int32 [N] and vectors fp16 [N, 12] (the readout op's output) on one device. The leaf
preimage ``0x00 || LE32(nonce) || 24 vector bytes`` (29 bytes) is one SHA-256 block; an internal node
``0x01 || left || right || LE32(count)`` (69 bytes) is two. Only non-empty nodes are hashed; a missing
sibling is E[h]. The root is exact: bit for bit the C++/Go root. On CPU tensors the kernels run under
the Triton interpreter (``TRITON_INTERPRET=1``), which is slow: small trees only.
Hashes travel as 8 uint32 words (big-endian digest words) in int32 tensors [M, 8].
"""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

from cpoc_kernels.merkle.oracle import DEFAULT_DEPTH, EMPTY_HASHES

POCV2_K_DIM = 12


def _block(n: int) -> int:
    """Lanes per program: 128 on a GPU; under the interpreter one wide program (its cost is per op, not per lane)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(4096, triton.next_power_of_2(max(n, 1)))
    return 128

_K = [
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
]
_H0 = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]


def _as_int32(words: list[int]) -> list[int]:
    return [w - 2**32 if w >= 2**31 else w for w in words]


# ----------------------------------------------------------------------------------------- Triton SHA-256
@triton.jit
def _compress(a0, b0, c0, d0, e0, f0, g0, h0,
              w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, k_ptr):
    """One SHA-256 compression of the 16 uint32 message words into state (a0..h0); returns the new state.
    Rotations are written out (no helper calls): far faster under the interpreter."""
    a, b, c, d, e, f, g, h = a0, b0, c0, d0, e0, f0, g0, h0
    for t in tl.static_range(64):
        k = tl.load(k_ptr + t).to(tl.uint32, bitcast=True)
        s1 = ((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7))
        ch = g ^ (e & (f ^ g))
        t1 = h + s1 + ch + k + w0
        s0 = ((a >> 2) | (a << 30)) ^ ((a >> 13) | (a << 19)) ^ ((a >> 22) | (a << 10))
        maj = (a & b) | (c & (a | b))
        t2 = s0 + maj
        h = g
        g = f
        f = e
        e = d + t1
        d = c
        c = b
        b = a
        a = t1 + t2
        # Message schedule as a 16-word window: w0 is W[t]; W[t+16] enters at w15.
        nxt = w0
        if t < 48:
            sg0 = ((w1 >> 7) | (w1 << 25)) ^ ((w1 >> 18) | (w1 << 14)) ^ (w1 >> 3)
            sg1 = ((w14 >> 17) | (w14 << 15)) ^ ((w14 >> 19) | (w14 << 13)) ^ (w14 >> 10)
            nxt = sg1 + w9 + sg0 + w0
        w0, w1, w2, w3, w4, w5, w6, w7 = w1, w2, w3, w4, w5, w6, w7, w8
        w8, w9, w10, w11, w12, w13, w14, w15 = w9, w10, w11, w12, w13, w14, w15, nxt
    return a0 + a, b0 + b, c0 + c, d0 + d, e0 + e, f0 + f, g0 + g, h0 + h


@triton.jit
def _iv(h_ptr, i: tl.constexpr, like):
    return tl.zeros_like(like) + tl.load(h_ptr + i).to(tl.uint32, bitcast=True)


@triton.jit
def _bswap(x):
    return ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)


@triton.jit
def _join(prev, cur):
    """The big-endian word made of prev's last byte and cur's first three bytes (cur big-endian)."""
    return (prev << 24) | (cur >> 8)


@triton.jit
def _store_digest(out_ptr, rows, mask, a, b, c, d, e, f, g, h):
    base = out_ptr + rows * 8
    tl.store(base + 0, a.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 1, b.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 2, c.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 3, d.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 4, e.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 5, f.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 6, g.to(tl.int32, bitcast=True), mask=mask)
    tl.store(base + 7, h.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _leaf_kernel(keys_ptr, vec_ptr, out_ptr, k_ptr, h_ptr, n, BLOCK: tl.constexpr):
    """out[i] = SHA256(0x00 || LE32(key[i]) || vec[i]) for 24-byte vectors given as 6 LE int32 words."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    # Little-endian words of the 28 data bytes after the 0x00 prefix, as big-endian words.
    l0 = _bswap(tl.load(keys_ptr + rows, mask=mask, other=0).to(tl.uint32, bitcast=True))
    v = vec_ptr + rows * 6
    l1 = _bswap(tl.load(v + 0, mask=mask, other=0).to(tl.uint32, bitcast=True))
    l2 = _bswap(tl.load(v + 1, mask=mask, other=0).to(tl.uint32, bitcast=True))
    l3 = _bswap(tl.load(v + 2, mask=mask, other=0).to(tl.uint32, bitcast=True))
    l4 = _bswap(tl.load(v + 3, mask=mask, other=0).to(tl.uint32, bitcast=True))
    l5 = _bswap(tl.load(v + 4, mask=mask, other=0).to(tl.uint32, bitcast=True))
    l6 = _bswap(tl.load(v + 5, mask=mask, other=0).to(tl.uint32, bitcast=True))
    zero = tl.zeros_like(l0)
    pad = zero + tl.full([], 0x80000000, tl.uint32)  # the 0x80 byte right after the data
    # 29-byte message = 232 bits: one block.
    length = zero + tl.full([], 232, tl.uint32)
    a, b, c, d, e, f, g, h = _compress(
        _iv(h_ptr, 0, zero), _iv(h_ptr, 1, zero), _iv(h_ptr, 2, zero), _iv(h_ptr, 3, zero),
        _iv(h_ptr, 4, zero), _iv(h_ptr, 5, zero), _iv(h_ptr, 6, zero), _iv(h_ptr, 7, zero),
        _join(zero, l0), _join(l0, l1), _join(l1, l2), _join(l2, l3), _join(l3, l4), _join(l4, l5),
        _join(l5, l6), _join(l6, pad), zero, zero, zero, zero, zero, zero, zero, length, k_ptr)
    _store_digest(out_ptr, rows, mask, a, b, c, d, e, f, g, h)


@triton.jit
def _node_kernel(left_ptr, right_ptr, count_ptr, out_ptr, k_ptr, h_ptr, n, BLOCK: tl.constexpr):
    """out[i] = SHA256(0x01 || left[i] || right[i] || LE32(count[i])), two blocks."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    lp = left_ptr + rows * 8
    rp = right_ptr + rows * 8
    x0 = tl.load(lp + 0, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x1 = tl.load(lp + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x2 = tl.load(lp + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x3 = tl.load(lp + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x4 = tl.load(lp + 4, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x5 = tl.load(lp + 5, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x6 = tl.load(lp + 6, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x7 = tl.load(lp + 7, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y0 = tl.load(rp + 0, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y1 = tl.load(rp + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y2 = tl.load(rp + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y3 = tl.load(rp + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y4 = tl.load(rp + 4, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y5 = tl.load(rp + 5, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y6 = tl.load(rp + 6, mask=mask, other=0).to(tl.uint32, bitcast=True)
    y7 = tl.load(rp + 7, mask=mask, other=0).to(tl.uint32, bitcast=True)
    cnt = _bswap(tl.load(count_ptr + rows, mask=mask, other=0).to(tl.uint32, bitcast=True))  # LE32 bytes
    zero = tl.zeros_like(x0)
    prefix = zero + tl.full([], 0x01, tl.uint32)
    pad = zero + tl.full([], 0x80000000, tl.uint32)
    length = zero + tl.full([], 552, tl.uint32)  # 69 bytes
    a, b, c, d, e, f, g, h = _compress(
        _iv(h_ptr, 0, zero), _iv(h_ptr, 1, zero), _iv(h_ptr, 2, zero), _iv(h_ptr, 3, zero),
        _iv(h_ptr, 4, zero), _iv(h_ptr, 5, zero), _iv(h_ptr, 6, zero), _iv(h_ptr, 7, zero),
        _join(prefix, x0), _join(x0, x1), _join(x1, x2), _join(x2, x3), _join(x3, x4), _join(x4, x5),
        _join(x5, x6), _join(x6, x7), _join(x7, y0), _join(y0, y1), _join(y1, y2), _join(y2, y3),
        _join(y3, y4), _join(y4, y5), _join(y5, y6), _join(y6, y7), k_ptr)
    a, b, c, d, e, f, g, h = _compress(
        a, b, c, d, e, f, g, h,
        _join(y7, cnt), _join(cnt, pad), zero, zero, zero, zero, zero, zero,
        zero, zero, zero, zero, zero, zero, zero, length, k_ptr)
    _store_digest(out_ptr, rows, mask, a, b, c, d, e, f, g, h)


# ----------------------------------------------------------------------------------------- host driver
def _tables(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = torch.tensor(_as_int32(_K), dtype=torch.int32, device=device)
    h = torch.tensor(_as_int32(_H0), dtype=torch.int32, device=device)
    empty = torch.tensor([_as_int32(list(struct.unpack(">8I", e))) for e in EMPTY_HASHES], dtype=torch.int32,
                         device=device)
    return k, h, empty


def _check_inputs(nonces: torch.Tensor, vectors: torch.Tensor) -> None:
    if not isinstance(nonces, torch.Tensor) or not isinstance(vectors, torch.Tensor):
        raise TypeError("nonces and vectors must be torch tensors")
    if nonces.dtype != torch.int32 or nonces.dim() != 1:
        raise ValueError(f"nonces must be int32 [N], got {nonces.dtype} {tuple(nonces.shape)}")
    if vectors.dtype != torch.float16 or vectors.dim() != 2 or vectors.shape[1] != POCV2_K_DIM:
        raise ValueError(f"vectors must be fp16 [N, {POCV2_K_DIM}], got {vectors.dtype} {tuple(vectors.shape)}")
    if vectors.shape[0] != nonces.shape[0]:
        raise ValueError(f"{nonces.shape[0]} nonces but {vectors.shape[0]} vectors")
    if nonces.device != vectors.device:
        raise ValueError(f"nonces on {nonces.device} but vectors on {vectors.device}")
    if nonces.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter); on the CPU use SMST")


def _digest_bytes(words: torch.Tensor) -> bytes:
    return struct.pack(">8I", *[w & 0xFFFFFFFF for w in words.cpu().tolist()])


def smst_leaf_hashes_gpu(keys: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """int32 [M, 8] leaf hash words of (keys int32 [M], vectors fp16 [M, 12]) on their device."""
    k_tab, h_tab, _ = _tables(keys.device)
    vec_words = vectors.contiguous().view(torch.int32)  # [M, 6], little-endian fp16 pairs
    out = torch.empty((keys.shape[0], 8), dtype=torch.int32, device=keys.device)
    m = keys.shape[0]
    if m:
        _leaf_kernel[(triton.cdiv(m, _block(m)),)](keys.contiguous(), vec_words, out, k_tab, h_tab, m, BLOCK=_block(m))
    return out


def smst_node_hashes_gpu(left: torch.Tensor, right: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int32 [P, 8] node hash words of (left [P, 8], right [P, 8], counts int32 [P]) on their device."""
    k_tab, h_tab, _ = _tables(left.device)
    out = torch.empty_like(left)
    p = left.shape[0]
    if p:
        _node_kernel[(triton.cdiv(p, _block(p)),)](left.contiguous(), right.contiguous(), counts.contiguous(), out,
                                                   k_tab, h_tab, p, BLOCK=_block(p))
    return out


def smst_root_gpu(nonces: torch.Tensor, vectors: torch.Tensor) -> bytes:
    """32-byte SMST root of (nonces int32 [N], vectors fp16 [N, 12]), computed where the tensors are.

    Exact (equals ``SMST().root`` for the same leaves in any order). Duplicate nonces -> ValueError.
    Only the depth (one scalar) and each level's size come back to the host; the leaves never do.
    """
    _check_inputs(nonces, vectors)
    device = nonces.device
    n = nonces.shape[0]
    if n == 0:
        return EMPTY_HASHES[DEFAULT_DEPTH]
    k_tab, h_tab, empty = _tables(device)
    keys = nonces.to(torch.int64) & 0xFFFFFFFF  # uint32 order
    keys, perm = torch.sort(keys)
    if n > 1 and bool((keys[1:] == keys[:-1]).any()):
        first = int(keys[1:][keys[1:] == keys[:-1]][0])
        raise ValueError(f"duplicate nonce {first - 2**32 if first >= 2**31 else first} (each nonce has one slot)")
    depth = max(DEFAULT_DEPTH, max(1, int(keys[-1]).bit_length()))
    vec_words = vectors[perm].contiguous().view(torch.int32)
    hashes = torch.empty((n, 8), dtype=torch.int32, device=device)
    _leaf_kernel[(triton.cdiv(n, _block(n)),)](nonces[perm].contiguous(), vec_words, hashes, k_tab, h_tab, n,
                                              BLOCK=_block(n))
    counts = torch.ones(n, dtype=torch.int32, device=device)
    for height in range(depth):
        parents = keys >> 1
        is_right = (keys & 1).bool()
        new_group = torch.ones_like(parents, dtype=torch.bool)
        new_group[1:] = parents[1:] != parents[:-1]
        slot = torch.cumsum(new_group, 0) - 1
        p = int(slot[-1]) + 1
        left = empty[height].expand(p, 8).clone()
        right = left.clone()
        left[slot[~is_right]] = hashes[~is_right]
        right[slot[is_right]] = hashes[is_right]
        parent_counts = torch.zeros(p, dtype=torch.int32, device=device).index_add_(0, slot, counts)
        hashes = torch.empty((p, 8), dtype=torch.int32, device=device)
        _node_kernel[(triton.cdiv(p, _block(p)),)](left, right, parent_counts, hashes, k_tab, h_tab, p, BLOCK=_block(p))
        keys, counts = parents[new_group], parent_counts
    return _digest_bytes(hashes[0])
