"""Governor and online step-time model (cpoc_kernels/governor.py) against a synthetic engine."""
from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpoc_kernels.governor import (
    BudgetReason,
    Governor,
    GovernorConfig,
    PoCBudget,
    StepLoad,
    StepTimeModel,
)

# The synthetic engine: a step of n rows takes OVERHEAD + PER_TOKEN·n seconds, times (1 + noise).
# Deliberately not the model's prior (2 ms, 10 µs), so the fit has to learn it.
OVERHEAD = 3e-3
PER_TOKEN = 25e-6
NOISE = 0.03


def true_step_seconds(tokens: int) -> float:
    return OVERHEAD + PER_TOKEN * tokens


def measured_step_seconds(tokens: int, rng: random.Random) -> float:
    return true_step_seconds(tokens) * max(0.5, 1 + rng.gauss(0, NOISE))


def config(**overrides) -> GovernorConfig:
    # idle steps unbounded unless a test says otherwise (the default "auto" bound has its own tests)
    values = dict(max_batch_tokens=4096, kv_tokens_capacity=1 << 20, poc_seq_len=1024, idle_max_seconds=None)
    values.update(overrides)
    return GovernorConfig(**values)


def ample_load(chat_tokens: int, **overrides) -> StepLoad:
    values = dict(chat_tokens=chat_tokens, kv_tokens_free=1 << 19, poc_tokens_pending=0)
    values.update(overrides)
    return StepLoad(**values)


def admissible_poc_tokens(cfg: GovernorConfig, load: StepLoad) -> int:
    """What an oracle knowing the true step time would allow (the 'idle capacity')."""
    room = cfg.max_batch_tokens - load.chat_tokens
    kv = load.kv_tokens_free - cfg.kv_reserve_tokens
    if load.chat_tokens == 0:
        slo = cfg.max_batch_tokens
    else:
        slo = math.floor(cfg.slo_overhead * true_step_seconds(load.chat_tokens) / PER_TOKEN)
    return max(0, min(room, kv, slo))


def warmed_governor(cfg: GovernorConfig, steps: int = 300, seed: int = 0) -> Governor:
    """A governor that has run ``steps`` steps of random chat load on the synthetic engine."""
    rng = random.Random(seed)
    governor = Governor(cfg)
    for _ in range(steps):
        load = ample_load(rng.choice([0, 8, 64, 300, 1000, 2500]))
        budget = governor.decide(load)
        total = load.chat_tokens + budget.tokens
        governor.observe(total, budget.tokens, measured_step_seconds(total, rng))
    return governor


# ----------------------------------------------------------------------------------------------
# StepTimeModel


def test_model_prior_before_data():
    model = StepTimeModel(prior_overhead_seconds=4e-3, prior_seconds_per_token=2e-5)
    assert model.n_observations == 0
    assert model.predict(0) == pytest.approx(4e-3)
    assert model.predict(1000) == pytest.approx(4e-3 + 1000 * 2e-5)
    # uncertain before data: the upper bound on the marginal cost is well above the mean
    assert model.marginal_seconds_per_token(z=1.0) > 1.5 * model.marginal_seconds_per_token(z=0.0)


def test_model_learns_the_engine():
    rng = random.Random(3)
    model = StepTimeModel()
    for _ in range(400):
        tokens = rng.randint(0, 4096)
        model.observe(tokens, measured_step_seconds(tokens, rng))
    assert model.overhead_seconds == pytest.approx(OVERHEAD, rel=0.1)
    assert model.seconds_per_token == pytest.approx(PER_TOKEN, rel=0.05)
    assert model.relative_noise == pytest.approx(NOISE, rel=0.5)
    # once fitted, the confidence bound is tight
    assert model.marginal_seconds_per_token(z=1.0) < 1.1 * model.marginal_seconds_per_token(z=0.0)


def test_model_is_robust_to_outlier_steps():
    rng = random.Random(4)
    model = StepTimeModel()
    for i in range(600):
        tokens = rng.randint(0, 4096)
        seconds = measured_step_seconds(tokens, rng)
        if i % 25 == 7:
            seconds *= 20  # e.g. a garbage-collection pause or a graph capture
        model.observe(tokens, seconds)
    assert model.n_outliers >= 5  # the window holds about 10 of them
    assert model.seconds_per_token == pytest.approx(PER_TOKEN, rel=0.1)
    assert model.overhead_seconds == pytest.approx(OVERHEAD, rel=0.3)
    assert model.relative_noise < 2 * NOISE


