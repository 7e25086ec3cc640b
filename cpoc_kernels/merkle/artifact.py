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
