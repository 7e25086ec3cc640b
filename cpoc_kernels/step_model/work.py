"""A roofline step-time model of the step's bytes and FLOPs, its hardware constants learnt online.

For a step doing :class:`~cpoc_kernels.step_work.StepWork` ``w`` on a model whose shape is known, the
:class:`~cpoc_kernels.step_work.StepCounter` gives the bytes it reads ``B(w)`` (weights touched — MoE
experts by expected coverage — and KV) and its FLOPs ``F(w)`` exactly. The model is

    t(w) = overhead + per_row · tokens + ‖(B(w) / bandwidth, F(w) / flop_rate)‖_p

(``‖(a, b)‖_p = (a^p + b^p)^(1/p)``: a roofline whose knee is as sharp as ``p``; p = 1 adds the two, as a
CPU that does not overlap memory and compute; large p is the sharp ``max``). ``per_row`` carries what
grows with rows outside the roofline (tensor-parallel all-reduces, sampling). It learns ``overhead``,
``per_row``, ``bandwidth`` and ``flop_rate`` (log-scale, around a prior card) for each ``p`` of a small
grid by Gauss-Newton on the last ``window`` steps, and keeps the ``p`` with the smallest penalised error.

Why bytes and FLOPs rather than rows: a decode step's time is set by the weights and by the KV its
requests read, which grow with the chat context but not with PoC rows; PoC prefill rows add FLOPs (and
a little KV). A model of rows alone learns the average cost of a row and misjudges both.

Noise: relative residuals (step times span orders of magnitude), Huber weights at ``outlier_sigmas``
robust standard deviations (GC pauses, graph captures), robust noise from the median. Drift: the window
forgets; ``change_run`` consecutive steps off by more than ``change_sigmas`` on one side restart the
fit from them. Deterministic; monotone in every part of the work (all coefficients ≥ 0).
"""
from __future__ import annotations

import math

import numpy as np

from cpoc_kernels.cost import ModelShape
from cpoc_kernels.step_work import StepCounter, StepWork

from .common import _check_count, _check_real, largest_fitting

__all__ = ["WorkStepTimeModel"]

_MS = 1e3  # internal time unit: milliseconds
_GB = 1e9
_TFLOP = 1e12
_KROWS = 1e3


