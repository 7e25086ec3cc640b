"""One command settles the open GPU checks and records every GPU figure (issue 13), in <= 8 minutes on an H100/H200.

    python3 bench/gpu_check.py --out bench/gpu_results/      # on the GPU machine (bare: it builds what it needs)
    python3 bench/gpu_check.py --dry-run --out /tmp/gpu_dry   # CPU, tiny shapes, Triton interpreter (CI runs this)
    python3 bench/gpu_check.py --fetch-wheels                 # here, before a run on a machine without registries

A machine that cannot reach a package registry gets the missing packages as wheels: ``--fetch-wheels`` puts them in
``.whl/`` (git-ignored), which then travels with the working tree; write ``--out`` to a folder that comes back
from that machine (e.g. ``--out "$OUT/gpu_results"``) and give the command ~9.5 minutes.

Steps (each isolated: an exception is recorded as ERROR and the next step runs; results.json and results.md are
rewritten after every step, so a timeout still leaves them): env, install, pick, normals, reflect, readout, smst,
gpu_tests, bench_kernels, bench_merkle, hf. Each has a time budget (STEPS below, with the bytes/FLOPs estimate
it rests on); a step stops its remaining cases when its budget is spent, and a step that no longer fits the
total budget is skipped and named in the report. Output (``--out``): results.json (machine-readable),
results.md (a section ready for bench/RESULTS.md), log.txt, pytest_gpu.txt, hf.json, hf_log.txt.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WHEEL_DIR = ROOT / ".whl"
SITE = Path(os.environ.get("CPOC_GPU_CHECK_SITE", "/tmp/cpoc_gpu_check_site"))
sys.path[:0] = [str(ROOT), str(BENCH)]
# Carried to a machine that cannot reach a registry (transformers' continuous batching glue needs 5.20-5.24; the
# lent H100/H200 image has torch, triton, pybind11, pytest and an older transformers).
WHEELS = ["transformers==5.24.0", "regex==2026.11.19"]  # regex: transformers checks its version at import
TRANSFORMERS_RANGE = ((5, 20), (5, 24))

# ==================================================================================================== budgets
# name: (seconds on an H100/H200, estimate). Card specs used: H100 SXM 3.35 TB/s HBM3, 989 TFLOP/s dense bf16,
# 67 TFLOP/s fp32; H200 4.8 TB/s, same rates (the copy measured on the lent H200: ~4.3 TB/s read + write).
STEPS: dict[str, tuple[float, str]] = {
    "env": (5, "nvidia-smi + device properties: no device work"),
    "install": (60, "build cpoc_kernels._C (5 C++ files, -O3, compiled in parallel: ~15 s on 16 cores), install carried "
                    "wheels --no-deps (~5 s), import torch/triton/cpoc_kernels (~5 s)"),
    "pick": (20, "9 (H, B) groups x 8 rounds of int64 scores [<=200, <=7168] (<= 11 MB per topk, ~0.3 GB in all: "
                 "< 0.1 ms of HBM); host side dominates: pick_table on the CPU (mmh + stable argsort of <= 1.4 M "
                 "int64, ~0.15 s per call, ~4 s in all) and 1 800 one-nonce topk calls with a sync (~0.1 s)"),
    "normals": (40, "golden: 49 small cases (launch-bound, ~1 s); poc_inputs vs reference on 16x1024x4096 (legacy, "
                    "stronger), 4x256x7168, 64x64x1024: 150 M normals, ~40 FLOP each = 6 GFLOP (< 1 ms at 67 TFLOP/s "
                    "fp32); bytes: kernel writes 4+2+2 B/element, the reference ~12 passes x 4 B: ~8 GB = 2.5 ms at "
                    "3.35 TB/s; the budget is ~12 kernel specialisations to compile (dtype x RNG x layout, ~1-2 s each) and the "
                    "per-nonce reference launches"),
    "reflect": (40, "bf16 rows 16384x1024, 8192x4096, 4096x7168 (32/64/56 MB, hidden + residual): 4 op runs + "
                    "reference ~6 passes = ~2.5 GB = 0.8 ms; ~16 kernel specialisations to compile (2 kernels x block size "
                    "x residual or not, the golden rows' sizes too; ~1-2 s each); the row "
                    "explanation runs only on differing rows; CUDA graph 512x4096 x 4 replays: negligible"),
    "readout": (25, "B=512 x H in (1024, 4096, 7168) fp32 + 256x4096 bf16: 30 MB read; the torch reference is a "
                    "per-nonce loop (host pick + 11 Haar normal() calls, ~150 launches/nonce): 1 800 nonces x 150 x "
                    "~8 us = ~2.5 s, ~8 kernel specialisations to compile (~10 s), the fp32 replay of differing rows"),
    "smst": (20, "device roots of 1, 1k, 100k, 1M, 50k leaves (25-33 levels of ~12 small launches + one host sync "
                 "each: ~10 ms/root; 1M leaves = ~3M SHA-256 blocks, < 1 ms of integer work); C++ host roots: ~1.2 M "
                 "leaves + ~4 M nodes at ~0.3 us = ~1.5 s; golden Go trees (<= 64 leaves): ~30 roots, ~0.3 s"),
    "gpu_tests": (55, "pytest -m gpu in a subprocess: collection + imports ~15 s, tests/merkle (4 roots) and "
                      "tests/bench/test_gpu_exact.py (smaller copies of the checks above; kernels already compiled: Triton's "
                      "disk cache) ~20 s"),
    "bench_kernels": (45, "fleet shapes: inputs 32x1024x4096 bf16 = 268 MB written (~80 us at 3.35 TB/s); reflect "
                          "32768x4096 bf16 h+r read+write = 1.07 GB (~0.32 ms); readout 0.5 MB; 17 do_bench timings x "
                          "(25 ms warm-up + 100 ms) + the slow references (up to ~50 ms a call) + 1 GiB copy: ~25 s"),
    "bench_merkle": (25, "N = 65 536 / 1 M / 4 M leaves: 4 M x ~3 SHA-256 blocks x 64 rounds x ~30 int ops = 23 G ops "
                         "(~1 ms); roots are launch/sync-bound (25-33 levels); 3 x 3 timings x 200 ms + C++ roots up "
                         "to 1 M (~2 s): ~10 s"),
    "hf": (140, "Qwen3-0.6B shape (0.44 B non-embedding params): a 1024-token nonce = 2 x 0.44e9 x 1024 + attention "
                "= ~1.1 TFLOP (~2.5 ms at ~450 TFLOP/s effective); own process (torch + transformers import ~10 s), "
                "deterministic model build ~20 s (0.6 B host uniforms), pure PoC 128 nonces, 10 s of idle continuous "
                "PoC, chat 48 requests x ~80 tokens at 16 in flight with PoC off then on (~2 x 15 s), 64 artifacts "
                "recomputed: ~90 s"),
}
TOTAL_BUDGET = 480.0  # 8 minutes = sum(STEPS) + 5 s; a step that is skipped or ends early leaves time to the next
DRY_SCALE = 10.0  # budgets on a 2-core CPU under the Triton interpreter


# ==================================================================================================== results
@dataclass
class StepResult:
    name: str
    status: str = "PENDING"  # PASS | FAIL | DONE (measured, no verdict) | ERROR | SKIP
    seconds: float = 0.0
    budget: float = 0.0
    summary: str = ""
    details: dict | None = None
    error: str | None = None


class Run:
    """State of one gpu_check run: the clock, the results (written after every change) and the log."""

    def __init__(self, out: Path, dry: bool, budget: float):
        self.out, self.dry, self.budget = out, dry, budget
        self.t0 = time.monotonic()
        self.results: dict[str, StepResult] = {}
        self.meta: dict = dict(dry_run=dry, started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               budget_s=budget)
        self.lock = threading.RLock()
        self.step_deadline = float("inf")
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "log.txt", "a", buffering=1)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def stop(self) -> bool:
        """True once the current step's budget (or the total) is spent: checks stop their remaining cases."""
        return time.monotonic() > self.step_deadline

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")

    def save(self) -> None:
        with self.lock:
            doc = dict(meta=dict(self.meta, elapsed_s=self.elapsed()),
                       steps={k: vars(v) for k, v in self.results.items()})
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(doc, indent=1, default=str))
            tmp.replace(self.out / "results.json")
            try:
                text = markdown_report(doc)
            except Exception as exc:  # noqa: BLE001  (the JSON above is the record; never lose it to the report)
                text = f"## GPU verification\n\nreport failed: {type(exc).__name__}: {exc}; see results.json"
            (self.out / "results.md").write_text(text + "\n")


