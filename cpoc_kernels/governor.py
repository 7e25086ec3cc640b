"""Governor: how many PoC tokens may join each forward step so that chat does not notice.

Engine-independent. Each step the engine glue calls :meth:`Governor.decide` with the step's chat load
(:class:`StepLoad`) *after* the engine scheduled its chat rows, and gets a :class:`PoCBudget`: how many
PoC prefill tokens to add to this step and how many new nonce requests to admit. After the step it calls
:meth:`Governor.observe` with the measured step time, which feeds the online :class:`StepTimeModel`.
``decide`` is deterministic and side-effect free (no clocks, no threads); only ``observe`` and
``stop`` change state.

Rules (chat always first):

* ``off`` mode, or after :meth:`Governor.stop`: 0.
* Chat requests waiting to be admitted: 0 (``chat_waiting``). If they wait for KV that PoC holds, the
  budget's ``preempt_kv_tokens`` says how many KV slots the glue should free by preempting PoC nonces
  (PoC also belongs at the engine's lowest scheduling priority, so the engine preempts PoC, never chat).
  ``decide`` is pure, so the glue may call it, preempt, admit chat, and call it again in one step.
* Chat fills ``max_batch_tokens``: 0 (``chat_full``).
* KV backpressure: PoC tokens this step ≤ ``kv_tokens_free − reserve``; new nonces are admitted only while
  the KV left after the pending PoC tokens still holds a whole nonce (``reserve`` is kept for chat growth).
* ``fill`` (default): with chat present, the predicted step time with PoC must stay
  ≤ ``(1 + slo_overhead)`` × the predicted chat-only step time. Since TPOT is the step time of a decode
  step, this bounds the slowdown of chat time-per-output-token. The bound uses the time the PoC tokens
  *add* to this step (mean + ``confidence_z`` standard deviations of the fit), against a budget that
  is a fraction of the whole chat step, so a step's fixed overhead makes small PoC additions cheap.
  If carrying *any* PoC rows costs the step a fixed time (``StepLoad.poc_fixed_seconds``: hooks, an extra
  scheduling pass; measured by the glue), that time is taken from the allowance first; when it alone
  exceeds the allowance, PoC waits for a step without chat (``fixed_cost``), except for
  ``StepLoad.probe_tokens`` rows the glue may ask for to keep its measurement of the fixed time current.
  With no chat in the step there is nothing to slow down: PoC fills up to ``idle_max_tokens``
  (default: the whole batch). That idle step delays a chat request arriving during it by at most one
  such step; ``idle_max_seconds`` bounds that wait in time (the step-time fit turns it into tokens), or
  lower ``idle_max_tokens``.
* ``fixed-share``: PoC gets ``fixed_share × max_batch_tokens``, still behind chat and KV (no SLO).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Sequence

import numpy as np

MODES = ("fill", "fixed-share", "off")


class BudgetReason(str, Enum):
    """Which rule set the budget (the binding constraint)."""

    OFF = "off"
    STOPPED = "stopped"
    CHAT_WAITING = "chat_waiting"
    CHAT_FULL = "chat_full"
    KV_BACKPRESSURE = "kv_backpressure"
    SLO = "slo"
    FIXED_SHARE = "fixed_share"
    BATCH_ROOM = "batch_room"
    IDLE_CAP = "idle_cap"
    FIXED_COST = "fixed_cost"


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


def _largest_fitting(fits, limit: int) -> int:
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


# ----------------------------------------------------------------------------------------------
# Step-time model


class StepTimeModel:
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

    def added_seconds(self, tokens: float, attention_keys: float, added_tokens: float, added_keys: float,
                      z: float = 0.0) -> float:
        """Predicted extra step time (s) from adding ``added_tokens`` rows (``added_keys`` attention
        pairs) to a step of ``tokens`` rows: mean + z·std of the fit (the overhead cancels)."""
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

        return _largest_fitting(fits, limit)

    def max_added_tokens(self, tokens: int, attention_keys: float, keys_per_added_token: float,
                         extra_seconds: float, z: float, limit: int) -> int:
        """Largest ``x`` in ``0..limit`` whose :meth:`added_seconds` (mean + z·std) is ≤ ``extra_seconds``."""
        def fits(x: int) -> bool:
            return self.added_seconds(tokens, attention_keys, x, x * keys_per_added_token, z) <= extra_seconds

        return _largest_fitting(fits, limit)

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


# ----------------------------------------------------------------------------------------------
# Governor


@dataclass(frozen=True, kw_only=True)
class GovernorConfig:
    """Governor settings. Token counts are rows of the engine's flat batch; KV is in token slots."""

    max_batch_tokens: int
    """Engine's token budget per step (e.g. vLLM ``max_num_batched_tokens``)."""
    kv_tokens_capacity: int
    """Total KV-cache token slots."""
    mode: str = "fill"
    """``fill`` | ``fixed-share`` | ``off``."""
    slo_overhead: float = 0.05
    """Allowed chat step-time (TPOT) increase, as a fraction: 0.05 = +5 %."""
    fixed_share: float = 0.5
    """``fixed-share`` mode: PoC fraction of ``max_batch_tokens``."""
    kv_reserve_fraction: float = 0.1
    """Fraction of ``kv_tokens_capacity`` PoC never takes (kept for chat growth)."""
    poc_seq_len: int = 1024
    """Tokens per PoC nonce (each admitted nonce will need this many KV slots)."""
    idle_max_tokens: int | None = None
    """PoC tokens in a step without chat (None: ``max_batch_tokens``)."""
    idle_max_seconds: float | None = None
    """Predicted duration of a step without chat (None: unbounded), i.e. about the longest a chat request
    arriving during it waits; at least one PoC token per idle step, so PoC always progresses."""
    poc_attention_keys_per_token: float | None = None
    """Attention pairs per PoC token, if the glue reports attention keys (a full nonce averages
    ``(poc_seq_len + 1) / 2``); None: attention is folded into the per-token cost."""
    confidence_z: float = 1.0
    """Standard deviations of the fit added to the predicted PoC time (caution while it is uncertain)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        _check_count("max_batch_tokens", self.max_batch_tokens)
        _check_count("kv_tokens_capacity", self.kv_tokens_capacity)
        _check_count("poc_seq_len", self.poc_seq_len)
        if self.max_batch_tokens < 1 or self.kv_tokens_capacity < 1 or self.poc_seq_len < 1:
            raise ValueError("max_batch_tokens, kv_tokens_capacity and poc_seq_len must be >= 1")
        _check_real("slo_overhead", self.slo_overhead)
        _check_real("confidence_z", self.confidence_z)
        if not 0 <= self.fixed_share <= 1:
            raise ValueError(f"fixed_share must be in [0, 1], got {self.fixed_share}")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError(f"kv_reserve_fraction must be in [0, 1), got {self.kv_reserve_fraction}")
        if self.idle_max_tokens is not None:
            _check_count("idle_max_tokens", self.idle_max_tokens)
        if self.idle_max_seconds is not None:
            _check_real("idle_max_seconds", self.idle_max_seconds, strictly=True)
        if self.poc_attention_keys_per_token is not None:
            _check_real("poc_attention_keys_per_token", self.poc_attention_keys_per_token)

    @property
    def kv_reserve_tokens(self) -> int:
        """KV token slots PoC leaves free for chat."""
        return math.ceil(self.kv_reserve_fraction * self.kv_tokens_capacity)


@dataclass(frozen=True)
class StepLoad:
    """The chat side of one step, as scheduled by the engine before PoC is added.

    ``chat_tokens`` = all chat rows of the step (``chat_prefill_tokens`` + decode rows, one or more per
    decode request). ``kv_tokens_free``: free KV slots now. ``poc_tokens_pending``: prefill tokens of
    admitted PoC nonces not computed yet (they will still need KV). ``poc_kv_tokens_held``: KV slots
    PoC nonces in flight hold. ``waiting_chat_kv_tokens``: KV slots the waiting chat requests need to
    be admitted (at least the head of the queue; 0 if unknown: then no preemption is asked for).
    ``chat_attention_keys``: attention pairs of the chat rows (only used when the config's
    ``poc_attention_keys_per_token`` is set). ``poc_fixed_seconds``: the time a step pays for carrying any
    PoC rows at all, whatever their number (``fill`` mode charges it to the SLO allowance first);
    ``probe_tokens``: PoC rows allowed even when that fixed time alone exceeds the allowance (0: none).
    """

    chat_tokens: int
    kv_tokens_free: int
    chat_decode_requests: int = 0
    chat_prefill_tokens: int = 0
    waiting_chat_requests: int = 0
    poc_tokens_pending: int = 0
    poc_kv_tokens_held: int = 0
    waiting_chat_kv_tokens: int = 0
    chat_attention_keys: int = 0
    poc_fixed_seconds: float = 0.0
    probe_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("chat_tokens", "kv_tokens_free", "chat_decode_requests", "chat_prefill_tokens",
                     "waiting_chat_requests", "poc_tokens_pending", "poc_kv_tokens_held",
                     "waiting_chat_kv_tokens", "chat_attention_keys", "probe_tokens"):
            _check_count(name, getattr(self, name))
        _check_real("poc_fixed_seconds", self.poc_fixed_seconds)
        if self.chat_prefill_tokens + self.chat_decode_requests > self.chat_tokens:
            raise ValueError(f"chat_prefill_tokens ({self.chat_prefill_tokens}) + chat_decode_requests "
                             f"({self.chat_decode_requests}) exceed chat_tokens ({self.chat_tokens})")


@dataclass(frozen=True)
class PoCBudget:
    """What PoC may add to this step: ``tokens`` rows (from pending nonces first, then from the
    ``new_requests`` nonces to admit now), why (``reason``), the model's predictions (s), and the KV
    slots to free by preempting PoC nonces so waiting chat fits (``preempt_kv_tokens``)."""

    tokens: int
    new_requests: int
    reason: BudgetReason
    predicted_chat_step_seconds: float
    predicted_step_seconds: float
    preempt_kv_tokens: int = 0

    @property
    def predicted_slowdown(self) -> float:
        """Predicted step time with PoC over chat alone (1.0 = no slowdown; inf when chat is idle)."""
        if self.predicted_chat_step_seconds <= 0:
            return math.inf
        return self.predicted_step_seconds / self.predicted_chat_step_seconds


class Governor:
    """Per-step PoC admission (see the module docstring for the rules)."""

    def __init__(self, config: GovernorConfig, model: StepTimeModel | None = None):
        self.config = config
        self.model = model if model is not None else StepTimeModel()
        self.stopped_reason: str | None = None
        self._decisions = {reason.value: 0 for reason in BudgetReason}
        self._steps = 0
        self._chat_tokens = 0
        self._poc_tokens = 0
        self._seconds = 0.0
        self._poc_seconds_estimate = 0.0

    def _keys_per_poc_token(self) -> float:
        return self.config.poc_attention_keys_per_token or 0.0

    def stop(self, reason: str) -> None:
        """Stop PoC for good (e.g. after a crash in PoC handling); ``decide`` then returns 0."""
        self.stopped_reason = str(reason) or "stopped"

    def decide(self, load: StepLoad) -> PoCBudget:
        """The PoC budget for the step described by ``load``. Pure: no state changes."""
        if not isinstance(load, StepLoad):
            raise ValueError(f"decide expects a StepLoad, got {type(load).__name__}")
        cfg = self.config
        use_keys = cfg.poc_attention_keys_per_token is not None
        chat_keys = load.chat_attention_keys if use_keys else 0
        chat_seconds = self.model.predict(load.chat_tokens, chat_keys) if load.chat_tokens else 0.0

        def budget(tokens: int, reason: BudgetReason) -> PoCBudget:
            new = 0
            if tokens > load.poc_tokens_pending:
                new = math.ceil((tokens - load.poc_tokens_pending) / cfg.poc_seq_len)
            total_keys = chat_keys + tokens * self._keys_per_poc_token()
            step = self.model.predict(load.chat_tokens + tokens, total_keys) if load.chat_tokens + tokens else 0.0
            return PoCBudget(tokens=tokens, new_requests=new, reason=reason,
                             predicted_chat_step_seconds=chat_seconds, predicted_step_seconds=step,
                             preempt_kv_tokens=preempt)

        preempt = 0  # chat waiting for KV that PoC holds: free it, whatever the mode
        if load.waiting_chat_requests > 0:
            preempt = min(load.poc_kv_tokens_held, max(0, load.waiting_chat_kv_tokens - load.kv_tokens_free))

        if self.stopped_reason is not None:
            return budget(0, BudgetReason.STOPPED)
        if cfg.mode == "off":
            return budget(0, BudgetReason.OFF)
        if load.waiting_chat_requests > 0:
            return budget(0, BudgetReason.CHAT_WAITING)
        room = cfg.max_batch_tokens - load.chat_tokens
        if room <= 0:
            return budget(0, BudgetReason.CHAT_FULL)

        # KV: this step's PoC tokens need slots now; new nonces need room for all their tokens
        kv_available = max(0, load.kv_tokens_free - cfg.kv_reserve_tokens)
        admissible_new = max(0, kv_available - load.poc_tokens_pending) // cfg.poc_seq_len
        kv_limit = min(kv_available, load.poc_tokens_pending + admissible_new * cfg.poc_seq_len)

        limits: list[tuple[int, BudgetReason]] = [(room, BudgetReason.BATCH_ROOM)]
        if cfg.mode == "fixed-share":
            limits.append((math.floor(cfg.fixed_share * cfg.max_batch_tokens), BudgetReason.FIXED_SHARE))
        elif load.chat_tokens == 0:
            idle = cfg.max_batch_tokens if cfg.idle_max_tokens is None else cfg.idle_max_tokens
            if cfg.idle_max_seconds is not None:
                idle = min(idle, max(1, self.model.max_tokens_within(
                    cfg.idle_max_seconds, self._keys_per_poc_token(), cfg.confidence_z, cfg.max_batch_tokens)))
            limits.append((idle, BudgetReason.IDLE_CAP))
        else:
            allowance = cfg.slo_overhead * chat_seconds - load.poc_fixed_seconds  # left for the PoC rows
            if load.poc_fixed_seconds > 0 and allowance <= 0:
                limits.append((load.probe_tokens, BudgetReason.FIXED_COST))
            else:
                slo_tokens = self.model.max_added_tokens(
                    load.chat_tokens, chat_keys, self._keys_per_poc_token(), allowance, cfg.confidence_z,
                    limit=cfg.max_batch_tokens)
                limits.append((slo_tokens, BudgetReason.SLO))
        limits.append((kv_limit, BudgetReason.KV_BACKPRESSURE))
        tokens, reason = min(limits, key=lambda item: item[0])  # first of equal limits wins
        return budget(max(0, tokens), reason)

    def observe(self, total_tokens: int, poc_tokens: int, step_seconds: float, attention_keys: int = 0) -> None:
        """Record a finished step: ``total_tokens`` rows (``poc_tokens`` of them PoC) took ``step_seconds``.

        ``attention_keys`` (attention pairs of the whole step) is used only when the config's
        ``poc_attention_keys_per_token`` is set.
        """
        _check_count("total_tokens", total_tokens)
        _check_count("poc_tokens", poc_tokens)
        _check_real("step_seconds", step_seconds, strictly=True)
        if poc_tokens > total_tokens:
            raise ValueError(f"poc_tokens ({poc_tokens}) > total_tokens ({total_tokens})")
        keys = attention_keys if self.config.poc_attention_keys_per_token is not None else 0
        self.model.observe(total_tokens, step_seconds, keys)
        self._steps += 1
        self._chat_tokens += total_tokens - poc_tokens
        self._poc_tokens += poc_tokens
        self._seconds += step_seconds
        keys_per_token = self._keys_per_poc_token()
        self._poc_seconds_estimate += min(step_seconds, max(0.0, self.model.added_seconds(
            total_tokens - poc_tokens, keys - poc_tokens * keys_per_token, poc_tokens,
            poc_tokens * keys_per_token)))

    def record(self, budget: PoCBudget) -> None:
        """Count a decision the glue acted on (for :meth:`stats`)."""
        self._decisions[budget.reason.value] += 1

    def stats(self) -> dict:
        """Counters and the fitted model, for an engine's stats endpoint (plain JSON types)."""
        return {
            "mode": self.config.mode,
            "stopped_reason": self.stopped_reason,
            "steps_observed": self._steps,
            "chat_tokens": self._chat_tokens,
            "poc_tokens": self._poc_tokens,
            "poc_token_share": self._poc_tokens / max(1, self._chat_tokens + self._poc_tokens),
            "step_seconds_total": self._seconds,
            "poc_seconds_estimate": self._poc_seconds_estimate,
            "decisions": dict(self._decisions),
            "model": {
                "overhead_seconds": self.model.overhead_seconds,
                "seconds_per_token": self.model.seconds_per_token,
                "seconds_per_key": self.model.seconds_per_key,
                "relative_noise": self.model.relative_noise,
                "observations": self.model.n_observations,
                "outliers_in_window": self.model.n_outliers,
            },
            "config": asdict(self.config),
        }
