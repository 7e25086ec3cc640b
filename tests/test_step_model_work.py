"""WorkStepTimeModel (cpoc_kernels/step_model/work.py) and the governor with a model shape: the roofline of
each step's bytes and FLOPs, its hardware constants learnt online from noisy synthetic steps.

Ground truths: a roofline written out here for Qwen3-8B (its bytes and FLOPs counted from the config
numbers, constants chosen here), and the engine simulator's StepCurve presets (whose constants are known:
bandwidth = HBM·efficiency·tp, FLOP rate = peak·MFU·tp, plus a per-step and per-row all-reduce cost)."""
from __future__ import annotations

import dataclasses
import math
import random
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpoc_kernels.cost import QWEN3_235B_A22B
from cpoc_kernels.governor import Governor, GovernorConfig, StepLoad
from cpoc_kernels.sim.hardware import PRESETS, QWEN3_8B, StepCurve
from cpoc_kernels.step_model import WorkStepTimeModel
from cpoc_kernels.step_work import StepWork

# ---------------------------------------------------------------------------------------------- truths

# Qwen3-8B from its config: hidden 4096, 36 layers, 32 heads / 8 KV heads of 128, MLP 12288, vocab 151936
H8, L8, NH8, NKV8, HD8, INTER8, VOCAB8 = 4096, 36, 32, 8, 128, 12288, 151936
BODY8 = L8 * (2 * H8 * NH8 * HD8 + 2 * H8 * NKV8 * HD8) + L8 * 3 * H8 * INTER8  # non-embedding parameters
HEAD8 = VOCAB8 * H8
KV8 = 2 * L8 * NKV8 * HD8 * 2  # bytes per cached token (K and V, bf16)


@dataclasses.dataclass(frozen=True)
class Roofline8B:
    """t = overhead + ((bytes / bandwidth)^p + (flops / flop_rate)^p)^(1/p) for Qwen3-8B on one card."""

    bandwidth: float = 2.5e12
    flop_rate: float = 6.0e14
    overhead_seconds: float = 5e-4
    p: float = 3.0

    def seconds(self, w: StepWork) -> float:
        read = 2 * (BODY8 + (HEAD8 if w.lm_rows else 0)) + KV8 * w.kv_tokens_read
        flops = 2 * BODY8 * w.tokens + 4 * NH8 * HD8 * L8 * w.attention_pairs + 2 * HEAD8 * w.lm_rows
        return self.overhead_seconds + ((read / self.bandwidth) ** self.p + (flops / self.flop_rate) ** self.p) ** (
            1 / self.p)

    def slower(self, factor: float) -> "Roofline8B":
        return dataclasses.replace(self, bandwidth=self.bandwidth / factor, flop_rate=self.flop_rate / factor,
                                   overhead_seconds=self.overhead_seconds * factor)


MOE = PRESETS["qwen3-235b-a22b"].curve  # Qwen3-235B-A22B on 8x H200


def curve_rates(curve: StepCurve) -> tuple[float, float]:
    """(bandwidth, FLOP/s) of a StepCurve, whole group."""
    tp = curve.tensor_parallel
    return (curve.card.hbm_bytes_per_second * curve.bw_efficiency * tp, curve.card.bf16_flops * curve.mfu * tp)


def slower_card(curve: StepCurve, factor: float) -> StepCurve:
    card = dataclasses.replace(curve.card, bf16_flops=curve.card.bf16_flops / factor,
                               hbm_bytes_per_second=curve.card.hbm_bytes_per_second / factor)
    return dataclasses.replace(curve, card=card, overhead_seconds=curve.overhead_seconds * factor)


# ---------------------------------------------------------------------------------------------- steps


def pairs(n: int, start: int) -> int:
    """Causal (query, key) pairs of ``n`` rows after ``start`` cached tokens: Σ_{i<n} (start + i + 1)."""
    return n * start + n * (n + 1) // 2


def random_work(rng: random.Random, max_batch: int = 8192) -> StepWork:
    """A decode batch (with contexts, sometimes PoC rows joining), a chat prefill chunk, or PoC alone."""
    kind = rng.random()
    if kind < 0.4:
        rows = rng.randint(1, 256)
        contexts = [min(16384, int(math.exp(rng.gauss(math.log(900), 1.0)))) + 1 for _ in range(rows)]
        work = StepWork(rows, sum(contexts), rows, sum(contexts))
        if rng.random() < 0.5:
            poc, start = rng.randint(1, max_batch - rows), rng.randrange(0, 1024, 64)
            work = work.plus(StepWork(poc, pairs(poc, start), 0, start + poc))
        return work
    n = int(math.exp(rng.uniform(0, math.log(max_batch))))
    if kind < 0.7:
        start = rng.randint(0, 8000)
        return StepWork(n, pairs(n, start), 1, start + n)
    start = rng.randrange(0, 1024, 64)
    return StepWork(n, pairs(n, start), 0, start + n)