def run_step(run: Run, name: str, fn) -> StepResult:
    budget = STEPS[name][0] * (DRY_SCALE if run.dry else 1.0)
    res = StepResult(name, budget=budget)
    with run.lock:
        run.results[name] = res
    left = run.left()
    if left < 0.5 * budget:
        res.status, res.summary = "SKIP", f"skipped: {left:.0f} s of the total budget left, the step needs ~{budget:.0f} s"
        run.log(f"== {name}: {res.summary}")
        run.save()
        return res
    run.log(f"== {name} (budget {budget:.0f} s; {STEPS[name][1]})")
    run.step_deadline = time.monotonic() + min(budget, max(left, 0.0))
    t0 = time.monotonic()
    try:
        status, summary, details = fn(run)
        res.status, res.summary, res.details = status, summary, details
    except Exception as exc:  # noqa: BLE001  (recorded; the next step runs)
        res.status, res.summary = "ERROR", f"{type(exc).__name__}: {exc}"[:500]
        res.error = "".join(traceback.format_exception(exc))[-4000:]
        run.log(res.error)
    finally:
        run.step_deadline = float("inf")
        res.seconds = time.monotonic() - t0
        run.log(f"-> {name}: {res.status} in {res.seconds:.1f} s: {res.summary}")
        free_device_memory()
        run.save()
    return res


