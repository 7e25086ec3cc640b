"""Mixed chat + continuous PoC on transformers' continuous batching: the ``cpoc demo`` and ``cpoc bench-mixed`` logic.

Chat is an open-loop Poisson stream of requests (seeded prompts and output lengths) at a rate given as a
fraction of the engine's measured chat capacity; latency is completion time minus scheduled arrival time.
Every load point runs the *same* arrival schedule twice, without and with continuous PoC, so the latency
overhead is PoC's alone. PoC throughput is compared with the pure-PoC runner (plain [B, S, H] batches).
"""
from __future__ import annotations

import csv
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpoc_kernels.artifacts import Artifact, ArtifactFile
from cpoc_kernels.progress import ProgressBar

from .continuous import ContinuousPoC, _CBInternals, cb_config
from .runner import PoCRunner


@dataclass(frozen=True)
class EngineSettings:
    """Continuous-batching sizes (explicit: needed on CPU) and the chat workload shape."""

    max_batch_tokens: int = 128
    num_blocks: int = 256
    page_size: int = 16
    max_requests_per_batch: int = 32
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (8, 24)
    mode: str = "fill"
    slo_overhead: float = 0.05
    idle_max_tokens: int | None = None  # PoC tokens in a step without chat (None: the whole batch)
    idle_max_seconds: float | None = None  # predicted duration bound of a step without chat (None: none)


@dataclass(frozen=True)
class Round:
    block_hash: str = "TEST_BLOCK"
    public_key: str = "test_pub_keys"
    seq_len: int = 64
    k: int = 12
    stronger_rng: bool = False


@dataclass
class RunResult:
    """One session: chat (maybe none) with or without continuous PoC."""

    poc: bool
    chat_rate: float
    chat_requests: int
    chat_latencies: list[float]
    chat_tokens: list[list[int]]
    window_s: float
    nonces_done: int = 0
    nonces_per_s: float = 0.0
    poc_token_share: float = 0.0
    stats: dict = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    engine_idle_s: float = 0.0
    """Time the engine loop slept with nothing to schedule during the window (its idle capacity)."""

    @property
    def idle_fraction(self) -> float:
        return self.engine_idle_s / self.window_s if self.window_s > 0 else 0.0

    def latency_ms(self, pct: float) -> float:
        if not self.chat_latencies:
            return math.nan
        return 1e3 * float(np.percentile(np.asarray(self.chat_latencies), pct))


