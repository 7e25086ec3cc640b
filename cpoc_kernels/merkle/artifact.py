"""The PoC v2 artifact layer above the tree: vector checks and the validator-side proof check.

The SMST commits any non-empty bytes; what the store accepts and serves, and what a validator
accepts, are PoC v2 PREFILL vectors: 12 little-endian fp16 (24 bytes), none with exponent 31
(NaN/Inf) (``ValidateFP16Vector`` in the network's DAPI).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpoc_kernels.merkle.oracle import leaf_data
from cpoc_kernels.merkle.smst import _as_bytes, _as_nonce, verify_proof

POCV2_K_DIM = 12
POCV2_VECTOR_BYTES = 2 * POCV2_K_DIM


def validate_pocv2_vector(vector) -> bytes:
    """Returns the vector as bytes; ValueError unless it is 24 bytes of finite fp16."""
    vector = _as_bytes(vector, "vector")
    if len(vector) != POCV2_VECTOR_BYTES:
        raise ValueError(f"PoC v2 vector must be {POCV2_VECTOR_BYTES} bytes (12 x fp16), got {len(vector)}")
    bits = np.frombuffer(vector, dtype="<u2")
    bad = np.flatnonzero((bits & 0x7C00) == 0x7C00)
    if bad.size:
        raise ValueError(f"PoC v2 vector element {int(bad[0])} is NaN/Inf (fp16 0x{int(bits[bad[0]]):04x})")
    return vector


def validate_pocv2_vectors(vectors) -> np.ndarray:
    """uint8 [n, 24] from a list of bytes, a uint8 [n, 24] array or an fp16 [n, 12] array/tensor
    (little-endian fp16 bytes); ValueError naming the first vector that is not 24 bytes of finite fp16."""
    if hasattr(vectors, "detach"):  # torch.Tensor
        vectors = vectors.detach().cpu().numpy()
    if isinstance(vectors, np.ndarray):
        if vectors.dtype == np.float16 and vectors.ndim == 2 and vectors.shape[1] == POCV2_K_DIM:
            rows = vectors.astype("<f2", copy=False).view(np.uint8)
        elif vectors.dtype == np.uint8 and vectors.ndim == 2 and vectors.shape[1] == POCV2_VECTOR_BYTES:
            rows = vectors
        else:
            raise ValueError(f"PoC v2 vectors must be fp16 [n, {POCV2_K_DIM}] or uint8 [n, {POCV2_VECTOR_BYTES}], "
                             f"got {vectors.dtype} {vectors.shape}")
        rows = np.ascontiguousarray(rows)
    else:
        items = [_as_bytes(v, "vector") for v in vectors]
        for i, v in enumerate(items):
            if len(v) != POCV2_VECTOR_BYTES:
                raise ValueError(f"vector {i}: PoC v2 vector must be {POCV2_VECTOR_BYTES} bytes (12 x fp16), "
                                 f"got {len(v)}")
        rows = np.frombuffer(b"".join(items), np.uint8).reshape(len(items), POCV2_VECTOR_BYTES)
    bad = first_non_finite(rows)
    if bad is not None:
        i, j, bits = bad
        raise ValueError(f"vector {i}: PoC v2 vector element {j} is NaN/Inf (fp16 0x{bits:04x})")
    return rows


def first_non_finite(rows: np.ndarray) -> tuple[int, int, int] | None:
    """(row, element, bits) of the first fp16 with exponent 31 in uint8 [n, 24] rows, or None."""
    bits = rows.view("<u2")
    hits = np.flatnonzero(((bits & 0x7C00) == 0x7C00).ravel())
    if hits.size == 0:
        return None
    i, j = divmod(int(hits[0]), bits.shape[1])
    return i, j, int(bits[i, j])


def pocv2_vector_ok(vector) -> bool:
    try:
        validate_pocv2_vector(vector)
    except (ValueError, TypeError):
        return False
    return True


def verify_artifact_proof(root: bytes, count: int, dense_index: int, nonce: int, vector: bytes,
                          proof: Sequence[bytes]) -> bool:
    """What a validator checks per served artifact: a well-formed PoC v2 vector and a proof that
    verifies (with index binding) for leaf_data rebuilt as LE32(nonce) || vector."""
    if not pocv2_vector_ok(vector):
        return False
    return verify_proof(root, count, dense_index, nonce, leaf_data(_as_nonce(nonce), bytes(vector)), proof)
