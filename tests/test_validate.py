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


def test_binomial_matches_exact_integer_sums_on_small_n():
    """Against exact rational sums (integer arithmetic on the float p's exact dyadic value)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 120))
        k = int(rng.integers(0, n + 2))
        p = float(rng.choice([0.1, 0.05, 0.5, 0.9, 1e-3, rng.random()]))
        exact = exact_tail(k, n, Fraction(p))
        got = binomial_sf(k, n, p)
        if exact > 1e-280:
            assert got == pytest.approx(exact, rel=1e-11, abs=0), (k, n, p)
        else:
            assert got <= 1e-270, (k, n, p)


def test_binomial_at_ten_million_is_sound():
    """n = 1e7 (issue 12: the old log-space sum took 16 s): values stay probabilities and match the normal
    approximation near the mean; monotone in k."""
    n, p = 10**7, 0.1
    assert binomial_sf(1, n, p) == 1.0
    assert binomial_sf(n, n, p) == 0.0 or binomial_sf(n, n, p) < 1e-300
    mid = binomial_sf(n // 10, n, p)
    assert 0.49 < mid < 0.51
    ks = [n // 10 - 3000, n // 10, n // 10 + 1000, n // 10 + 3000, n // 10 + 6000]
    vals = [binomial_sf(k, n, p) for k in ks]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    sigma = math.sqrt(n * p * (1 - p))
    z = (ks[3] - 0.5 - n * p) / sigma
    assert vals[3] == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=0.02)


@pytest.mark.parametrize("args", [(1.0, 10, 0.1), (1, 10.0, 0.1), (True, 10, 0.1), (1, 10, math.nan),
                                  (1, 10, "0.1"), (1, -1, 0.1), (1, 10, -0.1), (1, 10, math.inf)])
def test_binomial_bad_arguments(args):
    with pytest.raises(ValueError):
        binomial_sf(*args)


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
    assert res.skipped_nonces == [2] and res.n_compared == 2


def test_bad_input():
    vecs = unit_vectors(2, 4)
    with pytest.raises(ValueError):
        validate({}, {}, 0.2, 0.1, 0.05)
    with pytest.raises(ValueError):
        validate([(0, vecs[0]), (0, vecs[1])], {0: vecs[0]}, 0.2, 0.1, 0.05)
    with pytest.raises(ValueError):
        validate({0: vecs[0]}, {0: vecs[0]}, 0.2, 1.5, 0.05)


@pytest.mark.parametrize("kw", [
    {"dist_threshold": math.inf}, {"dist_threshold": True}, {"dist_threshold": math.nan},
    {"dist_threshold": "0.2"}, {"dist_threshold": 0.0}, {"dist_threshold": -1.0},
    {"p_mismatch": math.nan}, {"p_mismatch": True}, {"fraud_threshold": math.inf}, {"fraud_threshold": False},
    {"k": 12.0}, {"k": True}, {"k": 0},
])
def test_judging_parameters_are_refused_unless_finite_numbers_in_range(kw):
    """Regression (issue 12): dist_threshold=inf/True let a fully tampered file pass."""
    vecs = unit_vectors(2, 5)
    with pytest.raises(ValueError):
        validate({0: vecs[0]}, {0: vecs[1]}, **kw)


@pytest.mark.parametrize("nonce", [1.0, 1.5, True, False, "1", 2**31, -(2**31) - 1, None, float("nan")])
def test_nonces_must_be_int32_ints(nonce):
    """Regression (issue 12): float and out-of-int32 nonces were accepted (int() truncation)."""
    vec = unit_vectors(1, 6)[0]
    with pytest.raises(ValueError):
        validate({nonce: vec}, {0: vec})
    with pytest.raises(ValueError):
        validate({0: vec}, [(nonce, vec)])


def test_int32_edges_and_numpy_nonces_are_accepted():
    vecs = unit_vectors(2, 7)
    res = validate({np.int64(2**31 - 1): vecs[0], -(2**31): vecs[1]}, {2**31 - 1: vecs[0], np.int32(-(2**31)): vecs[1]})
    assert res.verdict == "honest" and res.n_mismatch == 0


def test_verdicts_are_distinct():
    vecs = unit_vectors(200, 8)
    fake = unit_vectors(200, 9)
    honest = validate(dict(enumerate(vecs)), dict(enumerate(vecs)))
    fraud = validate(dict(enumerate(fake)), dict(enumerate(vecs)))
    assert (honest.verdict, honest.fraud) == ("honest", False)
    assert (fraud.verdict, fraud.fraud) == ("fraud", True)


def test_a_validator_that_recomputed_nothing_gives_no_verdict():
    """Regression (issue 12): an empty or disjoint recompute returned fraud=False, p=1: it passed everyone."""
    vecs = unit_vectors(5, 10)
    received = dict(enumerate(vecs))
    for mine in ({}, [], {100 + i: v for i, v in enumerate(vecs)}):
        res = validate(received, mine)
        assert res.verdict == "no_verdict" and not res.fraud
        assert res.n_compared == 0 and res.n_skipped == 5 and res.skipped_nonces == list(range(5))


def test_partial_recompute_abstains_unless_the_compared_nonces_prove_fraud():
    """The network's DAPI submits no vote when a result reports excluded nonces; counting the skipped ones as
    matches only raises p, so fraud found among the compared nonces still stands."""
    vecs = unit_vectors(200, 11)
    fake = unit_vectors(200, 12)
    mine = {i: vecs[i] for i in range(150)}  # 50 nonces not recomputed
    clean = validate(dict(enumerate(vecs)), mine)
    assert clean.verdict == "no_verdict" and clean.n_mismatch == 0 and clean.n_skipped == 50
    tampered = validate(dict(enumerate(fake)), mine)
    assert tampered.verdict == "fraud" and tampered.fraud and tampered.n_mismatch == 150


def test_malformed_recomputed_vector_names_the_nonce():
    vec = unit_vectors(1, 13)[0]
    with pytest.raises(ValueError, match="nonce 7"):
        validate({7: vec}, {7: "not base64!"})
    with pytest.raises(ValueError, match="nonce 7"):
        validate({7: vec}, {7: np.full(12, np.nan, dtype=np.float32)})


@pytest.mark.parametrize("bad", [None, 5, "abc", b"abc", [(1,)], [1, 2]])
def test_artifact_containers_of_the_wrong_shape_are_refused(bad):
    vec = unit_vectors(1, 14)[0]
    with pytest.raises(ValueError):
        validate(bad, {0: vec})
