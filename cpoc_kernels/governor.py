"""Governor: how many PoC tokens may join each forward step so that chat does not notice.

Engine-independent. Each step the engine glue calls :meth:`Governor.decide` with the step's chat load
(:class:`StepLoad`) *after* the engine scheduled its chat rows, and gets a :class:`PoCBudget`: how many
PoC prefill tokens to add to this step and how many new nonce requests to admit. After the step it calls
:meth:`Governor.observe` with the measured step time, which feeds the online step-time model: with
``GovernorConfig.model_shape`` :class:`~cpoc_kernels.step_model.WorkStepTimeModel` (a roofline of each
step's bytes read and FLOPs, hardware constants learnt; the glue reports the step's attention pairs, KV
reads, LM-head rows and the pending nonces' progress), otherwise
:class:`~cpoc_kernels.step_model.RooflineStepTimeModel` (flat, then linear in rows, knee learnt);
:class:`~cpoc_kernels.step_model.StepTimeModel` is the straight line of earlier revisions.
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
  With no chat in the step there is nothing to slow down, but a chat request arriving during it waits
  for the step to end: PoC fills up to ``idle_max_tokens`` (default: the whole batch) and
  ``idle_max_seconds`` (default ``"auto"``: no longer than ``(1 + slo_overhead)`` × a one-token step,
  i.e. the flat part of a GPU's step-time curve, when the model has found one and no token cap is set;
  a number: that many seconds; None: unbounded).
* ``fixed-share``: PoC gets ``fixed_share × max_batch_tokens``, still behind chat and KV (no SLO).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

from cpoc_kernels.cost import ModelShape
from cpoc_kernels.step_model import RooflineStepTimeModel, StepTimeModel, WorkStepTimeModel, _check_count, _check_real
from cpoc_kernels.step_work import StepWork, step_elasticity

__all__ = ["MODES", "BudgetReason", "Governor", "GovernorConfig", "PoCBudget", "RooflineStepTimeModel", "StepLoad",
           "StepTimeModel", "WorkStepTimeModel"]

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
    idle_max_seconds: float | str | None = "auto"
    """Predicted duration of a step without chat, i.e. about the longest a chat request arriving during
    it waits: seconds; ``"auto"`` (default): ``(1 + slo_overhead)`` × the predicted time of a one-token
    step — on a GPU-shaped engine an idle step fills the flat part of the step-time curve (free) and
    stops where a step would get slower than a chat decode step plus its SLO allowance; ``"auto"`` does
    nothing when ``idle_max_tokens`` is set or while the model has no flat part (a knee at 0 tokens, as
    on a CPU, or a model without a knee); None: unbounded. At least one PoC token per idle step, so PoC
    always progresses."""
    poc_attention_keys_per_token: float | None = None
    """Attention pairs per PoC token, if the glue reports attention keys (a full nonce averages
    ``(poc_seq_len + 1) / 2``); None: attention is folded into the per-token cost."""
    confidence_z: float = 1.0
    """Standard deviations of the fit added to the predicted PoC time (caution while it is uncertain)."""
    model_shape: ModelShape | None = None
    """The served model's shape. Given, the default step-time model is :class:`WorkStepTimeModel` (a
    roofline of each step's bytes and FLOPs; the glue then reports KV reads and LM-head rows in
    :class:`StepLoad` and :meth:`Governor.observe`); None: :class:`RooflineStepTimeModel` (rows only)."""
    tensor_parallel: int = 1
    """Cards of the tensor-parallel group serving the model (with ``model_shape``)."""
    max_pending_nonces: int = 4
    """With the work model and a glue that can: when continuing the pending nonces would give a chat step
    less than a quarter of the rows that new nonces would (their cached prefixes are re-read), new nonces
    start instead, while fewer than this many admitted nonces have rows left."""
    slo_feedback: bool = True
    """With :class:`WorkStepTimeModel`: bound end-to-end TPOT rather than each step — the per-step
    allowance shrinks by the chat step's elasticity in its own work (a slower step lets more chat into
    later steps; see ``Governor._step_allowance``). False: every chat step may grow by ``slo_overhead``."""

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
        if self.idle_max_seconds is not None and self.idle_max_seconds != "auto":
            if isinstance(self.idle_max_seconds, str):
                raise ValueError(f"idle_max_seconds must be seconds, 'auto' or None, got {self.idle_max_seconds!r}")
            _check_real("idle_max_seconds", self.idle_max_seconds, strictly=True)
        if self.poc_attention_keys_per_token is not None:
            _check_real("poc_attention_keys_per_token", self.poc_attention_keys_per_token)
        if self.model_shape is not None and not isinstance(self.model_shape, ModelShape):
            raise ValueError(f"model_shape must be a ModelShape or None, got {type(self.model_shape).__name__}")
        if _check_count("max_pending_nonces", self.max_pending_nonces) < 1:
            raise ValueError(f"max_pending_nonces must be >= 1, got {self.max_pending_nonces}")
        if _check_count("tensor_parallel", self.tensor_parallel) < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")

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
    ``chat_attention_keys``: attention pairs of the chat rows (used by :class:`WorkStepTimeModel`, and
    by the rows models when the config's ``poc_attention_keys_per_token`` is set).
    ``chat_kv_tokens_read``: KV entries the chat rows read (Σ over the scheduled chat requests of their
    context after this step); ``chat_lm_rows``: chat rows through the LM head (None: one per decode
    request) — both used by :class:`WorkStepTimeModel` only. ``poc_pending_computed``: tokens already
    computed of each admitted nonce that has rows left, in the order the glue continues them (PoC rows of
    a step continue these nonces, then start new ones): with it, :class:`WorkStepTimeModel` counts the
    exact attention pairs and KV reads of the PoC rows (a nonce's late rows attend more keys); empty:
    nonces are assumed to start at 0. ``can_start_fresh``: the glue can honour
    ``PoCBudget.fresh_nonces_only`` (give a step's PoC rows to newly admitted nonces only).
    ``poc_fixed_seconds``: the time a step pays for carrying any PoC rows at all, whatever their number
    (``fill`` mode charges it to the SLO allowance first);
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
    chat_kv_tokens_read: int = 0
    chat_lm_rows: int | None = None
    poc_pending_computed: tuple[int, ...] = ()
    can_start_fresh: bool = False

    def __post_init__(self) -> None:
        for name in ("chat_tokens", "kv_tokens_free", "chat_decode_requests", "chat_prefill_tokens",
                     "waiting_chat_requests", "poc_tokens_pending", "poc_kv_tokens_held",
                     "waiting_chat_kv_tokens", "chat_attention_keys", "probe_tokens", "chat_kv_tokens_read"):
            _check_count(name, getattr(self, name))
        object.__setattr__(self, "poc_pending_computed", tuple(self.poc_pending_computed))
        if not isinstance(self.can_start_fresh, bool):
            raise ValueError(f"can_start_fresh must be a bool, got {self.can_start_fresh!r}")
        for computed in self.poc_pending_computed:
            _check_count("poc_pending_computed[i]", computed)
        if self.chat_lm_rows is not None:
            _check_count("chat_lm_rows", self.chat_lm_rows)
            if self.chat_lm_rows > self.chat_tokens:
                raise ValueError(f"chat_lm_rows ({self.chat_lm_rows}) exceed chat_tokens ({self.chat_tokens})")
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
    fresh_nonces_only: bool = False
    """The rows go to the ``new_requests`` nonces admitted now only; pending nonces wait this step (each
    continuation re-reads its cached prefix, which can cost more than the step allows). Only when the
    glue set ``StepLoad.can_start_fresh``."""

    @property
    def predicted_slowdown(self) -> float:
        """Predicted step time with PoC over chat alone (1.0 = no slowdown; inf when chat is idle)."""
        if self.predicted_chat_step_seconds <= 0:
            return math.inf
        return self.predicted_step_seconds / self.predicted_chat_step_seconds


class Governor:
    """Per-step PoC admission (see the module docstring for the rules)."""

    def __init__(self, config: GovernorConfig, model: RooflineStepTimeModel | StepTimeModel | None = None):
        self.config = config
        if model is None:
            model = (WorkStepTimeModel(config.model_shape, config.tensor_parallel) if config.model_shape is not None
                     else RooflineStepTimeModel())
        self.model = model
        self._uses_work = isinstance(model, WorkStepTimeModel)
        self.stopped_reason: str | None = None
        self._decisions = {reason.value: 0 for reason in BudgetReason}
        self._steps = 0
        self._chat_tokens = 0
        self._poc_tokens = 0
        self._seconds = 0.0
        self._poc_seconds_estimate = 0.0

    @property
    def reads_step_work(self) -> bool:
        """Whether :meth:`decide`/:meth:`observe` use a step's attention pairs, KV reads, LM rows and the
        pending nonces' progress (the work model, or a rows model told about attention keys): a glue can
        skip working them out otherwise."""
        return self._uses_work or self.config.poc_attention_keys_per_token is not None

    def _keys_per_poc_token(self) -> float:
        return self.config.poc_attention_keys_per_token or 0.0

    def _poc_work(self, tokens: int, pending_computed: tuple[int, ...] = ()) -> StepWork:
        """What ``tokens`` PoC prefill rows add to a step (no LM head): they continue the pending nonces
        (``pending_computed`` tokens done each), then start new ones; attention pairs and KV reads exact
        (Σ over the chunks: causal pairs, context after the chunk) — or, when the config sets
        ``poc_attention_keys_per_token``, that many keys per row and one KV entry per row."""
        per = self.config.poc_attention_keys_per_token
        if per is not None:
            return StepWork(tokens, tokens * per, 0, tokens)
        seq = self.config.poc_seq_len
        pairs = kv = 0
        left = tokens
        for done in pending_computed:
            if left <= 0:
                break
            n = min(max(0, seq - done), left)
            pairs += n * done + n * (n + 1) // 2
            kv += done + n
            left -= n
        whole, rest = divmod(left, seq)
        pairs += whole * (seq * (seq + 1) // 2) + rest * (rest + 1) // 2
        kv += left
        return StepWork(tokens, pairs, 0, kv)

    @staticmethod
    def _chat_work(load: StepLoad) -> StepWork:
        lm = load.chat_decode_requests if load.chat_lm_rows is None else load.chat_lm_rows
        return StepWork(load.chat_tokens, load.chat_attention_keys, lm, load.chat_kv_tokens_read)

    def stop(self, reason: str) -> None:
        """Stop PoC for good (e.g. after a crash in PoC handling); ``decide`` then returns 0."""
        self.stopped_reason = str(reason) or "stopped"

    def decide(self, load: StepLoad) -> PoCBudget:
        """The PoC budget for the step described by ``load``. Pure: no state changes."""
        if not isinstance(load, StepLoad):
            raise ValueError(f"decide expects a StepLoad, got {type(load).__name__}")
        cfg, model = self.config, self.model
        if self._uses_work:
            chat_work = self._chat_work(load)

            def poc_work(poc_tokens: int) -> StepWork:
                return self._poc_work(poc_tokens, load.poc_pending_computed)

            def predict(poc_tokens: int) -> float:
                return model.predict_work(chat_work.plus(poc_work(poc_tokens)))
        else:
            use_keys = cfg.poc_attention_keys_per_token is not None
            chat_keys = load.chat_attention_keys if use_keys else 0

            def predict(poc_tokens: int) -> float:
                return model.predict(load.chat_tokens + poc_tokens, chat_keys + poc_tokens * self._keys_per_poc_token())
        chat_seconds = predict(0) if load.chat_tokens else 0.0

        def budget(tokens: int, reason: BudgetReason, fresh: bool = False) -> PoCBudget:
            new = 0
            if fresh:
                new = math.ceil(tokens / cfg.poc_seq_len)
                step = model.predict_work(chat_work.plus(self._poc_work(tokens)))
            else:
                if tokens > load.poc_tokens_pending:
                    new = math.ceil((tokens - load.poc_tokens_pending) / cfg.poc_seq_len)
                step = predict(tokens) if load.chat_tokens + tokens else 0.0
            return PoCBudget(tokens=tokens, new_requests=new, reason=reason,
                             predicted_chat_step_seconds=chat_seconds, predicted_step_seconds=step,
                             preempt_kv_tokens=preempt, fresh_nonces_only=fresh)

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
            limits.append((self._idle_limit(load), BudgetReason.IDLE_CAP))
        else:
            allowance = self._step_allowance(chat_seconds, chat_work if self._uses_work else None) \
                - load.poc_fixed_seconds  # left for the PoC rows
            if load.poc_fixed_seconds > 0 and allowance <= 0:
                limits.append((load.probe_tokens, BudgetReason.FIXED_COST))
            elif self._uses_work:
                slo_tokens = model.max_added_within(chat_work, poc_work, allowance, cfg.confidence_z,
                                                    limit=cfg.max_batch_tokens)
                if (load.can_start_fresh and load.poc_pending_computed and admissible_new > 0
                        and len(load.poc_pending_computed) < cfg.max_pending_nonces):
                    fresh_tokens = min(admissible_new * cfg.poc_seq_len, room, model.max_added_within(
                        chat_work, self._poc_work, allowance, cfg.confidence_z, limit=cfg.max_batch_tokens))
                    # only when continuing is (nearly) impossible: nonces that are started but not finished
                    # hold KV and are lost to a preemption, so finishing comes first
                    if fresh_tokens > 4 * slo_tokens:
                        return budget(fresh_tokens, BudgetReason.SLO, fresh=True)
                limits.append((slo_tokens, BudgetReason.SLO))
            else:
                slo_tokens = model.max_added_tokens(
                    load.chat_tokens, chat_keys, self._keys_per_poc_token(), allowance, cfg.confidence_z,
                    limit=cfg.max_batch_tokens)
                limits.append((slo_tokens, BudgetReason.SLO))
        limits.append((kv_limit, BudgetReason.KV_BACKPRESSURE))
        tokens, reason = min(limits, key=lambda item: item[0])  # first of equal limits wins
        return budget(max(0, tokens), reason)

    def _step_allowance(self, chat_seconds: float, chat_work: StepWork | None) -> float:
        """Seconds PoC may add to a chat step: ``slo_overhead`` × the chat step; with ``slo_feedback`` and
        the work model, ``slo_overhead·(1 − e)`` × it, ``e`` the predicted elasticity of the chat step's
        time in its chat work (d log t / d log w, every chat row, attention pair, KV read and LM row scaled
        together). Why: at a given arrival rate a slower step lets more arrivals and longer-staying decodes
        into each later step (Little's law), so a per-step slowdown ``s`` costs TPOT about ``s/(1 − e)``."""
        cfg = self.config
        if not cfg.slo_feedback or chat_work is None or chat_seconds <= 0:
            return cfg.slo_overhead * chat_seconds
        return cfg.slo_overhead * (1 - step_elasticity(self.model.predict_work, chat_work)) * chat_seconds

    def _idle_limit(self, load: StepLoad) -> int:
        """PoC rows of a step without chat (``idle_max_tokens``, ``idle_max_seconds``)."""
        cfg, model = self.config, self.model

        def poc_work(tokens: int) -> StepWork:
            return self._poc_work(tokens, load.poc_pending_computed)

        idle = cfg.max_batch_tokens if cfg.idle_max_tokens is None else cfg.idle_max_tokens
        if cfg.idle_max_seconds == "auto":
            # only when no token cap is set and the model has found a flat part (a CPU step has none: a
            # one-token bound there would starve PoC); the mean fit: the flat part is learnt by filling it
            if cfg.idle_max_tokens is not None:
                return idle
            if self._uses_work:
                if model.memory_bound_at(self._poc_work(1)):
                    # relative to the smallest step that continues PoC at all (one row of the next nonce,
                    # which reads that nonce's cached prefix): a long prefix must not shrink idle steps to a row
                    bound = (1 + cfg.slo_overhead) * model.predict_work(poc_work(1))
                    idle = min(idle, max(1, model.max_within(bound, poc_work, 0.0, cfg.max_batch_tokens)))
            elif getattr(model, "knee_tokens", 0.0) > 0:
                keys = self._keys_per_poc_token()
                bound = (1 + cfg.slo_overhead) * model.predict(1, keys)
                idle = min(idle, max(1, model.max_tokens_within(bound, keys, 0.0, cfg.max_batch_tokens)))
        elif cfg.idle_max_seconds is not None:
            if self._uses_work:
                fitted = model.max_within(cfg.idle_max_seconds, poc_work, cfg.confidence_z, cfg.max_batch_tokens)
            else:
                fitted = model.max_tokens_within(cfg.idle_max_seconds, self._keys_per_poc_token(), cfg.confidence_z,
                                                 cfg.max_batch_tokens)
            idle = min(idle, max(1, fitted))
        return idle

    def observe(self, total_tokens: int, poc_tokens: int, step_seconds: float, attention_keys: int = 0,
                kv_tokens_read: int = 0, lm_rows: int = 0) -> None:
        """Record a finished step: ``total_tokens`` rows (``poc_tokens`` of them PoC) took ``step_seconds``.

        ``attention_keys`` (attention pairs of the whole step) is used by :class:`WorkStepTimeModel`, and by
        the rows models only when the config's ``poc_attention_keys_per_token`` is set; ``kv_tokens_read``
        (KV entries the step read; 0: one per row) and ``lm_rows`` (rows through the LM head) by
        :class:`WorkStepTimeModel` only.
        """
        _check_count("total_tokens", total_tokens)
        _check_count("poc_tokens", poc_tokens)
        _check_count("attention_keys", attention_keys)
        _check_count("kv_tokens_read", kv_tokens_read)
        _check_count("lm_rows", lm_rows)
        _check_real("step_seconds", step_seconds, strictly=True)
        if poc_tokens > total_tokens:
            raise ValueError(f"poc_tokens ({poc_tokens}) > total_tokens ({total_tokens})")
        if lm_rows > total_tokens:
            raise ValueError(f"lm_rows ({lm_rows}) > total_tokens ({total_tokens})")
        if self._uses_work:
            work = StepWork(total_tokens, attention_keys, lm_rows, kv_tokens_read or total_tokens)
            self.model.observe_work(work, step_seconds)
            poc = self._poc_work(poc_tokens)
            base = StepWork(total_tokens - poc_tokens, max(0.0, attention_keys - poc.attention_pairs), lm_rows,
                            max(0, work.kv_tokens_read - poc_tokens))
            added = self.model.added_seconds_work(base, poc) if poc_tokens else 0.0
        else:
            keys = attention_keys if self.config.poc_attention_keys_per_token is not None else 0
            self.model.observe(total_tokens, step_seconds, keys)
            keys_per_token = self._keys_per_poc_token()
            added = self.model.added_seconds(total_tokens - poc_tokens, keys - poc_tokens * keys_per_token, poc_tokens,
                                             poc_tokens * keys_per_token)
        self._steps += 1
        self._chat_tokens += total_tokens - poc_tokens
        self._poc_tokens += poc_tokens
        self._seconds += step_seconds
        self._poc_seconds_estimate += min(step_seconds, max(0.0, added))

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
            "model": self.model.summary(),
            "config": asdict(self.config),
        }