def test_model_tracks_a_change():
    rng = random.Random(5)
    model = StepTimeModel()
    for _ in range(300):
        tokens = rng.randint(0, 4096)
        model.observe(tokens, measured_step_seconds(tokens, rng))
    for _ in range(300):  # the engine gets 2× slower per token (e.g. another tenant on the GPU)
        tokens = rng.randint(0, 4096)
        model.observe(tokens, OVERHEAD + 2 * PER_TOKEN * tokens)
    assert model.seconds_per_token == pytest.approx(2 * PER_TOKEN, rel=0.1)


def test_model_separates_attention_cost():
    rng = random.Random(6)
    model = StepTimeModel()
    per_key = 2e-9
    for _ in range(800):
        tokens = rng.randint(1, 4096)
        keys = tokens * rng.randint(1, 8000)
        model.observe(tokens, (OVERHEAD + PER_TOKEN * tokens + per_key * keys) * (1 + rng.gauss(0, 0.01)), keys)
    assert model.seconds_per_token == pytest.approx(PER_TOKEN, rel=0.1)
    assert model.seconds_per_key == pytest.approx(per_key, rel=0.1)
    assert model.marginal_seconds_per_token(512) == pytest.approx(model.seconds_per_token
                                                                  + 512 * model.seconds_per_key)


def test_model_stays_uncertain_about_what_the_steps_do_not_vary():
    # every step the same size (e.g. PoC always topping the batch up to the maximum): the split between
    # overhead and per-token cost is not observed, so the marginal cost keeps the prior's uncertainty
    # (here a vague prior overhead of 50 ms ± 50 ms)
    rng = random.Random(7)
    model = StepTimeModel(prior_overhead_seconds=0.05)
    for _ in range(300):
        model.observe(4096, measured_step_seconds(4096, rng))
    assert model.predict(4096) == pytest.approx(true_step_seconds(4096), rel=0.02)
    assert model.marginal_seconds_per_token(z=1.0) > 1.5 * model.marginal_seconds_per_token(z=0.0)
    for _ in range(300):
        tokens = rng.randint(0, 4096)
        model.observe(tokens, measured_step_seconds(tokens, rng))
    assert model.marginal_seconds_per_token(z=1.0) < 1.1 * model.marginal_seconds_per_token(z=0.0)


def test_model_rejects_bad_input():
    model = StepTimeModel()
    for args in [(-1, 0.01), (10, 0.0), (10, -0.01), (10, float("nan")), (10, float("inf")), (1.5, 0.01)]:
        with pytest.raises(ValueError):
            model.observe(*args)
    with pytest.raises(ValueError):
        model.observe(10, 0.01, attention_keys=-1)
    with pytest.raises(ValueError):
        StepTimeModel(prior_seconds_per_token=0.0)
    with pytest.raises(ValueError):
        StepTimeModel(window=1)
    with pytest.raises(ValueError):
        StepTimeModel(knots=(512, 256))
    with pytest.raises(ValueError):
        StepTimeModel(knots=(0,))
    assert model.n_observations == 0


# ----------------------------------------------------------------------------------------------
# Governor rules, one at a time


def test_off_mode_and_stop_give_nothing():
    off = Governor(config(mode="off"))
    for chat in (0, 10, 4000):
        budget = off.decide(ample_load(chat))
        assert (budget.tokens, budget.new_requests, budget.reason) == (0, 0, BudgetReason.OFF)
    governor = Governor(config())
    assert governor.decide(ample_load(0)).tokens > 0
    governor.stop("IndexError in PoC readout")
    budget = governor.decide(ample_load(0))
    assert (budget.tokens, budget.reason) == (0, BudgetReason.STOPPED)
    assert governor.stats()["stopped_reason"] == "IndexError in PoC readout"


