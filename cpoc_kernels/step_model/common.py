"""Argument checks and the prediction queries shared by the step-time models."""
from __future__ import annotations

import math

import numpy as np


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_real(name: str, value: object, minimum: float = 0.0, strictly: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strictly and value == minimum):
        bound = ">" if strictly else ">="
        raise ValueError(f"{name} must be finite and {bound} {minimum}, got {value}")
    return value


def largest_fitting(fits, limit: int) -> int:
    """Largest ``x`` in ``0..limit`` with ``fits(x)``, for a ``fits`` true up to some point and false after
    (a predicted time growing with x); 0 if not even ``fits(1)``. Binary search."""
    if limit <= 0 or not fits(1):
        return 0
    low, high = 1, limit  # fits(low)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


class _FeaturePredictions:
    """Predictions shared by the linear-in-features step-time models: they need ``_features(tokens, keys)``,
    ``_theta`` and ``_cov``."""

    def added_seconds(self, tokens: float, attention_keys: float, added_tokens: float, added_keys: float,
                      z: float = 0.0) -> float:
        """Predicted extra step time (s) from adding ``added_tokens`` rows (``added_keys`` attention
        pairs) to a step of ``tokens`` rows: mean + z·std of the fit."""
        v = (self._features(tokens + added_tokens, attention_keys + added_keys)
             - self._features(tokens, attention_keys))
        mean = float(v @ self._theta)
        std = math.sqrt(max(float(v @ self._cov @ v), 0.0))
        return mean + z * std

    def marginal_seconds_per_token(self, attention_keys_per_token: float = 0.0, z: float = 0.0,
                                   tokens: float = 0.0) -> float:
        """Cost (s) of one more token attending ``attention_keys_per_token`` keys, added to a step of
        ``tokens`` rows: mean + z·std."""
        return self.added_seconds(tokens, 0.0, 1.0, attention_keys_per_token, z)

    def max_tokens_within(self, seconds: float, keys_per_token: float, z: float, limit: int) -> int:
        """Largest ``x`` in ``0..limit`` whose predicted step time (mean + z·std, ``x·keys_per_token``
        attention pairs) is ≤ ``seconds``."""
        def fits(x: int) -> bool:
            f = self._features(x, x * keys_per_token)
            return float(f @ self._theta) + z * math.sqrt(max(float(f @ self._cov @ f), 0.0)) <= seconds

        return largest_fitting(fits, limit)

    def max_added_tokens(self, tokens: int, attention_keys: float, keys_per_added_token: float,
                         extra_seconds: float, z: float, limit: int) -> int:
        """Largest ``x`` in ``0..limit`` whose :meth:`added_seconds` (mean + z·std) is ≤ ``extra_seconds``."""
        def fits(x: int) -> bool:
            return self.added_seconds(tokens, attention_keys, x, x * keys_per_added_token, z) <= extra_seconds

        return largest_fitting(fits, limit)