def measured(truth, work: StepWork, rng: random.Random, noise: float = 0.02, spikes: float = 0.01) -> float:
    seconds = truth.seconds(work) * math.exp(rng.gauss(0, noise))  # 2 % log-normal
    if rng.random() < spikes:
        seconds *= 5  # a GC pause, a graph capture
    return seconds


def feed(model: WorkStepTimeModel, truth, steps: int, rng: random.Random, **kwargs) -> None:
    for _ in range(steps):
        work = random_work(rng)
        model.observe_work(work, measured(truth, work, rng, **kwargs))


def relative_errors(model: WorkStepTimeModel, truth, works) -> list[float]:
    return [abs(model.predict_work(w) / truth.seconds(w) - 1) for w in works]


HELD_OUT = [random_work(random.Random(10_000 + i)) for i in range(200)]

# ---------------------------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_a_dense_roofline(seed):
    truth = Roofline8B()
    model = WorkStepTimeModel(QWEN3_8B)
    feed(model, truth, 400, random.Random(seed))
    assert model.bandwidth == pytest.approx(truth.bandwidth, rel=0.10)
    assert model.flop_rate == pytest.approx(truth.flop_rate, rel=0.10)
    assert model.knee_sharpness in (2.0, 3.0, 4.0)
    assert model.overhead_seconds == pytest.approx(truth.overhead_seconds, rel=0.25)
    errors = relative_errors(model, truth, HELD_OUT)
    assert max(errors) < 0.05
    assert sum(errors) / len(errors) < 0.015
    assert model.n_changes == 0  # a steady engine raises no change
    summary = model.summary()
    assert summary["kind"] == "work-roofline" and summary["observations"] == 400


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_the_moe_tp8_preset(seed):
    bandwidth, flop_rate = curve_rates(MOE)
    model = WorkStepTimeModel(QWEN3_235B_A22B, 8)
    feed(model, MOE, 400, random.Random(seed))
    assert model.bandwidth == pytest.approx(bandwidth, rel=0.10)
    assert model.flop_rate == pytest.approx(flop_rate, rel=0.10)
    assert model.knee_sharpness in (2.0, 3.0, 4.0)
    # the two all-reduces per layer: a fixed latency (into the overhead) and a volume per row (per_row)
    layers, hidden, tp, link = 94, 4096, 8, MOE.card.link_bytes_per_second
    overhead = MOE.overhead_seconds + 2 * layers * MOE.allreduce_latency_seconds
    per_row = 2 * layers * hidden * 2 * 2 * (tp - 1) / tp / link
    assert model.overhead_seconds == pytest.approx(overhead, rel=0.15)
    assert model.seconds_per_row == pytest.approx(per_row, rel=0.15)
    errors = relative_errors(model, MOE, HELD_OUT)
    assert max(errors) < 0.05
    assert sum(errors) / len(errors) < 0.015
    assert model.n_changes == 0


@pytest.mark.parametrize("true_p, allowed", [(1.5, (1.0, 1.5, 2.0)), (3.0, (2.0, 3.0, 4.0)), (10.0, (6.0, 10.0))])
def test_picks_a_knee_sharpness_near_the_true_one(true_p, allowed):
    truth = Roofline8B(p=true_p)
    for seed in (1, 2, 3):
        model = WorkStepTimeModel(QWEN3_8B)
        feed(model, truth, 400, random.Random(seed))
        assert model.knee_sharpness in allowed, seed
        errors = relative_errors(model, truth, HELD_OUT)
        assert max(errors) < 0.07, seed
        assert sum(errors) / len(errors) < 0.015, seed


def test_spikes_are_down_weighted():
    truth = Roofline8B()
    clean, spiky = WorkStepTimeModel(QWEN3_8B), WorkStepTimeModel(QWEN3_8B)
    feed(clean, truth, 400, random.Random(4), spikes=0.0)
    feed(spiky, truth, 400, random.Random(4), spikes=0.04)
    assert spiky.n_outliers >= 3
    assert spiky.relative_noise < 0.04
    errors = relative_errors(spiky, truth, HELD_OUT)
    assert max(errors) < 0.05
    assert spiky.bandwidth == pytest.approx(clean.bandwidth, rel=0.05)
    assert spiky.flop_rate == pytest.approx(clean.flop_rate, rel=0.10)


