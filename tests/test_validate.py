"""validate(): distance test + exact one-sided binomial test (spec §10)."""
import math
from fractions import Fraction

import numpy as np
import pytest

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.validate import binomial_sf, validate


def exact_tail(k: int, n: int, p: Fraction) -> float:
    """P[X >= k] by direct summation in exact rational arithmetic (independent of the code under test)."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize("k", [20, 28, 31])
def test_binomial_p_value_against_direct_summation(k):
    assert binomial_sf(k, 200, 0.1) == pytest.approx(exact_tail(k, 200, Fraction(1, 10)), rel=1e-10)


def test_binomial_thresholds_of_the_network():
    """Spec §10: n=200, p0=0.1 flags at >= 31 mismatches for alpha 0.01 and >= 28 for alpha 0.05."""
    assert binomial_sf(31, 200, 0.1) < 0.01 <= binomial_sf(30, 200, 0.1)
    assert binomial_sf(28, 200, 0.1) < 0.05 <= binomial_sf(27, 200, 0.1)


def test_binomial_edges():
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(10, 10, 0.5) == pytest.approx(0.5**10)
    with pytest.raises(ValueError):
        binomial_sf(1, 10, 1.5)


def unit_vectors(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 12))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def test_honest_artifacts_pass():
    vecs = unit_vectors(200, 0)
    honest = [Artifact.from_vector(i, v) for i, v in enumerate(vecs)]
    noisy = {i: (v.astype(np.float32) + 0.01).astype(np.float16) for i, v in enumerate(vecs)}
    res = validate(honest, noisy, 0.2, 0.1, 0.05)
    assert res.n_total == 200 and res.n_mismatch == 0 and res.p_value == 1.0 and not res.fraud


def test_fabricated_artifacts_are_flagged():
    vecs = unit_vectors(200, 1)
    fake = unit_vectors(200, 2)  # independent random unit vectors: L2 ≈ √2
    mixed = {i: (fake[i] if i % 4 == 0 else vecs[i]) for i in range(200)}  # 25 % fabricated
    res = validate(mixed, dict(enumerate(vecs)), 0.2, 0.1, 0.05)
    assert res.n_mismatch == 50 and res.fraud
    assert res.mismatch_nonces == list(range(0, 200, 4))
    assert res.p_value == pytest.approx(exact_tail(50, 200, Fraction(1, 10)), rel=1e-9)


def test_malformed_received_vector_is_a_mismatch_and_missing_recompute_is_skipped():
    vecs = unit_vectors(3, 3)
    received = {0: "AAAA", 1: vecs[1], 2: vecs[2]}
    res = validate(received, {0: vecs[0], 1: vecs[1]}, 0.2, 0.1, 0.05)
    assert res.mismatch_nonces == [0] and res.n_skipped == 1 and res.n_total == 3


def test_bad_input():
    vecs = unit_vectors(2, 4)
    with pytest.raises(ValueError):
        validate({}, {}, 0.2, 0.1, 0.05)
    with pytest.raises(ValueError):
        validate([(0, vecs[0]), (0, vecs[1])], {0: vecs[0]}, 0.2, 0.1, 0.05)
    with pytest.raises(ValueError):
        validate({0: vecs[0]}, {0: vecs[0]}, 0.2, 1.5, 0.05)
