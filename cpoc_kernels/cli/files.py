"""``cpoc generate`` / ``cpoc validate`` (artifact files from plain PoC batches, and their validation), and the
pure-PoC demo (``cpoc demo --pure``) built from both.

Validation exit codes: 0 honest, 1 fraud, 3 no verdict (some requested nonces could not be recomputed, so nothing
may be voted), 2 bad input.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cpoc_kernels.progress import ProgressBar

from .common import (EXIT_FRAUD, EXIT_NO_VERDICT, EXIT_OK, MAX_NONCES, UsageError, add_round_args, add_threads_arg,
                     DTYPES, check_in_file, check_out_file, check_positive, check_real, check_round_args,
                     check_shape, default_batch_size, load_model, model_config, parse_nonces, require, save_file,
                     set_threads)

DEFAULT_DIST_THRESHOLD, DEFAULT_P_MISMATCH, DEFAULT_FRAUD_THRESHOLD = 0.2, 0.1, 0.05
VERDICT_EXIT = {"honest": EXIT_OK, "fraud": EXIT_FRAUD, "no_verdict": EXIT_NO_VERDICT}
SHOW_NONCES = 20  # mismatching nonces named on screen (all of them are in the result)


def generate_file(args, nonces: list[int], quiet: bool = False):
    """Run the pure-PoC runner on ``nonces`` and write the artifact file; returns (file, seconds).
    ``args``: checked round arguments (:func:`check_round_args`) and ``out``."""
    from cpoc_kernels.artifacts import ArtifactFile
    from cpoc_kernels.integrations.hf.runner import PoCRunner

    model = load_model(args.model, args.dtype)
    runner = PoCRunner(model, args.block_hash, args.public_key, args.seq_len, k=args.k,
                       batch_size=args.batch_size, stronger_rng=args.stronger_rng)
    progress = None if quiet else ProgressBar(len(nonces))
    t0 = time.perf_counter()
    artifacts = runner.run(nonces, progress=progress)
    seconds = time.perf_counter() - t0
    doc = ArtifactFile(model=args.model, block_hash=args.block_hash, public_key=args.public_key,
                       seq_len=args.seq_len, k_dim=args.k, artifacts=artifacts,
                       extra={"dtype": args.dtype, "batch_size": args.batch_size, "poc_stronger_rng": args.stronger_rng})
    save_file(doc, args.out)
    return doc, seconds


# ---------------------------------------------------------------------------------------------- validate
def check_judging(dist_threshold: float, p_mismatch: float, fraud_threshold: float) -> None:
    check_real("dist_threshold", dist_threshold, 0.0)
    check_real("p_mismatch", p_mismatch, 0.0, 1.0)
    check_real("fraud_threshold", fraud_threshold, 0.0, 1.0)


def load_artifact_file(path: Path):
    """The artifact file at ``path``, its nonces checked (int32, no duplicates); any problem → UsageError naming it."""
    from cpoc_kernels.artifacts import ArtifactFile, check_nonce

    check_in_file(path)
    try:
        doc = ArtifactFile.load(path)
    except UnicodeDecodeError:
        raise UsageError(f"cannot read artifact file {path}: not UTF-8 text (an artifact file is JSON)") from None
    except OSError as exc:
        raise UsageError(f"cannot read artifact file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # the file format's own messages
        detail = str(exc).replace(str(path) + ": ", "")
        raise UsageError(f"{path} is not a valid artifact file: {detail}") from None
    except KeyError as exc:
        raise UsageError(f"{path} is not a valid artifact file: missing field {exc}") from None
    except (TypeError, AttributeError, OverflowError):
        raise UsageError(f"{path} is not a valid artifact file: expected a JSON object with fields model, "
                         f"block_hash, public_key, seq_len, k_dim and a list of artifacts (a field has the wrong "
                         f"type)") from None
    seen: set[int] = set()
    for art in doc.artifacts:
        try:
            nonce = check_nonce(art.nonce)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        if nonce in seen:
            raise UsageError(f"{path}: duplicate nonce {nonce}")
        seen.add(nonce)
    if not doc.artifacts:
        raise UsageError(f"{path} holds no artifacts")
    return doc


def judging_setup(doc, model: str | None, dtype: str | None, stronger_rng: bool | None = None) -> dict:
    """The recomputation's model / dtype / RNG: the command line's when given, else the file's, each with where it
    came from (printed: a judge must not take its parameters from what it judges without saying so)."""
    file_dtype = doc.extra.get("dtype")
    file_rng = doc.extra.get("poc_stronger_rng", False)
    setup = {
        "model": (model, "command line") if model is not None else (doc.model, "from the file"),
        "dtype": (dtype, "command line") if dtype is not None else (
            (file_dtype, "from the file") if file_dtype is not None else ("float32", "default")),
        "stronger_rng": (stronger_rng, "command line") if stronger_rng is not None else (bool(file_rng), "from the file"),
    }
    name, source = setup["model"]
    try:
        model_config(name)
    except UsageError:
        raise UsageError(f"model {name!r} ({source}) is not a built-in model; pass --model") from None
    d, source = setup["dtype"]
    if not isinstance(d, str) or d not in DTYPES:
        raise UsageError(f"unknown dtype {d!r} ({source}); choose one of {', '.join(DTYPES)}")
    check_shape(name, doc.seq_len, doc.k_dim, what=" (from the file)")
    notes = []
    if dtype is not None and file_dtype is not None and dtype != file_dtype:
        notes.append(f"the file says dtype {file_dtype}; recomputing in {dtype} (--dtype)")
    if model is not None and model != doc.model:
        notes.append(f"the file says model {doc.model}; recomputing with {model} (--model)")
    setup["notes"] = notes
    return setup


def validate_file(path: Path, model_name: str | None, dtype: str | None, batch_size: int | None, sample: int | None,
                  dist_threshold: float, p_mismatch: float, fraud_threshold: float, stronger_rng: bool | None = None,
                  seed: int = 0, threads: int | None = None, log=print):
    """Recompute the artifacts of ``path`` (optionally a seeded random sample) and run the statistical test.
    Every check runs before the model is built."""
    import random

    check_judging(dist_threshold, p_mismatch, fraud_threshold)
    if sample is not None and sample <= 0:
        raise UsageError(f"--sample must be positive, got {sample}")
    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    doc = load_artifact_file(path)
    setup = judging_setup(doc, model_name, dtype, stronger_rng)
    require("transformers", "hf", "cpoc validate (recomputing the artifacts)")
    set_threads(threads)
    from cpoc_kernels.integrations.hf.runner import PoCRunner
    from cpoc_kernels.validate import validate

    artifacts = doc.artifacts
    if sample is not None and sample < len(artifacts):
        artifacts = random.Random(seed).sample(artifacts, sample)
    (model, model_src), (dt, dt_src), (rng, rng_src) = setup["model"], setup["dtype"], setup["stronger_rng"]
    log(f"judging {len(artifacts)} of {len(doc.artifacts)} artifacts of {path}: model {model} ({model_src}), dtype "
        f"{dt} ({dt_src}), RNG {'stronger' if rng else 'standard'} ({rng_src}); seq_len {doc.seq_len}, k {doc.k_dim}, "
        f"block hash and key from the file; thresholds L2 > {dist_threshold:g}, p_mismatch {p_mismatch:g}, "
        f"fraud if p < {fraud_threshold:g} (command line)")
    for note in setup["notes"]:
        log(f"note: {note}")
    runner = PoCRunner(load_model(model, dt), doc.block_hash, doc.public_key, doc.seq_len, k=doc.k_dim,
                       batch_size=batch_size or default_batch_size(doc.seq_len), stronger_rng=rng)
    recomputed = runner.run([a.nonce for a in artifacts], progress=ProgressBar(len(artifacts), "recomputed"))
    return validate(artifacts, recomputed, dist_threshold, p_mismatch, fraud_threshold, k=doc.k_dim)


def _nonce_list(nonces: list[int]) -> str:
    shown = ", ".join(map(str, sorted(nonces)[:SHOW_NONCES]))
    return shown + (f", … ({len(nonces) - SHOW_NONCES} more)" if len(nonces) > SHOW_NONCES else "")


def print_validation(result, dist_threshold: float) -> int:
    """Print the result and the verdict; returns the exit code of the verdict."""
    print(f"validation: {result.n_mismatch}/{result.n_total} mismatches (L2 > {dist_threshold:g}), "
          f"{result.n_skipped} skipped, p-value {result.p_value:.4g}, fraud={result.fraud}")
    if result.distances:
        finite = [d for d in result.distances.values() if d != float("inf")]
        if finite:
            print(f"  L2 distance: max {max(finite):.3g}, mean {sum(finite) / len(finite):.3g}")
    if result.mismatch_nonces:
        print(f"  mismatching nonces: {_nonce_list(result.mismatch_nonces)}")
    if result.skipped_nonces:
        print(f"  not recomputed (validator's own non-finite rows): {_nonce_list(result.skipped_nonces)}")
    verdict = result.verdict
    if verdict == "honest":
        print(f"verdict: honest ({result.n_compared} nonces compared; exit 0)")
    elif verdict == "fraud":
        print(f"verdict: fraud ({result.n_mismatch} mismatching nonces, p-value {result.p_value:.4g}; exit 1)")
    else:
        print(f"verdict: no verdict — {result.n_skipped} of {result.n_total} nonces could not be recomputed, so "
              f"nothing may be voted (the network's validators abstain); exit {EXIT_NO_VERDICT}")
    return VERDICT_EXIT[verdict]


# ---------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    check_round_args(args)
    nonces = parse_nonces(args.nonces)
    check_out_file(args.out)
    require("transformers", "hf", "cpoc generate")
    set_threads(args.threads)
    doc, seconds = generate_file(args, nonces)
    print(f"{len(doc.artifacts)} artifacts in {seconds:.2f} s ({len(doc.artifacts) / max(seconds, 1e-9):.1f} "
          f"nonces/s) → {args.out}")
    return EXIT_OK


def cmd_validate(args) -> int:
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    result = validate_file(args.file, args.model, args.dtype, args.batch_size, args.sample, args.dist_threshold,
                           args.p_mismatch, args.fraud_threshold, seed=args.seed, threads=args.threads)
    return print_validation(result, args.dist_threshold)


def cmd_demo_pure(args) -> int:
    check_positive(args, "nonces", maximum=MAX_NONCES)
    check_round_args(args)
    check_out_file(args.out)
    require("transformers", "hf", "cpoc demo")
    set_threads(args.threads)
    print(f"cpoc demo: {args.nonces} nonces on {args.model} (CPU, {args.dtype}), seq_len {args.seq_len}, k {args.k}")
    doc, seconds = generate_file(args, list(range(args.nonces)))
    rate = len(doc.artifacts) / max(seconds, 1e-9)
    print(f"generated {len(doc.artifacts)} artifacts in {seconds:.2f} s: {rate:.1f} nonces/s")
    print(f"wrote {args.out}")
    result = validate_file(args.out, None, args.dtype, None, None, DEFAULT_DIST_THRESHOLD, DEFAULT_P_MISMATCH,
                           DEFAULT_FRAUD_THRESHOLD)
    code = print_validation(result, DEFAULT_DIST_THRESHOLD)
    print(f"summary: {len(doc.artifacts)} of {args.nonces} nonces → artifacts at {rate:.1f} nonces/s; recomputation "
          f"verdict {result.verdict}, {result.n_mismatch} mismatches (good: all nonces written, verdict honest, "
          f"0 mismatches)")
    return code


def register_generate(sub) -> None:
    gen = sub.add_parser("generate", help="compute artifacts for a nonce range and write an artifact file",
                         description="Compute artifacts for nonces in plain PoC batches and write an artifact file. "
                                     "Speed: --batch-size (default up to 256 nonces per forward) and --threads "
                                     "(default 1).")
    add_round_args(gen)
    gen.add_argument("--nonces", required=True,
                     help=f"START:STOP (STOP exclusive) or a comma list; int32, no duplicates, at most {MAX_NONCES} "
                          f"(negative first nonce: --nonces=-5:3)")
    gen.add_argument("--out", type=Path, required=True, help="artifact file to write (JSON)")
    add_threads_arg(gen)
    gen.set_defaults(func=cmd_generate)


def register_validate(sub) -> None:
    val = sub.add_parser(
        "validate", help="recompute an artifact file and run the statistical test (exit 0 honest, 1 fraud, "
                         "3 no verdict, 2 bad input)",
        description="Recompute the artifacts of FILE in plain PoC batches and judge them. The model, dtype and RNG "
                    "are the file's unless given here (the command says which); thresholds come from the command "
                    "line only. Exit codes: 0 honest, 1 fraud, 3 no verdict (some nonces could not be recomputed), "
                    "2 bad input. Speed: --batch-size, --threads.")
    val.add_argument("file", type=Path)
    val.add_argument("--model", default=None, help="built-in model name (default: the file's model)")
    val.add_argument("--dtype", default=None, help="recompute in this dtype (default: the file's dtype)")
    val.add_argument("--batch-size", type=int, default=None,
                     help="nonces per forward (default: 16384 // seq_len, at most 256)")
    val.add_argument("--sample", type=int, default=None, help="recompute a random sample of this many nonces")
    val.add_argument("--seed", type=int, default=0, help="seed of the --sample draw (default %(default)s)")
    val.add_argument("--dist-threshold", type=float, default=DEFAULT_DIST_THRESHOLD,
                     help="L2 distance above which a nonce mismatches (finite, > 0; default %(default)s)")
    val.add_argument("--p-mismatch", type=float, default=DEFAULT_P_MISMATCH,
                     help="mismatch rate allowed for an honest node, in (0, 1) (default %(default)s)")
    val.add_argument("--fraud-threshold", type=float, default=DEFAULT_FRAUD_THRESHOLD,
                     help="fraud if the binomial p-value is below this, in (0, 1) (default %(default)s)")
    add_threads_arg(val)
    val.set_defaults(func=cmd_validate)


def add_pure_demo_args(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--pure", action="store_true", help="the pure-PoC demo (no chat, plain batches)")
    demo.add_argument("--nonces", type=int, default=64, help="--pure: how many nonces (default %(default)s)")
