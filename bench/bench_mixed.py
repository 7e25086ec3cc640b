"""Continuous PoC beside chat on HF continuous batching (CPU): PoC throughput and chat latency vs chat load.

    python bench/bench_mixed.py --config tiny      # cpoc-tiny fp32, loads 0..100 %
    python bench/bench_mixed.py --config qwen      # qwen3-0.6b-shaped bf16, loads 0 / 50 / 90 %

Writes ``bench/continuous_poc/<config>.csv`` and ``.png`` (the same as ``cpoc bench-mixed`` with these
presets). Each load point runs the same seeded Poisson chat stream with PoC off and on; chat outputs must
be identical (checked). Not a test: figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from cpoc_kernels.integrations.hf.mixed_bench import EngineSettings, Round, bench_mixed, plot, write_csv
from cpoc_kernels.integrations.hf.models import build_model

CONFIGS = {
    "tiny": dict(model="cpoc-tiny", dtype=torch.float32, loads=(0, 0.25, 0.5, 0.75, 0.9, 1.0), duration=3.0, repeats=3,
                 settings=EngineSettings(max_batch_tokens=1024, num_blocks=256, page_size=16, max_requests_per_batch=32,
                                         prompt_len=(16, 64), output_len=(8, 24), idle_max_tokens=512)),
    "qwen": dict(model="qwen3-0.6b-shaped", dtype=torch.bfloat16, loads=(0, 0.5, 0.9), duration=12.0, repeats=2,
                 settings=EngineSettings(max_batch_tokens=512, num_blocks=96, page_size=16, max_requests_per_batch=16,
                                         prompt_len=(16, 48), output_len=(8, 16), idle_max_tokens=128)),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="tiny")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--duration", type=float, default=None, help="seconds of chat per run (preset default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 OpenMP threads stall whenever "
                         "another process holds a core)")
    ap.add_argument("--repeats", type=int, default=None, help="off/on repetitions per load (preset default)")
    ap.add_argument("--idle-max-tokens", type=int, default=None,
                    help="PoC tokens in a step without chat (preset default; bounds the wait of a chat request "
                         "arriving during an idle PoC step)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "continuous_poc")
    args = ap.parse_args()
    if importlib.util.find_spec("matplotlib") is None:  # the plot is written after the whole sweep: refuse now
        ap.error("the plot needs matplotlib: pip install 'cpoc_kernels[plot]'")
    torch.set_num_threads(args.threads)
    for name in CONFIGS if args.config == "all" else [args.config]:
        cfg = CONFIGS[name]
        dtype_name = str(cfg["dtype"]).replace("torch.", "")
        print(f"== {name}: {cfg['model']} {dtype_name}, seq_len {args.seq_len}, CPU {cpu_name()}, "
              f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        model = build_model(cfg["model"], dtype=cfg["dtype"])
        rnd = Round(seq_len=args.seq_len)
        settings = cfg["settings"]
        if args.idle_max_tokens is not None:
            settings = dataclasses.replace(settings, idle_max_tokens=args.idle_max_tokens)
        print(f"engine: {settings}")
        rows = bench_mixed(model, cfg["model"], dtype_name, settings, rnd, cfg["loads"],
                           args.duration or cfg["duration"], repeats=args.repeats or cfg["repeats"])
        write_csv(rows, args.out_dir / f"{name}.csv")
        plot(rows, args.out_dir / f"{name}.png",
             title=f"continuous PoC, {cfg['model']} {dtype_name}, seq_len {args.seq_len} (CPU, 2 cores)")
        print(json.dumps([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                         indent=1))
        del model


if __name__ == "__main__":
    main()
