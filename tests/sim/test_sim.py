"""Engine simulator (cpoc_kernels/sim/) and ``cpoc bench-sim``: a short sweep as CI runs it, plus the
simulator's own invariants (chat served, budgets and KV respected, preemption exercised, deterministic)."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math

import numpy as np
import pytest

from cpoc_kernels import cost
from cpoc_kernels.cli import main
from cpoc_kernels.governor import Governor
from cpoc_kernels.sim import PRESETS, SimConfig, StepWork, chat_trace, simulate
from cpoc_kernels.sim.engine import _Engine
from cpoc_kernels.sim.hardware import CARDS, StepCurve


def small_preset(kv_tokens: int | None = None):
    """Qwen3-0.6B with short requests (and optionally a small KV cache, to force preemption)."""
    return dataclasses.replace(PRESETS["qwen3-0.6b"], prompt_median=256, output_median=32, max_num_seqs=32,
                               max_batch_tokens=2048, kv_capacity_tokens=kv_tokens)


def trace_for(preset, rate: float, n: int, seed: int = 0):
    return chat_trace(rate, n, seed, (preset.prompt_median, preset.prompt_sigma, preset.prompt_range),
                      (preset.output_median, preset.output_sigma, preset.output_range))


def test_step_curve_is_flat_then_linear():
    curve = PRESETS["dense-8b"].curve
    t = [curve.seconds(StepWork(n, 0, 0, 0)) for n in (1, 16, 64, 4096, 8192)]
    assert t == sorted(t)
    assert t[2] < 1.02 * t[0]  # flat while the weights dominate
    assert t[4] / t[3] == pytest.approx(2.0, rel=0.05)  # linear once compute-bound
    # the slope is cost.py's FLOPs at the preset's MFU
    slope = (t[4] - t[3]) / 4096
    assert slope == pytest.approx(cost.linear_flops_per_token(curve.shape) / (989e12 * 0.6), rel=0.05)
    faster = dataclasses.replace(curve, card=CARDS["B200"])
    assert faster.seconds(StepWork(4096, 0, 0, 0)) < t[3]
    tp = StepCurve(cost.QWEN3_235B_A22B, CARDS["H200"], tensor_parallel=8)
    assert tp.kv_capacity_tokens() > 0 and tp.seconds(StepWork(1, 0, 1, 0)) > 0


def test_traces_have_the_asked_rate_and_bursts():
    lengths = ((512, 1.0, (16, 4096)), (64, 0.8, (4, 512)))
    for arrivals in ("poisson", "bursty"):
        trace = chat_trace(20.0, 4000, 1, *lengths, arrivals=arrivals)
        times = np.array([a.arrival for a in trace])
        assert len(trace) / times[-1] == pytest.approx(20.0, rel=0.1)
        assert all(16 <= a.prompt_len <= 4096 and 4 <= a.output_len <= 512 for a in trace)
    counts = {a: np.histogram([x.arrival for x in chat_trace(20.0, 4000, 2, *lengths, arrivals=a)],
                              bins=100)[0] for a in ("poisson", "bursty")}
    assert counts["bursty"].var() > 2 * counts["poisson"].var()
    with pytest.raises(ValueError):
        chat_trace(1.0, 10, 0, *lengths, arrivals="weekly")


@pytest.mark.parametrize("path", ["hf", "vllm"])
def test_simulation_serves_chat_within_budget_and_kv(path):
    preset = small_preset(kv_tokens=5_000)  # small KV: preemption happens
    trace = trace_for(preset, 150.0, 80)
    engine = _Engine(preset, trace, SimConfig(path=path))
    kv_peak = []
    original = engine._work

    def watched(scheduled, hf_poc):
        kv_peak.append(engine.kv_used)
        return original(scheduled, hf_poc)

    engine._work = watched
    result = engine.run()
    assert all(r.finish is not None and r.arrival <= r.first_token <= r.finish for r in result.chat)
    assert max(kv_peak) <= engine.kv_capacity
    assert all(s.chat_tokens + s.poc_tokens <= preset.max_batch_tokens for s in result.steps)
    assert result.poc_tokens > 0
    if path == "vllm":  # path hf keeps chat's SLO: at this load (and with this little KV) no nonce completes,
        assert result.nonces_done > 0  # even with the oracle model; see the lighter test below
    assert result.preemptions_chat + result.preemptions_poc > 0
    stats = result.governor_stats
    # path hf: the glue reports each step's work and the model shape (work roofline); vllm: rows only
    assert stats["steps_observed"] > 0 and stats["model"]["kind"] == {"hf": "work-roofline", "vllm": "roofline"}[path]
    if path == "hf":
        assert isinstance(engine.governor, Governor)  # the package's own object, not a copy
        assert sum(stats["decisions"].values()) > 0


def test_poc_off_runs_are_deterministic_and_poc_on_keeps_every_request():
    preset = small_preset()
    trace = trace_for(preset, 40.0, 60, seed=3)
    a = simulate(preset, trace, SimConfig(poc=False))
    b = simulate(preset, trace, SimConfig(poc=False))
    assert [(r.first_token, r.finish) for r in a.chat] == [(r.first_token, r.finish) for r in b.chat]
    assert a.poc_tokens == 0
    on = simulate(preset, trace, SimConfig(path="hf"))
    assert len(on.chat) == len(a.chat) and on.poc_tokens > 0 and on.nonces_done > 0
    assert np.all(np.isfinite(on.tpot())) and np.all(on.ttft() > 0)


def test_bench_sim_short_sweep(tmp_path, capsys):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["bench-sim", "--presets", "dense-8b", "--paths", "all", "--models", "work,oracle", "--loads", "0.5",
            "--requests", "24", "--out-dir", str(tmp_path)] + ([] if plot else ["--no-plot"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fill" in out and "nonces/s" in out and "end to end" in out
    for path in ("hf", "hf-oracle", "vllm"):
        with open(tmp_path / f"dense-8b_{path}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1
        row = rows[0]
        for key in ("fill", "tpot_p99_change", "ttft_p99_change", "nonces_per_s"):
            assert math.isfinite(float(row[key]))
        assert float(row["fill"]) > 0 and float(row["nonces_per_s"]) > 0
        assert (tmp_path / f"dense-8b_{path}.png").exists() == plot


@pytest.mark.parametrize("bad", [["--presets", "gpt-5"], ["--paths", "sglang"], ["--loads", "0.5,x"],
                                 ["--loads", "2.0"], ["--requests", "3"]])
def test_bench_sim_bad_arguments(bad, tmp_path, capsys):
    assert main(["bench-sim", "--out-dir", str(tmp_path), "--no-plot"] + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpoc: error:")


def test_oracle_model_is_the_true_curve_and_keeps_every_chat_step_within_the_slo():
    """The oracle (true curve behind the model interface) never over-fills a chat step: with it, every
    step's true time stays within 1 + slo of its chat rows alone — the control loop is exact given a
    perfect model, so a learnt model's shortfall is the model's."""
    preset = small_preset()
    trace = trace_for(preset, 60.0, 60, seed=5)
    engine = _Engine(preset, trace, SimConfig(path="hf", model="oracle"))
    chat_only = []
    original = engine._capacity

    def watched(chat_work):
        chat_only.append(chat_work)
        return original(chat_work)

    engine._capacity = watched
    result = engine.run()
    assert result.poc_tokens > 0
    for step, chat_work in zip(result.steps, chat_only):
        if step.chat_tokens:
            assert step.seconds <= (1 + 0.05) * preset.curve.seconds(chat_work) * (1 + 1e-9)
    with pytest.raises(ValueError):
        SimConfig(model="crystal-ball")
