"""``cpoc bench-sim``: sweep chat load on simulated GPU engines, PoC on vs off on the same arrival trace.

For each preset and PoC path, each load (a fraction of the chat capacity: completions/s of a burst of
``2 × max_num_seqs`` requests without PoC) runs one seeded trace twice — PoC off, then on — and records:
PoC **fill** = PoC tokens / free capacity (free capacity of a chat step: the largest PoC addition keeping
the step's *true* time within ``1 + slo_overhead`` of chat alone; of a step without chat: the idle bound,
the largest step within ``1 + slo_overhead`` of a one-token step), chat TPOT p50/p99 and TTFT p50/p99 on vs
off, PoC nonces/s. The **exchange rate**: fixed-length chat requests at one load, nonces forgone per request
(PoC-only rate × time − nonces made) against :func:`cpoc_kernels.cost.nonces_per_request`.
Writes ``<out>/<preset>_<path>.csv`` / ``.png`` and ``<out>/exchange_<preset>.csv``.
"""
from __future__ import annotations

import csv
import importlib.util
import time
from pathlib import Path

import numpy as np

from cpoc_kernels import cost

from .engine import MODELS, PATHS, POLICIES, SimConfig, simulate
from .hardware import PRESETS, EnginePreset
from .workload import ARRIVALS, ChatArrival, chat_trace

EXCHANGE_LENGTHS = ((128, 128), (1024, 256), (4096, 512))


def _lengths(preset: EnginePreset):
    return ((preset.prompt_median, preset.prompt_sigma, preset.prompt_range),
            (preset.output_median, preset.output_sigma, preset.output_range))


def chat_capacity(preset: EnginePreset, seed: int = 0) -> float:
    """Chat completions/s of a burst of 2 × max_num_seqs requests, PoC off."""
    prompt, output = _lengths(preset)
    trace = chat_trace(1e9, 2 * preset.max_num_seqs, seed, prompt, output)
    return len(trace) / simulate(preset, trace, SimConfig(poc=False)).duration


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_load(preset: EnginePreset, path: str, load: float, capacity: float, n_requests: int, seed: int,
             arrivals: str = "poisson", policy: str = "fcfs", **options) -> dict:
    """One load point: the same trace with PoC off and on; the row of the CSV."""
    prompt, output = _lengths(preset)
    trace = chat_trace(load * capacity, n_requests, seed, prompt, output, arrivals=arrivals)
    off = simulate(preset, trace, SimConfig(poc=False, policy=policy, seed=seed))
    on = simulate(preset, trace, SimConfig(path=path, policy=policy, seed=seed, **options))
    free = sum(s.capacity for s in on.steps)
    chat_steps = [s for s in on.steps if s.chat_tokens]
    row = {
        "load": load, "chat_rate": load * capacity, "requests": n_requests,
        "fill": on.poc_tokens / free if free else float("nan"),
        "fill_end_to_end": on.poc_tokens / max(1, sum(s.capacity_end_to_end for s in on.steps)),
        "fill_chat_steps": (sum(s.poc_tokens for s in chat_steps) / max(1, sum(s.capacity for s in chat_steps))),
        "overfilled_steps": sum(1 for s in on.steps if s.poc_tokens > s.capacity) / max(1, len(on.steps)),
        "nonces_per_s": on.nonces_done / on.duration,
    }
    for name, a, b in (("tpot", off.tpot(), on.tpot()), ("ttft", off.ttft(), on.ttft())):
        for q in (50, 99):
            row[f"{name}_p{q}_off_ms"] = 1e3 * _pct(a, q)
            row[f"{name}_p{q}_on_ms"] = 1e3 * _pct(b, q)
            row[f"{name}_p{q}_change"] = _pct(b, q) / _pct(a, q) - 1
    row["preemptions_chat_off"], row["preemptions_chat_on"] = off.preemptions_chat, on.preemptions_chat
    row["preemptions_poc"] = on.preemptions_poc
    model = (on.governor_stats or {}).get("model", {})
    row["model"] = model.get("kind", "")
    row["model_knee_tokens"] = model.get("knee_tokens", float("nan"))
    row["model_flat_ms"] = 1e3 * model.get("flat_seconds", float("nan"))
    return row