# ---------------------------------------------------------------------------------------------- drift


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_follows_a_slower_card_within_a_bounded_number_of_steps(kind, seed):
    """Measured over seeds 1..20 (400 steps, then the card 1.5x slower): the mean held-out error stays < 5 %
    from at most 16 steps after the switch, the largest < 10 % from at most 48 steps."""
    if kind == "dense":
        before, model = Roofline8B(), WorkStepTimeModel(QWEN3_8B)
        after = before.slower(1.5)
        new_rates = (after.bandwidth, after.flop_rate)
    else:
        before, model = MOE, WorkStepTimeModel(QWEN3_235B_A22B, 8)
        after = slower_card(MOE, 1.5)
        new_rates = curve_rates(after)
    rng = random.Random(seed)
    feed(model, before, 400, rng)
    assert model.n_changes == 0
    probes = HELD_OUT[:60]
    assert min(relative_errors(model, after, probes)) > 0.2  # the old fit is badly off on the new card
    for step in range(1, 151):
        feed(model, after, 1, rng)
        errors = relative_errors(model, after, probes)
        if step >= 30:
            assert sum(errors) / len(errors) < 0.05, step
        if step >= 60:
            assert max(errors) < 0.10, step
    assert model.n_changes == 1
    assert model.bandwidth == pytest.approx(new_rates[0], rel=0.10)
    assert model.flop_rate == pytest.approx(new_rates[1], rel=0.15)


# ---------------------------------------------------------------------------------------------- invariants

any_work = st.builds(StepWork, st.integers(1, 20000), st.integers(0, 10 ** 9), st.integers(0, 20000),
                     st.integers(0, 2 * 10 ** 7))
random_steps = st.lists(st.tuples(any_work, st.floats(1e-5, 5.0)), min_size=0, max_size=12)
deltas = st.tuples(st.integers(0, 5000), st.integers(0, 10 ** 8), st.integers(0, 300), st.integers(0, 10 ** 6))


def _trained(shape, tp, truth, steps: int, seed: int) -> WorkStepTimeModel:
    model = WorkStepTimeModel(shape, tp)
    feed(model, truth, steps, random.Random(seed))
    return model


TRAINED = {"dense": lambda: _trained(QWEN3_8B, 1, Roofline8B(), 60, 5),
           "moe": lambda: _trained(QWEN3_235B_A22B, 8, MOE, 60, 6)}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["dense", "moe", "dense-fresh", "moe-fresh"]), steps=random_steps,
       queries=st.lists(st.tuples(any_work, deltas), min_size=1, max_size=6))
def test_invariants(kind, steps, queries):
    shape, tp = (QWEN3_8B, 1) if kind.startswith("dense") else (QWEN3_235B_A22B, 8)
    if kind.endswith("fresh"):
        a, b = WorkStepTimeModel(shape, tp), WorkStepTimeModel(shape, tp)
    else:
        a, b = TRAINED[kind](), TRAINED[kind]()
    for work, seconds in steps:  # anything at all, after the prior or a fit
        a.observe_work(work, seconds)
        b.observe_work(work, seconds)
    overhead = a.overhead_seconds
    assert overhead >= 0 and a.seconds_per_row >= 0
    assert a.bandwidth > 0 and a.flop_rate > 0 and math.isfinite(a.bandwidth) and math.isfinite(a.flop_rate)
    for work, (dt, dp, dl, dk) in queries:
        base = a.predict_work(work)
        assert math.isfinite(base) and base >= overhead
        assert base == b.predict_work(work)  # deterministic
        grown = [StepWork(work.tokens + dt, work.attention_pairs, work.lm_rows, work.kv_tokens_read),
                 StepWork(work.tokens, work.attention_pairs + dp, work.lm_rows, work.kv_tokens_read),
                 StepWork(work.tokens, work.attention_pairs, work.lm_rows + dl, work.kv_tokens_read),
                 StepWork(work.tokens, work.attention_pairs, work.lm_rows, work.kv_tokens_read + dk),
                 StepWork(work.tokens + dt, work.attention_pairs + dp, work.lm_rows + dl, work.kv_tokens_read + dk)]
        for more in grown:
            value = a.predict_work(more)
            assert math.isfinite(value)
            assert value >= base * (1 - 1e-12), (work, more)  # monotone in every part of the work
        added = a.added_seconds_work(work, StepWork(dt, dp, 0, dt), z=1.0)
        assert math.isfinite(added) and added >= -1e-15
        upper = a.predict_work_upper(work, 1.0)
        assert math.isfinite(upper) and upper >= base * (1 - 1e-12)
    assert a.predict_work(StepWork(0)) == 0.0  # an empty step takes no time
    assert a.summary() == b.summary()
    assert math.isfinite(a.relative_noise) and a.relative_noise > 0