class WorkStepTimeModel:
    """Online roofline fit of step times from each step's :class:`StepWork` (see the module docstring).

    ``shape``/``tensor_parallel``: the served model and its group (bytes and FLOPs are counted for the
    whole group). ``prior_flop_rate`` (FLOP/s, group) and ``prior_bandwidth`` (bytes/s, group) centre the
    log-scale prior (``prior_log_std`` natural-log units: 1.5 ≈ a factor 4.5 per standard deviation);
    defaults: one H100 per group member at 60 % of its dense bf16 rate and 80 % of its HBM bandwidth.
    """

    P_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0)
    _PRIOR_NOISE_WEIGHT = 10.0
    _REFIT_EVERY = 4  # one Gauss-Newton iteration on the chosen p every this many steps
    _RERANK_EVERY = 64  # every p refitted and ranked
    _GN_ITERATIONS_RERANK = 3
    _PLAUSIBLE_CHI2 = 4.0

    def __init__(self, shape: ModelShape, tensor_parallel: int = 1, *, prior_flop_rate: float | None = None,
                 prior_bandwidth: float | None = None, prior_overhead_seconds: float = 5e-4,
                 prior_log_std: float = 1.5, relative_noise: float = 0.05, window: int = 256,
                 outlier_sigmas: float = 3.0, change_sigmas: float = 4.0, change_run: int = 8, warmup: int = 8):
        self.counter = StepCounter(shape, tensor_parallel)
        tp = tensor_parallel
        flop_rate = 0.6 * 989e12 * tp if prior_flop_rate is None else prior_flop_rate
        bandwidth = 0.8 * 3.35e12 * tp if prior_bandwidth is None else prior_bandwidth
        _check_real("prior_flop_rate", flop_rate, strictly=True)
        _check_real("prior_bandwidth", bandwidth, strictly=True)
        _check_real("prior_overhead_seconds", prior_overhead_seconds)
        _check_real("prior_log_std", prior_log_std, strictly=True)
        _check_real("relative_noise", relative_noise, strictly=True)
        _check_real("outlier_sigmas", outlier_sigmas, strictly=True)
        _check_real("change_sigmas", change_sigmas, strictly=True)
        for name, value, least in (("window", window, 4), ("change_run", change_run, 2), ("warmup", warmup, 1)):
            if _check_count(name, value) < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        # θ = (overhead ms, per_row ms per 1000 rows, log(ms per GB), log(ms per TFLOP))
        o0 = prior_overhead_seconds * _MS
        self._prior_mean = np.array([o0, 0.0, math.log(_MS * _GB / bandwidth), math.log(_MS * _TFLOP / flop_rate)])
        # per-row time outside the roofline is the tensor-parallel all-reduces: ~0 on one card (a loose prior
        # there lets it absorb what the roofline should explain, and over-price PoC rows), loose for a group
        row_std = 0.05 if tensor_parallel == 1 else 10.0  # ms per 1000 rows
        self._prior_precision = 1.0 / np.array([max(o0, 0.1) * 2.0, row_std, prior_log_std, prior_log_std]) ** 2
        self._prior_noise = relative_noise
        self._outlier_sigmas = outlier_sigmas
        self._change_sigmas = change_sigmas
        self._change_run = change_run
        self._warmup = warmup
        self._window = window
        # the kept steps, oldest first, rows [start, end) of a buffer twice the window (moved to its front when
        # full): per step (GB read, TFLOP, thousands of rows, ms) — the fit reads them as views, without a copy
        self._steps = np.empty((2 * window, 4))
        self._start = self._end = 0
        self._thetas = {p: self._prior_mean.copy() for p in self.P_GRID}
        self._p = 3.0
        self._theta = self._prior_mean.copy()
        self._cov = np.diag(1.0 / self._prior_precision)
        self._noise = relative_noise
        self._run, self._run_sign = 0, 0
        self._since_restart = 0
        self._plausible: list[tuple[float, np.ndarray]] = []  # other (p, θ) the steps do not rule out
        self.n_observations = 0
        self.n_changes = 0
        self.n_outliers = 0

    # ------------------------------------------------------------------------------------------ features
    def _features(self, work: StepWork) -> tuple[float, float, float]:
        return (self.counter.bytes_read(work) / _GB, self.counter.flops(work) / _TFLOP, work.tokens / _KROWS)

    def _point(self, x: tuple[float, float, float], theta: np.ndarray | None = None,
               p: float | None = None) -> tuple[float, tuple[float, float, float, float]]:
        """Predicted ms of one feature row and its gradient in θ (scalar twin of :meth:`_curve`); the
        chosen fit unless ``theta``/``p`` are given."""
        if theta is None:
            theta, p = self._theta, self._p
        if x[2] <= 0:
            return 0.0, (0.0, 0.0, 0.0, 0.0)
        mem, comp = math.exp(theta[2]) * x[0], math.exp(theta[3]) * x[1]
        top = max(mem, comp, 1e-300)
        rm, rc = mem / top, comp / top
        norm = max((rm ** p + rc ** p) ** (1.0 / p), 1e-300)
        pred = float(theta[0] + theta[1] * x[2] + top * norm)
        return pred, (1.0, x[2], mem * (rm / norm) ** (p - 1.0), comp * (rc / norm) ** (p - 1.0))

    def _std(self, grad) -> float:
        g = np.asarray(grad)
        return math.sqrt(max(float(g @ self._cov @ g), 0.0))

    @staticmethod
    def _curve(theta: np.ndarray, x: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
        """Predicted ms of feature rows ``x`` [n, 3] and the Jacobian [n, 4] with respect to θ."""
        beta, phi = math.exp(theta[2]), math.exp(theta[3])
        mem, comp = beta * x[:, 0], phi * x[:, 1]
        top = np.maximum(np.maximum(mem, comp), 1e-300)
        rm, rc = mem / top, comp / top
        norm = np.maximum((rm ** p + rc ** p) ** (1.0 / p), 1e-300)
        roof = top * norm
        # ∂roof/∂mem = (mem/roof)^(p-1); with respect to log β: mem · that
        dm = (rm / norm) ** (p - 1.0)
        dc = (rc / norm) ** (p - 1.0)
        jac = np.empty((len(x), 4))
        jac[:, 0] = 1.0
        jac[:, 1] = x[:, 2]
        jac[:, 2] = mem * dm
        jac[:, 3] = comp * dc
        empty = x[:, 2] <= 0
        pred = theta[0] + theta[1] * x[:, 2] + roof
        if empty.any():
            pred = np.where(empty, 0.0, pred)
            jac[empty] = 0.0
        return pred, jac

    def _gauss_newton(self, x: np.ndarray, y: np.ndarray, theta: np.ndarray, p: float,
                      iterations: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        """``iterations`` damped Gauss-Newton steps from ``theta`` (overhead, per-row ≥ 0) on the steps ``x``
        (features) / ``y`` (ms), Huber-weighted relative residuals; returns (θ, penalised objective, the normal
        matrix, the relative residuals at θ)."""
        prior = self._prior_precision * self._noise ** 2
        normal = np.diag(prior)
        for _ in range(iterations):
            pred, jac = self._curve(theta, x, p)
            rel = (y - pred) / y
            bound = self._outlier_sigmas * self._noise
            huber = np.minimum(1.0, bound / np.maximum(np.abs(rel), 1e-300))
            w = huber / (y * y)
            normal = (jac * w[:, None]).T @ jac + np.diag(prior)
            dev = theta - self._prior_mean
            grad = (jac * w[:, None]).T @ (y - pred) - prior * dev
            step = np.linalg.solve(normal + 1e-9 * np.eye(4), grad)
            step[2:] = np.clip(step[2:], -2.0, 2.0)  # at most a factor e² per iteration on the rates
            candidate = theta + step
            candidate[:2] = np.maximum(candidate[:2], 0.0)
            theta = candidate
        pred, _ = self._curve(theta, x, p)
        rel = (y - pred) / y
        bound = self._outlier_sigmas * self._noise
        loss = np.where(np.abs(rel) <= bound, rel * rel, 2 * bound * np.abs(rel) - bound * bound)
        dev = theta - self._prior_mean
        objective = float(np.sum(loss) + np.sum(prior * dev * dev))
        return theta, objective, normal, rel

    def _refit(self, rerank: bool) -> None:
        n = self._end - self._start
        if n == 0:
            return
        kept = self._steps[self._start:self._end]
        x, y = kept[:, :3], kept[:, 3]
        if rerank:
            iterations = self._GN_ITERATIONS_RERANK
            results = {p: self._gauss_newton(x, y, self._thetas[p], p, iterations) for p in self.P_GRID}
            for p, (theta, *_) in results.items():
                self._thetas[p] = theta
            best = min(self.P_GRID, key=lambda p: (results[p][1], p))  # ties: the smaller p
            # the knee's sharpness the steps do not rule out (within Δχ² = 4 of the best): added times are
            # taken as the largest over them, so a shape the data cannot pin down makes the governor cautious
            cut = results[best][1] + self._PLAUSIBLE_CHI2 * self._noise ** 2
            self._plausible = [(p, results[p][0]) for p in self.P_GRID if p != best and results[p][1] <= cut]
            self._p = best
            theta, _, normal, rel = results[best]
        else:
            theta, _, normal, rel = self._gauss_newton(x, y, self._thetas[self._p], self._p, 1)
            self._thetas[self._p] = theta
        self._theta = theta
        mad = 1.4826 * float(np.median(np.abs(rel)))
        self._noise = max(1e-3, math.sqrt((n * mad ** 2 + self._PRIOR_NOISE_WEIGHT * self._prior_noise ** 2)
                                          / (n + self._PRIOR_NOISE_WEIGHT)))
        self.n_outliers = int(np.sum(np.abs(rel) > self._outlier_sigmas * self._noise))
        cov = self._noise ** 2 * np.linalg.inv(normal)
        for i in (0, 1):  # a coefficient held at its bound carries no uncertainty upwards from the data
            if theta[i] <= 0:
                cov[i, :] = 0.0
                cov[:, i] = 0.0
        self._cov = cov

    # ------------------------------------------------------------------------------------------ learning
    def observe_work(self, work: StepWork, step_seconds: float) -> None:
        """Add one measured step (``work`` took ``step_seconds`` s); refits every few steps."""
        if not isinstance(work, StepWork):
            raise ValueError(f"work must be a StepWork, got {type(work).__name__}")
        _check_real("step_seconds", step_seconds, strictly=True)
        if work.tokens <= 0:
            raise ValueError("a measured step has at least one row")
        x = self._features(work)
        y = float(step_seconds) * _MS
        if self.n_observations >= self._warmup:
            predicted = self._point(x)[0]
            relative = (y - predicted) / predicted
            if abs(relative) > self._change_sigmas * self._noise:
                sign = 1 if relative > 0 else -1
                self._run = self._run + 1 if sign == self._run_sign else 1
                self._run_sign = sign
            else:
                self._run, self._run_sign = 0, 0
        if self._end == len(self._steps):
            kept = self._end - self._start
            self._steps[:kept] = self._steps[self._start:self._end]
            self._start, self._end = 0, kept
        self._steps[self._end] = (*x, y)
        self._end += 1
        self._start = max(self._start, self._end - self._window)
        self.n_observations += 1
        self._since_restart += 1
        if self._run >= self._change_run:  # the engine changed: keep only the steps that say so
            self._start = max(self._start, self._end - self._change_run)
            self._run, self._run_sign = 0, 0
            self._since_restart = self._change_run
            self.n_changes += 1
            self._noise = self._prior_noise
            self._refit(rerank=True)
            return
        n, fresh = self.n_observations, self._since_restart
        # every p refitted: every step while new, every 4th for the first 64 steps of a fit, then every 64th
        young = fresh <= self._RERANK_EVERY and n % self._REFIT_EVERY == 0
        if fresh <= self._warmup or n % self._RERANK_EVERY == 0 or young:
            self._refit(rerank=True)
        elif n % self._REFIT_EVERY == 0:
            self._refit(rerank=False)

    def observe(self, tokens: int, step_seconds: float, attention_keys: int = 0, kv_tokens_read: int | None = None,
                lm_rows: int = 0) -> None:
        """Rows-only interface: a step of ``tokens`` rows (each reading its own KV entry unless
        ``kv_tokens_read`` says otherwise)."""
        _check_count("tokens", tokens)
        self.observe_work(StepWork(tokens, attention_keys, lm_rows, tokens if kv_tokens_read is None
                                   else kv_tokens_read), step_seconds)

    # ------------------------------------------------------------------------------------------ queries
    def predict_work(self, work: StepWork) -> float:
        """Predicted step time (s) of ``work`` (0 for an empty step)."""
        return self._point(self._features(work))[0] / _MS

    def predict(self, tokens: float, attention_keys: float = 0.0) -> float:
        """Rows-only interface: predicted time (s) of ``tokens`` prefill rows, no LM head."""
        return self.predict_work(StepWork(tokens, attention_keys, 0, tokens))

    def added_seconds_work(self, base: StepWork, added: StepWork, z: float = 0.0) -> float:
        """Predicted extra time (s) of ``added`` joining ``base``: mean + z·std of the fit (delta method);
        with ``z > 0`` the mean is the largest over the knee sharpnesses the steps do not rule out."""
        xa, xb = self._features(base.plus(added)), self._features(base)
        pa, ga = self._point(xa)
        pb, gb = self._point(xb)
        extra = pa - pb
        if z:
            for p, theta in self._plausible:
                extra = max(extra, self._point(xa, theta, p)[0] - self._point(xb, theta, p)[0])
            extra += z * self._std([a - b for a, b in zip(ga, gb)])
        return extra / _MS

    def max_added_within(self, base: StepWork, added_for, extra_seconds: float, z: float, limit: int) -> int:
        """Largest ``x`` in ``0..limit`` whose ``added_for(x)`` (a :class:`StepWork` growing with x) adds at
        most ``extra_seconds`` (mean + z·std) to ``base``."""
        return largest_fitting(lambda x: self.added_seconds_work(base, added_for(x), z) <= extra_seconds, limit)

    def predict_work_upper(self, work: StepWork, z: float) -> float:
        """Predicted step time (s) of ``work``: mean + z·std of the fit."""
        pred, grad = self._point(self._features(work))
        return (pred + (z * self._std(grad) if z else 0.0)) / _MS

    def max_within(self, seconds: float, work_for, z: float, limit: int) -> int:
        """Largest ``x`` in ``0..limit`` whose step ``work_for(x)`` is predicted (mean + z·std) ≤ ``seconds``."""
        return largest_fitting(lambda x: self.predict_work_upper(work_for(x), z) <= seconds, limit)

    def memory_bound_at(self, work: StepWork) -> bool:
        """Whether the fitted roofline puts ``work`` on its memory side (the flat part of a GPU step)."""
        x = self._features(work)
        return math.exp(self._theta[2]) * x[0] > math.exp(self._theta[3]) * x[1]

    @property
    def overhead_seconds(self) -> float:
        return float(self._theta[0]) / _MS

    @property
    def seconds_per_row(self) -> float:
        """Fitted time per row outside the roofline (s)."""
        return float(self._theta[1]) / _MS / _KROWS

    @property
    def bandwidth(self) -> float:
        """Fitted effective bandwidth (bytes/s, whole group)."""
        return _MS * _GB / math.exp(self._theta[2])

    @property
    def flop_rate(self) -> float:
        """Fitted effective FLOP/s (whole group)."""
        return _MS * _TFLOP / math.exp(self._theta[3])

    @property
    def knee_sharpness(self) -> float:
        return float(self._p)

    @property
    def relative_noise(self) -> float:
        return float(self._noise)

    def summary(self) -> dict:
        """The fitted model as plain JSON types (for ``Governor.stats``)."""
        return {"kind": "work-roofline", "overhead_seconds": self.overhead_seconds,
                "seconds_per_row": self.seconds_per_row, "bandwidth_bytes_per_second": self.bandwidth,
                "flop_per_second": self.flop_rate, "knee_sharpness": self.knee_sharpness,
                "relative_noise": self.relative_noise, "observations": self.n_observations,
                "outliers_in_window": self.n_outliers, "changes_detected": self.n_changes,
                "model": self.counter.shape.name, "tensor_parallel": self.counter.tensor_parallel}