def test_idle_chat_fills_the_batch():
    cfg = config()
    governor = Governor(cfg)
    budget = governor.decide(ample_load(0))
    assert budget.tokens == cfg.max_batch_tokens
    assert budget.new_requests == cfg.max_batch_tokens // cfg.poc_seq_len
    assert budget.predicted_slowdown == math.inf
    capped = Governor(config(idle_max_tokens=1500)).decide(ample_load(0))
    assert (capped.tokens, capped.reason) == (1500, BudgetReason.IDLE_CAP)
    assert capped.new_requests == 2


def test_idle_steps_bounded_in_time():
    """idle_max_seconds: a step without chat is sized so its predicted time (fit + caution) stays within the
    bound, i.e. a chat request arriving during it waits about that long at most; at least one token."""
    for bound in (4e-3, 20e-3, 60e-3):
        governor = warmed_governor(config(idle_max_seconds=bound))
        budget = governor.decide(ample_load(0))
        assert budget.reason == BudgetReason.IDLE_CAP
        exact = (bound - OVERHEAD) / PER_TOKEN  # what the true engine allows
        assert 0.85 * exact <= budget.tokens <= exact
        assert true_step_seconds(budget.tokens) <= bound
    assert warmed_governor(config(idle_max_seconds=1e-6)).decide(ample_load(0)).tokens == 1
    both = warmed_governor(config(idle_max_seconds=1.0, idle_max_tokens=100)).decide(ample_load(0))
    assert both.tokens == 100
    chat = warmed_governor(config(idle_max_seconds=4e-3)).decide(ample_load(300))
    assert chat.reason == BudgetReason.SLO  # steps with chat follow the SLO, not the idle bound
    with pytest.raises(ValueError):
        config(idle_max_seconds=0.0)


def test_full_chat_and_waiting_chat_give_nothing():
    cfg = config()
    governor = warmed_governor(cfg)
    for chat in (cfg.max_batch_tokens, cfg.max_batch_tokens + 100):
        budget = governor.decide(ample_load(chat, poc_tokens_pending=5000))
        assert (budget.tokens, budget.new_requests, budget.reason) == (0, 0, BudgetReason.CHAT_FULL)
    for chat in (0, 100):
        budget = governor.decide(ample_load(chat, waiting_chat_requests=1, poc_tokens_pending=5000))
        assert (budget.tokens, budget.new_requests, budget.reason) == (0, 0, BudgetReason.CHAT_WAITING)
    fixed = Governor(config(mode="fixed-share"))
    assert fixed.decide(ample_load(0, waiting_chat_requests=3)).tokens == 0
    assert fixed.decide(ample_load(cfg.max_batch_tokens)).tokens == 0


def test_pending_poc_tokens_are_used_before_new_nonces():
    governor = Governor(config())
    budget = governor.decide(ample_load(0, poc_tokens_pending=5000))
    assert (budget.tokens, budget.new_requests) == (4096, 0)
    budget = governor.decide(ample_load(0, poc_tokens_pending=1100))
    assert (budget.tokens, budget.new_requests) == (4096, 3)  # 1100 + 3·1024 ≥ 4096 > 1100 + 2·1024
    budget = governor.decide(ample_load(0, poc_tokens_pending=1000))
    assert (budget.tokens, budget.new_requests) == (4096, 4)  # 1000 + 3·1024 = 4072 < 4096


def test_kv_backpressure():
    cfg = config(kv_tokens_capacity=100_000, kv_reserve_fraction=0.1)  # reserve 10 000 slots
    governor = Governor(cfg)
    # 12 000 free: 2 000 usable by PoC; one nonce fits, not two
    budget = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=12_000))
    assert budget.reason == BudgetReason.KV_BACKPRESSURE
    assert (budget.tokens, budget.new_requests) == (1024, 1)
    # pending PoC tokens already claim the usable KV: they may still run, no new nonce is admitted
    budget = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=12_000, poc_tokens_pending=1500))
    assert (budget.tokens, budget.new_requests) == (1500, 0)
    budget = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=11_000, poc_tokens_pending=1500))
    assert (budget.tokens, budget.new_requests) == (1000, 0)
    # inside the reserve: nothing
    budget = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=9_000, poc_tokens_pending=1500))
    assert (budget.tokens, budget.new_requests, budget.reason) == (0, 0, BudgetReason.KV_BACKPRESSURE)


