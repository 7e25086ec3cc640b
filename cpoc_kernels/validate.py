"""Validation of received artifacts against recomputed ones (spec §10 / protocol §3.3).

Per nonce: decode both vectors from fp16 (the recomputed one round-trips through fp16 too); a nonce
is a mismatch if the received vector is malformed (wrong length, not finite) or
``||a − b||₂ > dist_threshold``. Nonces the validator could not recompute (its own NaN rows) are
skipped, yet still counted in ``n_total`` (the network's behaviour). Then the one-sided binomial test
``p = P[X ≥ n_mismatch]``, ``X ~ Binom(n_total, p_mismatch)``, and ``fraud = p < fraud_threshold``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from cpoc_kernels.reference.codec import decode_vector, vector_bytes
from cpoc_kernels.reference.readout import K_DIM

# Chain parameters for Qwen3-235B (spec §2.2).
DEFAULT_DIST_THRESHOLD = 0.2
DEFAULT_P_MISMATCH = 0.1
DEFAULT_FRAUD_THRESHOLD = 0.05


def binomial_sf(k: int, n: int, p: float) -> float:
    """P[X ≥ k] for X ~ Binom(n, p), summed in log space (log-sum-exp of log pmf terms)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


@dataclass(frozen=True)
class ValidationResult:
    n_total: int
    n_mismatch: int
    mismatch_nonces: list[int]
    p_value: float
    fraud: bool
    n_skipped: int = 0  # nonces the validator did not recompute (its own NaN): not counted as mismatches
    distances: dict[int, float] = field(default_factory=dict, repr=False)


def _as_mapping(artifacts, what: str) -> dict[int, object]:
    """Accept {nonce: vector} or an iterable of objects with .nonce/.vector_b64 or (nonce, vector) pairs."""
    if isinstance(artifacts, Mapping):
        items: Iterable = artifacts.items()
    else:
        items = ((a.nonce, a.vector_b64) if hasattr(a, "vector_b64") else tuple(a) for a in artifacts)
    out: dict[int, object] = {}
    for nonce, vec in items:
        nonce = int(nonce)
        if nonce in out:
            raise ValueError(f"duplicate nonce {nonce} in {what}")
        out[nonce] = vec
    return out


def _decode(vec, k: int) -> np.ndarray:
    """base64 string or array → float32 [k] through fp16; malformed → ValueError."""
    if isinstance(vec, (str, bytes)):
        return decode_vector(vec, k)
    return np.frombuffer(vector_bytes(vec, k), dtype="<f2").astype(np.float32)


def validate(
    artifacts,
    recomputed,
    dist_threshold: float = DEFAULT_DIST_THRESHOLD,
    p_mismatch: float = DEFAULT_P_MISMATCH,
    fraud_threshold: float = DEFAULT_FRAUD_THRESHOLD,
    k: int = K_DIM,
) -> ValidationResult:
    """Compare received ``artifacts`` with the validator's ``recomputed`` vectors (spec §10).

    Both: {nonce: vector_b64 | fp16/fp32 array} or iterables of ``Artifact``. Duplicate nonces,
    an empty request or thresholds out of range → ValueError.
    """
    if not dist_threshold > 0 or not 0 < p_mismatch < 1 or not 0 < fraud_threshold < 1:
        raise ValueError(
            f"need dist_threshold > 0 and p_mismatch, fraud_threshold in (0, 1); got "
            f"{dist_threshold}, {p_mismatch}, {fraud_threshold}"
        )
    received = _as_mapping(artifacts, "artifacts")
    mine = _as_mapping(recomputed, "recomputed")
    if not received:
        raise ValueError("no artifacts to validate")
    mismatches, distances, skipped = [], {}, 0
    for nonce, vec in received.items():
        if nonce not in mine:
            skipped += 1
            continue
        expected = _decode(mine[nonce], k)
        try:
            got = _decode(vec, k)
        except ValueError:
            mismatches.append(nonce)
            distances[nonce] = math.inf
            continue
        dist = float(np.linalg.norm(got.astype(np.float64) - expected.astype(np.float64)))
        distances[nonce] = dist
        if dist > dist_threshold:
            mismatches.append(nonce)
    n_total = len(received)
    p_value = binomial_sf(len(mismatches), n_total, p_mismatch)
    return ValidationResult(
        n_total=n_total,
        n_mismatch=len(mismatches),
        mismatch_nonces=sorted(mismatches),
        p_value=p_value,
        fraud=p_value < fraud_threshold,
        n_skipped=skipped,
        distances=distances,
    )
