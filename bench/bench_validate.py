"""CPU benchmark: the binomial p-value of ``validate`` (issue 12: ``binomial_sf(1, 10**7, 0.1)`` took 16 s).

Run: python -m pytest bench/bench_validate.py --benchmark-enable
Anchor: the previous implementation (a log-space sum over every term k..n, kept below), side by side with
``cpoc_kernels.validate.binomial_sf`` (``scipy.stats.binom.sf``) on the same workload, n = 10**5 (the anchor
is O(n), too slow to repeat at 10**7). The new function alone at n = 10**7 (the acceptance case: <= 10 ms).
Values are asserted equal (rel 1e-9) on the shared workload.
"""
import math

import pytest

from cpoc_kernels.validate import binomial_sf

N_SHARED, K_SHARED, P = 10**5, 10**4 + 100, 0.1


def log_space_sf(k: int, n: int, p: float) -> float:
    """The anchor: P[X >= k] summed term by term in log space (what validate used before)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


@pytest.mark.benchmark(group="binomial sf n=1e5 (shared workload)")
def test_anchor_log_space_sum(benchmark):
    benchmark(log_space_sf, K_SHARED, N_SHARED, P)


@pytest.mark.benchmark(group="binomial sf n=1e5 (shared workload)")
def test_scipy_binom_sf(benchmark):
    got = benchmark(binomial_sf, K_SHARED, N_SHARED, P)
    assert got == pytest.approx(log_space_sf(K_SHARED, N_SHARED, P), rel=1e-9)


@pytest.mark.parametrize("k", [1, 10**6, 10**6 + 3000])
@pytest.mark.benchmark(group="binomial sf n=1e7")
def test_scipy_binom_sf_ten_million(benchmark, k):
    got = benchmark(binomial_sf, k, 10**7, P)
    assert 0.0 <= got <= 1.0