def test_fixed_share():
    cfg = config(mode="fixed-share", fixed_share=0.25)
    governor = Governor(cfg)
    assert governor.decide(ample_load(0)).tokens == 1024
    budget = governor.decide(ample_load(2000))
    assert (budget.tokens, budget.reason) == (1024, BudgetReason.FIXED_SHARE)  # no SLO in this mode
    budget = governor.decide(ample_load(3500))
    assert (budget.tokens, budget.reason) == (596, BudgetReason.BATCH_ROOM)
    budget = governor.decide(ample_load(10, kv_tokens_free=cfg.kv_reserve_tokens + 300))
    assert (budget.tokens, budget.reason) == (0, BudgetReason.KV_BACKPRESSURE)  # not even one nonce fits


def test_small_additions_are_cheap_because_of_the_fixed_overhead():
    governor = warmed_governor(config())
    small, large = governor.decide(ample_load(8)), governor.decide(ample_load(2000))
    # a 8-token chat step is mostly overhead: PoC may add about slo·overhead/per_token tokens
    assert small.tokens >= 0.9 * admissible_poc_tokens(governor.config, ample_load(8))
    assert small.tokens > 8 * 0.05
    assert large.tokens > small.tokens


def test_fixed_cost_of_carrying_poc_is_charged_to_the_slo_first():
    """A step carrying any PoC rows pays a fixed time (hooks, a scheduling pass): it comes off the allowance
    first; when it alone exceeds the allowance, only the glue's probe rows may join (reason fixed_cost)."""
    governor = warmed_governor(config())
    chat = 300
    allowance = 0.05 * governor.model.predict(chat)
    free = governor.decide(ample_load(chat))
    half = governor.decide(ample_load(chat, poc_fixed_seconds=allowance / 2))
    assert free.reason == half.reason == BudgetReason.SLO
    # the PoC rows get what is left: about half the tokens (the fit's per-token cost is what it is)
    assert half.tokens == governor.model.max_added_tokens(chat, 0, 0, allowance / 2, governor.config.confidence_z,
                                                          governor.config.max_batch_tokens)
    assert 0.4 * free.tokens <= half.tokens <= 0.6 * free.tokens
    veto = governor.decide(ample_load(chat, poc_fixed_seconds=allowance * 1.01))
    assert (veto.tokens, veto.reason) == (0, BudgetReason.FIXED_COST)
    probe = governor.decide(ample_load(chat, poc_fixed_seconds=allowance * 1.01, probe_tokens=8))
    assert (probe.tokens, probe.reason) == (8, BudgetReason.FIXED_COST)
    tight_kv = governor.decide(ample_load(chat, poc_fixed_seconds=1.0, probe_tokens=8,
                                          kv_tokens_free=governor.config.kv_reserve_tokens + 5, poc_tokens_pending=5))
    assert tight_kv.tokens == 5  # a probe still respects KV
    idle = governor.decide(ample_load(0, poc_fixed_seconds=1.0))
    assert idle.reason in (BudgetReason.BATCH_ROOM, BudgetReason.IDLE_CAP) and idle.tokens > 0  # no chat: nothing to slow
    with pytest.raises(ValueError):
        ample_load(chat, poc_fixed_seconds=-1e-3)
    with pytest.raises(ValueError):
        ample_load(chat, probe_tokens=-1)


def test_attention_cost_of_poc_tokens_counts_against_the_slo():
    """With attention reported, a PoC token is charged for the ~512 keys it attends; without, for the
    average attention of whatever steps the fit saw (here chat rows attending up to 4000 keys)."""
    rng = random.Random(8)
    per_key = 5e-9
    governors = {keys: Governor(config(poc_attention_keys_per_token=keys), StepTimeModel())
                 for keys in (None, 512.5)}
    for _ in range(400):
        tokens = rng.randint(1, 4096)
        keys = tokens * rng.randint(1, 4000)
        seconds = (OVERHEAD + PER_TOKEN * tokens + per_key * keys) * (1 + rng.gauss(0, 0.01))
        for governor in governors.values():
            governor.observe(tokens, 0, seconds, attention_keys=keys)
    load = ample_load(512, chat_attention_keys=512 * 2000)
    bare, with_keys = governors[None].decide(load), governors[512.5].decide(load)
    chat_seconds = OVERHEAD + PER_TOKEN * 512 + per_key * 512 * 2000
    exact = 0.05 * chat_seconds / (PER_TOKEN + per_key * 512.5)
    assert with_keys.tokens == pytest.approx(exact, rel=0.1)
    assert abs(bare.tokens - exact) > 2 * abs(with_keys.tokens - exact)


