"""Validation of received artifacts against recomputed ones (spec §10 / protocol §3.3).

Per nonce: decode both vectors from fp16 (the recomputed one round-trips through fp16 too); a nonce
is a mismatch if the received vector is malformed (wrong length, not finite) or
``||a − b||₂ > dist_threshold``. Nonces the validator could not recompute (its own NaN rows) are
skipped, yet still counted in ``n_total`` (the network's behaviour). Then the one-sided binomial test
``p = P[X ≥ n_mismatch]``, ``X ~ Binom(n_total, p_mismatch)`` (``scipy.stats``, as the network's
``binomtest``), and ``fraud = p < fraud_threshold``.

Verdict (what a validator may vote): ``"fraud"`` when the test flags fraud (counting skipped nonces as
matches only raises p, so the evidence stands); otherwise ``"no_verdict"`` when any requested nonce was
not recomputed (the network's DAPI abstains, submitting no vote, when a validation result reports
excluded nonces), else ``"honest"``. A validator that recomputed nothing never passes anyone.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

from cpoc_kernels.artifacts import check_nonce
from cpoc_kernels.reference.codec import decode_vector, vector_bytes
from cpoc_kernels.reference.readout import K_DIM

# Chain parameters for Qwen3-235B (spec §2.2).
DEFAULT_DIST_THRESHOLD = 0.2
DEFAULT_P_MISMATCH = 0.1
DEFAULT_FRAUD_THRESHOLD = 0.05

Verdict = Literal["honest", "fraud", "no_verdict"]
VERDICTS: tuple[str, ...] = ("honest", "fraud", "no_verdict")


def _count(name: str, value) -> int:
    """A non-negative Python int (numpy ints accepted; bools, floats, strings refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    """A finite real number (numpy floats accepted; bools, strings, NaN and ±inf refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def binomial_sf(k: int, n: int, p: float) -> float:
    """P[X ≥ k] for X ~ Binom(n, p): ``scipy.stats.binom.sf(k - 1, n, p)``, what the network's
    ``binomtest(k, n, p, alternative="greater").pvalue`` returns (regularised incomplete beta, O(1) in n).

    k, n: ints (n ≥ 0); p: finite in [0, 1]. Anything else → ValueError.
    """
    k, n, p = _count("k", k), _count("n", n), _real("p", p)
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, float(stats.binom.sf(k - 1, n, p)))


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :func:`validate`. ``fraud`` is the network's stat-test output (``fraud_detected``);
    ``verdict`` is the vote it supports: "honest", "fraud" or "no_verdict" (abstain)."""

    n_total: int
    n_mismatch: int
    mismatch_nonces: list[int]
    p_value: float
    fraud: bool
    n_skipped: int = 0  # nonces the validator did not recompute (its own NaN): not counted as mismatches
    distances: dict[int, float] = field(default_factory=dict, repr=False)
    verdict: Verdict = "honest"
    skipped_nonces: list[int] = field(default_factory=list)

    @property
    def n_compared(self) -> int:
        """Nonces actually compared (received and recomputed)."""
        return self.n_total - self.n_skipped


def _as_mapping(artifacts, what: str) -> dict[int, object]:
    """Accept {nonce: vector} or an iterable of objects with .nonce/.vector_b64 or (nonce, vector) pairs.

    Nonces must be ints in the chain's int32 range (bools, floats, strings → ValueError)."""
    if isinstance(artifacts, (str, bytes)) or not isinstance(artifacts, (Mapping, Iterable)):
        raise ValueError(f"{what} must be a mapping or an iterable of artifacts, got {type(artifacts).__name__}")
    if isinstance(artifacts, Mapping):
        items: Iterable = artifacts.items()
    else:
        items = ((a.nonce, a.vector_b64) if hasattr(a, "vector_b64") else a for a in artifacts)
    out: dict[int, object] = {}
    for item in items:
        try:
            nonce, vec = item
        except (TypeError, ValueError):
            raise ValueError(f"{what}: each entry must be (nonce, vector), got {item!r}"[:200]) from None
        try:
            nonce = check_nonce(nonce)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
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

    Both: {nonce: vector_b64 | fp16/fp32 array} or iterables of ``Artifact`` / (nonce, vector) pairs;
    nonces are ints in int32 range. dist_threshold: finite > 0; p_mismatch, fraud_threshold: finite in
    (0, 1); k: int > 0. Bad types, duplicate nonces, an empty request, a malformed recomputed vector or
    thresholds out of range → ValueError. ``verdict`` is "no_verdict" whenever a requested nonce was
    not recomputed and the test does not flag fraud (in particular for an empty or disjoint recompute).
    """
    dist_threshold = _real("dist_threshold", dist_threshold)
    p_mismatch = _real("p_mismatch", p_mismatch)
    fraud_threshold = _real("fraud_threshold", fraud_threshold)
    k = _count("k", k)
    if not dist_threshold > 0 or not 0 < p_mismatch < 1 or not 0 < fraud_threshold < 1 or k <= 0:
        raise ValueError(
            f"need dist_threshold > 0, p_mismatch and fraud_threshold in (0, 1), k > 0; got "
            f"{dist_threshold}, {p_mismatch}, {fraud_threshold}, {k}"
        )
    received = _as_mapping(artifacts, "artifacts")
    mine = _as_mapping(recomputed, "recomputed")
    if not received:
        raise ValueError("no artifacts to validate")
    mismatches, distances, skipped = [], {}, []
    for nonce, vec in received.items():
        if nonce not in mine:
            skipped.append(nonce)
            continue
        try:
            expected = _decode(mine[nonce], k)
        except ValueError as exc:
            raise ValueError(f"recomputed vector of nonce {nonce} is malformed: {exc}") from None
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
    fraud = p_value < fraud_threshold
    verdict: Verdict = "fraud" if fraud else ("no_verdict" if skipped else "honest")
    return ValidationResult(
        n_total=n_total,
        n_mismatch=len(mismatches),
        mismatch_nonces=sorted(mismatches),
        p_value=p_value,
        fraud=fraud,
        n_skipped=len(skipped),
        distances=distances,
        verdict=verdict,
        skipped_nonces=sorted(skipped),
    )
