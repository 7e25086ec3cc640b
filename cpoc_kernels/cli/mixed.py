"""``cpoc demo`` (chat stream + continuous PoC on HF continuous batching; ``--pure`` for plain PoC) and
``cpoc bench-mixed`` (chat-load sweep with and without continuous PoC → CSV + PNG). The work itself is in
:mod:`cpoc_kernels.integrations.hf.mixed_bench`; here: arguments, their checks (before any model build), output.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (EXIT_NO_VERDICT, EXIT_OK, UsageError, add_round_args, check_out_dir, check_out_file, check_positive, check_real,
                     check_round_args, load_model, require, set_threads)
from .files import VERDICT_EXIT, add_pure_demo_args, cmd_demo_pure


def _add_mixed_args(p: argparse.ArgumentParser, duration: float) -> None:
    p.add_argument("--duration", type=float, default=duration, help="seconds of chat per run (default %(default)s)")
    p.add_argument("--mode", default="fill", help="governor mode: fill, fixed-share, off (default %(default)s)")
    p.add_argument("--slo-overhead", type=float, default=0.05, help="allowed chat step-time increase (fill mode)")
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="engine token budget per step (default %(default)s)")
    p.add_argument("--num-blocks", type=int, default=256, help="KV cache blocks")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-requests", type=int, default=32, help="max requests per step")
    p.add_argument("--idle-max-tokens", type=int, default=512,
                   help="PoC tokens in a step without chat (default %(default)s); bounds how long a chat request "
                        "arriving during one waits")
    p.add_argument("--idle-max-ms", type=float, default=None,
                   help="predicted duration bound of a step without chat, i.e. about the longest a chat request "
                        "arriving during one waits (default: none)")
    p.add_argument("--prompt-len", default="16:64", help="chat prompt length range MIN:MAX")
    p.add_argument("--output-len", default="8:24", help="chat output length range MIN:MAX")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default %(default)s: small steps gain nothing from more, and on a shared "
                        "machine OpenMP threads stall whenever another process holds a core)")
    p.add_argument("--seed", type=int, default=0)


def _range_arg(spec: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in spec.split(":", 1))
    except ValueError:
        raise UsageError(f"--{name} must be MIN:MAX, got {spec!r}") from None
    if not 1 <= lo <= hi:
        raise UsageError(f"--{name} needs 1 <= MIN <= MAX, got {spec!r}")
    return lo, hi


def _check_mixed(args) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check the mixed commands' arguments (nothing heavy imported); returns the prompt and output length ranges."""
    from cpoc_kernels.governor import MODES

    check_round_args(args)
    check_positive(args, "max_batch_tokens", "num_blocks", "page_size", "max_requests", "idle_max_tokens")
    check_real("duration", args.duration, 0.0)
    if args.duration > 3600:
        raise UsageError(f"--duration must be at most 3600 s, got {args.duration:g}")
    if args.mode not in MODES:
        raise UsageError(f"unknown governor mode {args.mode!r}; choose one of {', '.join(MODES)}")
    check_real("slo_overhead", args.slo_overhead, 0.0, low_inclusive=True)
    if args.idle_max_ms is not None:
        check_real("idle_max_ms", args.idle_max_ms, 0.0)
    return _range_arg(args.prompt_len, "prompt-len"), _range_arg(args.output_len, "output-len")


def _mixed_setup(args, lengths):
    """(settings, round) of the mixed commands from checked arguments (imports torch: after every check)."""
    from cpoc_kernels.integrations.hf.mixed_bench import EngineSettings, Round

    prompt_len, output_len = lengths
    settings = EngineSettings(max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks,
                              page_size=args.page_size, max_requests_per_batch=args.max_requests,
                              prompt_len=prompt_len, output_len=output_len, mode=args.mode,
                              slo_overhead=args.slo_overhead, idle_max_tokens=args.idle_max_tokens,
                              idle_max_seconds=None if args.idle_max_ms is None else args.idle_max_ms / 1e3)
    rnd = Round(block_hash=args.block_hash, public_key=args.public_key, seq_len=args.seq_len, k=args.k,
                stronger_rng=args.stronger_rng)
    return settings, rnd