def test_bad_input_raises():
    for bad in [dict(mode="greedy"), dict(slo_overhead=-0.01), dict(fixed_share=1.5), dict(max_batch_tokens=0),
                dict(kv_tokens_capacity=-5), dict(kv_reserve_fraction=1.0), dict(poc_seq_len=0),
                dict(slo_overhead=float("nan")), dict(idle_max_tokens=-1)]:
        with pytest.raises(ValueError):
            config(**bad)
    for bad in [dict(chat_tokens=-1, kv_tokens_free=10), dict(chat_tokens=1, kv_tokens_free=-10),
                dict(chat_tokens=1, kv_tokens_free=10, waiting_chat_requests=-1),
                dict(chat_tokens=1, kv_tokens_free=10, poc_tokens_pending=-1),
                dict(chat_tokens=4, kv_tokens_free=10, chat_prefill_tokens=3, chat_decode_requests=2),
                dict(chat_tokens=1.5, kv_tokens_free=10)]:
        with pytest.raises(ValueError):
            StepLoad(**bad)
    governor = Governor(config())
    with pytest.raises(ValueError):
        governor.decide({"chat_tokens": 1})
    with pytest.raises(ValueError):
        governor.observe(10, 11, 0.01)
    with pytest.raises(ValueError):
        governor.observe(10, 1, -0.01)


# ----------------------------------------------------------------------------------------------
# Simulations on the synthetic engine


def test_slo_respected_and_idle_capacity_filled():
    cfg = config(slo_overhead=0.05)
    rng = random.Random(11)
    governor = Governor(cfg)
    ratios, granted, admissible = [], 0, 0
    for step in range(3000):
        chat = rng.choice([0, 1, 16, 64, 128, 512, 1024, 2048, 3000, 4096])
        load = ample_load(chat, chat_decode_requests=min(chat, 64), poc_tokens_pending=rng.randint(0, 3000))
        budget = governor.decide(load)
        governor.record(budget)
        total = chat + budget.tokens
        governor.observe(total, budget.tokens, measured_step_seconds(total, rng))
        if step < 200:  # warm-up: the model starts from its (wrong) prior
            continue
        if chat:
            ratios.append(true_step_seconds(total) / true_step_seconds(chat))
        granted += budget.tokens
        admissible += admissible_poc_tokens(cfg, load)
    # chat TPOT with PoC ≤ (1 + slo) × chat alone, per step within the model error, on average strictly
    assert max(ratios) <= 1 + cfg.slo_overhead * 1.2
    assert sum(ratios) / len(ratios) <= 1 + cfg.slo_overhead
    # and PoC takes what is admissible
    assert granted >= 0.9 * admissible
    stats = json.loads(json.dumps(governor.stats()))  # plain JSON types
    assert stats["decisions"]["chat_full"] > 0 and stats["decisions"]["slo"] > 0
    assert stats["poc_tokens"] > 0 and 0 < stats["poc_token_share"] < 1
    assert stats["model"]["seconds_per_token"] == pytest.approx(PER_TOKEN, rel=0.1)
    assert 0 < stats["poc_seconds_estimate"] < stats["step_seconds_total"]


def test_slo_respected_from_a_pessimistic_and_an_optimistic_prior():
    for prior_per_token in (1e-6, 1e-3):  # 25× too cheap, 40× too expensive
        cfg = config()
        rng = random.Random(12)
        governor = Governor(cfg, StepTimeModel(prior_seconds_per_token=prior_per_token))
        ratios = []
        for step in range(1500):
            chat = rng.choice([0, 32, 256, 1024])
            budget = governor.decide(ample_load(chat))
            total = chat + budget.tokens
            governor.observe(total, budget.tokens, measured_step_seconds(total, rng))
            if chat and step >= 300:
                ratios.append(true_step_seconds(total) / true_step_seconds(chat))
        assert max(ratios) <= 1 + cfg.slo_overhead * 1.2
        assert sum(ratios) / len(ratios) >= 1 + 0.8 * cfg.slo_overhead  # not starved by a pessimistic prior


