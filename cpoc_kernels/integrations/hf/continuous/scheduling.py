"""Scheduling: chat first, the governor's PoC budget, PoC admission and preemption (engine thread).

Owns: the wrappers of the engine scheduler's ``schedule_batch`` / ``has_pending_requests``, the governor instance's
construction and its per-step dialogue (:class:`~cpoc_kernels.governor.StepLoad` → budget), admitting prepared
nonces as engine requests, preempting in-flight PoC nonces when chat is short of KV, and the step clock (closing a
step: counters, the fixed-cost estimate, subsampled ``observe`` jobs for the governor's step-time fit), and the
work figures of a step the governor's step-time model reads (attention pairs, KV entries read, LM-head rows of the
scheduled requests: :func:`step_work_figures`).

A step is scheduled as: chat with the whole token budget as if PoC did not exist; if chat is short of KV while PoC
holds some, the governor may ask for preemption (PoC nonces are dropped and re-queued, the engine never offloads
chat for PoC); then the governor decides how many PoC tokens join and how many new nonces are admitted, and PoC
requests are scheduled only into what is left (the engine's own scheduler, run over the PoC requests alone: in-flight
nonces first, oldest first; or, when the budget says ``fresh_nonces_only``, over the nonces admitted now alone). The
measured fixed cost of a step carrying PoC rows is charged to the SLO allowance first; while it vetoes PoC in chat
steps, every ``probe_every``-th such step may carry ``small_poc_rows`` rows so the measurement stays current.

May not: touch the model's forward (it only arms/disarms the hooks) or the output stage; engine access only through
:class:`~.engine.CBInternals`.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from cpoc_kernels.cost import ModelShape, attention_key_pairs
from cpoc_kernels.governor import BudgetReason, Governor, GovernorConfig, StepLoad, StepTimeModel

from .engine import Patches
from .hooks import ForwardHooks
from .state import SharedState, StepClock

SMALL_POC_ROWS = 8  # a probe step's PoC rows (and the chat steps the fixed-cost estimate is taken from)
PROBE_EVERY = 50  # fixed-cost vetoes between two probes


def _merge(a, b):
    """Concatenate two (requests, decode_fast_path, q_tokens, kv_read) schedules (a first)."""
    if not b[0]:
        return a
    if not a[0]:
        return b
    return list(a[0]) + list(b[0]), a[1] and b[1], a[2] + b[2], a[3] + b[3]


def step_work_figures(cb, batch, is_poc: Callable[[str], bool]) -> tuple[int, int, int]:
    """(attention pairs, KV entries read, LM-head rows) of the scheduled requests ``batch`` (future states, before
    the batch is prepared): a request computing ``n`` rows from context position ``s`` attends over
    ``attention_key_pairs(n, s)`` causal pairs and reads ``s + n`` KV entries; a chat request goes through the LM
    head once when it samples a token (decode, or a chunk that finishes its prompt), a PoC request never."""
    keys = kv = lm = 0
    for fs in batch:
        start, n = cb.query_span(fs)
        keys += attention_key_pairs(n, start)
        kv += start + n
        if cb.has_new_token(fs) and not is_poc(cb.request_id(fs)):
            lm += 1
    return keys, kv, lm


class PoCScheduler:
    """Wraps the engine scheduler of every batch processor of one manager."""

    def __init__(self, shared: SharedState, hooks: ForwardHooks, patches: Patches, *, mode: str,
                 slo_overhead: float, governor_options: dict, step_time_model: StepTimeModel | None,
                 observe_interval: float, small_poc_rows: int = SMALL_POC_ROWS, probe_every: int = PROBE_EVERY,
                 model_shape: ModelShape | None = None):
        self.shared, self.hooks, self.patches = shared, hooks, patches
        self.model_shape = model_shape  # the governor's GovernorConfig.model_shape unless set otherwise (see below)
        self.mode, self.slo_overhead = mode, slo_overhead
        self.governor_options = governor_options
        self.step_time_model = step_time_model
        self.observe_interval = observe_interval
        self.small_poc_rows, self.probe_every = small_poc_rows, probe_every
        self._next_observe = 0.0
        self.poc_step_overhead: float | None = None  # EWMA of PoC's cost per step on the engine thread (all)
        self._poc_small_overhead: float | None = None  # the same over chat steps with few PoC rows (fixed part)
        self._vetoes_since_probe = 0
        self._chat_step_ewma: float | None = None  # EWMA of the time of steps with chat rows and no PoC row

    def wrap(self, bp) -> None:
        """Install the wrappers on ``bp``'s scheduler (once)."""
        self.shared.cb.wrap_scheduler(self.patches, bp, lambda sched, original: self._make_schedule(sched, bp, original),
                                      lambda sched, original: self._make_has_pending(original))

    def fixed_cost(self) -> float | None:
        """Measured PoC cost (s) of a step carrying a few PoC rows beside chat (its fixed part), or of all PoC
        steps until there is such a step (an overestimate); None before any PoC step."""
        small = self._poc_small_overhead
        return small if small is not None else self.poc_step_overhead

    # ------------------------------------------------------------------ engine loop
    def _make_has_pending(self, original):
        sh = self.shared

        def has_pending_requests() -> bool:
            # the engine loop asks this first thing after a step: the step scheduled last is over
            if sh.clock is not None:
                self._close_step(time.perf_counter())
            if original():
                return True
            try:
                return (sh.running and sh.failed is None and not sh.cb.stopping()
                        and (bool(sh.prepared) or not sh.round["exhausted"]))
            except Exception:  # noqa: BLE001
                return False

        return has_pending_requests

    def _make_schedule(self, sched, bp, original):
        sh, cb = self.shared, self.shared.cb

        def schedule_batch(token_budget: int, cache_budget: int):
            t0 = time.perf_counter()
            if sh.clock is not None:
                self._close_step(t0)
            if not sh.engaged():
                self.hooks.disarm()
                return original(token_budget, cache_budget)
            is_poc = sh.tracker.is_poc_request
            max_requests = cb.max_requests(sched)
            # 1. chat first, with the whole budget, as if PoC did not exist (no PoC request in the scheduler:
            #    nothing to hide)
            poc_in_flight = len(sh.tracker) > 0
            chat, waiting, head, starved = self._pass(sched, original, (lambda r: not is_poc(r)) if poc_in_flight
                                                      else None, token_budget, cache_budget, max_requests)
            t_extra = time.perf_counter()
            result = chat
            try:
                # 1b. chat short of KV while PoC holds some: preempt PoC nonces (re-queued), schedule more chat
                if poc_in_flight and (chat[0] is None or starved or waiting) and self._preempt_for_chat(
                        sched, bp, chat, waiting, head, starved):
                    if chat[0] is None:
                        chat, waiting, head, starved = self._pass(sched, original, lambda r: not is_poc(r),
                                                                  token_budget, cache_budget, max_requests)
                    else:
                        done = {cb.request_id(fs) for fs in chat[0]}
                        more, waiting, head, starved = self._pass(
                            sched, original, lambda r: not is_poc(r) and r not in done, token_budget - chat[2],
                            max(0, cache_budget - chat[3]), max_requests - len(chat[0]))
                        if more[0] is not None:
                            chat = _merge(chat, more)
                if chat[0] is None:
                    return chat
                result = self._schedule_poc(sched, bp, original, chat, token_budget, cache_budget, waiting,
                                            head, starved)
                return result
            except Exception as exc:  # noqa: BLE001
                sh.fail(exc, "schedule")
                cb.set_starved(sched, starved)
                result = chat
                return chat
            finally:
                chat_q = int(chat[2]) if chat[0] else 0
                poc_q = int(result[2]) - chat_q if result[0] else 0
                if poc_q > 0:
                    self.hooks.arm()  # before the forward: the LM-head filter must hold on every step with PoC rows
                else:
                    self.hooks.disarm()
                if result[0]:
                    # the work figures of a step the governor will observe (computed now: the batch's preparation
                    # advances the requests' positions)
                    work = None
                    if t0 >= self._next_observe:  # only worked out when the governor's model reads them
                        reads = sh.governor is not None and sh.governor.reads_step_work
                        work = step_work_figures(cb, result[0], is_poc) if reads else (0, 0, 0)
                    sh.clock = StepClock(t0, chat_q, poc_q, time.perf_counter() - t_extra, work=work)

        return schedule_batch

    def _pass(self, sched, original, visible: Callable[[str], bool] | None, token_budget: int, cache_budget: int,
              max_requests: int):
        """One call of the engine's own scheduler with only ``visible`` requests present.
        Returns (schedule, waiting requests left, head of the waiting queue, starved requests). ``visible`` None:
        all requests."""
        cb = self.shared.cb

        def outcome(result):
            waiting, head = cb.waiting(sched)
            return result, waiting, head, cb.starved(sched)

        if visible is None and max_requests == cb.max_requests(sched):  # the engine's own call, as is
            return outcome(original(token_budget, cache_budget))
        hidden = cb.hide(sched, visible) if visible is not None else ({}, {}, [])
        saved = cb.max_requests(sched)
        cb.set_max_requests(sched, max_requests)
        try:
            return outcome(original(token_budget, cache_budget))
        finally:
            cb.set_max_requests(sched, saved)
            cb.restore(sched, hidden)

    # ------------------------------------------------------------------ governor dialogue
    def _ensure_governor(self, cache) -> Governor:
        sh = self.shared
        if sh.governor is None:
            capacity, _ = sh.cb.kv_tokens(cache)
            options = dict(self.governor_options)
            if self.model_shape is not None and self.step_time_model is None:
                # the work (roofline) step-time model; a user's step_time_model or model_shape option wins
                options.setdefault("model_shape", self.model_shape)
            config = GovernorConfig(max_batch_tokens=sh.cb.max_batch_tokens(cache), kv_tokens_capacity=capacity,
                                    mode=self.mode, slo_overhead=self.slo_overhead,
                                    poc_seq_len=sh.round["seq_len"], **options)
            sh.governor = Governor(config, self.step_time_model)
            if sh.failed is not None:
                sh.governor.stop(sh.failed)
        return sh.governor

    def _load(self, bp, chat, waiting, head, starved) -> StepLoad:
        sh, cb = self.shared, self.shared.cb
        tracker, page = sh.tracker, cb.page_size()
        chat_batch, _, chat_q, _ = chat
        chat_batch = chat_batch or []
        _, kv_free = cb.kv_tokens(cb.cache(bp))
        decode_reqs = sum(1 for fs in chat_batch if cb.is_decode(fs))

        def pages(n: int) -> int:
            return -(-int(n) // page) * page

        need = sum(pages(n) for _, n in starved)
        if head is not None:
            need += pages(cb.remaining_prefill(head) + 1)
        in_flight = [st for st in tracker.states() if not st.done]
        held = sum(pages(st.computed) for st in in_flight)
        # the progress of the nonces with rows left, in the order the PoC pass continues them: the engine's own
        # scheduler over the PoC requests alone takes them in its candidate order (started ones in the order they
        # first ran, then the waiting queue: FIFO, oldest first); a nonce it does not hold (yet) last
        pending, keys, kv_read, lm_rows = (), 0, 0, 0
        if sh.governor is not None and sh.governor.reads_step_work:  # a rows model reads none of this: skip it
            order = {rid: i for i, rid in enumerate(cb.request_order(cb.scheduler(bp)))}
            rows_left = [st for st in in_flight if st.computed < tracker.seq_len]
            rows_left.sort(key=lambda st: order.get(st.request_id, len(order)))  # stable: ties in admission order
            pending = tuple(st.computed for st in rows_left)
            keys, kv_read, lm_rows = step_work_figures(cb, chat_batch, tracker.is_poc_request)
        return StepLoad(chat_tokens=int(chat_q), kv_tokens_free=max(0, kv_free), chat_decode_requests=decode_reqs,
                        chat_prefill_tokens=int(chat_q) - decode_reqs, waiting_chat_requests=waiting,
                        poc_tokens_pending=tracker.pending_tokens, poc_kv_tokens_held=held,
                        waiting_chat_kv_tokens=need, chat_attention_keys=keys, chat_kv_tokens_read=kv_read,
                        chat_lm_rows=lm_rows, poc_pending_computed=pending, poc_fixed_seconds=self.fixed_cost() or 0.0,
                        probe_tokens=self.small_poc_rows if self._vetoes_since_probe >= self.probe_every else 0,
                        can_start_fresh=True)  # _schedule_poc honours PoCBudget.fresh_nonces_only

    def _preempt_for_chat(self, sched, bp, chat, waiting, head, starved) -> bool:
        """Free the KV the governor asks for by preempting in-flight PoC nonces (newest first); True if any."""
        sh, cb = self.shared, self.shared.cb
        governor = self._ensure_governor(cb.cache(bp))
        load = self._load(bp, chat, waiting, head, starved)
        with sh.gov_lock:
            budget = governor.decide(load)
        want = int(getattr(budget, "preempt_kv_tokens", 0) or 0)
        if want <= 0:
            return False
        page = cb.page_size()
        victims, freed = [], 0
        for st in reversed(sh.tracker.states()):
            if freed >= want:
                break
            if st.done or st.computed == 0:
                continue
            victims.append(st)
            freed += -(-st.computed // page) * page
        if not victims:
            return False
        cb.preempt(sched, [st.request_id for st in victims])
        for st in victims:
            state = sh.tracker.finish(st.request_id)
            if state is not None and state.inputs is not None:
                sh.prepared.appendleft((state.nonce, state.inputs))  # re-admitted first, from scratch
        sh.counters["nonces_preempted"] += len(victims)
        sh.counters["poc_tokens_discarded"] += sum(st.computed for st in victims)
        return True

    def _schedule_poc(self, sched, bp, original, chat, token_budget, cache_budget, waiting, head, starved):
        sh, cb = self.shared, self.shared.cb
        tracker = sh.tracker
        chat_batch, _, chat_q, chat_kv = chat
        fixed, chat_step = self.fixed_cost(), self._chat_step_ewma
        if (self.mode == "fill" and chat_q > 0 and fixed is not None and chat_step is not None
                and fixed >= self.slo_overhead * chat_step and len(sh.prepared) > 0
                and self._vetoes_since_probe < self.probe_every):
            # fast path of the governor's fixed-cost rule (measured chat step time instead of the fit): PoC's
            # fixed per-step cost alone exceeds the SLO allowance of a chat step, so skip building the load
            sh.counters["fixed_cost_vetoes"] += 1
            self._vetoes_since_probe += 1
            cb.set_starved(sched, starved)
            return chat
        governor = self._ensure_governor(cb.cache(bp))
        load = self._load(bp, chat, waiting, head, starved)
        with sh.gov_lock:
            budget = governor.decide(load)
            governor.record(budget)
        admitted: list[str] = []
        if sh.running and sh.failed is None and budget.new_requests > 0 and not cb.stopping():
            admitted = self._admit(sched, budget.new_requests)
        if budget.reason == BudgetReason.FIXED_COST:
            if budget.tokens > 0:
                self._vetoes_since_probe = 0
                sh.counters["fixed_cost_probes"] += 1
            else:
                self._vetoes_since_probe += 1
                sh.counters["fixed_cost_vetoes"] += 1
        if budget.fresh_nonces_only:
            # the rows go to the nonces admitted now only: the pending ones wait (continuing one re-reads its
            # cached prefix, which can cost more than the step allows); none admitted: no PoC row this step
            fresh = frozenset(admitted)
            visible = fresh.__contains__
            room = len(fresh) * tracker.seq_len
            if fresh:
                sh.counters["fresh_only_steps"] += 1
        else:
            visible, room = tracker.is_poc_request, tracker.pending_tokens
        tokens = min(budget.tokens, token_budget - chat_q, room)
        requests_left = cb.max_requests(sched) - len(chat_batch)
        if tokens <= 0 or requests_left <= 0 or sh.failed is not None:
            cb.set_starved(sched, starved)
            return chat
        # 2. PoC only into what is left (in-flight nonces first: FIFO over active, then waiting; or the fresh
        #    nonces alone)
        poc, _, _, poc_starved = self._pass(sched, original, visible, tokens, max(0, cache_budget - chat_kv),
                                            requests_left)
        # the engine may offload starved requests: report chat's only, so it never evicts chat for PoC
        cb.set_starved(sched, starved)
        if not poc[0]:
            return chat
        return _merge(chat, poc)

    def _admit(self, sched, n: int) -> list[str]:
        """Admit up to ``n`` prepared nonces (inputs made by the worker) as engine requests; their request ids."""
        sh, cb = self.shared, self.shared.cb
        tracker = sh.tracker
        placeholder = [0] * tracker.seq_len
        ids: list[str] = []
        while len(ids) < n:
            try:
                nonce, emb = sh.prepared.popleft()
            except IndexError:
                break
            rid = tracker.request_id_for(nonce)
            tracker.admit(nonce, rid, emb)
            cb.add_waiting(sched, cb.new_request_state(rid, placeholder))
            ids.append(rid)
        sh.counters["nonces_admitted"] += len(ids)
        if ids and len(sh.prepared) * 2 < sh.round["prefetch"]:
            sh.jobs.put(("refill",))  # wake the worker to prepare more
        return ids

    # ------------------------------------------------------------------ step clock
    def _close_step(self, now: float) -> None:
        """Account the step scheduled last (engine thread): its time from scheduling to the engine loop's return
        (batch preparation, forward, sampling, output update), counters, the fixed-cost estimate and a
        subsample for the governor's step-time fit."""
        sh = self.shared
        clock, sh.clock = sh.clock, None
        dt = now - clock.t0
        c = sh.counters
        c["steps"] += 1
        c["poc_tokens"] += clock.poc_tokens
        c["chat_tokens"] += clock.chat_tokens
        if not clock.poc_tokens and dt > 0:
            e = self._chat_step_ewma
            self._chat_step_ewma = dt if e is None else 0.95 * e + 0.05 * dt
        if clock.poc_tokens:
            c["poc_steps"] += 1
            ovh = clock.hook_seconds + clock.sched_seconds
            self.poc_step_overhead = ovh if self.poc_step_overhead is None else (
                0.9 * self.poc_step_overhead + 0.1 * ovh)
            if clock.poc_tokens <= self.small_poc_rows and clock.chat_tokens:
                e = self._poc_small_overhead
                self._poc_small_overhead = ovh if e is None else 0.8 * e + 0.2 * ovh
        # the step-time fit costs ~0.2 ms: feed it a subsample (at most one step per observe_interval: the steps
        # scheduled with their work figures)
        total = clock.chat_tokens + clock.poc_tokens
        if sh.governor is not None and total > 0 and dt > 0 and clock.work is not None:
            self._next_observe = clock.t0 + self.observe_interval
            keys, kv_read, lm_rows = clock.work
            sh.jobs.put(("observe", total, clock.poc_tokens, dt, keys, kv_read, lm_rows))