def cmd_demo(args) -> int:
    if args.pure:
        return cmd_demo_pure(args)
    lengths = _check_mixed(args)
    if args.chat_rate is not None:
        check_real("chat_rate", args.chat_rate, 0.0, low_inclusive=True)
    elif not (0 <= args.load <= 1.5):
        raise UsageError(f"--load must be in [0, 1.5], got {args.load:g}")
    check_out_file(args.out)
    require("transformers", "hf", "cpoc demo")
    from cpoc_kernels.integrations.hf.mixed_bench import demo

    settings, rnd = _mixed_setup(args, lengths)
    set_threads(args.threads)
    model = load_model(args.model, args.dtype)
    print(f"cpoc demo: chat + continuous PoC on {args.model} (CPU, {args.dtype}), HF continuous batching, "
          f"seq_len {args.seq_len}, governor {args.mode}")
    result = demo(model, args.model, args.dtype, settings, rnd, load=args.load, duration=args.duration,
                  out=args.out, seed=args.seed, chat_rate=args.chat_rate)
    validation = result["validation"]
    return EXIT_NO_VERDICT if validation is None else VERDICT_EXIT[validation.verdict]


def cmd_bench_mixed(args) -> int:
    lengths = _check_mixed(args)
    check_positive(args, "repeats", maximum=100)
    try:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"cannot read --loads {args.loads!r}; use a comma list of fractions") from None
    if not loads or any(not 0 <= x <= 1.5 for x in loads):
        raise UsageError("--loads must be fractions in [0, 1.5]")
    if args.tag is not None and (not args.tag.strip() or "/" in args.tag or args.tag in (".", "..")):
        raise UsageError(f"--tag must be a plain file name stem, got {args.tag!r}")
    check_out_dir(args.out_dir)
    require("transformers", "hf", "cpoc bench-mixed")
    require("matplotlib", "plot", "cpoc bench-mixed (the PNG plot)")  # before the sweep, not after it
    from cpoc_kernels.integrations.hf.mixed_bench import bench_mixed, plot, write_csv

    settings, rnd = _mixed_setup(args, lengths)
    set_threads(args.threads)
    model = load_model(args.model, args.dtype)
    tag = args.tag or f"{args.model}_{args.dtype}_s{args.seq_len}"
    print(f"cpoc bench-mixed: {args.model} ({args.dtype}), seq_len {args.seq_len}, loads {loads}, "
          f"{args.duration:g} s per run, governor {args.mode}")
    rows = bench_mixed(model, args.model, args.dtype, settings, rnd, loads, args.duration, seed=args.seed,
                       repeats=args.repeats)
    csv_path, png_path = args.out_dir / f"{tag}.csv", args.out_dir / f"{tag}.png"
    write_csv(rows, csv_path)
    plot(rows, png_path, title=f"continuous PoC, {args.model} {args.dtype}, seq_len {args.seq_len} (CPU)")
    print(f"wrote {csv_path} and {png_path}")
    return EXIT_OK


def register_demo(sub) -> None:
    demo = sub.add_parser("demo", help="chat stream + continuous PoC on the tiny model on CPU (HF continuous "
                                       "batching), then validate the artifacts; --pure: plain PoC batches only")
    add_pure_demo_args(demo)
    demo.add_argument("--out", type=Path, default=Path("out/demo_artifacts.json"))
    _add_mixed_args(demo, duration=4.0)
    demo.add_argument("--load", type=float, default=0.4,
                      help="chat arrival rate as a fraction of measured chat capacity (default %(default)s)")
    demo.add_argument("--chat-rate", type=float, default=None, help="chat requests/s (overrides --load)")
    add_round_args(demo)
    demo.set_defaults(func=cmd_demo)


def register_bench_mixed(sub) -> None:
    bench = sub.add_parser("bench-mixed", help="sweep chat load (0-100%% of capacity) with and without continuous "
                                               "PoC; write a CSV and a PNG plot (needs the 'plot' extra)")
    _add_mixed_args(bench, duration=3.0)
    bench.add_argument("--loads", default="0,0.25,0.5,0.75,0.9,1.0", help="comma list of fractions of capacity")
    bench.add_argument("--repeats", type=int, default=1, help="off/on repetitions per load (default %(default)s)")
    bench.add_argument("--out-dir", type=Path, default=Path("out/bench_mixed"))
    bench.add_argument("--tag", default=None, help="file name stem (default: MODEL_DTYPE_sSEQ_LEN)")
    add_round_args(bench)
    bench.set_defaults(func=cmd_bench_mixed)
