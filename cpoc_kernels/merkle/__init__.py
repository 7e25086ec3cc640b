"""Merkle commitment of PoC v2 artifacts: the Gonka v0.2.14 Sparse Merkle Sum Tree (SMST).

- ``SMST``: the tree (C++ core in ``cpoc_kernels._C``; pure-Python fallback), snapshots and proofs.
- ``verify_proof`` / ``check_proof`` / ``verify_proofs``: the network's verifier (index binding).
- ``smst_root_gpu``: the root from nonces int32 [N] + fp16 vectors [N, 12] on the device (Triton).
- ``ArtifactStore``: the append-only artifact log with flushed (count, root) commitments.
- ``oracle``: the pure-``hashlib`` implementation used as the test oracle.
"""
from cpoc_kernels.merkle import oracle
from cpoc_kernels.merkle.artifact import (
    POCV2_VECTOR_BYTES,
    pocv2_vector_ok,
    validate_pocv2_vector,
    validate_pocv2_vectors,
    verify_artifact_proof,
)
from cpoc_kernels.merkle.oracle import DEFAULT_DEPTH, EMPTY_HASHES, MAX_DEPTH, PROOF_ELEMENT_SIZE
from cpoc_kernels.merkle.smst import SMST, ProofRejected, check_proof, verify_proof, verify_proofs

__all__ = [
    "SMST", "verify_proof", "check_proof", "verify_proofs", "ProofRejected", "smst_root_gpu",
    "ArtifactStore", "oracle", "validate_pocv2_vector", "validate_pocv2_vectors", "pocv2_vector_ok", "verify_artifact_proof",
    "POCV2_VECTOR_BYTES", "DEFAULT_DEPTH", "MAX_DEPTH", "PROOF_ELEMENT_SIZE", "EMPTY_HASHES",
]


def __getattr__(name):  # the GPU path and the store load on first use (Triton import is slow)
    if name == "smst_root_gpu":
        from cpoc_kernels.merkle.gpu import smst_root_gpu

        return smst_root_gpu
    if name == "ArtifactStore":
        from cpoc_kernels.merkle.store import ArtifactStore

        return ArtifactStore
    raise AttributeError(name)
