"""RooflineStepTimeModel (cpoc_kernels/step_model.py): the governor's default step-time model, on synthetic
flat-then-linear engines with noise, spikes and a change of curve."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpoc_kernels.governor import Governor, GovernorConfig, StepLoad
from cpoc_kernels.step_model import RooflineStepTimeModel

# a GPU-like engine, deliberately far from the model's prior (2 ms + 10 µs/token, line)
FLAT, OVERHEAD, SLOPE = 6e-3, 1.5e-3, 18e-6
KNEE = (FLAT - OVERHEAD) / SLOPE  # 250 tokens


def sharp(n: float) -> float:
    return max(FLAT, OVERHEAD + SLOPE * n)


def smooth(n: float, p: float = 3.0) -> float:  # a gradual knee, as measured steps have
    return OVERHEAD + ((FLAT - OVERHEAD) ** p + (SLOPE * n) ** p) ** (1 / p)


def feed(model, curve, steps: int, rng: random.Random, noise: float = 0.03, spikes: float = 0.0, high: int = 8192):
    for _ in range(steps):
        n = int(math.exp(rng.uniform(0, math.log(high))))
        seconds = curve(n) * (1 + rng.gauss(0, noise))
        if rng.random() < spikes:
            seconds *= 20  # a GC pause or a graph capture
        model.observe(n, max(seconds, 1e-6))


def test_recovers_a_sharp_knee_and_its_slopes():
    model = RooflineStepTimeModel()
    feed(model, sharp, 600, random.Random(1))
    assert model.flat_seconds == pytest.approx(FLAT, rel=0.03)
    assert model.seconds_per_token == pytest.approx(SLOPE, rel=0.05)
    assert model.seconds_per_token_below_knee < 0.1 * SLOPE
    assert model.knee_tokens == pytest.approx(KNEE, rel=0.2)  # where the linear part starts
    assert model.overhead_seconds == pytest.approx(OVERHEAD, rel=0.25)
    for n in range(1, 8192, 37):
        assert model.predict(n) == pytest.approx(sharp(n), rel=0.04)


def test_follows_a_smooth_knee():
    model = RooflineStepTimeModel()
    feed(model, smooth, 600, random.Random(2))
    errors = [model.predict(n) / smooth(n) - 1 for n in range(1, 8192, 13)]
    assert max(abs(e) for e in errors) < 0.05
    assert model.seconds_per_token == pytest.approx(SLOPE, rel=0.05)


def test_a_straight_line_engine_is_fitted_as_a_line():
    line = lambda n: 3e-3 + 25e-6 * n  # noqa: E731  (a CPU step: no flat part)
    model = RooflineStepTimeModel()
    feed(model, line, 500, random.Random(3), high=4096)
    for n in range(1, 4096, 29):
        assert model.predict(n) == pytest.approx(line(n), rel=0.03)


def test_never_predicts_below_the_flat_part():
    for curve in (sharp, smooth):
        model = RooflineStepTimeModel()
        feed(model, curve, 400, random.Random(4))
        assert model.flat_seconds >= 0.97 * FLAT  # the flat level itself is not underestimated
        previous = model.predict(0)
        for n in range(0, 10000, 7):  # and nothing predicts below it (monotone)
            assert model.predict(n) >= previous >= model.flat_seconds - 1e-15
            previous = model.predict(n)


def test_robust_to_rare_spikes():
    model = RooflineStepTimeModel()
    feed(model, sharp, 800, random.Random(5), spikes=0.03)
    assert model.n_outliers >= 3
    assert model.seconds_per_token == pytest.approx(SLOPE, rel=0.06)
    assert model.flat_seconds == pytest.approx(FLAT, rel=0.04)
    assert model.relative_noise < 0.06


def test_spikes_among_the_first_steps_are_down_weighted_too():
    rng = random.Random(6)
    model = RooflineStepTimeModel()
    model.observe(100, 20 * sharp(100))  # e.g. CUDA graph capture on the first steps
    model.observe(4000, 20 * sharp(4000))
    feed(model, sharp, 300, rng)
    assert model.flat_seconds == pytest.approx(FLAT, rel=0.04)
    assert model.seconds_per_token == pytest.approx(SLOPE, rel=0.06)


def test_tracks_a_change_of_curve_within_a_bounded_number_of_steps():
    rng = random.Random(7)
    model = RooflineStepTimeModel()
    feed(model, sharp, 400, rng)

    def other(n):  # the engine changed: another model or card (flatter top, steeper slope, knee at 200)
        return max(4e-3, 0.4e-3 + 18e-6 * n)

    bound = 60
    feed(model, other, bound, rng)
    assert model.n_changes >= 1
    for n in range(1, 8192, 41):
        assert model.predict(n) == pytest.approx(other(n), rel=0.10)


def test_uncertain_where_the_steps_never_went():
    # only small steps seen: the cost of a large addition keeps the prior's uncertainty
    model = RooflineStepTimeModel()
    rng = random.Random(8)
    for _ in range(300):
        n = rng.randint(1, 200)
        model.observe(n, sharp(n) * (1 + rng.gauss(0, 0.03)))
    assert model.added_seconds(100, 0, 4000, 0, z=1.0) > 1.5 * model.added_seconds(100, 0, 4000, 0, z=0.0)


def test_rejects_bad_input():
    model = RooflineStepTimeModel()
    for args in [(-1, 0.01), (10, 0.0), (10, -0.01), (10, float("nan")), (10, float("inf")), (1.5, 0.01)]:
        with pytest.raises(ValueError):
            model.observe(*args)
    for bad in [dict(knee_range=(0, 10)), dict(knee_range=(100, 10)), dict(knee_widths=()), dict(window=1),
                dict(memory_steps=1), dict(prior_seconds_per_token=0.0), dict(knee_widths=(-1.0,))]:
        with pytest.raises(ValueError):
            RooflineStepTimeModel(**bad)
    assert model.n_observations == 0


def test_is_the_governors_default_and_bounds_idle_steps_to_the_flat_part():
    cfg = GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, poc_seq_len=1024)
    assert cfg.idle_max_seconds == "auto"
    governor = Governor(cfg)
    assert isinstance(governor.model, RooflineStepTimeModel)
    rng = random.Random(9)
    for _ in range(400):
        chat = rng.choice([0, 16, 64, 128, 256, 1024, 4096])
        budget = governor.decide(StepLoad(chat_tokens=chat, kv_tokens_free=1 << 21))
        total = chat + budget.tokens
        if total:
            governor.observe(total, budget.tokens, sharp(total) * (1 + rng.gauss(0, 0.02)))
    idle = governor.decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21))
    exact = (1.05 * FLAT - OVERHEAD) / SLOPE  # the largest step within (1 + slo) × a one-token step
    assert 0.85 * exact <= idle.tokens <= 1.05 * exact
    assert sharp(idle.tokens) <= 1.05 * FLAT * 1.02
    assert governor.stats()["model"]["kind"] == "roofline"
    unbounded = Governor(GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, idle_max_seconds=None))
    assert unbounded.decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21)).tokens == 8192
    capped = Governor(GovernorConfig(max_batch_tokens=8192, kv_tokens_capacity=1 << 22, idle_max_tokens=5000),
                      governor.model)  # an explicit token cap replaces the automatic bound
    assert capped.decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21)).tokens == 5000
    with pytest.raises(ValueError):
        GovernorConfig(max_batch_tokens=1, kv_tokens_capacity=1, idle_max_seconds="soon")


def test_auto_idle_bound_waits_for_a_flat_part():
    """On an engine without a flat part (a CPU: the fit is a line, knee 0) "auto" does not bound idle steps
    (a one-token step would be its bound); a fresh model has not found a knee yet either."""
    cfg = GovernorConfig(max_batch_tokens=4096, kv_tokens_capacity=1 << 22, poc_seq_len=1024)
    fresh = Governor(cfg)
    assert fresh.decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21)).tokens == 4096
    model = RooflineStepTimeModel()
    feed(model, lambda n: 3e-3 + 25e-6 * n, 400, random.Random(10), high=4096)
    assert model.knee_tokens == 0
    assert Governor(cfg, model).decide(StepLoad(chat_tokens=0, kv_tokens_free=1 << 21)).tokens == 4096


observations = st.lists(st.tuples(st.integers(0, 20000), st.floats(1e-5, 2.0), st.integers(0, 10 ** 7)),
                        min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps=observations, queries=st.lists(st.integers(0, 30000), min_size=2, max_size=10))
def test_invariants(steps, queries):
    a, b = RooflineStepTimeModel(), RooflineStepTimeModel()
    for tokens, seconds, keys in steps:
        a.observe(tokens, seconds, keys)
        b.observe(tokens, seconds, keys)
    queries = sorted(queries)
    values = [a.predict(n, 1000) for n in queries]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert all(x <= y + 1e-12 * max(1.0, abs(y)) for x, y in zip(values, values[1:]))  # monotone in tokens
    assert values == [b.predict(n, 1000) for n in queries]  # deterministic
    for n in queries:
        added = a.added_seconds(n, 0, 100, 0, z=1.0)
        assert math.isfinite(added) and added >= -1e-15
    assert math.isfinite(a.relative_noise) and a.relative_noise > 0