def roofline_step_seconds(tokens: int) -> float:
    """A GPU-like step: flat while reading the weights dominates (≤ 300 rows), then linear."""
    return max(5e-3, 2e-3 + 10e-6 * tokens)


@pytest.mark.parametrize("knots", [(), (300,)])
def test_roofline_engine(knots):
    """A line fitted to a flat-then-linear engine stays within the SLO but leaves the flat part unused;
    a knot at the bend lets PoC fill it."""
    cfg = config(max_batch_tokens=8192)
    rng = random.Random(13)
    governor = Governor(cfg, StepTimeModel(knots=knots))
    ratios, granted, admissible = [], 0, 0
    for step in range(2000):
        chat = rng.choice([0, 16, 64, 128, 256, 1024])
        budget = governor.decide(ample_load(chat))
        total = chat + budget.tokens
        governor.observe(total, budget.tokens, roofline_step_seconds(total) * (1 + rng.gauss(0, 0.02)))
        if chat and step >= 500:
            ratios.append(roofline_step_seconds(total) / roofline_step_seconds(chat))
            granted += budget.tokens
            admissible += (1 + cfg.slo_overhead) * roofline_step_seconds(chat) / 10e-6 - 200 - chat
    assert max(ratios) <= 1 + cfg.slo_overhead * 1.2
    if knots:
        assert granted >= 0.9 * admissible
    else:
        assert granted < 0.5 * admissible


@dataclass
class ChatRequest:
    arrival_step: int
    prompt_len: int
    output_len: int
    prefilled: int = 0
    generated: int = 0
    admitted_step: int | None = None
    finished_step: int | None = None
    decode_steps: list[int] = field(default_factory=list)


@dataclass
class PoCNonce:
    remaining: int
    kv_held: int = 0


