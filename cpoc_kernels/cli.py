"""``cpoc`` command line: demo (mixed chat + continuous PoC; ``--pure`` for plain PoC), generate, validate,
bench-mixed.

Bad arguments print one line ``cpoc: error: …`` and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        raise UsageError(message)


class ProgressBar:
    """A one-line progress bar on stderr: ``[#####.....] 12/100 nonces  3.2 nonces/s``."""

    def __init__(self, total: int, label: str = "nonces", width: int = 30, stream=None):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.min_interval = 0.1
        self._last_draw = float("-inf")

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        if done < total and now - self._last_draw < self.min_interval:
            return  # redraw at most every min_interval seconds, and always at the end
        self._last_draw = now
        filled = int(self.width * done / max(total, 1))
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {self.label}  {rate:.1f}/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def parse_nonces(spec: str) -> list[int]:
    """``START:STOP`` (a Python range, STOP exclusive) or a comma list ``1,5,9``."""
    try:
        if ":" in spec:
            start, stop = (int(x) for x in spec.split(":", 1))
            if stop <= start:
                raise UsageError(f"nonce range {spec!r} is empty")
            return list(range(start, stop))
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"cannot read nonces {spec!r}; use START:STOP or a comma list") from None


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _load_model(name: str, dtype: str):
    from cpoc_kernels.integrations.hf.models import MODEL_CONFIGS, build_model

    if name not in MODEL_CONFIGS:
        raise UsageError(f"unknown model {name!r}; built-in models: {', '.join(sorted(MODEL_CONFIGS))}")
    return build_model(name, dtype=_dtype(dtype))


def generate_file(args, nonces: list[int], quiet: bool = False):
    """Run the pure-PoC runner on ``nonces`` and write the artifact file; returns (file, seconds)."""
    from cpoc_kernels.artifacts import ArtifactFile
    from cpoc_kernels.integrations.hf.runner import PoCRunner

    model = _load_model(args.model, args.dtype)
    runner = PoCRunner(model, args.block_hash, args.public_key, args.seq_len, k=args.k,
                       batch_size=args.batch_size, stronger_rng=args.stronger_rng)
    progress = None if quiet else ProgressBar(len(nonces))
    t0 = time.perf_counter()
    artifacts = runner.run(nonces, progress=progress)
    seconds = time.perf_counter() - t0
    doc = ArtifactFile(model=args.model, block_hash=args.block_hash, public_key=args.public_key,
                       seq_len=args.seq_len, k_dim=args.k, artifacts=artifacts,
                       extra={"dtype": args.dtype, "batch_size": args.batch_size, "poc_stronger_rng": args.stronger_rng})
    doc.save(args.out)
    return doc, seconds


def validate_file(path: Path, model_name: str | None, dtype: str, batch_size: int, sample: int | None,
                  dist_threshold: float, p_mismatch: float, fraud_threshold: float, stronger_rng: bool | None = None):
    """Recompute the artifacts of ``path`` (optionally a sample) and run the statistical test."""
    import random

    from cpoc_kernels.artifacts import ArtifactFile
    from cpoc_kernels.integrations.hf.runner import PoCRunner
    from cpoc_kernels.validate import validate

    try:
        doc = ArtifactFile.load(path)
    except FileNotFoundError:
        raise UsageError(f"no such artifact file: {path}") from None
    model_name = model_name or doc.model
    dtype = doc.extra.get("dtype", dtype)
    stronger = doc.extra.get("poc_stronger_rng", False) if stronger_rng is None else stronger_rng
    artifacts = doc.artifacts
    if sample is not None and sample < len(artifacts):
        artifacts = random.Random(0).sample(artifacts, sample)
    if not artifacts:
        raise UsageError(f"{path} holds no artifacts")
    runner = PoCRunner(_load_model(model_name, dtype), doc.block_hash, doc.public_key, doc.seq_len,
                       k=doc.k_dim, batch_size=batch_size, stronger_rng=stronger)
    recomputed = runner.run([a.nonce for a in artifacts], progress=ProgressBar(len(artifacts), "recomputed"))
    return validate(artifacts, recomputed, dist_threshold, p_mismatch, fraud_threshold, k=doc.k_dim)