def idle_nonce_rate(preset: EnginePreset, path: str, seconds: float, seed: int, **options) -> float:
    """PoC nonces/s with no chat (one tiny request at ``seconds`` ends the run)."""
    result = simulate(preset, [ChatArrival(seconds, 16, 2)], SimConfig(path=path, seed=seed, **options))
    return result.nonces_done / seconds


def exchange_rate(preset: EnginePreset, path: str, capacity: float, load: float, n_requests: int, seed: int,
                  idle_rate: float, **options) -> list[dict]:
    """Nonces forgone per chat request at fixed lengths, against the FLOP-based figure."""
    rows = []
    for prompt_len, output_len in EXCHANGE_LENGTHS:
        trace = chat_trace(load * capacity, n_requests, seed, (prompt_len, 0.0, (prompt_len, prompt_len)),
                           (output_len, 0.0, (output_len, output_len)))
        on = simulate(preset, trace, SimConfig(path=path, seed=seed, **options))
        forgone = (idle_rate * on.duration - on.nonces_done) / n_requests
        rows.append({"path": path, "prompt": prompt_len, "output": output_len, "load": load,
                     "nonces_forgone_per_request": forgone,
                     "flop_nonces_per_request": cost.nonces_per_request(preset.curve.shape, prompt_len, output_len),
                     "idle_nonces_per_s": idle_rate})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [r["load"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(loads, [r["fill"] for r in rows], "o-", label="all steps")
    axes[0].plot(loads, [r["fill_chat_steps"] for r in rows], "s--", label="chat steps")
    axes[0].plot(loads, [r["fill_end_to_end"] for r in rows], "^:", label="vs end-to-end capacity")
    axes[0].axhline(0.9, color="grey", ls=":", label="goal 0.9")
    axes[0].set(title="PoC fill (PoC tokens / free capacity)", xlabel="chat load")
    for key, style in (("tpot_p50", "o-"), ("tpot_p99", "s-"), ("ttft_p99", "^-")):
        axes[1].plot(loads, [100 * r[f"{key}_change"] for r in rows], style, label=key.replace("_", " "))
    axes[1].axhline(5, color="grey", ls=":", label="+5 %")
    axes[1].axhline(10, color="grey", ls="--", label="+10 %")
    axes[1].set(title="chat latency, PoC on vs off (%)", xlabel="chat load")
    for key in ("tpot_p99", "ttft_p99"):
        axes[2].plot(loads, [r[f"{key}_off_ms"] for r in rows], "o--", label=f"{key} off")
        axes[2].plot(loads, [r[f"{key}_on_ms"] for r in rows], "o-", label=f"{key} on")
    axes[2].set(title="chat latency (ms)", xlabel="chat load", yscale="log")
    axes[3].plot(loads, [r["nonces_per_s"] for r in rows], "o-")
    axes[3].set(title="PoC nonces/s", xlabel="chat load")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"cannot read --{name} {text!r}; use a comma list of numbers") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def _choices(text: str, allowed, name: str) -> list[str]:
    values = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown --{name} {', '.join(bad) or text!r}; choose from {', '.join(allowed)} or all")
    return values


def cmd_bench_sim(args) -> int:
    presets = _choices(args.presets, PRESETS, "presets")
    paths = _choices(args.paths, PATHS, "paths")
    loads = _floats(args.loads, "loads")
    if any(not 0 < x < 1.5 for x in loads):
        raise ValueError("--loads must be fractions of capacity in (0, 1.5)")
    if args.requests < 10:
        raise ValueError("--requests must be >= 10")
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:  # checked before the sweep
            raise ValueError("plots need matplotlib (pip install 'cpoc-kernels[plot]'), or pass --no-plot")
    options = {"long_prefill_token_threshold": args.long_prefill_token_threshold}
    models = _choices(args.models, MODELS, "models")
    runs = [(path, model) for path in paths for model in (models if path == "hf" else ["work"])]
    for name in presets:
        preset = PRESETS[name]
        capacity = chat_capacity(preset, args.seed)
        print(f"== {name}: {preset.name}; chat capacity {capacity:.2f} req/s, KV {preset.kv_tokens} tokens, "
              f"{args.arrivals} arrivals, {args.requests} requests per load")
        for path, model in runs:
            label = path if model == "work" else f"{path}-{model}"
            rows = []
            for load in loads:
                t0 = time.perf_counter()
                row = run_load(preset, path, load, capacity, args.requests, args.seed, args.arrivals, args.policy,
                               model=model, **options)
                rows.append(row)
                print(f"  {label:9s} load {load:.2f}: fill {row['fill']:.3f} (end to end {row['fill_end_to_end']:.3f})  "
                      f"TPOT p50 {100 * row['tpot_p50_change']:+.1f} % "
                      f"p99 {100 * row['tpot_p99_change']:+.1f} %  TTFT p99 {100 * row['ttft_p99_change']:+.1f} %  "
                      f"{row['nonces_per_s']:.1f} nonces/s  ({time.perf_counter() - t0:.1f} s)")
            write_csv(rows, args.out_dir / f"{name}_{label}.csv")
            if not args.no_plot:
                plot(rows, args.out_dir / f"{name}_{label}.png", f"{preset.name}, path {label} ({args.policy}, {args.arrivals})")
        if args.exchange:
            ex = []
            for path in paths:
                idle = idle_nonce_rate(preset, path, 5.0, args.seed, **options)
                ex += exchange_rate(preset, path, capacity, 0.3, max(10, args.requests // 3), args.seed, idle, **options)
            write_csv(ex, args.out_dir / f"exchange_{name}.csv")
            for r in ex:
                print(f"  exchange {r['path']} {r['prompt']}/{r['output']}: {r['nonces_forgone_per_request']:.3g} nonces "
                      f"forgone per request (FLOPs: {r['flop_nonces_per_request']:.3g})")
    print(f"wrote {args.out_dir}")
    return 0


def register(subparsers, commands: dict | None = None):
    """Add ``bench-sim`` to an argparse ``subparsers``; with ``commands``, also ``commands['bench-sim']``."""
    p = subparsers.add_parser("bench-sim", help="simulate continuous PoC on GPU-shaped engines (no GPU needed): "
                                                "fill, chat TPOT/TTFT on vs off, nonces/s; CSV + PNG")
    p.add_argument("--presets", default="all", help=f"comma list of {', '.join(PRESETS)} or all (default all)")
    p.add_argument("--paths", default="all", help="hf (the HF glue's per-step governor), vllm (stock scheduler + "
                                                  "client-side PoCAdmission), or all")
    p.add_argument("--loads", default="0.1,0.3,0.5,0.7,0.9", help="comma list of fractions of chat capacity")
    p.add_argument("--requests", type=int, default=300, help="chat requests per load point (default %(default)s)")
    p.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    p.add_argument("--policy", choices=POLICIES, default="fcfs", help="waiting-queue order (vllm path: PoC last "
                                                                      "under priority)")
    p.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="vLLM's per-request chunk cap (0: off, vLLM's default)")
    p.add_argument("--models", default="work", help="step-time model of path hf: work (bytes/FLOPs roofline, "
                   "learnt), rows (row-count roofline), oracle (the true curve: the bound of a perfect model); "
                   "comma list or all (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange", action="store_true", help="also measure the exchange rate (fixed lengths)")
    p.add_argument("--no-plot", action="store_true", help="CSV only")
    p.add_argument("--out-dir", type=Path, default=Path("out/bench_sim"))
    p.set_defaults(func=cmd_bench_sim)
    if commands is not None:
        commands["bench-sim"] = cmd_bench_sim
    return p


__all__ = ["EXCHANGE_LENGTHS", "chat_capacity", "cmd_bench_sim", "exchange_rate", "idle_nonce_rate", "plot",
           "register", "run_load", "write_csv"]