def test_rows_interface_matches_the_work_interface():
    a, b = WorkStepTimeModel(QWEN3_8B), WorkStepTimeModel(QWEN3_8B)
    rng = random.Random(7)
    for _ in range(40):
        work = random_work(rng)
        seconds = measured(Roofline8B(), work, rng)
        a.observe_work(work, seconds)
        b.observe(work.tokens, seconds, work.attention_pairs, work.kv_tokens_read, work.lm_rows)
    assert a.summary() == b.summary()
    assert a.predict(300, 5000) == a.predict_work(StepWork(300, 5000, 0, 300))


def test_empty_work_predicts_zero_without_numpy_warnings():
    """An empty step (tokens 0) is predicted as 0 s, and so is its cost as a base: the PoC rows of a step with no
    chat rows, which Governor.observe prices on every PoC-only step. No 0/0 on the way (an engine running with
    warnings as errors, ``python -W error``, would stop there)."""
    model = WorkStepTimeModel(QWEN3_8B)
    feed(model, Roofline8B(), 50, random.Random(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.predict_work(StepWork(0)) == 0.0
        assert model.predict_work_upper(StepWork(0), 1.0) == 0.0
        assert model.added_seconds_work(StepWork(0), poc_work(1024), z=1.0) > 0
        governor = Governor(GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, model_shape=QWEN3_8B),
                            model)
        governor.observe(1024, 1024, 0.02, attention_keys=1024 * 1025 // 2, kv_tokens_read=1024)  # PoC only
    assert governor.stats()["steps_observed"] == 1


def test_rejects_bad_input():
    model = WorkStepTimeModel(QWEN3_8B)
    for work, seconds in [(StepWork(0), 0.01), (StepWork(4), 0.0), (StepWork(4), -1.0), (StepWork(4), math.nan),
                          (StepWork(4), math.inf), (StepWork(4), True), ((4, 0, 0, 4), 0.01), (4, 0.01)]:
        with pytest.raises(ValueError):
            model.observe_work(work, seconds)
    for args in [(-1, 0.01), (1.5, 0.01), (True, 0.01), (4, 0.0)]:
        with pytest.raises(ValueError):
            model.observe(*args)
    assert model.n_observations == 0
    for bad in [dict(window=3), dict(change_run=1), dict(warmup=0), dict(prior_flop_rate=0.0),
                dict(prior_bandwidth=-1.0), dict(prior_log_std=0.0), dict(relative_noise=math.nan),
                dict(outlier_sigmas=0.0), dict(window=10.0), dict(tensor_parallel=0)]:
        with pytest.raises(ValueError):
            WorkStepTimeModel(QWEN3_8B, **bad)
    with pytest.raises(ValueError):
        WorkStepTimeModel("Qwen3-8B")


# ---------------------------------------------------------------------------------------------- governor

SEQ = 1024
SLO = 0.05


def poc_work(tokens: int) -> StepWork:
    """PoC prefill rows as the governor adds them: nonce rows average (seq_len + 1) / 2 keys, own KV, no LM."""
    return StepWork(tokens, tokens * (SEQ + 1) / 2, 0, tokens)


def largest(fits, high: int) -> int:
    """Largest x in 0..high with fits(x), fits monotone (a search on the true curve)."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def trained_governor(curve: StepCurve, seed: int, steps: int = 400, slo_feedback: bool = True) -> Governor:
    governor = Governor(GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, poc_seq_len=SEQ,
                                       slo_overhead=SLO, model_shape=curve.shape,
                                       tensor_parallel=curve.tensor_parallel, slo_feedback=slo_feedback))
    rng = random.Random(seed)
    for _ in range(steps):
        work = random_work(rng)
        governor.observe(work.tokens, 0, measured(curve, work, rng), work.attention_pairs, work.kv_tokens_read,
                         work.lm_rows)
    return governor


def test_a_model_shape_makes_the_work_model_the_default():
    cfg = GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, model_shape=QWEN3_235B_A22B,
                         tensor_parallel=8)
    governor = Governor(cfg)
    assert isinstance(governor.model, WorkStepTimeModel)
    assert governor.model.counter.tensor_parallel == 8
    stats = governor.stats()["model"]
    assert stats["kind"] == "work-roofline" and stats["tensor_parallel"] == 8
    # before any step: still a budget, and a finite prediction
    budget = governor.decide(StepLoad(chat_tokens=32, kv_tokens_free=1 << 21, chat_decode_requests=32,
                                      chat_attention_keys=32_000, chat_kv_tokens_read=32_000, chat_lm_rows=32))
    assert 0 <= budget.tokens <= 8192 - 32
    assert math.isfinite(budget.predicted_step_seconds) and budget.predicted_step_seconds > 0


@pytest.mark.parametrize("preset", ["dense-8b", "qwen3-235b-a22b"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("feedback", [False, True])
def test_decode_budget_respects_the_slo_and_fills_most_of_it(preset, seed, feedback):
    curve = PRESETS[preset].curve
    governor = trained_governor(curve, seed, slo_feedback=feedback)
    chat = StepWork(32, 32 * 1000, 32, 32_000)  # 32 decode rows, contexts of 1000: memory-bound
    load = StepLoad(chat_tokens=32, kv_tokens_free=1 << 21, chat_decode_requests=32, chat_attention_keys=32_000,
                    chat_kv_tokens_read=32_000, chat_lm_rows=32)
    budget = governor.decide(load)
    chat_seconds = curve.seconds(chat)
    allowed = SLO
    if feedback:  # the allowance shrinks by the true curve's elasticity in the chat work (finite difference)
        bigger = StepWork(32 * 1.01, 32 * 1000 * 1.01, 32 * 1.01, 32_000 * 1.01)
        elasticity = (curve.seconds(bigger) / chat_seconds - 1) / 0.01
        assert 0.05 < elasticity < 0.9
        allowed = SLO * (1 - elasticity)
    with_poc = curve.seconds(chat.plus(poc_work(budget.tokens)))
    assert with_poc <= (1 + allowed * 1.05) * chat_seconds  # 5 % of the allowance: the fit's error
    best = largest(lambda x: curve.seconds(chat.plus(poc_work(x))) <= (1 + allowed) * chat_seconds, 8192 - 32)
    assert best >= 1
    assert budget.tokens >= 0.8 * best
    assert budget.reason.value == "slo"
    assert budget.predicted_chat_step_seconds == pytest.approx(chat_seconds, rel=0.05)


@pytest.mark.parametrize("preset", ["dense-8b", "qwen3-235b-a22b"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_idle_budget_stays_in_the_flat_part(preset, seed):
    curve = PRESETS[preset].curve
    governor = trained_governor(curve, seed)
    assert governor.config.idle_max_seconds == "auto"
    idle = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21))
    one_token = curve.seconds(poc_work(1))
    assert idle.tokens >= 1
    assert curve.seconds(poc_work(idle.tokens)) <= (1 + SLO) * one_token * 1.005
    best = largest(lambda x: curve.seconds(poc_work(x)) <= (1 + SLO) * one_token, 8192)
    assert idle.tokens >= 0.8 * best
    assert idle.reason.value == "idle_cap"


def test_step_load_and_observe_reject_bad_work_counts():
    with pytest.raises(ValueError, match="chat_lm_rows"):
        StepLoad(chat_tokens=10, kv_tokens_free=100, chat_lm_rows=11)
    with pytest.raises(ValueError, match="chat_kv_tokens_read"):
        StepLoad(chat_tokens=10, kv_tokens_free=100, chat_kv_tokens_read=-1)
    with pytest.raises(ValueError, match="chat_lm_rows"):
        StepLoad(chat_tokens=10, kv_tokens_free=100, chat_lm_rows=-1)
    StepLoad(chat_tokens=10, kv_tokens_free=100, chat_lm_rows=10, chat_kv_tokens_read=0)  # at the bounds: fine
    governor = Governor(GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, model_shape=QWEN3_8B))
    with pytest.raises(ValueError, match="lm_rows"):
        governor.observe(10, 0, 0.01, lm_rows=11)
    for kwargs in [dict(kv_tokens_read=-1), dict(attention_keys=-5), dict(lm_rows=-1), dict(lm_rows=1.5)]:
        with pytest.raises(ValueError):
            governor.observe(10, 0, 0.01, **kwargs)
    assert governor.model.n_observations == 0
    with pytest.raises(ValueError):
        GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, model_shape="Qwen3-8B")
    with pytest.raises(ValueError):
        GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, model_shape=QWEN3_8B, tensor_parallel=0)
