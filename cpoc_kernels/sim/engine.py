"""Discrete-event continuous batching with chat and PoC, driven by the package's real admission code.

One :func:`simulate` call runs one chat trace on one engine preset, step by step: arrivals join a
waiting queue; each step the scheduler fills a token budget (``max_batch_tokens``) — running requests
first (a decode row each, or their next prefill chunk), then waiting requests (FCFS, or by priority) —
within ``max_num_seqs`` requests and the KV slots (a request holds one slot per token in its cache; when
a running request cannot grow, the newest / lowest-priority running request is preempted and later
recomputed from scratch). The step's true duration comes from the preset's :class:`StepCurve`; what the
governor measures is that time × log-normal jitter × rare spikes (GC pauses, graph captures), which
the engine clock does not carry (they would hit the PoC-on and PoC-off runs alike).

PoC paths (``path``):

* ``"hf"``: the HF glue's way (:mod:`cpoc_kernels.integrations.hf`): chat is scheduled first as if PoC
  did not exist; then :meth:`Governor.decide` gets the step's :class:`StepLoad` and returns how many PoC
  tokens join the step and how many nonces to admit (and the KV to free by preempting PoC when chat
  waits for it); PoC rows go into what is left. The glue feeds :meth:`Governor.observe` at most one step
  per ``observe_interval`` (measured time).
* ``"vllm"``: vLLM's stock scheduler sees PoC nonces as ordinary requests (prefill of ``seq_len`` tokens,
  one output token; ``policy="priority"`` gives them a lower priority than chat); the client-side
  :class:`~cpoc_kernels.integrations.vllm.client.PoCAdmission` decides how many to submit from the
  workers' step log, polled every ``poll_seconds`` or when a nonce finishes (as ``AsyncCpoc.run`` does).

The same :class:`Governor` objects the engines use are called; none of their logic is copied here.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cpoc_kernels.cost import DEFAULT_SEQ_LEN, attention_key_pairs
from cpoc_kernels.governor import Governor, GovernorConfig, StepLoad
from cpoc_kernels.step_model import WorkStepTimeModel
from cpoc_kernels.step_model.common import largest_fitting
from cpoc_kernels.step_work import step_elasticity

from .hardware import EnginePreset, StepWork
from .workload import ChatArrival

PATHS = ("hf", "vllm")
POLICIES = ("fcfs", "priority")
MODELS = ("work", "rows", "oracle")


@dataclass
class _Request:
    rid: int
    arrival: float
    prompt_len: int
    output_len: int
    poc: bool = False
    target: int = 0  # tokens to prefill (the prompt; after a preemption: everything it had)
    computed: int = 0  # tokens in its KV cache
    generated: int = 0
    first_token: float | None = None
    finish: float | None = None

    def __post_init__(self) -> None:
        self.target = self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target

    def need(self) -> int:
        return self.target - self.computed if self.prefilling else 1


@dataclass
class StepRecord:
    """One simulated step: start (s), true duration (s), chat and PoC rows, free PoC capacity (rows; per
    step and end to end, see ``_Engine._capacity``)."""

    start: float
    seconds: float
    chat_tokens: int
    poc_tokens: int
    capacity: int = 0
    capacity_end_to_end: int = 0


@dataclass
class RunResult:
    """What one simulation run produced."""

    chat: list[_Request]
    steps: list[StepRecord]
    nonces_done: int
    poc_tokens: int
    duration: float
    preemptions_chat: int
    preemptions_poc: int
    governor_stats: dict | None = None

    def ttft(self) -> np.ndarray:
        return np.array([r.first_token - r.arrival for r in self.chat])

    def tpot(self) -> np.ndarray:
        return np.array([(r.finish - r.first_token) / (r.output_len - 1) for r in self.chat if r.output_len > 1])


@dataclass
class SimConfig:
    """Knobs of one run (defaults: the glue's and vLLM's defaults where they exist)."""

    path: str = "hf"
    poc: bool = True
    policy: str = "fcfs"
    seq_len: int = DEFAULT_SEQ_LEN
    slo_overhead: float = 0.05
    governor_options: dict = field(default_factory=dict)
    observe_interval: float = 0.02
    poll_seconds: float = 0.05
    max_in_flight: int = 64
    model: str = "work"  # hf path: "work" (the glue reports bytes/FLOPs inputs and the model shape) | "rows"
    # | "oracle" (the true curve, for the bound a perfect model reaches)
    long_prefill_token_threshold: int = 0  # vLLM's cap on one request's chunk per step (0: none)
    jitter: float = 0.02
    spike_probability: float = 0.002
    spike_factor: float = 5.0
    seed: int = 0
    max_steps: int = 2_000_000

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")


class _Engine:
    def __init__(self, preset: EnginePreset, trace: list[ChatArrival], cfg: SimConfig):
        self.p, self.cfg, self.curve = preset, cfg, preset.curve
        self.kv_capacity = preset.kv_tokens
        self.kv_used = 0
        self.now = 0.0
        self.arrivals = deque(_Request(i, a.arrival, a.prompt_len, a.output_len) for i, a in enumerate(trace))
        self.chat = list(self.arrivals)
        self.running: list[_Request] = []
        self.waiting: list[_Request] = []
        self.poc_running: list[_Request] = []  # hf path: admitted PoC nonces (the glue's own list)
        self.steps: list[StepRecord] = []
        self.nonces_done = self.poc_tokens = 0
        self.preempt_chat = self.preempt_poc = 0
        self.rng = np.random.default_rng(cfg.seed + 7919)
        self.next_rid = len(self.chat)
        self.governor: Governor | None = None
        self.admission: PoCAdmission | None = None  # noqa: F821 (imported where the vllm path needs it)
        gcfg = dict(max_batch_tokens=preset.max_batch_tokens, kv_tokens_capacity=self.kv_capacity,
                    poc_seq_len=cfg.seq_len, slo_overhead=cfg.slo_overhead)
        if cfg.poc and cfg.path == "hf":
            if cfg.model != "rows":  # the glue knows the model's config and its tensor-parallel group
                gcfg.update(model_shape=preset.curve.shape, tensor_parallel=preset.curve.tensor_parallel)
            oracle = OracleStepTimeModel(preset.curve) if cfg.model == "oracle" else None
            self.governor = Governor(GovernorConfig(**gcfg, **cfg.governor_options), oracle)
        if cfg.poc and cfg.path == "vllm":
            # imported here: the vLLM client module pulls in torch, which `cpoc --help` must not
            from cpoc_kernels.integrations.vllm.client import PoCAdmission

            self.admission = PoCAdmission(GovernorConfig(**gcfg, **cfg.governor_options))
        self.next_observe = 0.0
        self.next_poll = 0.0
        self.step_log: deque[dict] = deque(maxlen=64)
        self.n_logged = 0
        self.last_step_start: float | None = None
        self.idle_bound_cache: int | None = None

    # ------------------------------------------------------------------------------ KV and requests
    def _free(self, req: _Request) -> None:
        self.kv_used -= req.computed

    def _preempt(self, req: _Request) -> None:
        """Recompute preemption: drop its KV; it prefills everything it had again later."""
        self._free(req)
        req.target = req.prompt_len + req.generated if not req.poc else req.prompt_len
        req.computed = 0
        if req.poc:
            self.preempt_poc += 1
        else:
            self.preempt_chat += 1

    def _victim(self, pool: list[_Request]) -> _Request:
        if self.cfg.policy == "priority":
            return max(pool, key=lambda r: (r.poc, r.arrival))
        return pool[-1]

    def _schedule(self, running: list[_Request], waiting: list[_Request], budget: int, max_seqs: int,
                  cap: int = 0) -> tuple[list[tuple[_Request, int]], bool]:
        """vLLM-style pass: running first, then waiting (``waiting`` is kept in policy order).
        Returns the scheduled (request, tokens) and whether a preemption happened."""
        scheduled: list[tuple[_Request, int]] = []
        preempted = False
        left = budget
        i = 0
        while i < len(running) and left > 0:
            req = running[i]
            n = min(req.need(), left)
            if req.prefilling and cap:
                n = min(n, cap)
            while self.kv_used + n > self.kv_capacity:
                pool = [r for r in running if r is not req and all(r is not s for s, _ in scheduled)]
                victim = self._victim(pool) if pool else req
                running.remove(victim)
                self._preempt(victim)
                waiting.insert(0, victim)
                preempted = True
                if victim is req:
                    break
            else:
                self.kv_used += n
                scheduled.append((req, n))
                left -= n
                i += 1
                continue
            # req itself was preempted: running[i] is now the next request
        if not preempted:
            while waiting and left > 0 and len(running) < max_seqs:
                req = waiting[0]
                n = min(req.need(), left)
                if cap:
                    n = min(n, cap)
                if self.kv_used + n > self.kv_capacity:
                    break
                waiting.pop(0)
                running.append(req)
                self.kv_used += n
                scheduled.append((req, n))
                left -= n
        return scheduled, preempted

    def _enqueue(self, req: _Request) -> None:
        if self.cfg.policy == "priority" and req.poc is False:  # chat ahead of every PoC request
            k = next((i for i, r in enumerate(self.waiting) if r.poc), len(self.waiting))
            self.waiting.insert(k, req)
        else:
            self.waiting.append(req)

    # ------------------------------------------------------------------------------ step time
    def _work(self, scheduled: list[tuple[_Request, int]], hf_poc: bool) -> tuple[StepWork, int, int]:
        tokens = pairs = lm = kv_read = chat_tokens = poc_tokens = 0
        for req, n in scheduled:
            start = req.computed  # tokens in its cache before this step
            tokens += n
            pairs += attention_key_pairs(n, start)
            kv_read += start + n
            if not req.poc or not hf_poc:
                if start + n >= req.target:  # samples a token
                    lm += 1
            if req.poc:
                poc_tokens += n
            else:
                chat_tokens += n
        return StepWork(tokens, pairs, lm, kv_read), chat_tokens, poc_tokens

    def _chat_only_work(self, scheduled) -> StepWork:
        return self._work([(r, n) for r, n in scheduled if not r.poc], True)[0]

    def _capacity(self, chat_work: StepWork) -> tuple[int, int]:
        """Free PoC capacity of a step (true curve, PoC tokens of fresh nonces): the largest addition keeping
        the step within 1 + slo of chat alone; for a step without chat, the idle bound (≤ (1 + slo) × a
        one-token step). Second, the end-to-end capacity: within 1 + slo·(1 − e) for a chat step, ``e`` the
        true elasticity of the chat step in its own work (what a per-step addition costs TPOT once more
        chat piles into later steps; see ``Governor._step_allowance``); the same idle bound."""
        budget = self.p.max_batch_tokens
        keys_per = (self.cfg.seq_len + 1) / 2
        slo = self.cfg.slo_overhead

        def with_poc(x: int, base: StepWork) -> float:
            return self.curve.seconds(StepWork(base.tokens + x, base.attention_pairs + int(x * keys_per),
                                               base.lm_rows, base.kv_tokens_read + x))

        if chat_work.tokens == 0:
            if self.idle_bound_cache is None:
                empty = StepWork(0, 0, 0, 0)
                limit = (1 + slo) * with_poc(1, empty)
                self.idle_bound_cache = largest_fitting(lambda x: with_poc(x, empty) <= limit, budget)
            return self.idle_bound_cache, self.idle_bound_cache
        alone = self.curve.seconds(chat_work)
        elasticity = step_elasticity(self.curve.seconds, chat_work)  # the governor's definition, on the truth
        room = budget - chat_work.tokens
        per_step = largest_fitting(lambda x: with_poc(x, chat_work) <= (1 + slo) * alone, room)
        end_to_end = largest_fitting(lambda x: with_poc(x, chat_work) <= (1 + slo * (1 - elasticity)) * alone, room)
        return per_step, end_to_end

    def _measured(self, seconds: float) -> float:
        noisy = seconds * math.exp(self.cfg.jitter * self.rng.standard_normal())
        if self.rng.random() < self.cfg.spike_probability:
            noisy *= self.cfg.spike_factor
        return noisy

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        cfg = self.cfg
        finished_chat = 0
        n_chat = len(self.chat)
        for _ in range(cfg.max_steps):
            if finished_chat >= n_chat:
                break
            while self.arrivals and self.arrivals[0].arrival <= self.now:
                self._enqueue(self.arrivals.popleft())
            if cfg.path == "vllm" and self.admission is not None:
                self._client_admission()
            if cfg.path == "hf":
                scheduled = self._step_hf()
            else:
                scheduled, _ = self._schedule(self.running, self.waiting, self.p.max_batch_tokens,
                                              self.p.max_num_seqs, cfg.long_prefill_token_threshold)
            if not scheduled:
                nxt = [self.arrivals[0].arrival] if self.arrivals else []
                if self.admission is not None:
                    nxt.append(self.next_poll)
                if not nxt:
                    raise RuntimeError("simulation stalled: nothing scheduled and nothing to wait for")
                self.now = max(self.now, min(nxt))
                continue
            work, chat_q, poc_q = self._work(scheduled, cfg.path == "hf")
            seconds = self.curve.seconds(work)
            capacity, capacity_e2e = self._capacity(self._chat_only_work(scheduled)) if cfg.poc else (0, 0)
            start = self.now
            self.now += seconds
            self.steps.append(StepRecord(start, seconds, chat_q, poc_q, capacity, capacity_e2e))
            self.poc_tokens += poc_q
            measured = self._measured(seconds)
            nonce_done = False
            for req, n in scheduled:
                req.computed += n
                if req.prefilling:
                    continue
                req.generated += 1  # a decode row, or the last prefill chunk's last position, samples a token
                if req.first_token is None:
                    req.first_token = self.now
                if req.generated >= req.output_len:
                    req.finish = self.now
                    self._free(req)
                    if req.poc:
                        self.nonces_done += 1
                        nonce_done = True
                        (self.poc_running if cfg.path == "hf" else self.running).remove(req)
                    else:
                        finished_chat += 1
                        self.running.remove(req)
            if self.governor is not None and start >= self.next_observe:
                self.next_observe = start + cfg.observe_interval
                self.governor.observe(work.tokens, poc_q, measured, attention_keys=work.attention_pairs,
                                      kv_tokens_read=work.kv_tokens_read, lm_rows=work.lm_rows)
            if cfg.path == "vllm":
                since = measured if self.last_step_start is None else max(measured, start - self.last_step_start)
                self.last_step_start = start
                self.step_log.append({"rows": work.tokens, "poc_rows": poc_q, "seconds_since_previous": since})
                self.n_logged += 1
                if nonce_done:
                    self.next_poll = self.now
        else:
            raise RuntimeError(f"simulation did not finish in {cfg.max_steps} steps")
        duration = max((r.finish for r in self.chat), default=self.now)
        stats = self.governor.stats() if self.governor else (self.admission.governor.stats() if self.admission else None)
        return RunResult(self.chat, self.steps, self.nonces_done, self.poc_tokens, duration, self.preempt_chat,
                         self.preempt_poc, stats)

    def _new_nonce(self) -> _Request:
        req = _Request(self.next_rid, self.now, self.cfg.seq_len, 1, poc=True)
        self.next_rid += 1
        return req

    def _step_hf(self) -> list[tuple[_Request, int]]:
        """Chat first (PoC hidden), then the governor's PoC share, as the HF glue schedules a step."""
        p, gov = self.p, self.governor
        chat, _ = self._schedule(self.running, self.waiting, p.max_batch_tokens, p.max_num_seqs)
        if gov is None:
            return chat

        def load(chat_sched) -> StepLoad:
            chat_q = sum(n for _, n in chat_sched)
            decode = sum(1 for r, _ in chat_sched if not r.prefilling)
            work = self._work(chat_sched, True)[0]
            head = self.waiting[0].need() + 1 if self.waiting else 0
            return StepLoad(chat_tokens=chat_q, kv_tokens_free=max(0, self.kv_capacity - self.kv_used),
                            chat_decode_requests=decode, chat_prefill_tokens=chat_q - decode,
                            waiting_chat_requests=len(self.waiting),
                            poc_tokens_pending=sum(r.target - r.computed for r in self.poc_running),
                            poc_kv_tokens_held=sum(r.computed for r in self.poc_running),
                            waiting_chat_kv_tokens=head, chat_attention_keys=work.attention_pairs,
                            chat_kv_tokens_read=work.kv_tokens_read, chat_lm_rows=work.lm_rows,
                            poc_pending_computed=tuple(r.computed for r in self._continuation_order()),
                            can_start_fresh=True)

        if self.waiting and self.poc_running:  # chat short of room while PoC holds KV: the glue preempts PoC
            want = gov.decide(load(chat)).preempt_kv_tokens
            freed = 0
            for req in reversed(list(self.poc_running)):
                if freed >= want:
                    break
                if req.computed == 0:
                    continue
                freed += req.computed
                self._preempt(req)
                self.poc_running.remove(req)
            if freed:
                used = sum(n for _, n in chat)
                more, _ = self._schedule([], self.waiting, p.max_batch_tokens - used, p.max_num_seqs - len(self.running))
                for r, _ in more:
                    self.running.append(r)
                chat += more
        budget = gov.decide(load(chat))
        gov.record(budget)
        fresh = [self._new_nonce() for _ in range(budget.new_requests)]
        self.poc_running.extend(fresh)
        chat_q = sum(n for _, n in chat)
        left = min(budget.tokens, p.max_batch_tokens - chat_q)
        seqs_left = p.max_num_seqs - len(chat)
        poc = []
        for req in (fresh if budget.fresh_nonces_only else self._continuation_order()):
            if left <= 0 or seqs_left <= 0:
                break
            n = min(req.need(), left, max(0, self.kv_capacity - self.kv_used))
            if n <= 0:
                break
            self.kv_used += n
            poc.append((req, n))
            left -= n
            seqs_left -= 1
        return chat + poc

    def _continuation_order(self) -> list[_Request]:
        """Admitted nonces with rows left, cheapest to continue first (the least computed: the shortest
        cached prefix to re-read); ties in admission order."""
        return sorted((r for r in self.poc_running if r.prefilling), key=lambda r: r.computed)

    def _client_admission(self) -> None:
        """``AsyncCpoc.run``'s loop: when due, ask :class:`PoCAdmission` with the workers' stats, submit."""
        if self.now < self.next_poll:
            return
        self.next_poll = self.now + self.cfg.poll_seconds
        in_flight = [r for r in self.running + self.waiting if r.poc]
        stats = {"steps": self.n_logged, "recent_steps": list(self.step_log),
                 "pending_tokens": sum(r.target - r.computed for r in in_flight), "in_flight": len(in_flight)}
        room = self.cfg.max_in_flight - len(in_flight)
        room = min(room, max(self.admission.admit(stats), 1 if not in_flight else 0))
        for _ in range(max(0, room)):
            self._enqueue(self._new_nonce())