def print_validation(result, dist_threshold: float) -> None:
    print(f"validation: {result.n_mismatch}/{result.n_total} mismatches (L2 > {dist_threshold}), "
          f"{result.n_skipped} skipped, p-value {result.p_value:.4g}, fraud={result.fraud}")
    if result.distances:
        finite = [d for d in result.distances.values() if d != float("inf")]
        if finite:
            print(f"  L2 distance: max {max(finite):.3g}, mean {sum(finite) / len(finite):.3g}")


def _add_round_args(p: argparse.ArgumentParser, model_default: str = "cpoc-tiny") -> None:
    p.add_argument("--model", default=model_default, help="built-in model name (default %(default)s)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    p.add_argument("--block-hash", default="TEST_BLOCK")
    p.add_argument("--public-key", default="test_pub_keys")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--k", type=int, default=12, help="artifact dimension k_dim (12 on chain)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stronger-rng", action="store_true", help="the 8-sub-seed input RNG")


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


def _mixed_setup(args):
    """(settings, round) of the mixed commands, after checking the arguments."""
    from cpoc_kernels.governor import MODES
    from cpoc_kernels.integrations.hf.mixed_bench import EngineSettings, Round

    _check_round_args(args)
    for name in ("max_batch_tokens", "num_blocks", "page_size", "max_requests"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.duration <= 0:
        raise UsageError("--duration must be positive")
    if args.mode not in MODES:
        raise UsageError(f"unknown governor mode {args.mode!r}; choose one of {', '.join(MODES)}")
    if args.slo_overhead < 0:
        raise UsageError("--slo-overhead must be >= 0")
    if args.idle_max_tokens is not None and args.idle_max_tokens <= 0:
        raise UsageError("--idle-max-tokens must be positive")
    if args.idle_max_ms is not None and not args.idle_max_ms > 0:
        raise UsageError("--idle-max-ms must be positive")
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError("--threads must be positive")
        import torch

        torch.set_num_threads(args.threads)
    settings = EngineSettings(max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks,
                              page_size=args.page_size, max_requests_per_batch=args.max_requests,
                              prompt_len=_range_arg(args.prompt_len, "prompt-len"),
                              output_len=_range_arg(args.output_len, "output-len"), mode=args.mode,
                              slo_overhead=args.slo_overhead, idle_max_tokens=args.idle_max_tokens,
                              idle_max_seconds=None if args.idle_max_ms is None else args.idle_max_ms / 1e3)
    rnd = Round(block_hash=args.block_hash, public_key=args.public_key, seq_len=args.seq_len, k=args.k,
                stronger_rng=args.stronger_rng)
    return settings, rnd


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpoc", description="Gonka PoC v2 nonces inside inference batches (cpoc_kernels)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="chat stream + continuous PoC on the tiny model on CPU (HF continuous "
                                       "batching), then validate the artifacts; --pure: plain PoC batches only")
    demo.add_argument("--pure", action="store_true", help="the pure-PoC demo (no chat, plain batches)")
    demo.add_argument("--nonces", type=int, default=64, help="--pure: how many nonces (default %(default)s)")
    demo.add_argument("--out", type=Path, default=Path("out/demo_artifacts.json"))
    _add_mixed_args(demo, duration=4.0)
    demo.add_argument("--load", type=float, default=0.4,
                      help="chat arrival rate as a fraction of measured chat capacity (default %(default)s)")
    demo.add_argument("--chat-rate", type=float, default=None, help="chat requests/s (overrides --load)")
    _add_round_args(demo)

    bench = sub.add_parser("bench-mixed", help="sweep chat load (0-100%% of capacity) with and without continuous "
                                               "PoC; write a CSV and a PNG plot")
    _add_mixed_args(bench, duration=3.0)
    bench.add_argument("--loads", default="0,0.25,0.5,0.75,0.9,1.0", help="comma list of fractions of capacity")
    bench.add_argument("--repeats", type=int, default=1, help="off/on repetitions per load (default %(default)s)")
    bench.add_argument("--out-dir", type=Path, default=Path("out/bench_mixed"))
    bench.add_argument("--tag", default=None, help="file name stem (default: MODEL_DTYPE_sSEQ_LEN)")
    _add_round_args(bench)

    gen = sub.add_parser("generate", help="compute artifacts for a nonce range and write an artifact file")
    _add_round_args(gen)
    gen.add_argument("--nonces", required=True, help="START:STOP or a comma list")
    gen.add_argument("--out", type=Path, required=True)

    val = sub.add_parser("validate", help="recompute an artifact file and run the statistical test")
    val.add_argument("file", type=Path)
    val.add_argument("--model", default=None, help="built-in model name (default: the file's model)")
    val.add_argument("--dtype", default="float32")
    val.add_argument("--batch-size", type=int, default=32)
    val.add_argument("--sample", type=int, default=None, help="recompute a random sample of this many nonces")
    val.add_argument("--dist-threshold", type=float, default=0.2)
    val.add_argument("--p-mismatch", type=float, default=0.1)
    val.add_argument("--fraud-threshold", type=float, default=0.05)
    __import__("cpoc_kernels.sim.bench", fromlist=["register"]).register(sub, COMMANDS)  # cpoc bench-sim
    return parser


def _check_round_args(args) -> None:
    for name in ("seq_len", "batch_size", "k"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")


def cmd_demo(args) -> int:
    if not args.pure:
        return cmd_demo_mixed(args)
    if args.nonces <= 0:
        raise UsageError("--nonces must be positive")
    _check_round_args(args)
    print(f"cpoc demo: {args.nonces} nonces on {args.model} (CPU, {args.dtype}), seq_len {args.seq_len}, k {args.k}")
    doc, seconds = generate_file(args, list(range(args.nonces)))
    print(f"generated {len(doc.artifacts)} artifacts in {seconds:.2f} s: {len(doc.artifacts) / seconds:.1f} nonces/s")
    print(f"wrote {args.out}")
    result = validate_file(args.out, None, args.dtype, 32, None, 0.2, 0.1, 0.05)
    print_validation(result, 0.2)
    return 0 if not result.fraud else 1


def cmd_demo_mixed(args) -> int:
    from cpoc_kernels.integrations.hf.mixed_bench import demo

    settings, rnd = _mixed_setup(args)
    if args.chat_rate is not None and args.chat_rate < 0:
        raise UsageError("--chat-rate must be >= 0")
    if args.chat_rate is None and not 0 <= args.load <= 1.5:
        raise UsageError("--load must be in [0, 1.5]")
    model = _load_model(args.model, args.dtype)
    print(f"cpoc demo: chat + continuous PoC on {args.model} (CPU, {args.dtype}), HF continuous batching, "
          f"seq_len {args.seq_len}, governor {args.mode}")
    result = demo(model, args.model, args.dtype, settings, rnd, load=args.load, duration=args.duration,
                  out=args.out, seed=args.seed, chat_rate=args.chat_rate)
    return 0 if not result["validation"].fraud else 1


def cmd_bench_mixed(args) -> int:
    from cpoc_kernels.integrations.hf.mixed_bench import bench_mixed, plot, write_csv

    settings, rnd = _mixed_setup(args)
    try:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"cannot read --loads {args.loads!r}; use a comma list of fractions") from None
    if not loads or any(not 0 <= x <= 1.5 for x in loads):
        raise UsageError("--loads must be fractions in [0, 1.5]")
    model = _load_model(args.model, args.dtype)
    tag = args.tag or f"{args.model}_{args.dtype}_s{args.seq_len}"
    print(f"cpoc bench-mixed: {args.model} ({args.dtype}), seq_len {args.seq_len}, loads {loads}, "
          f"{args.duration:g} s per run, governor {args.mode}")
    if args.repeats <= 0:
        raise UsageError("--repeats must be positive")
    rows = bench_mixed(model, args.model, args.dtype, settings, rnd, loads, args.duration, seed=args.seed,
                       repeats=args.repeats)
    csv_path, png_path = args.out_dir / f"{tag}.csv", args.out_dir / f"{tag}.png"
    write_csv(rows, csv_path)
    plot(rows, png_path, title=f"continuous PoC, {args.model} {args.dtype}, seq_len {args.seq_len} (CPU)")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def cmd_generate(args) -> int:
    _check_round_args(args)
    nonces = parse_nonces(args.nonces)
    doc, seconds = generate_file(args, nonces)
    print(f"{len(doc.artifacts)} artifacts in {seconds:.2f} s ({len(doc.artifacts) / seconds:.1f} nonces/s) → {args.out}")
    return 0


def cmd_validate(args) -> int:
    result = validate_file(args.file, args.model, args.dtype, args.batch_size, args.sample,
                           args.dist_threshold, args.p_mismatch, args.fraud_threshold)
    print_validation(result, args.dist_threshold)
    return 0 if not result.fraud else 1


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "validate": cmd_validate, "bench-mixed": cmd_bench_mixed}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as exc:
        print(f"cpoc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