def chat_requests(n: int, seed: int, settings: EngineSettings, vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    lo, hi = settings.prompt_len
    olo, ohi = settings.output_len
    return [(rng.integers(1, vocab, size=int(rng.integers(lo, hi + 1))).tolist(), int(rng.integers(olo, ohi + 1)))
            for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from start) of ``n`` requests at ``rate`` per second (rate inf: all at 0)."""
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


class _IdleClock(threading.Event):
    """The CB loop's wake-up event (installed by ``_CBInternals.set_wake_event``), timing how long the loop
    waits with nothing to do."""

    def __init__(self):
        super().__init__()
        self.idle_s = 0.0
        self.since: float | None = None  # count only waits that start after this (the measured window)

    def wait(self, timeout: float | None = None) -> bool:
        t0 = time.perf_counter()
        try:
            return super().wait(timeout)
        finally:
            if self.since is not None and t0 >= self.since:
                self.idle_s += time.perf_counter() - t0


def _manager(model, settings: EngineSettings):
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=settings.max_batch_tokens, num_blocks=settings.num_blocks, page_size=settings.page_size,
        max_requests_per_batch=settings.max_requests_per_batch))


def run_session(model, settings: EngineSettings, requests: Sequence[tuple[list[int], int]], arrivals: Sequence[float],
                *, poc: bool, rnd: Round | None = None, nonces: Iterable[int] | None = None,
                poc_seconds: float = 0.0, chat_rate: float = 0.0,
                progress: Callable[[int, int, dict | None], None] | None = None, timeout: float = 600.0) -> RunResult:
    """Serve ``requests`` at ``arrivals`` (open loop) on a fresh manager, with continuous PoC if ``poc``.

    Without chat, PoC runs for ``poc_seconds``. PoC throughput is measured over the chat window (first
    arrival to last completion), PoC nonces still in flight at its end are drained.
    """
    mgr = _manager(model, settings)
    idle = _IdleClock()
    _CBInternals.set_wake_event(mgr, idle)
    cp = None
    if poc:
        rnd = rnd or Round()
        cp = ContinuousPoC(model, mgr, mode=settings.mode, slo_overhead=settings.slo_overhead,
                           governor_options={"idle_max_tokens": settings.idle_max_tokens,
                                             "idle_max_seconds": settings.idle_max_seconds})
    latencies: list[float] = []
    tokens: dict[str, list[int]] = {}
    ids: list[str] = []
    try:
        mgr.start()
        if cp is not None:
            cp.start(rnd.block_hash, rnd.public_key, nonces, rnd.seq_len, rnd.k, rnd.stronger_rng)
        t0 = time.perf_counter()
        idle.since = t0
        due: dict[str, float] = {}
        i = 0
        snapshot = None
        deadline = t0 + timeout
        while len(tokens) < len(requests):
            now = time.perf_counter() - t0
            while i < len(requests) and arrivals[i] <= now:
                prompt, max_new = requests[i]
                rid = mgr.add_request(prompt, max_new_tokens=max_new)
                ids.append(rid)
                due[rid] = arrivals[i]
                i += 1
            wait = 0.01 if i >= len(requests) else max(0.0, min(0.01, arrivals[i] - now))
            out = mgr.get_result(timeout=wait) if wait > 0 else mgr.get_result(timeout=0.0005)
            if out is not None:
                if out.request_id not in due:
                    raise RuntimeError(f"unexpected output {out.request_id!r} in the chat stream")
                if out.error is not None:
                    raise RuntimeError(f"chat request {out.request_id} failed: {out.error}")
                latencies.append(time.perf_counter() - t0 - due[out.request_id])
                tokens[out.request_id] = list(out.generated_tokens)
                if progress is not None:
                    progress(len(tokens), len(requests), cp.stats() if cp is not None else None)
            if time.perf_counter() > deadline or not mgr.is_running():
                raise RuntimeError("chat requests not served in time (engine stopped?)")
        if not requests and cp is not None:
            end = t0 + poc_seconds
            while time.perf_counter() < end and not cp.failed:
                time.sleep(min(0.05, max(0.0, end - time.perf_counter())))
                if progress is not None:
                    progress(0, 0, cp.stats())
        window = time.perf_counter() - t0
        idle_s, idle.since = idle.idle_s, None
        if cp is not None:
            snapshot = cp.stats()
            cp.stop(drain=True, timeout=60)
    finally:
        mgr.stop(block=True, timeout=60)
        if cp is not None:
            cp.detach()
    res = RunResult(poc=poc, chat_rate=chat_rate, chat_requests=len(requests), chat_latencies=latencies,
                    chat_tokens=[tokens[r] for r in ids], window_s=window, engine_idle_s=min(idle_s, window))
    if cp is not None:
        res.stats = cp.stats()
        res.nonces_done = snapshot["nonces_done"]
        res.nonces_per_s = snapshot["nonces_done"] / window if window > 0 else 0.0
        res.poc_token_share = snapshot["poc_token_share"]
        res.artifacts = list(cp.collected)
        if res.stats.get("failed"):
            raise RuntimeError(f"continuous PoC failed: {res.stats['error']}")
    return res


def chat_capacity(model, settings: EngineSettings, n: int = 48, seed: int = 0) -> float:
    """Chat requests/s the engine sustains with all ``n`` requests queued at once (no PoC)."""
    reqs = chat_requests(n, seed + 1000, settings, model.config.vocab_size)
    run_session(model, settings, reqs[: max(2, n // 8)], [0.0] * max(2, n // 8), poc=False)  # warm-up
    res = run_session(model, settings, reqs, [0.0] * n, poc=False)
    return n / max(res.window_s, 1e-9)


def pure_poc_rate(model, rnd: Round, n: int = 64, batch_size: int = 16) -> float:
    """Nonces/s of the pure-PoC runner (plain [B, S, H] batches, no chat) on the same model."""
    runner = PoCRunner(model, rnd.block_hash, rnd.public_key, rnd.seq_len, k=rnd.k, batch_size=batch_size,
                       stronger_rng=rnd.stronger_rng)
    runner.run(range(10**6, 10**6 + batch_size))  # warm-up
    t0 = time.perf_counter()
    runner.run(range(n))
    return n / (time.perf_counter() - t0)


def recompute_and_validate(model, rnd: Round, artifacts: Sequence[Artifact], batch_size: int = 32):
    """The validator's view: recompute ``artifacts`` with the pure-PoC runner and run the statistical test."""
    from cpoc_kernels.validate import validate

    runner = PoCRunner(model, rnd.block_hash, rnd.public_key, rnd.seq_len, k=rnd.k, batch_size=batch_size,
                       stronger_rng=rnd.stronger_rng)
    recomputed = runner.run([a.nonce for a in artifacts])
    return validate(artifacts, recomputed, 0.2, 0.1, 0.05, k=rnd.k), recomputed


# ============================================================================================ bench


CSV_FIELDS = ["model", "dtype", "seq_len", "load", "chat_rate_rps", "chat_requests", "chat_p50_off_ms",
              "chat_p99_off_ms", "chat_p50_on_ms", "chat_p99_on_ms", "p50_overhead", "p99_overhead",
              "nonces_per_s", "pure_poc_nonces_per_s", "poc_fraction_of_pure", "goal_fraction", "idle_share",
              "goal_fraction_idle", "idle_share_filled", "of_engine_idle_rate", "poc_token_share", "nonces_preempted",
              "chat_outputs_differ", "window_s"]


def _pct_ms(values: Sequence[float], pct: float) -> float:
    return 1e3 * float(np.percentile(np.asarray(values), pct)) if len(values) else math.nan


def bench_mixed(model, model_name: str, dtype_name: str, settings: EngineSettings, rnd: Round,
                loads: Sequence[float], duration: float, min_chat: int = 6, seed: int = 0,
                capacity: float | None = None, pure_rate: float | None = None, repeats: int = 1,
                log: Callable[[str], None] = print) -> list[dict]:
    """Sweep chat load (fractions of capacity); one row per load with PoC on vs off.

    Each load point runs the same chat stream ``repeats`` times with PoC off and on, alternating (so slow
    drifts of a shared machine hit both); latencies are pooled, PoC throughput is total nonces / total time.
    The pure-PoC rate is measured before and after the sweep and averaged.

    Two views of the idle capacity: ``goal_fraction`` = 0.9·(1 − load), the nominal one; ``idle_share`` = the
    fraction of the window the engine loop sat idle serving the chat stream alone (off runs), the capacity
    that is actually left when a step's cost grows with its rows (CPU: chat at half the burst rate keeps the
    engine busy most of the time in small, inefficient steps); ``goal_fraction_idle`` = 0.9·idle_share and
    ``idle_share_filled`` = PoC's fraction of pure / idle_share. ``of_engine_idle_rate``: PoC's rate over the
    engine's own PoC rate without chat (the load-0 row, when swept): the governor's filling, apart from how
    efficient the engine's steps are for PoC compared with plain batches.
    """
    if capacity is None:
        log("measuring chat capacity (burst, no PoC) ...")
        capacity = chat_capacity(model, settings, seed=seed)
    pure_before = pure_rate
    if pure_rate is None:
        log("measuring pure-PoC throughput (PoCRunner, plain batches) ...")
        pure_before = pure_poc_rate(model, rnd)
    log(f"chat capacity {capacity:.2f} req/s; pure PoC {pure_before:.2f} nonces/s")
    rows = []
    nonce_base = 0
    for load in loads:
        rate = load * capacity
        n = 0 if load <= 0 else max(min_chat, round(rate * duration))
        reqs = chat_requests(n, seed + int(load * 1000), settings, model.config.vocab_size)
        arr = poisson_arrivals(n, rate, seed + int(load * 1000)) if n else []
        lat_off, lat_on, differ, nonces, window, tok_share, preempted = [], [], 0, 0, 0.0, [], 0
        idle_off, window_off = 0.0, 0.0
        for _ in range(max(1, repeats) if n else 1):
            off = run_session(model, settings, reqs, arr, poc=False, chat_rate=rate) if n else None
            on = run_session(model, settings, reqs, arr, poc=True, rnd=rnd,
                             nonces=iter(range(nonce_base, 2**31 - 1)), poc_seconds=duration, chat_rate=rate)
            nonce_base += on.stats.get("nonces_admitted", 0) + 1
            if off is not None:
                lat_off += off.chat_latencies
                idle_off += off.engine_idle_s
                window_off += off.window_s
                # fp32: identical (tested); bf16 on CPU: a row's matmul result can depend on the batch's row
                # count, so a near-tied greedy token may flip when the batch composition changes
                differ += sum(a != b for a, b in zip(on.chat_tokens, off.chat_tokens))
            lat_on += on.chat_latencies
            nonces += on.nonces_done
            window += on.window_s
            tok_share.append(on.poc_token_share)
            preempted += on.stats.get("nonces_preempted", 0)
        p50_off, p99_off = _pct_ms(lat_off, 50), _pct_ms(lat_off, 99)
        p50_on, p99_on = _pct_ms(lat_on, 50), _pct_ms(lat_on, 99)
        rate_poc = nonces / window if window > 0 else 0.0
        idle_share = idle_off / window_off if window_off > 0 else 1.0  # no chat: all of it
        row = dict(model=model_name, dtype=dtype_name, seq_len=rnd.seq_len, load=load, chat_rate_rps=rate,
                   chat_requests=n, chat_p50_off_ms=p50_off, chat_p99_off_ms=p99_off, chat_p50_on_ms=p50_on,
                   chat_p99_on_ms=p99_on, p50_overhead=p50_on / p50_off - 1 if lat_off else math.nan,
                   p99_overhead=p99_on / p99_off - 1 if lat_off else math.nan, nonces_per_s=rate_poc,
                   pure_poc_nonces_per_s=pure_before, goal_fraction=0.9 * max(0.0, 1.0 - load),
                   idle_share=idle_share, goal_fraction_idle=0.9 * idle_share,
                   poc_token_share=float(np.mean(tok_share)), nonces_preempted=preempted,
                   chat_outputs_differ=differ, window_s=window)
        rows.append(row)
        log(f"load {load:4.0%}: {n:3d} chat req, p50 {p50_off:7.1f} → {p50_on:7.1f} ms, p99 {p99_off:7.1f} → "
            f"{p99_on:7.1f} ms; PoC {rate_poc:6.2f} nonces/s, PoC token share {row['poc_token_share']:.0%}, "
            f"engine idle with chat alone {idle_share:.1%}"
            + (f"; {differ} chat outputs differ" if differ else ""))
        gov = on.stats.get("governor") or {}
        log(f"           governor decisions {gov.get('decisions')}, PoC fixed cost/step "
            f"{on.stats.get('poc_step_overhead_ms') or 0:.2f} ms, vetoes {on.stats.get('fixed_cost_vetoes')}, "
            f"steps {on.stats.get('steps')} ({on.stats.get('poc_steps')} with PoC)")
    pure = pure_before
    if pure_rate is None:
        pure_after = pure_poc_rate(model, rnd)
        pure = 0.5 * (pure_before + pure_after)
        log(f"pure PoC {pure_before:.2f} nonces/s before, {pure_after:.2f} after the sweep: using {pure:.2f}")
    idle_rate = next((r["nonces_per_s"] for r in rows if r["load"] == 0), math.nan)
    for row in rows:
        row["of_engine_idle_rate"] = row["nonces_per_s"] / idle_rate if idle_rate > 0 else math.nan
        row["pure_poc_nonces_per_s"] = pure
        row["poc_fraction_of_pure"] = row["nonces_per_s"] / pure
        row["idle_share_filled"] = row["poc_fraction_of_pure"] / row["idle_share"] if row["idle_share"] > 0 else math.nan
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})