def free_device_memory() -> None:
    if "torch" in sys.modules:
        import gc

        gc.collect()
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def device_of(run: Run):
    import torch

    return torch.device("cpu" if run.dry else "cuda")


def checks_outcome(run: Run, checks) -> tuple[str, str, dict]:
    for c in checks:
        run.log(c.line())
        for note in c.notes:
            run.log(f"       note: {note}")
    failed = [c for c in checks if c.status != "PASS"]
    incomplete = [c.name for c in checks if not c.complete]
    status = "FAIL" if failed else "PASS"
    summary = f"{len(checks) - len(failed)}/{len(checks)} checks pass"
    if failed:
        summary += "; failing: " + "; ".join(f"{c.name} ({c.failures}/{c.cases})" for c in failed)
    if incomplete:
        summary += f"; stopped by the budget: {', '.join(incomplete)}"
    return status, summary, {"checks": [c.to_json() for c in checks]}


# ==================================================================================================== env, install
def sh(cmd, timeout: float, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def child_env(extra: dict | None = None) -> dict:
    """Environment for child processes: the repo (and carried wheels) importable, this run's TRITON_INTERPRET."""
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else []) + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def step_env(run: Run):
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                platform=platform.platform(), date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing ({exc})"
    try:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in sh(["lscpu"], 10).stdout.splitlines()
                            if ln.startswith("Model name")), platform.processor())
    except Exception:  # noqa: BLE001
        info["cpu"] = platform.processor()
    try:
        info["git_commit"] = sh(["git", "rev-parse", "--short", "HEAD"], 10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        if shutil.which("nvidia-smi"):
            q = sh(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv,noheader"], 20)
            parts = [s.strip() for s in q.stdout.strip().split(",")]
            if len(parts) >= 4:
                info.update(driver=parts[0], max_sm_clock=parts[1], max_mem_clock=parts[2], power_limit=parts[3])
    else:
        info.update(card="none (CPU)" if run.dry else "NO CUDA DEVICE", driver=None)
    run.meta["env"] = info
    status = "DONE" if (run.dry or torch.cuda.is_available()) else "FAIL"
    return status, ", ".join(f"{k} {v}" for k, v in info.items() if k in ("card", "driver", "torch", "triton")), info


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def install_plan() -> dict:
    """What the install step must do on this machine (pure inspection, no changes)."""
    from importlib import metadata

    plan: dict = {}
    for dist in ("torch", "triton", "pybind11", "transformers", "pytest", "numpy"):
        try:
            plan[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            plan[dist] = None
    tf = plan["transformers"]
    plan["transformers_supported"] = bool(tf) and TRANSFORMERS_RANGE[0] <= _version_tuple(tf) <= TRANSFORMERS_RANGE[1]
    plan["wheels"] = sorted(str(p.name) for p in WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
    probe = sh([sys.executable, "-c", "import cpoc_kernels._C"], 60, env=child_env())
    plan["native_built"] = probe.returncode == 0
    return plan


BUILD_EXT = ("from pybind11.setup_helpers import ParallelCompile; ParallelCompile(default={jobs}).install(); "
             "import runpy, sys; sys.argv = ['setup.py'{dry}, 'build_ext', '--inplace', '-q']; "
             "runpy.run_path('setup.py', run_name='__main__')")


def pip(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], timeout)


def step_install(run: Run):
    """Build what the repo needs and install what the machine lacks; never replaces the machine's torch/triton."""
    t = {}
    t0 = time.monotonic()
    plan = install_plan()
    run.log(f"   found: {json.dumps(plan)}")
    if plan["torch"] is None:  # a machine without torch: only where a registry is reachable
        r = pip(["install", "-q", "torch"], 300)
        if r.returncode:
            raise RuntimeError(f"torch is missing and pip could not install it: {r.stderr[-500:]}")
    if plan["pybind11"] is None and not plan["native_built"]:
        if run.dry:
            run.log("   would pip install pybind11 (needed to build cpoc_kernels._C)")
        else:
            r = pip(["install", "-q", "--retries", "1", "--timeout", "10", "pybind11"], 120)
            run.log(f"   pip install pybind11: rc {r.returncode}")
            plan["pybind11"] = "installed" if r.returncode == 0 else None
    t["inspect_s"] = time.monotonic() - t0

    t1 = time.monotonic()
    dry_flag = ", '--dry-run'" if (run.dry and plan["native_built"]) else ""
    if dry_flag and plan["pybind11"] is None:
        plan["native_build"] = "already built (pybind11 not installed: the builder was not exercised)"
    elif not plan["native_built"] or dry_flag:
        r = sh([sys.executable, "-c", BUILD_EXT.format(jobs=os.cpu_count() or 2, dry=dry_flag)], 600,
               env=child_env())
        plan["native_build"] = "distutils --dry-run (already built)" if dry_flag else f"built, rc {r.returncode}"
        if r.returncode:
            run.log(f"   native build failed (the package falls back to pure torch): {r.stderr[-1500:]}")
    else:
        plan["native_build"] = "already built"
    t["native_build_s"] = time.monotonic() - t1

    t2 = time.monotonic()
    if not plan["transformers_supported"]:
        wheels = [str(WHEEL_DIR / w) for w in plan["wheels"]]
        base = ["install", "-q", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE)]
        if run.dry:
            plan["transformers_install"] = f"would install into {SITE}: {wheels or WHEELS}"
        elif wheels:  # one at a time: a wheel for another Python must not keep the others out
            codes = {}
            for wheel in wheels:
                r = pip(base + ["--no-index", wheel], 180)
                codes[Path(wheel).name] = r.returncode
                if r.returncode:
                    run.log(f"   {Path(wheel).name}: {r.stderr.strip()[-300:]}")
            plan["transformers_install"] = f"carried wheels, return codes {codes}"
        else:
            r = pip(base + ["--retries", "0", "--timeout", "8", *WHEELS], 180)
            plan["transformers_install"] = f"registry, rc {r.returncode} {r.stderr[-300:]}"
        if SITE.is_dir() and str(SITE) not in sys.path:
            sys.path.insert(0, str(SITE))
    t["transformers_s"] = time.monotonic() - t2

    t3 = time.monotonic()
    import torch
    import triton

    import cpoc_kernels.ops  # registers torch.ops.cpoc.*
    from cpoc_kernels._native import native

    plan["loaded"] = dict(torch=torch.__version__, triton=triton.__version__, cpoc_kernels=cpoc_kernels.ops.__file__)
    plan["native_loaded"] = native() is not None
    probe = sh([sys.executable, "-c", "import transformers; print(transformers.__version__)"], 120, env=child_env())
    plan["transformers_for_hf_step"] = probe.stdout.strip() if probe.returncode == 0 else f"import failed: {probe.stderr[-300:]}"
    t["imports_s"] = time.monotonic() - t3
    t["total_s"] = time.monotonic() - t0
    plan["timings"] = t
    run.meta["install"] = plan
    ok = plan["native_loaded"]
    summary = (f"native extension {'loaded' if ok else 'NOT built (pure-torch fallbacks)'} ({plan['native_build']}); "
               f"transformers for the HF step: {plan['transformers_for_hf_step']}; {t['total_s']:.1f} s")
    return ("DONE" if ok else "FAIL"), summary, plan


def fetch_wheels() -> int:
    """Download WHEELS for the GPU machine's Python (3.12, x86-64) into .whl/ (git-ignored; name it in ``carry``)."""
    WHEEL_DIR.mkdir(exist_ok=True)
    plats = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plats, "-d", str(WHEEL_DIR), *WHEELS]
    print(" ".join(cmd))
    return subprocess.call(cmd)


# ==================================================================================================== checks
def guarded(run: Run, label: str, fn) -> list:
    """The checks ``fn()`` returns, or one failed check naming the exception (the step's other checks still count)."""
    import gpu_check_exact as X

    try:
        return list(fn())
    except Exception as exc:  # noqa: BLE001
        run.log("".join(traceback.format_exception(exc))[-3000:])
        check = X.Check(f"{label} (raised)", cases=1)
        check.fail(f"{type(exc).__name__}: {exc}"[:600])
        return [check]


def step_pick(run: Run):
    import gpu_check_exact as X

    args = dict(hiddens=(64, 100), batches=(1, 3), rounds=2, per_nonce_rows=2) if run.dry else {}
    return checks_outcome(run, guarded(run, "pick order", lambda: X.check_pick(device_of(run), stop=run.stop, **args)))


def step_normals(run: Run):
    import gpu_check_exact as X

    dev = device_of(run)
    shapes = [(2, 4, 64, False), (2, 3, 100, True)] if run.dry else [
        (16, 1024, 4096, False), (16, 1024, 4096, True), (4, 256, 7168, False), (64, 64, 1024, True)]
    checks = guarded(run, "normals vs golden", lambda: X.check_normals_golden(dev, stop=run.stop))
    checks += guarded(run, "poc_inputs vs torch", lambda: X.check_inputs_vs_torch(
        dev, shapes, backend="triton" if run.dry else "auto", stop=run.stop))
    return checks_outcome(run, checks)


def step_reflect(run: Run):
    import gpu_check_exact as X

    dev = device_of(run)
    shapes = [(8, 64), (4, 200)] if run.dry else [(16384, 1024), (8192, 4096), (4096, 7168)]
    checks = guarded(run, "reflect", lambda: X.check_reflect(dev, shapes, backend="triton" if run.dry else "auto",
                                                             stop=run.stop))
    if dev.type == "cuda":
        checks += guarded(run, "reflect in a CUDA graph", lambda: [X.check_reflect_cuda_graph(dev)])
    return checks_outcome(run, checks)


def step_readout(run: Run):
    import torch

    import gpu_check_exact as X

    shapes = [(4, 64, torch.float32), (3, 100, torch.bfloat16)] if run.dry else [
        (512, 1024, torch.float32), (512, 4096, torch.float32), (512, 7168, torch.float32), (256, 4096, torch.bfloat16)]
    return checks_outcome(run, guarded(run, "readout", lambda: X.check_readout(
        device_of(run), shapes, backend="triton" if run.dry else "auto", stop=run.stop)))


def step_smst(run: Run):
    import gpu_check_exact as X

    # Under the interpreter a root costs ~25 launches of a second or more each: one golden tree (compared with the
    # Go root and the C++ root), no random tree.
    sizes = [] if run.dry else [(1, 2**20), (1000, 2**20), (100_000, 2**24), (1_000_000, 2**20),
                                          (50_000, 2**32)]
    return checks_outcome(run, guarded(run, "SMST", lambda: X.check_smst(
        device_of(run), sizes, golden_max_leaves=1 if run.dry else 64, golden_limit=1 if run.dry else None,
        stop=run.stop)))


# ==================================================================================================== tests, benches
def gpu_test_files() -> list[str]:
    """Test files holding GPU-marked tests (collecting only these keeps unrelated import errors out)."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if re.search(r"mark\.gpu\b", path.read_text(errors="replace")):
            found.append(str(path.relative_to(ROOT)))
    return found


def step_gpu_tests(run: Run):
    files = gpu_test_files()
    if not files:
        return "FAIL", "no GPU-marked test files found", {}
    timeout = max(10.0, run.step_deadline - time.monotonic())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *files]
    run.log("   " + " ".join(cmd))
    env = child_env({"TRITON_INTERPRET": "1" if run.dry else "0"})
    try:
        proc = sh(cmd, timeout, env=env)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr)]
        text, rc = "".join(parts) + f"\nTIMEOUT after {timeout:.0f} s", None
    (run.out / "pytest_gpu.txt").write_text(text)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1]
                                               if text.strip() else "")}
    for line in text.strip().splitlines()[-15:]:
        run.log("   | " + line)
    details = dict(files=files, returncode=rc, counts=counts)
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if rc is None:
        return "FAIL", f"pytest timed out after {timeout:.0f} s ({counts})", details
    if bad or rc not in (0, 5):
        return "FAIL", f"pytest rc {rc}: {counts}", details
    if not counts.get("passed"):
        return ("DONE" if run.dry else "FAIL"), f"no GPU test ran: {counts}", details
    return "PASS", f"{counts}", details


def step_bench_kernels(run: Run):
    import gpu_kernels
    from gpu_timing import make_timer

    dev = device_of(run)
    timer = make_timer(dev, cpu_reps=1)
    result = gpu_kernels.run(dev, "tiny" if run.dry else "full", log=run.log, timer=timer)
    run.meta["copy_gbs"] = result["copy_gbs"]
    best = {r["op"]: r for r in result["rows"]}
    inputs = next(iter(best.values()))
    return "DONE", (f"copy {result['copy_gbs']:.0f} GB/s; {len(result['rows'])} rows; first: {inputs['op']} "
                    f"{inputs['ms']:.3f} ms, {inputs['pct_copy']:.0f} % of copy, {inputs['speedup']:.1f}x"), result


def step_bench_merkle(run: Run):
    import merkle_gpu
    from gpu_timing import make_timer

    dev = device_of(run)
    if run.dry:  # one call per timing: an interpreted root costs seconds
        result = merkle_gpu.run(dev, [8], check_max=0, log=run.log, timer=_once_ms, cpp_max=8, time_root=False)
    else:
        result = merkle_gpu.run(dev, [1 << 16, 1 << 20, 1 << 22], check_max=1 << 20, log=run.log,
                                timer=make_timer(dev, rep_ms=200), copy_gbs=run.meta.get("copy_gbs"))
    bad = [r["n"] for r in result["rows"] if r["root_equals_cpp"] is False]
    top = result["rows"][-1]
    rate = "root not timed" if top["leaves_per_s"] is None else f"{top['leaves_per_s']:.3g} leaves/s"
    return ("FAIL" if bad else "DONE"), (f"N={top['n']}: {rate}, node kernel {top['node_hashes_per_s']:.3g} hashes/s"
                                         + (f"; root != C++ for N={bad}" if bad else "")), result


def _once_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def step_hf(run: Run):
    timeout = max(10.0, run.step_deadline - time.monotonic())
    out_json = run.out / "hf.json"
    cmd = [sys.executable, str(BENCH / "gpu_check_hf.py"), "--json", str(out_json), "--budget", f"{timeout - 15:.0f}"]
    if run.dry:
        cmd.append("--dry-run")
    run.log("   " + " ".join(cmd))
    with open(run.out / "hf_log.txt", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    phases, errors = report.get("phases", {}), report.get("errors", {})
    for name, ph in phases.items():
        run.log(f"   {name}: {json.dumps(ph, default=str)[:400]}")
    for name, err in errors.items():
        run.log(f"   ERROR in {name}: {err.strip().splitlines()[-1] if err.strip() else err}")
    if rc is None:
        errors["timeout"] = f"killed after {timeout:.0f} s"
    art = phases.get("artifacts", {})
    summary = (f"pure {phases.get('pure_poc', {}).get('nonces_per_s', float('nan')):.1f} nonces/s; idle continuous "
               f"{phases.get('idle_poc', {}).get('nonces_per_s', float('nan')):.1f} nonces/s; TPOT p50 "
               f"{phases.get('chat_off', {}).get('tpot_ms_p50')} -> {phases.get('chat_on', {}).get('tpot_ms_p50')} ms; "
               f"artifacts {art.get('bit_identical')}/{art.get('compared')} bit-identical, fraud={art.get('fraud')}")
    if report.get("skipped"):
        summary += f"; skipped: {report['skipped']}"
    if not report:
        return "ERROR", f"no hf.json (rc {rc}); see hf_log.txt", {}
    status = "ERROR" if errors else ("FAIL" if art.get("fraud") else "DONE")
    return status, summary, report


# ==================================================================================================== report
def _fmt(v, spec=".3g"):
    return "–" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def markdown_report(doc: dict) -> str:
    import gpu_kernels
    import merkle_gpu

    meta, steps = doc["meta"], doc["steps"]
    env = meta.get("env", {})
    title = "DRY RUN (CPU, Triton interpreter: figures and the platform-dependent verdicts mean nothing)" \
        if meta.get("dry_run") else env.get("card", "GPU")
    lines = [f"## GPU verification: {title}", "",
             f"`python3 bench/gpu_check.py` — {env.get('date_utc', meta.get('started_utc'))} UTC; card "
             f"{env.get('card')}, driver {env.get('driver')}, CUDA {env.get('torch_cuda')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, Python {env.get('python')}, host CPU {env.get('cpu')}, commit "
             f"{env.get('git_commit')}; {meta.get('elapsed_s', 0):.0f} s of a {meta.get('budget_s', 0):.0f} s budget.",
             "", "| step | status | s (budget) | summary |", "|---|---|---:|---|"]
    for s in steps.values():
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} ({s['budget']:.0f}) | "
                     f"{s['summary'].replace('|', '/')} |")
    skipped = [s["name"] for s in steps.values() if s["status"] == "SKIP"]
    missing = [n for n in STEPS if n not in steps]
    if skipped or missing:
        lines += ["", f"Skipped by the budget: {', '.join(skipped) or '–'}; not reached: {', '.join(missing) or '–'}."]
    check_lines = []
    for s in steps.values():
        for c in (s.get("details") or {}).get("checks", []) if isinstance(s.get("details"), dict) else []:
            check_lines.append(f"| {c['name']} | {c['status']} | {c['cases'] - c['failures']}/{c['cases']} | "
                               f"{(c['first_failure'] or '').replace('|', '/')[:300]} |")
    if check_lines:
        lines += ["", "| check | verdict | equal / cases | first failure |", "|---|---|---:|---|", *check_lines]
    kern = steps.get("bench_kernels", {}).get("details")
    if kern and kern.get("rows"):
        lines += ["", "**Fused kernels vs the torch reference path (same card, same workload)**", "",
                  *gpu_kernels.markdown(kern)]
    merk = steps.get("bench_merkle", {}).get("details")
    if merk and merk.get("rows"):
        lines += ["", "**SMST root on the device (Triton SHA-256) vs the C++ root on the host**", "",
                  *merkle_gpu.markdown(merk)]
    hf = steps.get("hf", {}).get("details")
    if hf and hf.get("phases"):
        ph = hf["phases"]
        off, on, art = ph.get("chat_off", {}), ph.get("chat_on", {}), ph.get("artifacts", {})
        cfg = hf.get("config", {})
        lines += ["", f"**HF continuous PoC ({cfg.get('model')} bf16, deterministic weights, seq_len "
                      f"{cfg.get('seq_len')}, {cfg.get('max_batch_tokens')} tokens/step; chat: {cfg.get('concurrency')}"
                      f" requests in flight, {cfg.get('requests')} requests, prompts {cfg.get('prompt_len')}, outputs "
                      f"{cfg.get('output_len')})**", "",
                  "| measure | value |", "|---|---|",
                  f"| pure PoC (PoCRunner, plain batches) | {_fmt(ph.get('pure_poc', {}).get('nonces_per_s'))} nonces/s |",
                  f"| PoC alone in the engine (no chat) | {_fmt(ph.get('idle_poc', {}).get('nonces_per_s'))} nonces/s "
                  f"({_fmt(ph.get('idle_poc', {}).get('of_pure'), '.0%')} of pure) |",
                  f"| chat TPOT p50 / p90, PoC off | {_fmt(off.get('tpot_ms_p50'))} / {_fmt(off.get('tpot_ms_p90'))} ms |",
                  f"| chat TPOT p50 / p90, PoC on | {_fmt(on.get('tpot_ms_p50'))} / {_fmt(on.get('tpot_ms_p90'))} ms "
                  f"({_fmt(on.get('tpot_p50_overhead'), '+.1%')} / {_fmt(on.get('tpot_p90_overhead'), '+.1%')}) |",
                  f"| chat TTFT p50, off → on | {_fmt(off.get('ttft_ms_p50'))} → {_fmt(on.get('ttft_ms_p50'))} ms |",
                  f"| PoC beside chat | {_fmt(on.get('nonces_per_s'))} nonces/s, "
                  f"{_fmt(on.get('poc_token_share'), '.0%')} of the tokens |",
                  f"| greedy chat outputs changed by PoC | {_fmt(on.get('outputs_differ_from_off'))} |",
                  f"| artifacts vs plain batches (PoCRunner) | {_fmt(art.get('bit_identical'))}/{_fmt(art.get('compared'))}"
                  f" bit-identical ({_fmt(art.get('from_chat_run'))} from the run beside chat), max L2 {_fmt(art.get('max_l2'))}, {_fmt(art.get('mismatches_l2_gt_0_2'))} > 0.2, "
                  f"fraud={art.get('fraud')} |"]
        if hf.get("skipped") or hf.get("errors"):
            lines += ["", f"HF phases skipped: {hf.get('skipped') or '–'}; errors in: {list(hf.get('errors', {})) or '–'}"]
    return "\n".join(lines)


# ==================================================================================================== main
ORDER = [("env", step_env), ("install", step_install), ("pick", step_pick), ("normals", step_normals),
         ("reflect", step_reflect), ("readout", step_readout), ("smst", step_smst), ("gpu_tests", step_gpu_tests),
         ("bench_kernels", step_bench_kernels), ("bench_merkle", step_bench_merkle), ("hf", step_hf)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BENCH / "gpu_results")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"total seconds (default {TOTAL_BUDGET:.0f}; x{DRY_SCALE:.0f} in a dry run)")
    ap.add_argument("--steps", default=None, help="comma-separated subset of: " + ",".join(n for n, _ in ORDER))
    ap.add_argument("--fetch-wheels", action="store_true", help=f"download {WHEELS} into .whl/ and exit")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    # Before torch/triton are imported (the steps import them): a dry run is CPU-only with interpreted kernels; a GPU
    # run compiles them (tests/conftest.py would otherwise default the pytest step to the interpreter).
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    budget = args.budget if args.budget is not None else TOTAL_BUDGET * (DRY_SCALE if args.dry_run else 1.0)
    run = Run(args.out, args.dry_run, budget)
    faulthandler.enable()
    wanted = None if args.steps is None else set(args.steps.split(","))
    if wanted is not None and wanted - {n for n, _ in ORDER}:
        ap.error(f"unknown steps: {sorted(wanted - {n for n, _ in ORDER})}")

    def on_term(signum, _frame):
        run.meta["terminated"] = f"signal {signum} after {run.elapsed():.0f} s"
        run.save()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    def watchdog():  # a hung step (driver, deadlock) must not keep the results from being written
        time.sleep(budget + 60)
        run.meta["terminated"] = f"watchdog: still running {run.elapsed():.0f} s after the start"
        run.save()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    run.log(f"gpu_check: {'DRY RUN on CPU' if run.dry else 'GPU run'}, budget {budget:.0f} s, out {args.out}")
    for name, fn in ORDER:
        if wanted is None or name in wanted:
            run_step(run, name, fn)
    run.meta["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    run.save()
    run.log("")
    run.log(markdown_report(json.loads((run.out / "results.json").read_text())))
    bad = [r.name for r in run.results.values() if r.status in ("FAIL", "ERROR")]
    run.log(f"\ngpu_check finished in {run.elapsed():.0f} s; FAIL/ERROR: {bad or 'none'}; results in {args.out}")
    return 1 if bad and not run.dry else 0


if __name__ == "__main__":
    sys.exit(main())