def simulate_engine(mode: str, seed: int, steps: int = 1500) -> tuple[list[ChatRequest], list[float], int, int]:
    """A tiny engine: FIFO chat admission by token and KV room, chunked prefill, chat scheduled first,
    then the governor's PoC tokens. When a waiting chat request does not fit the KV, the glue preempts
    PoC nonces as the governor's ``preempt_kv_tokens`` says.

    Returns the chat requests, each step's true duration, the PoC tokens computed, and the preemptions.
    """
    rng = random.Random(seed)
    cfg = config(mode=mode, max_batch_tokens=2048, kv_tokens_capacity=60_000, kv_reserve_fraction=0.25)
    governor = Governor(cfg)
    requests = []
    for step in range(steps):  # bursts and quiet periods
        rate = 0.6 if (step // 200) % 2 == 0 else 0.01
        while rng.random() < rate:
            requests.append(ChatRequest(step, rng.randint(16, 1500), rng.randint(4, 200)))
            rate /= 2
    arrivals = deque(sorted(requests, key=lambda r: r.arrival_step))
    waiting: deque[ChatRequest] = deque()
    running: list[ChatRequest] = []
    nonces: list[PoCNonce] = []
    kv_used = 0
    durations, poc_total, preemptions = [], 0, [0]
    rng_time = random.Random(seed + 1)
    for step in range(steps):
        while arrivals and arrivals[0].arrival_step <= step:
            waiting.append(arrivals.popleft())
        # chat: decodes, continuing prefills, then admissions (each reserves its whole KV up front)
        budget_tokens = cfg.max_batch_tokens
        chat_tokens = decode_requests = prefill_tokens = 0
        scheduled: list[tuple[ChatRequest, int]] = []
        for req in running:
            need = 1 if req.prefilled == req.prompt_len else req.prompt_len - req.prefilled
            take = min(need, budget_tokens - chat_tokens)
            if take:
                scheduled.append((req, take))
                chat_tokens += take
        while waiting and chat_tokens < budget_tokens:
            req = waiting[0]
            need_kv = req.prompt_len + req.output_len
            if kv_used + need_kv > cfg.kv_tokens_capacity:
                # ask the governor (pure, so it may be asked twice a step) whether PoC must make room
                ask = governor.decide(StepLoad(
                    chat_tokens=chat_tokens, waiting_chat_requests=len(waiting),
                    kv_tokens_free=cfg.kv_tokens_capacity - kv_used, waiting_chat_kv_tokens=need_kv,
                    poc_kv_tokens_held=sum(n.kv_held for n in nonces), poc_tokens_pending=0))
                assert ask.tokens == 0 and ask.reason in (BudgetReason.CHAT_WAITING, BudgetReason.OFF)
                freed = 0
                for nonce in sorted(nonces, key=lambda n: n.kv_held):  # least progress first
                    if freed >= ask.preempt_kv_tokens:
                        break
                    freed += nonce.kv_held
                    kv_used -= nonce.kv_held
                    nonce.kv_held, nonce.remaining = 0, cfg.poc_seq_len  # recomputed from scratch
                    preemptions[0] += 1
                if kv_used + need_kv > cfg.kv_tokens_capacity:
                    break
            waiting.popleft()
            kv_used += req.prompt_len + req.output_len
            req.admitted_step = step
            running.append(req)
            take = min(req.prompt_len, budget_tokens - chat_tokens)
            scheduled.append((req, take))
            chat_tokens += take
        for req, take in scheduled:
            if req.prefilled == req.prompt_len:
                decode_requests += 1
            else:
                prefill_tokens += take
        pending = sum(n.remaining for n in nonces)
        load = StepLoad(chat_tokens=chat_tokens, chat_decode_requests=decode_requests,
                        chat_prefill_tokens=prefill_tokens, waiting_chat_requests=len(waiting),
                        kv_tokens_free=cfg.kv_tokens_capacity - kv_used, poc_tokens_pending=pending)
        budget = governor.decide(load)
        assert budget.tokens + chat_tokens <= cfg.max_batch_tokens
        assert budget.tokens <= max(0, load.kv_tokens_free - cfg.kv_reserve_tokens)
        nonces += [PoCNonce(cfg.poc_seq_len) for _ in range(budget.new_requests)]
        poc_left = budget.tokens
        for nonce in nonces:
            take = min(nonce.remaining, poc_left)
            nonce.remaining -= take
            nonce.kv_held += take
            kv_used += take
            poc_left -= take
        assert poc_left == 0, "the budget must be realisable from pending + newly admitted nonces"
        for nonce in [n for n in nonces if n.remaining == 0]:  # prefill-only: KV freed when done
            kv_used -= nonce.kv_held
            nonces.remove(nonce)
        assert kv_used <= cfg.kv_tokens_capacity
        # run the step
        total = chat_tokens + budget.tokens
        durations.append(true_step_seconds(total))
        governor.observe(total, budget.tokens, measured_step_seconds(total, rng_time))
        poc_total += budget.tokens
        for req, take in scheduled:
            if req.prefilled < req.prompt_len:
                req.prefilled += take
                if req.prefilled == req.prompt_len:
                    req.generated = 1
            else:
                req.generated += 1
                req.decode_steps.append(step)
            if req.prefilled == req.prompt_len and req.generated >= req.output_len:
                req.finished_step = step
                running.remove(req)
                kv_used -= req.prompt_len + req.output_len
    return requests, durations, poc_total, preemptions[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_no_starvation_and_chat_schedule_unchanged(seed):
    alone, durations_alone, poc_alone, _ = simulate_engine("off", seed)
    shared, durations_shared, poc_shared, preemptions = simulate_engine("fill", seed)
    assert poc_alone == 0 and poc_shared > 0
    assert preemptions > 0  # the KV-preemption path was exercised
    admitted = [r for r in alone if r.admitted_step is not None]
    assert len(admitted) > 100
    # every chat request is admitted, prefilled, decoded and finished at the same step as without PoC
    for a, b in zip(alone, shared):
        assert (b.admitted_step, b.finished_step, b.decode_steps) == (a.admitted_step, a.finished_step,
                                                                     a.decode_steps)
    # decode steps (TPOT) slow down by at most the SLO once the model is fitted
    decode_steps = sorted({s for r in alone for s in r.decode_steps if s >= 200})
    slowdowns = [durations_shared[s] / durations_alone[s] for s in decode_steps]
    assert max(slowdowns) <= 1.05 * 1.2 + 1e-12  # 5 % SLO, 20 % model-error margin
    assert sum(slowdowns) / len(slowdowns) <= 1.05


# ----------------------------------------------------------------------------------------------
# Invariants for any load


def _observed_model(observations: list[tuple[int, float]], knots: tuple[int, ...]) -> StepTimeModel:
    model = StepTimeModel(knots=knots)
    for tokens, seconds in observations:
        model.observe(tokens, seconds)
    return model


loads = st.builds(
    StepLoad,
    chat_tokens=st.integers(0, 10_000),
    kv_tokens_free=st.integers(0, 200_000),
    waiting_chat_requests=st.integers(0, 3),
    poc_tokens_pending=st.integers(0, 20_000),
    poc_fixed_seconds=st.sampled_from([0.0, 1e-5, 1e-3, 0.5]),
    probe_tokens=st.integers(0, 16),
)
configs = st.builds(
    GovernorConfig,
    max_batch_tokens=st.integers(1, 8192),
    kv_tokens_capacity=st.integers(200_000, 400_000),
    mode=st.sampled_from(["fill", "fixed-share", "off"]),
    slo_overhead=st.floats(0, 1),
    fixed_share=st.floats(0, 1),
    kv_reserve_fraction=st.floats(0, 0.5),
    poc_seq_len=st.integers(1, 4096),
    idle_max_tokens=st.none() | st.integers(0, 8192),
    idle_max_seconds=st.none() | st.floats(1e-4, 10.0),
)
observation_lists = st.lists(st.tuples(st.integers(0, 8192), st.floats(1e-4, 1.0)), max_size=20)
knot_choices = st.sampled_from([(), (256,), (128, 1024, 4096)])


@settings(max_examples=300, deadline=None)
@given(cfg=configs, load=loads, observations=observation_lists, knots=knot_choices)
def test_budget_invariants(cfg, load, observations, knots):
    governor = Governor(cfg, _observed_model(observations, knots))
    budget = governor.decide(load)
    assert isinstance(budget, PoCBudget)
    assert budget.tokens >= 0 and budget.new_requests >= 0
    assert budget.tokens <= max(0, cfg.max_batch_tokens - load.chat_tokens)
    assert budget.tokens <= max(0, load.kv_tokens_free - cfg.kv_reserve_tokens)
    # realisable: pending tokens plus the new nonces cover the budget, and new nonces fit the KV
    assert budget.tokens <= load.poc_tokens_pending + budget.new_requests * cfg.poc_seq_len
    if budget.new_requests:
        assert (load.poc_tokens_pending + budget.new_requests * cfg.poc_seq_len
                <= load.kv_tokens_free - cfg.kv_reserve_tokens)
        assert load.poc_tokens_pending + (budget.new_requests - 1) * cfg.poc_seq_len < budget.tokens
    if cfg.mode == "off" or load.waiting_chat_requests:
        assert budget.tokens == 0 and budget.new_requests == 0
    if cfg.mode == "fixed-share":
        assert budget.tokens <= cfg.fixed_share * cfg.max_batch_tokens
    if cfg.mode == "fill" and load.chat_tokens and budget.tokens:
        if budget.reason == BudgetReason.FIXED_COST:  # a probe: the fixed cost alone exceeds the allowance
            assert budget.tokens <= load.probe_tokens
            assert load.poc_fixed_seconds >= cfg.slo_overhead * budget.predicted_chat_step_seconds
        else:  # the model's own prediction, plus the fixed cost of carrying PoC rows, respects the SLO
            assert (budget.predicted_step_seconds + load.poc_fixed_seconds
                    <= (1 + cfg.slo_overhead) * budget.predicted_chat_step_seconds + 1e-12)
    # deterministic and pure
    assert governor.decide(load) == budget


def test_reads_step_work_says_when_a_glue_must_work_out_the_step_figures():
    from cpoc_kernels.cost import QWEN3_0_6B

    base = dict(max_batch_tokens=4096, kv_tokens_capacity=1 << 20)
    assert not Governor(GovernorConfig(**base)).reads_step_work  # rows model: row counts only
    assert Governor(GovernorConfig(**base, poc_attention_keys_per_token=512.5)).reads_step_work
    assert Governor(GovernorConfig(**base, model_shape=QWEN3_0_6B)).reads_step_work
