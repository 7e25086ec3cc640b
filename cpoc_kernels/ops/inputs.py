"""poc_inputs op family: per-nonce input embeddings written straight into a (flat) buffer.

Backends: Triton kernel (CUDA, or the interpreter on CPU), the native C++ RNG (``_C``) on CPU,
and the plain-torch reference (``cpoc_kernels.reference.poc_inputs``).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cpoc_kernels._native import native
from cpoc_kernels.reference.inputs import nonce_normals
from cpoc_kernels.reference.seeds import input_seed_string, seed32, stronger_sub_seeds


def _fill_nonce(lib, flat: np.ndarray, block_hash: str, public_key: str, nonce: int, stronger_rng: bool) -> None:
    n = flat.shape[0]
    if not stronger_rng:
        lib.normal_into(flat, seed32(input_seed_string(block_hash, public_key, nonce)))
        return
    seg = -(-n // 8)
    for k, sub_seed in enumerate(stronger_sub_seeds(block_hash, public_key, nonce)):
        if k * seg < n:
            lib.normal_into(flat[k * seg : k * seg + min(seg, n - k * seg)], sub_seed)


def nonce_normals_cpu(
    block_hash: str, public_key: str, nonces: Sequence[int], n: int, stronger_rng: bool = False
) -> torch.Tensor:
    """fp32 normals of each nonce, [B, n], on the CPU through the C++ RNG (torch fallback if not built).

    Integer parts bit-exact; fp32 values within a few ulp of the torch reference (C library log/cos/sin).
    """
    lib = native()
    if lib is None:
        rows = [nonce_normals(block_hash, public_key, int(x), n, stronger_rng) for x in nonces]
        return torch.stack(rows) if rows else torch.empty(0, n)
    buf = np.empty((len(nonces), n), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=max(1, min(len(nonces), torch.get_num_threads()))) as pool:
        list(pool.map(lambda b: _fill_nonce(lib, buf[b], block_hash, public_key, int(nonces[b]), stronger_rng),
                      range(len(nonces))))
    return torch.from_numpy(buf)
