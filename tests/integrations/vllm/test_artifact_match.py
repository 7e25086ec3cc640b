"""The cross-implementation artifact comparison of the vLLM tests (runs without vLLM)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from artifact_match import ARTIFACT_ATOL, assert_artifacts_close  # noqa: E402

from cpoc_kernels.artifacts import Artifact  # noqa: E402


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(12)
    return (v / np.linalg.norm(v)).astype(np.float16)


def _b64(nonce: int, v16: np.ndarray) -> str:
    return Artifact.from_vector(nonce, v16).vector_b64


def test_one_fp16_ulp_apart_is_close_but_a_wrong_vector_is_not():
    v = _unit(0)
    i = int(np.argmax(np.abs(v)))  # the largest coordinate has the largest ulp
    bumped = v.copy()
    bumped[i] = np.nextafter(v[i], np.float16(2.0) * np.sign(v[i]))  # one fp16 ulp away from zero
    assert abs(float(bumped[i]) - float(v[i])) < ARTIFACT_ATOL
    assert_artifacts_close({7: _b64(7, bumped)}, {7: _b64(7, v)})
    with pytest.raises(AssertionError, match="differ by more than"):
        assert_artifacts_close({7: _b64(7, _unit(1))}, {7: _b64(7, v)})
    shifted = v.copy()
    shifted[i] = np.float16(float(v[i]) - np.sign(v[i]) * 2e-3)
    with pytest.raises(AssertionError, match="differ by more than"):
        assert_artifacts_close({7: _b64(7, shifted)}, {7: _b64(7, v)})


def test_missing_or_extra_nonces_fail():
    v = _b64(1, _unit(2))
    with pytest.raises(AssertionError):
        assert_artifacts_close({1: v}, {1: v, 2: v})
    with pytest.raises(AssertionError):
        assert_artifacts_close({"1": v, "3": v}, {1: v})
    assert_artifacts_close({"1": v}, {1: v})  # JSON keys (str) and ints compare as nonces
