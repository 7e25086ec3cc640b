"""Step-time models of the step's row count alone (what a glue that reports nothing else can feed).

* :class:`RooflineStepTimeModel`: flat, then linear, with the knee learned from the steps — the shape of
  a GPU step, which is flat while it is bound by reading the weights and grows linearly once it is
  compute-bound; with the knee at 0 it is a straight line (a CPU step).
* :class:`StepTimeModel`: a ridge-regressed straight line (or piecewise linear with hand-set ``knots``).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np

from .common import _check_count, _check_real, _FeaturePredictions

# ----------------------------------------------------------------------------------------------
# Straight line (or hand-set knots)


class StepTimeModel(_FeaturePredictions):
    """Online fit of ``step_seconds ≈ overhead + seconds_per_token·tokens + seconds_per_key·attention_keys
    + Σ_k extra_k·max(0, tokens − knot_k)``.

    ``tokens`` are all rows of the step (chat + PoC); ``attention_keys`` the (query, key) pairs the step's
    attention computes (optional; pass 0 everywhere to fold attention into the per-token cost).
    ``knots`` (token counts) make the token term piecewise linear: a GPU step is flat while it is bound
    by reading the weights and grows linearly once compute-bound; without knots the fit is one line,
    which on such an engine is conservative (it sees the average slope, not the free flat part).

    The fit is a ridge regression on the last ``window`` steps, refitted at each :meth:`observe`:
    residuals relative to the predicted time (step times span orders of magnitude), a Gaussian prior
    (mean = the prior coefficients, standard deviation ``prior_relative_std`` × their size) as the ridge
    term, and Huber weights (iteratively reweighted) so that steps more than ``outlier_sigmas`` robust
    standard deviations off (a GC pause, a graph capture) count as if at that bound. Old steps leave the
    window, so the fit follows changes in the engine, and a direction the recent steps do not vary
    (e.g. PoC always filling the batch to the same size) falls back to the prior and its uncertainty,
    which makes the governor cautious again instead of trusting an untested belief. Overhead, per-token
    and per-key costs are clamped at ≥ 0. Deterministic: the same steps give the same fit (the
    reweighting starts from the previous fit). Cost: one small solve per step, ~0.2 ms in numpy.
    """

    _TOKEN_UNIT = 1e3  # features are kept O(1): thousands of tokens, millions of keys
    _KEY_UNIT = 1e6
    _IRLS_ITERATIONS = 4
    _PRIOR_NOISE_WEIGHT = 10.0  # the prior relative noise counts as this many steps

    def __init__(self, prior_overhead_seconds: float = 2e-3, prior_seconds_per_token: float = 1e-5,
                 prior_seconds_per_key: float | None = None, prior_relative_std: float = 1.0,
                 relative_noise: float = 0.05, window: int = 256, outlier_sigmas: float = 3.0,
                 knots: Sequence[int] = ()):
        _check_real("prior_overhead_seconds", prior_overhead_seconds)
        _check_real("prior_seconds_per_token", prior_seconds_per_token, strictly=True)
        if prior_seconds_per_key is None:
            prior_seconds_per_key = prior_seconds_per_token * 1e-4
        _check_real("prior_seconds_per_key", prior_seconds_per_key)
        _check_real("prior_relative_std", prior_relative_std, strictly=True)
        _check_real("relative_noise", relative_noise, strictly=True)
        _check_real("outlier_sigmas", outlier_sigmas, strictly=True)
        _check_count("window", window)
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.knots = tuple(_check_count("knot", k) for k in knots)
        if any(k < 1 for k in self.knots) or list(self.knots) != sorted(set(self.knots)):
            raise ValueError(f"knots must be distinct, increasing and >= 1, got {knots!r}")
        slope = prior_seconds_per_token * self._TOKEN_UNIT
        self._prior_mean = np.array([prior_overhead_seconds, slope, prior_seconds_per_key * self._KEY_UNIT]
                                    + [0.0] * len(self.knots))
        # coefficient scales (feature units), floored at 0.1 ms, 1 µs/token, 1 ns/key; knots: the prior slope
        scale_floor = np.array([1e-4, 1e-3, 1e-3] + [slope] * len(self.knots))
        prior_std = prior_relative_std * np.maximum(np.abs(self._prior_mean), scale_floor)
        self._prior_precision = np.diag(1.0 / prior_std ** 2)
        self._prior_noise = relative_noise
        self._outlier_sigmas = outlier_sigmas
        self._rows: deque[np.ndarray] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self._theta = self._prior_mean.copy()
        self._cov = np.linalg.inv(self._prior_precision)
        self._noise = relative_noise
        self.n_observations = 0
        self.n_outliers = 0  # steps of the window the last fit down-weighted

    def _features(self, tokens: float, attention_keys: float) -> np.ndarray:
        return np.array([1.0, tokens / self._TOKEN_UNIT, attention_keys / self._KEY_UNIT]
                        + [max(0.0, tokens - k) / self._TOKEN_UNIT for k in self.knots])

    @property
    def overhead_seconds(self) -> float:
        """Fitted fixed cost of a step (s)."""
        return float(self._theta[0])

    @property
    def seconds_per_token(self) -> float:
        """Fitted cost of one more row below the first knot (s/token)."""
        return float(self._theta[1] / self._TOKEN_UNIT)

    @property
    def seconds_per_key(self) -> float:
        """Fitted cost of one more attention (query, key) pair (s)."""
        return float(self._theta[2] / self._KEY_UNIT)

    @property
    def relative_noise(self) -> float:
        """Estimated (robust) relative standard deviation of a step time around the model."""
        return float(self._noise)

    def predict(self, tokens: float, attention_keys: float = 0.0) -> float:
        """Predicted step time (s) for ``tokens`` rows and ``attention_keys`` attention pairs."""
        return float(self._features(tokens, attention_keys) @ self._theta)


    def observe(self, tokens: int, step_seconds: float, attention_keys: int = 0) -> None:
        """Add one measured step (``tokens`` rows took ``step_seconds`` s) and refit."""
        _check_count("tokens", tokens)
        _check_count("attention_keys", attention_keys)
        _check_real("step_seconds", step_seconds, strictly=True)
        self._rows.append(self._features(tokens, attention_keys))
        self._seconds.append(float(step_seconds))
        self.n_observations += 1
        self._refit()

    def _refit(self) -> None:
        x = np.array(self._rows)
        y = np.array(self._seconds)
        n = len(y)
        theta = self._theta
        noise = self._noise
        huber = np.ones(n)
        for _ in range(self._IRLS_ITERATIONS):
            scale = np.maximum(x @ theta, 1e-6)           # relative residuals: divide by the predicted time
            relative = (y - x @ theta) / scale
            # robust noise (MAD), blended with the prior noise so a few steps cannot make it tiny
            mad = 1.4826 * float(np.median(np.abs(relative)))
            noise = math.sqrt((n * mad ** 2 + self._PRIOR_NOISE_WEIGHT * self._prior_noise ** 2)
                              / (n + self._PRIOR_NOISE_WEIGHT))
            noise = max(noise, 1e-3)
            bound = self._outlier_sigmas * noise
            huber = np.minimum(1.0, bound / np.maximum(np.abs(relative), 1e-300))
            weights = huber / (scale * noise) ** 2
            precision = (x * weights[:, None]).T @ x + self._prior_precision
            rhs = (x * weights[:, None]).T @ y + self._prior_precision @ self._prior_mean
            theta = np.linalg.solve(precision, rhs)
            theta[:3] = np.maximum(theta[:3], 0.0)
        self._theta = theta
        self._cov = np.linalg.inv(precision)
        self._noise = noise
        self.n_outliers = int(np.sum(huber < 1.0))

    def summary(self) -> dict:
        """The fitted model as plain JSON types (for ``Governor.stats``)."""
        return {"kind": "line", "overhead_seconds": self.overhead_seconds,
                "seconds_per_token": self.seconds_per_token, "seconds_per_key": self.seconds_per_key,
                "relative_noise": self.relative_noise, "observations": self.n_observations,
                "outliers_in_window": self.n_outliers, "knots": list(self.knots)}


# ----------------------------------------------------------------------------------------------
# Flat, then linear: the knee learned online


class RooflineStepTimeModel(_FeaturePredictions):
    """Online fit of ``step_seconds ≈ flat + slope_below·n + slope_above·hinge(n − knee; width)
    + seconds_per_key·attention_keys`` for a step of ``n`` rows, the knee learned from the steps.

    ``hinge`` is ``max(0, x)`` (a sharp knee) or the smooth ``(x + √(x² + width²))/2`` (a gradual one),
    shifted so that ``hinge = 0`` at ``n = 0``: ``flat`` is the predicted time of an empty step. The
    knee and its width are not set by hand: the model keeps a grid of candidate (knee, width) pairs —
    knee 0 (a straight line) and ``knees_per_octave`` knees per doubling over ``knee_range`` tokens,
    each with the relative ``knee_widths`` — and for every candidate the sufficient statistics of a
    weighted least-squares fit of the four linear coefficients (4×4 Gram matrix, right-hand side),
    updated in O(candidates) per step. The prediction is that of the candidate with the smallest
    penalised residual (MAP: relative residuals, a Gaussian prior around the prior coefficients as the
    ridge term — tight on ``slope_below``, so the flat part stays flat unless the steps insist — plus a
    BIC-like penalty for a knee over the straight line), re-ranked every ``_RERANK_EVERY`` steps (the
    chosen candidate is refitted at every step); coefficients are kept ≥ 0 (an active set), so
    predictions are monotone in ``n`` and never below ``flat``.

    Noise and spikes: each step's weight is ``1/t²`` (relative errors: step times span orders of
    magnitude; ``t`` the predicted time once there is a fit, the measured one before) times a Huber
    weight against the current fit, so a step more than
    ``outlier_sigmas`` robust standard deviations off (a GC pause, a graph capture) counts as if at
    that bound; the last ``window`` steps are kept and every ``refit_every`` steps (and once after
    the first ``warmup`` steps) the statistics are rebuilt from them with reweighting (so spikes among
    the first steps, before there was a fit to judge them, are down-weighted too).

    Drift: statistics decay by ``1 − 1/memory_steps`` per step (old steps fade); and when
    ``change_run`` consecutive steps all miss the fit by more than ``change_sigmas`` on the same side,
    the engine has changed: everything but those steps is dropped and the fit restarts from them.
    A direction the recent steps do not vary keeps the prior's uncertainty, so the governor stays
    cautious there (``added_seconds(..., z)``).

    Deterministic: the same steps in the same order give the same fit. Cost per :meth:`observe`: the
    statistics update of every candidate and one 4×4 solve (~0.1 ms CPU in numpy), a ranking of all
    candidates every 16 steps, and the periodic rebuild (a few ms every ``refit_every`` steps).

    Limits (see bench/RESULTS.md, engine simulator): the only input is the step's row count (and
    optionally attention keys as an additive term), so steps whose time is set by their KV reads or by
    MoE experts touched are not separated from PoC rows' cost.
    """

    _TOKEN_UNIT = 1e3  # features are kept O(1): thousands of tokens, millions of keys
    _KEY_UNIT = 1e6
    _PRIOR_NOISE_WEIGHT = 10.0  # the prior relative noise counts as this many steps
    _ACTIVE_SET_PASSES = 3
    _RERANK_EVERY = 16  # steps between two rankings of all candidates (in between: the best one is refitted)

    def __init__(self, prior_overhead_seconds: float = 2e-3, prior_seconds_per_token: float = 1e-5,
                 prior_seconds_per_key: float | None = None, prior_relative_std: float = 1.0,
                 relative_noise: float = 0.05, memory_steps: int = 256, outlier_sigmas: float = 3.0,
                 knee_range: tuple[int, int] = (4, 65536), knees_per_octave: int = 4,
                 knee_widths: Sequence[float] = (0.0, 0.25, 0.5, 1.0), window: int = 256, refit_every: int = 256,
                 warmup: int = 16, change_run: int = 6, change_sigmas: float = 4.0):
        _check_real("prior_overhead_seconds", prior_overhead_seconds)
        _check_real("prior_seconds_per_token", prior_seconds_per_token, strictly=True)
        if prior_seconds_per_key is None:
            prior_seconds_per_key = prior_seconds_per_token * 1e-4
        _check_real("prior_seconds_per_key", prior_seconds_per_key)
        _check_real("prior_relative_std", prior_relative_std, strictly=True)
        _check_real("relative_noise", relative_noise, strictly=True)
        _check_real("outlier_sigmas", outlier_sigmas, strictly=True)
        _check_real("change_sigmas", change_sigmas, strictly=True)
        for name, value, least in (("memory_steps", memory_steps, 2), ("window", window, 2),
                                   ("refit_every", refit_every, 1), ("warmup", warmup, 1),
                                   ("change_run", change_run, 2), ("knees_per_octave", knees_per_octave, 1)):
            if _check_count(name, value) < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        low, high = (_check_count("knee_range", k) for k in knee_range)
        if not 1 <= low < high:
            raise ValueError(f"knee_range must be 1 <= low < high, got {knee_range!r}")
        widths = [_check_real("knee_width", w) for w in knee_widths]
        if not widths:
            raise ValueError("knee_widths must not be empty")
        octaves = math.log2(high / low)
        grid = low * 2.0 ** (np.arange(math.floor(octaves * knees_per_octave) + 1) / knees_per_octave)
        knees, rel = [0.0], [0.0]
        for knee in grid:
            for w in widths:
                knees.append(float(knee))
                rel.append(w)
        self._knee = np.array(knees)
        self._width = self._knee * np.array(rel)
        self._hinge0 = 0.5 * (-self._knee + np.sqrt(self._knee ** 2 + self._width ** 2))
        slope = prior_seconds_per_token * self._TOKEN_UNIT
        self._prior_mean = np.array([prior_overhead_seconds, 0.0, slope, prior_seconds_per_key * self._KEY_UNIT])
        scale = np.maximum(np.array([prior_overhead_seconds, slope, slope, prior_seconds_per_key * self._KEY_UNIT]),
                           np.array([1e-4, 1e-3, 1e-3, 1e-3]))  # floors: 0.1 ms, 1 µs/token, 1 ns/key
        self._prior_precision = 1.0 / (prior_relative_std * scale) ** 2
        # the slope below the knee is held near 0 (a tight prior): without it, steps that cluster near the
        # knee tilt the flat part and the fit under-predicts small steps; the smooth knees give the bend
        self._prior_precision[1] *= 1e4
        self._prior_noise = relative_noise
        self._outlier_sigmas = outlier_sigmas
        self._change_sigmas = change_sigmas
        self._change_run = change_run
        self._decay = 1.0 - 1.0 / memory_steps
        self._memory = memory_steps
        self._refit_every = refit_every
        self._warmup = warmup
        self._steps: deque[tuple[float, float, float]] = deque(maxlen=window)  # (tokens, keys, seconds)
        self._flags: deque[bool] = deque(maxlen=window)  # down-weighted as an outlier
        k = len(self._knee)
        self._gram = np.zeros((k, 4, 4))
        self._rhs = np.zeros((k, 4))
        self._yy = 0.0
        self._abs_residual = relative_noise / 1.2533  # EW mean |relative residual| (clipped)
        self._since_restart = 0
        self._run_sign, self._run = 0, 0
        self.n_observations = 0
        self.n_changes = 0  # detected engine changes (restarts of the fit)
        self._noise = relative_noise
        self._best = 0
        self._fit()

    # ------------------------------------------------------------------------------------------ features
    def _features_all(self, tokens: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """[candidates, steps, 4] features of steps (tokens, keys arrays) under every candidate."""
        x = tokens[None, :] - self._knee[:, None]
        hinge = 0.5 * (x + np.sqrt(x * x + self._width[:, None] ** 2)) - self._hinge0[:, None]
        k, n = hinge.shape
        out = np.empty((k, n, 4))
        out[:, :, 0] = 1.0
        out[:, :, 1] = tokens[None, :] / self._TOKEN_UNIT
        out[:, :, 2] = hinge / self._TOKEN_UNIT
        out[:, :, 3] = keys[None, :] / self._KEY_UNIT
        return out

    def _features(self, tokens: float, keys: float) -> np.ndarray:
        """Features of one step under the chosen candidate."""
        x = tokens - self._best_knee
        hinge = 0.5 * (x + math.sqrt(x * x + self._best_width ** 2)) - self._best_hinge0
        return np.array([1.0, tokens / self._TOKEN_UNIT, hinge / self._TOKEN_UNIT, keys / self._KEY_UNIT])

    # ------------------------------------------------------------------------------------------ fitting
    def _solve(self, gram: np.ndarray, rhs: np.ndarray, yy: float, noise: float, objective: bool = True):
        """MAP coefficients ≥ 0 of the given candidates; returns (theta [K, 4], objective [K] or None, the
        systems solved, active coefficients)."""
        s2 = noise * noise
        prior = s2 * self._prior_precision
        systems = gram + np.diag(prior)[None]
        target = rhs + (prior * self._prior_mean)[None]
        theta = np.linalg.solve(systems, target[..., None])[..., 0]
        active = np.ones(target.shape, dtype=bool)
        bad = np.flatnonzero((theta < 0).any(axis=1))
        if bad.size:  # active set, only for the candidates with a negative coefficient
            eye = np.eye(4)[None]
            sub_active = active[bad]
            sub_theta = theta[bad]
            for _ in range(self._ACTIVE_SET_PASSES):
                negative = sub_active & (sub_theta < 0)
                if not negative.any():
                    break
                sub_active &= ~negative
                mask = sub_active[:, :, None] & sub_active[:, None, :]
                masked = np.where(mask, systems[bad], 0.0) + eye * (~sub_active)[:, None, :]
                sub_theta = np.linalg.solve(masked, np.where(sub_active, target[bad], 0.0)[..., None])[..., 0]
            systems = systems.copy()
            systems[bad] = masked
            theta[bad] = sub_theta
            active[bad] = sub_active
        theta = np.where(active, np.maximum(theta, 0.0), 0.0)
        if not objective:
            return theta, None, systems, active
        dev = theta - self._prior_mean[None]
        fit = np.matmul(gram, theta[..., None])[..., 0]
        objective = yy - 2 * np.sum(theta * rhs, axis=1) + np.sum(theta * fit, axis=1) + np.sum(dev * dev * prior, axis=1)
        return theta, objective, systems, active

    def _fit(self, full: bool = True) -> None:
        """Refit: rank all candidates and take the best (``full``), or refit the current best only."""
        if full:
            theta, objective, systems, active = self._solve(self._gram, self._rhs, self._yy, self._noise)
            # a knee (and its width) are two more parameters than the straight line: a BIC-like penalty,
            # so a bend must be supported by the steps rather than by the lack of them
            n_eff = max(2.0, min(float(self._since_restart), float(self._memory)))
            objective[1:] += 2.0 * math.log(n_eff) * self._noise ** 2
            pick = best = int(np.argmin(objective))  # first of equal objectives: the lowest knee
        else:
            best, pick = self._best, 0
            theta, _, systems, active = self._solve(self._gram[best:best + 1], self._rhs[best:best + 1], self._yy,
                                                    self._noise, objective=False)
        self._best = best
        self._best_knee = float(self._knee[best])
        self._best_width = float(self._width[best])
        self._best_hinge0 = float(self._hinge0[best])
        self._theta = theta[pick]
        cov = self._noise ** 2 * np.linalg.inv(systems[pick])
        keep = active[pick]
        self._cov = np.where(keep[:, None] & keep[None, :], cov, 0.0)

    def _rebuild(self, judge_first: bool) -> None:
        """Statistics from the kept steps, decayed by age, with Huber weights: from the current fit
        (``judge_first``), or from a first unweighted fit of these steps (then a second pass)."""
        steps = np.array(self._steps)
        tokens, keys, seconds = steps[:, 0], steps[:, 1], steps[:, 2]
        phi = self._features_all(tokens, keys)
        decay = self._decay ** np.arange(len(seconds) - 1, -1, -1, dtype=float)
        huber = np.ones(len(seconds))
        scale = seconds  # relative to the measured time until there is a fit, then to the predicted time
        if judge_first:
            scale = np.maximum(phi[self._best] @ self._theta, 1e-9)
            relative = np.abs(seconds - scale) / scale
            huber = np.minimum(1.0, self._outlier_sigmas * self._noise / np.maximum(relative, 1e-300))
        for _ in range(1 if judge_first else 2):
            w = decay * huber / scale ** 2
            self._gram = np.matmul(phi.transpose(0, 2, 1) * w[None, None, :], phi)
            self._rhs = np.matmul(phi.transpose(0, 2, 1), w * seconds)
            self._yy = float(np.sum(w * seconds ** 2))
            self._fit()
            scale = np.maximum(phi[self._best] @ self._theta, 1e-9)
            relative = (seconds - scale) / scale
            n = len(seconds)
            mad = 1.4826 * float(np.median(np.abs(relative)))
            self._noise = max(1e-3, math.sqrt((n * mad ** 2 + self._PRIOR_NOISE_WEIGHT * self._prior_noise ** 2)
                                              / (n + self._PRIOR_NOISE_WEIGHT)))
            huber = np.minimum(1.0, self._outlier_sigmas * self._noise / np.maximum(np.abs(relative), 1e-300))
        self._flags = deque((bool(h < 1.0) for h in huber), maxlen=self._flags.maxlen)
        self._abs_residual = self._noise / 1.2533

    def observe(self, tokens: int, step_seconds: float, attention_keys: int = 0) -> None:
        """Add one measured step (``tokens`` rows took ``step_seconds`` s) and refit."""
        _check_count("tokens", tokens)
        _check_count("attention_keys", attention_keys)
        _check_real("step_seconds", step_seconds, strictly=True)
        y = float(step_seconds)
        phi = self._features_all(np.array([float(tokens)]), np.array([float(attention_keys)]))[:, 0, :]
        predicted = max(float(phi[self._best] @ self._theta), 1e-9)
        relative = (y - predicted) / predicted
        judged = self._since_restart >= self._warmup
        huber = 1.0
        if judged:
            huber = min(1.0, self._outlier_sigmas * self._noise / max(abs(relative), 1e-300))
            sign = 1 if relative > 0 else -1
            if abs(relative) > self._change_sigmas * self._noise:
                self._run = self._run + 1 if sign == self._run_sign else 1
                self._run_sign = sign
            else:
                self._run, self._run_sign = 0, 0
        # robust noise: EW mean of the clipped |relative residual|, blended with the prior noise
        clipped = min(abs(relative), self._outlier_sigmas * self._noise)
        alpha = 1.0 / min(self._memory, self._since_restart + 1)
        self._abs_residual += alpha * (clipped - self._abs_residual)
        n_eff = min(self._memory, self._since_restart + 1)
        data_noise = 1.2533 * self._abs_residual
        self._noise = max(1e-3, math.sqrt((n_eff * data_noise ** 2 + self._PRIOR_NOISE_WEIGHT * self._prior_noise ** 2)
                                          / (n_eff + self._PRIOR_NOISE_WEIGHT)))
        scale = predicted if judged else y  # relative residuals (measured time: no bias towards fast steps)
        w = huber / (scale * scale)
        self._gram *= self._decay
        self._gram += (w * phi)[:, :, None] * phi[:, None, :]
        self._rhs *= self._decay
        self._rhs += (w * y) * phi
        self._yy = self._decay * self._yy + w * y * y
        self._steps.append((float(tokens), float(attention_keys), y))
        self._flags.append(huber < 1.0)
        self.n_observations += 1
        self._since_restart += 1
        if judged and self._run >= self._change_run:  # the engine changed: restart from the steps that say so
            recent = list(self._steps)[-self._change_run:]
            self._steps.clear()
            self._steps.extend(recent)
            self._since_restart = len(recent)
            self._run, self._run_sign = 0, 0
            self.n_changes += 1
            self._rebuild(judge_first=False)
        elif self._since_restart == self._warmup:
            self._rebuild(judge_first=False)
        elif self.n_observations % self._refit_every == 0:
            self._rebuild(judge_first=True)
        else:
            self._fit(full=self.n_observations % self._RERANK_EVERY == 0)

    # ------------------------------------------------------------------------------------------ queries
    @property
    def knee_tokens(self) -> float:
        """Tokens where the linear part starts (0: a straight line)."""
        return self._best_knee

    @property
    def knee_width_tokens(self) -> float:
        """Width of the knee's smooth bend (0: sharp)."""
        return self._best_width

    @property
    def flat_seconds(self) -> float:
        """Predicted time of an empty step: the level of the flat part (s)."""
        return float(self._theta[0])

    @property
    def seconds_per_token_below_knee(self) -> float:
        """Fitted cost of one more row below the knee (s/token)."""
        return float(self._theta[1] / self._TOKEN_UNIT)

    @property
    def seconds_per_token(self) -> float:
        """Fitted cost of one more row well above the knee (s/token)."""
        return float((self._theta[1] + self._theta[2]) / self._TOKEN_UNIT)

    @property
    def overhead_seconds(self) -> float:
        """Intercept of the linear part above the knee (s): the fixed cost a compute-bound step pays."""
        return max(0.0, float(self._theta[0] - self._theta[2] * (self._best_knee + self._best_hinge0) / self._TOKEN_UNIT))

    @property
    def seconds_per_key(self) -> float:
        """Fitted cost of one more attention (query, key) pair (s)."""
        return float(self._theta[3] / self._KEY_UNIT)

    @property
    def relative_noise(self) -> float:
        """Estimated (robust) relative standard deviation of a step time around the model."""
        return float(self._noise)

    @property
    def n_outliers(self) -> int:
        """Kept steps that were down-weighted as outliers."""
        return int(sum(self._flags))

    def predict(self, tokens: float, attention_keys: float = 0.0) -> float:
        """Predicted step time (s) for ``tokens`` rows and ``attention_keys`` attention pairs."""
        return float(self._features(tokens, attention_keys) @ self._theta)


    def summary(self) -> dict:
        """The fitted model as plain JSON types (for ``Governor.stats``)."""
        return {"kind": "roofline", "flat_seconds": self.flat_seconds, "knee_tokens": self.knee_tokens,
                "knee_width_tokens": self.knee_width_tokens, "overhead_seconds": self.overhead_seconds,
                "seconds_per_token": self.seconds_per_token,
                "seconds_per_token_below_knee": self.seconds_per_token_below_knee,
                "seconds_per_key": self.seconds_per_key, "relative_noise": self.relative_noise,
                "observations": self.n_observations, "outliers_in_window": self.n_outliers,
                "changes_detected": self.n_changes}