def plot(rows: Sequence[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [100 * r["load"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    pure = rows[0]["pure_poc_nonces_per_s"] if rows else 0
    a.plot(loads, [r["nonces_per_s"] for r in rows], "o-", label="continuous PoC")
    a.plot(loads, [pure * r["goal_fraction"] for r in rows], "--", color="gray", label="90% of (1 − load)")
    a.plot(loads, [pure * r["goal_fraction_idle"] for r in rows], ":", color="tab:red",
           label="90% of measured idle share")
    a.axhline(pure, color="k", lw=0.8, label="pure PoC (plain batches)")
    a.set_xlabel("chat load (% of capacity)")
    a.set_ylabel("nonces/s")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    for key, style, lab in (("chat_p50_off_ms", "o--", "p50 off"), ("chat_p50_on_ms", "o-", "p50 PoC on"),
                            ("chat_p99_off_ms", "s--", "p99 off"), ("chat_p99_on_ms", "s-", "p99 PoC on")):
        b.plot(loads, [r[key] for r in rows], style, label=lab)
    b.set_xlabel("chat load (% of capacity)")
    b.set_ylabel("chat request latency (ms)")
    b.set_yscale("log")
    b.legend(fontsize=8)
    fig.suptitle(title or "continuous PoC beside chat (HF continuous batching, CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================ demo


def demo(model, model_name: str, dtype_name: str, settings: EngineSettings, rnd: Round, load: float,
         duration: float, out: Path, seed: int = 0, chat_rate: float | None = None,
         log: Callable[[str], None] = print, progress_stream=None) -> dict:
    """Chat at ``chat_rate`` req/s (default ``load`` × measured capacity) for ``duration`` s without, then with
    continuous PoC; write the artifacts (fleet file format) and validate them by recomputation."""
    from cpoc_kernels.reference.nonces import NonceIterator

    if chat_rate is None:
        capacity = chat_capacity(model, settings, n=32, seed=seed)
        rate = load * capacity
        what = f"chat capacity ≈ {capacity:.1f} req/s → "
    else:
        rate, what = chat_rate, ""
        run_session(model, settings, chat_requests(4, seed + 99, settings, model.config.vocab_size), [0.0] * 4,
                    poc=False)  # warm-up
    n = max(4, round(rate * duration)) if rate > 0 else 0
    log(f"{what}{n} chat requests at {rate:.1f} req/s, prompts {settings.prompt_len[0]}-{settings.prompt_len[1]} "
        f"tokens, outputs {settings.output_len[0]}-{settings.output_len[1]} tokens")
    reqs = chat_requests(n, seed, settings, model.config.vocab_size)
    arr = poisson_arrivals(n, rate, seed)

    def bar(label):
        pb = ProgressBar(max(n, 1), label, stream=progress_stream)

        def update(done, total, stats):
            if total:
                pb(done, total)
        return update

    log("1/3 chat alone")
    off = run_session(model, settings, reqs, arr, poc=False, chat_rate=rate, progress=bar("chat requests"))
    log("2/3 the same chat stream with continuous PoC")
    on = run_session(model, settings, reqs, arr, poc=True, rnd=rnd, nonces=NonceIterator(0, 1), chat_rate=rate,
                     poc_seconds=duration, progress=bar("chat requests (PoC on)"))
    same = on.chat_tokens == off.chat_tokens
    st = on.stats
    log(f"chat latency p50 {off.latency_ms(50):.1f} ms → {on.latency_ms(50):.1f} ms with PoC, "
        f"p99 {off.latency_ms(99):.1f} ms → {on.latency_ms(99):.1f} ms; chat outputs identical: {same}")
    arts = sorted(on.artifacts, key=lambda a: a.nonce)
    drained = max(0, len(arts) - on.nonces_done)
    log(f"PoC: {on.nonces_done} nonces finished during the {on.window_s:.2f} s chat window = {on.nonces_per_s:.1f} "
        f"nonces/s, {drained} more finished while draining after it; PoC share of tokens {on.poc_token_share:.0%}, "
        f"preempted {st.get('nonces_preempted', 0)}")
    doc = ArtifactFile(model=model_name, block_hash=rnd.block_hash, public_key=rnd.public_key, seq_len=rnd.seq_len,
                       k_dim=rnd.k, artifacts=arts,
                       extra={"dtype": dtype_name, "poc_stronger_rng": rnd.stronger_rng,
                              "source": "cpoc demo: continuous PoC beside chat (HF continuous batching)"})
    doc.save(out)
    log(f"wrote {len(arts)} artifacts ({on.nonces_done} in the window + {drained} drained) to {out}")
    if not arts:
        log("3/3 nothing to validate: no PoC nonce finished (governor mode off, or chat kept the engine busy); "
            "summary: no verdict (good: artifacts > 0 and verdict honest)")
        return dict(off=off, on=on, validation=None, chat_identical=same, artifacts=0, identical=0)
    log("3/3 validating by recomputation in plain batches (PoCRunner)")
    result, recomputed = recompute_and_validate(model, rnd, arts)
    ref = {a.nonce: a.vector() for a in recomputed}
    identical = sum(np.array_equal(a.vector(), ref[a.nonce]) for a in arts if a.nonce in ref)
    finite = [d for d in result.distances.values() if d != math.inf]
    log(f"validation: {result.n_mismatch}/{result.n_total} mismatches (L2 > 0.2), {identical} bit-identical, "
        f"max L2 {max(finite) if finite else 0:.3g}, p-value {result.p_value:.4g}, fraud={result.fraud}, "
        f"verdict {result.verdict}")
    log(demo_summary(off, on, len(arts), result, settings.slo_overhead))
    return dict(off=off, on=on, validation=result, chat_identical=same, artifacts=len(arts), identical=identical)


def _change(before: float, after: float) -> str:
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
        return "n/a"
    return f"{after / before - 1:+.0%}"


def demo_summary(off: RunResult, on: RunResult, artifacts: int, result, slo_overhead: float) -> str:
    """The one line to read after ``cpoc demo``, with what good looks like."""
    same = on.chat_tokens == off.chat_tokens
    return (f"summary: chat outputs identical with PoC: {'yes' if same else 'NO'} (must be yes); chat latency p50 "
            f"{_change(off.latency_ms(50), on.latency_ms(50))}, p99 {_change(off.latency_ms(99), on.latency_ms(99))} "
            f"with PoC (good: small; the governor allows about +{slo_overhead:.0%} per chat step, a short run on a "
            f"shared CPU is noisy); {artifacts} artifacts, {on.nonces_per_s:.1f} nonces/s beside chat (good: > 0; "
            f"more when chat leaves the engine idle); validation verdict {result.verdict} with "
            f"{result.n_mismatch} mismatches (must be honest, 0 mismatches)")


def summary(rows: Sequence[dict]) -> dict:
    return {r["load"]: {k: r[k] for k in ("nonces_per_s", "poc_fraction_of_pure", "p50_overhead", "p99_overhead")}
            for r in rows}


__all__ = ["EngineSettings", "Round", "RunResult", "bench_mixed", "chat_capacity", "demo", "plot", "pure_poc_rate",
           "recompute_and_validate", "run_session", "write_csv"]
