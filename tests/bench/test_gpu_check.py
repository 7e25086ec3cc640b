"""bench/gpu_check.py end to end on CPU (``--dry-run``: tiny shapes, Triton interpreter), its budget skipping, and
the comparison logic of bench/gpu_check_exact.py (which must be able to fail)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_exact as X  # noqa: E402

STEPS = ["env", "install", "pick", "normals", "reflect", "readout", "smst", "gpu_tests", "bench_kernels",
         "bench_merkle", "hf"]
CHECK_STEPS = ["pick", "normals", "reflect", "readout", "smst"]


def _run(out: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    doc = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc, doc


def test_dry_run_runs_every_step_and_writes_json_and_markdown(tmp_path):
    proc, doc = _run(tmp_path, timeout=600)  # ~1.5 min on an idle 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = doc["steps"]
    assert list(steps) == STEPS
    for name, step in steps.items():
        assert step["status"] in ("PASS", "FAIL", "DONE"), (name, step["summary"], step.get("error"))
    for name in CHECK_STEPS:  # every check's code path ran on at least one case
        checks = steps[name]["details"]["checks"]
        assert checks and all(c["cases"] > 0 and c["complete"] for c in checks), (name, checks)
        for c in checks:
            assert (c["status"] == "FAIL") == bool(c["first_failure"]), c
    # Platform-independent on CPU too: integer SMST roots, the reflection's rounding points, the readout
    for name in ("reflect", "readout", "smst"):
        assert steps[name]["status"] == "PASS", steps[name]["summary"]
    assert steps["gpu_tests"]["details"]["counts"].get("skipped", 0) > 0  # GPU tests collected, skipped on CPU
    assert len(steps["bench_kernels"]["details"]["rows"]) == 9
    assert steps["bench_merkle"]["details"]["rows"][0]["node_hashes_per_s"] > 0
    hf = steps["hf"]["details"]
    assert set(hf["phases"]) == {"build", "pure_poc", "idle_poc", "chat_off", "chat_on", "artifacts"}, hf
    assert not hf["errors"] and hf["phases"]["artifacts"]["fraud"] is False
    assert hf["phases"]["chat_on"]["tpot_ms_p50"] > 0
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("## GPU verification: DRY RUN")
    assert "| step | status |" in md and "| op | ms (median) |" in md and "| N leaves |" in md
    assert "chat TPOT p50 / p90, PoC on" in md
    for name in ("log.txt", "pytest_gpu.txt", "hf.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_steps_that_do_not_fit_the_budget_are_skipped_and_named(tmp_path):
    proc, doc = _run(tmp_path, "--budget", "60", "--steps", "env,pick,smst", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = doc["steps"]
    assert steps["env"]["status"] == "DONE"
    for name in ("pick", "smst"):  # dry budgets 200 s each: half of that does not fit in what is left of 60 s
        assert steps[name]["status"] == "SKIP" and "budget" in steps[name]["summary"], steps[name]
    md = (tmp_path / "results.md").read_text()
    assert "Skipped by the budget: pick, smst" in md


def test_check_stops_when_its_budget_is_spent():
    checks = X.check_pick(torch.device("cpu"), hiddens=(64,), batches=(2,), rounds=3, stop=lambda: True)
    batched = next(c for c in checks if "[B, H]" in c.name)
    assert not batched.complete and batched.cases == 0 and batched.status == "EMPTY"


def test_describe_order_names_the_orders():
    scores = [50, 30, 40, 10, 20]  # picks {1, 2, 3}: scores 30, 40, 10
    assert X.describe_order([1, 2, 3], scores) == "ascending index"
    assert X.describe_order([3, 1, 2], scores) == "ascending score"
    assert X.describe_order([2, 1, 3], scores) == "descending score"
    assert X.describe_order([1, 3, 2], scores).startswith("k-1 ascending index")
    assert X.describe_order([2, 3, 1], scores).startswith("none of")


def _rows(n, h, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g) * 3).to(torch.bfloat16)


def test_reflect_explanation_rejects_a_wrong_row_and_accepts_a_boundary_flip():
    h = 64
    x = _rows(64, h, 1)
    v = torch.randn(h, generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    want = X.R.reflect(x, v)
    bad = want.clone()
    bad[:, 5] = bad[:, 5] * 2 + 1  # not any reflect expression's output
    assert all(X.explain_reflect_rows(x, v, bad, want))
    # Each row with its dot moved by one bf16 ulp: explained only where the exact dot lies at that rounding boundary.
    vb = v.to(torch.bfloat16)
    dot = torch.sum(x * vb, dim=-1, keepdim=True)
    up = (dot.view(torch.int16) + 1).view(torch.bfloat16)
    moved = x - (2 * up) * vb
    differs = (moved.view(torch.int16) != want.view(torch.int16)).any(dim=1)
    reasons = X.explain_reflect_rows(x[differs], v, moved[differs], want[differs])
    assert reasons and all("rounding boundary" in r for r in reasons)  # random rows are far from a boundary


def test_fp16_boundary_distance():
    one = torch.tensor([1.0])
    assert X._fp16_boundary_ulps(one).item() > 1000  # fp16 1.0 is exact: far from a boundary
    mid = torch.tensor([1.0 + 2.0**-11])  # exactly halfway between fp16 1.0 and 1.0 + 2^-10
    assert X._fp16_boundary_ulps(mid).item() == 0


def test_a_raising_check_is_recorded_as_a_failure_and_reported(tmp_path):
    import gpu_check as G

    run = G.Run(tmp_path, dry=True, budget=100)
    checks = G.guarded(run, "reflect", lambda: (_ for _ in ()).throw(RuntimeError("boom on the device")))
    assert [c.status for c in checks] == ["FAIL"] and "boom on the device" in checks[0].first_failure
    status, summary, details = G.checks_outcome(run, checks)
    assert status == "FAIL" and "reflect (raised)" in summary
    run.results["reflect"] = G.StepResult("reflect", status, 1.0, 25.0, summary, details)
    run.results["hf"] = G.StepResult("hf", "SKIP", 0.0, 150.0, "skipped: 3 s of the total budget left")
    run.save()
    md = (tmp_path / "results.md").read_text()
    assert "| reflect (raised) | FAIL | 0/1 | RuntimeError: boom on the device |" in md
    assert "Skipped by the budget: hf" in md and "not reached: env, install, pick" in md


def test_step_budgets_fit_in_eight_minutes_and_state_their_estimate():
    import gpu_check as G

    assert [name for name, _ in G.ORDER] == list(G.STEPS) == STEPS
    assert sum(budget for budget, _ in G.STEPS.values()) <= G.TOTAL_BUDGET <= 8 * 60
    assert all(len(estimate) > 30 for _, estimate in G.STEPS.values())


def test_order_counts_classify_rows():
    scores = torch.tensor([[50, 30, 40, 10, 20]] * 3)
    got = torch.tensor([[1, 2, 3], [3, 1, 2], [1, 3, 2]])  # ascending index, ascending score, derived
    counts = X.order_counts(got, scores)
    assert counts == {"ascending index": 1, "ascending score": 1, "descending score": 0, "derived": 1, "rows": 3}
