"""Fuzzing ``validate`` / ``binomial_sf`` (issue 12): junk in, ValueError out; good input, a consistent verdict.

Pure Python and numpy (no native code): run in process. Bounded by ``CPOC_FUZZ_EXAMPLES`` (default 100).
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpoc_kernels.reference import encode_vector
from cpoc_kernels.validate import VERDICTS, binomial_sf, validate

EXAMPLES = int(os.environ.get("CPOC_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
INT32 = (-(2**31), 2**31 - 1)

junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                 st.integers(-(2**40), 2**40), st.lists(st.integers(-3, 3), max_size=2), st.binary(max_size=3))


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(12)
    return (v / np.linalg.norm(v)).astype(np.float16)


def _vector_forms(seed: int):
    v = _unit(seed)
    return st.sampled_from([v, encode_vector(v), v.astype(np.float32)])


@FUZZ
@given(
    nonces=st.lists(st.one_of(st.integers(*INT32), st.integers(2**31, 2**32), junk), max_size=6),
    received_junk=st.lists(st.one_of(junk, st.text(alphabet="ABCD=+/ \n", max_size=40)), max_size=6),
    recompute_mask=st.lists(st.booleans(), min_size=6, max_size=6),
    tamper=st.lists(st.booleans(), min_size=6, max_size=6),
    dist=st.one_of(st.floats(0.01, 2.0), junk), p_mis=st.one_of(st.floats(0.01, 0.99), junk),
    alpha=st.one_of(st.floats(0.001, 0.5), junk), seed=st.integers(0, 1000),
)
def test_fuzz_validate(nonces, received_junk, recompute_mask, tamper, dist, p_mis, alpha, seed):
    """Any input: ValueError or a result whose verdict follows from its own counts."""
    received, mine = {}, {}
    for i, n in enumerate(nonces):
        honest = _unit(seed + i)
        try:
            if tamper[i]:
                received[n] = received_junk[i] if i < len(received_junk) else _unit(seed + 1000 + i)
            else:
                received[n] = honest
        except TypeError:  # unhashable junk nonce: skip it, as a dict cannot hold it
            continue
        if recompute_mask[i]:
            mine[n] = honest
    good_nonces = all(isinstance(n, int) and not isinstance(n, bool) and INT32[0] <= n <= INT32[1] for n in received)

    def real(x, lo, hi):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo < x < hi

    valid = good_nonces and bool(received) and real(dist, 0, math.inf) and real(p_mis, 0, 1) and real(alpha, 0, 1)
    try:
        res = validate(received, mine, dist, p_mis, alpha)
    except ValueError:
        assert not valid
        return
    assert valid
    assert res.verdict in VERDICTS
    assert res.n_total == len(received) and res.n_skipped == len(set(received) - set(mine))
    assert res.skipped_nonces == sorted(set(received) - set(mine))
    assert 0.0 <= res.p_value <= 1.0 and res.fraud == (res.p_value < alpha)
    assert res.p_value == binomial_sf(res.n_mismatch, res.n_total, p_mis)
    expected = "fraud" if res.fraud else ("no_verdict" if res.n_skipped else "honest")
    assert res.verdict == expected
    for n in res.mismatch_nonces:
        assert n in mine and res.distances[n] > dist


@FUZZ
@given(k=st.one_of(st.integers(-5, 130), junk), n=st.one_of(st.integers(-3, 120), junk),
       p=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, 0.1, 2**-30]), junk))
def test_fuzz_binomial_sf_against_exact_sums(k, n, p):
    valid_types = all(isinstance(x, int) and not isinstance(x, bool) for x in (k, n)) and \
        isinstance(p, (int, float)) and not isinstance(p, bool)
    valid = valid_types and n >= 0 and math.isfinite(p) and 0.0 <= p <= 1.0
    try:
        got = binomial_sf(k, n, p)
    except ValueError:
        assert not valid
        return
    assert valid and 0.0 <= got <= 1.0
    exact = float(sum(math.comb(n, i) * Fraction(p) ** i * (1 - Fraction(p)) ** (n - i) for i in range(max(k, 0), n + 1)))
    if exact > 1e-280:
        assert got == pytest.approx(exact, rel=1e-10, abs=0)
    else:
        assert got <= 1e-270
