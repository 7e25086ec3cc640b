"""Comparing artifacts computed by two different forward implementations (a test helper, not a test module).

vLLM's CPU kernels and HF's eager forward compute the same fp32 hidden states up to a few fp32 ulps (measured
≤ 1e-6 on the tiny models), but the artifact is the unit vector *rounded to fp16*: a coordinate lying near the
midpoint of two fp16 values may round either way, and which way depends on the host (the vendor math library
behind log/cos/sin in the inputs, the SIMD width of reductions). So across implementations the decoded vectors
are compared with a stated tolerance, never bit for bit:

    max_i |a_i - b_i| <= ARTIFACT_ATOL = 1e-3   (decoded fp16 -> fp32, k = 12 coordinates of a unit vector)

One fp16 ulp of a coordinate in [0.5, 1) is 2**-11 ≈ 4.9e-4, so the bound allows a coordinate to round the
other way (twice that at most) while any real computation error (a wrong seed, layer, position or nonce) moves
coordinates by O(0.1-1). It is 400x tighter than the chain's L2 ``dist_threshold`` (0.4).
Where the *same* code path runs twice (TP ranks, a nonce recomputed by the same engine) tests keep ``==``.
"""
from __future__ import annotations

import numpy as np

from cpoc_kernels.artifacts import Artifact

ARTIFACT_ATOL = 1e-3


def artifact_distance(nonce: int, got_b64: str, want_b64: str) -> float:
    """max |decoded got - decoded want| (fp32) of one nonce's artifacts."""
    a, b = Artifact(nonce, got_b64).vector(), Artifact(nonce, want_b64).vector()
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def assert_artifacts_close(got: dict, want: dict, atol: float = ARTIFACT_ATOL) -> None:
    """Same nonces, and every decoded vector of ``got`` within ``atol`` (max-abs) of ``want``'s."""
    got = {int(n): v for n, v in got.items()}
    want = {int(n): v for n, v in want.items()}
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    far = {n: d for n in want if (d := artifact_distance(n, got[n], want[n])) > atol}
    assert not far, f"artifacts differ by more than {atol} (max-abs, decoded fp32): {far}"