def simulate(preset: EnginePreset, trace: list[ChatArrival], config: SimConfig | None = None) -> RunResult:
    """Run ``trace`` on ``preset`` (see the module docstring); returns chat latencies, steps and PoC output."""
    return _Engine(preset, trace, config or SimConfig()).run()


class OracleStepTimeModel(WorkStepTimeModel):
    """The simulator's *true* step-time curve behind the governor's model interface (no noise, no
    learning): what a perfect model would let the governor do — the bound the learnt model is measured
    against. Uncertainty 0, so ``confidence_z`` has no effect."""

    def __init__(self, curve):
        super().__init__(curve.shape, curve.tensor_parallel)
        self._true = curve

    def observe_work(self, work: StepWork, step_seconds: float) -> None:
        self.n_observations += 1

    def predict_work(self, work: StepWork) -> float:
        return self._true.seconds(work)

    def predict_work_upper(self, work: StepWork, z: float) -> float:
        return self._true.seconds(work)

    def added_seconds_work(self, base: StepWork, added: StepWork, z: float = 0.0) -> float:
        return self._true.seconds(base.plus(added)) - self._true.seconds(base)

    def memory_bound_at(self, work: StepWork) -> bool:
        return True

    def summary(self) -> dict:
        return {"kind": "oracle", "observations": self.n_observations}
