"""What every ``cpoc`` subcommand shares: the usage error, exit codes, and the checks run before any work.

Every check here is cheap (no model build, no transformers import): bad input is refused within a second with one
line ``cpoc: error: …`` and exit code 2. Subcommands of other modules raise :class:`UsageError` from here.
"""
from __future__ import annotations

import argparse
import sys
import math
import os
import tempfile
from pathlib import Path

EXIT_OK = 0  # success; validate: verdict honest
EXIT_FRAUD = 1  # validate / demo: verdict fraud
EXIT_USAGE = 2  # bad input (one line "cpoc: error: ...")
EXIT_NO_VERDICT = 3  # validate: nothing could be judged (some requested nonces were not recomputed)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_NONCES = 1_000_000  # per generate call (every artifact is held in memory and written as one JSON file)
BATCH_TOKENS = 16384  # default batch size: as many nonces as fit in this many tokens, at most MAX_DEFAULT_BATCH
MAX_DEFAULT_BATCH = 256
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        # argparse turns an option value of "--" (``--out=--``) into a list; no option of ours takes one
        for arg in sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith("-") and arg.endswith("=--"):
                raise UsageError(f"argument {arg.split('=', 1)[0]}: '--' is not a value")
        return super().parse_args(args, namespace)


# ---------------------------------------------------------------------------------------------- nonces
def _int(text: str, spec: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"cannot read nonces {spec!r}: {text.strip()!r} is not an integer; use START:STOP or a "
                         f"comma list") from None


def parse_nonces(spec: str, limit: int = MAX_NONCES) -> list[int]:
    """``START:STOP`` (a Python range, STOP exclusive) or a comma list ``1,5,9``: int32 nonces, no duplicates, at
    least one and at most ``limit``. Anything else → :class:`UsageError` (checked before a list is built)."""
    spec = spec.strip()
    if ":" in spec:
        head, _, tail = spec.partition(":")
        if not head.strip() or not tail.strip() or ":" in tail:
            raise UsageError(f"cannot read nonces {spec!r}; use START:STOP or a comma list")
        start, stop = _int(head, spec), _int(tail, spec)
        if stop <= start:
            raise UsageError(f"nonce range {spec!r} is empty (STOP is exclusive)")
        if start < INT32_MIN or stop - 1 > INT32_MAX:
            raise UsageError(f"nonce range {spec!r} leaves the chain's int32 range [{INT32_MIN}, {INT32_MAX}]")
        if stop - start > limit:
            raise UsageError(f"nonce range {spec!r} holds {stop - start} nonces; at most {limit} per call "
                             f"(split it over several calls)")
        return list(range(start, stop))
    items = [x for x in spec.split(",") if x.strip()]
    if not items:
        raise UsageError(f"no nonces in {spec!r}; use START:STOP or a comma list")
    if len(items) > limit:
        raise UsageError(f"{len(items)} nonces given; at most {limit} per call")
    nonces = [_int(x, spec) for x in items]
    bad = [n for n in nonces if not INT32_MIN <= n <= INT32_MAX]
    if bad:
        raise UsageError(f"nonce {bad[0]} is outside the chain's int32 range [{INT32_MIN}, {INT32_MAX}]")
    if len(set(nonces)) != len(nonces):
        seen, dups = set(), []
        for n in nonces:
            if n in seen and n not in dups:
                dups.append(n)
            seen.add(n)
        raise UsageError(f"duplicate nonces: {', '.join(map(str, dups[:10]))}")
    return nonces


# ---------------------------------------------------------------------------------------------- numbers
def check_positive(args, *names: str, maximum: int | None = None) -> None:
    """Each ``args.<name>`` (when not None) must be an integer ≥ 1 (and ≤ ``maximum``)."""
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        if value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if maximum is not None and value > maximum:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {maximum}, got {value}")


def check_real(name: str, value: float, low: float, high: float | None = None, *, low_inclusive: bool = False,
               open_high: bool = True) -> float:
    """A finite ``value`` above ``low`` (or equal, ``low_inclusive``) and below ``high`` (or equal unless
    ``open_high``); else UsageError naming the option."""
    what = f"--{name.replace('_', '-')}"
    if not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value}")
    ok = (value >= low if low_inclusive else value > low) and (
        high is None or (value < high if open_high else value <= high))
    if not ok:
        if high is None and low == 0 and not low_inclusive:
            raise UsageError(f"{what} must be positive, got {value:g}")
        bound = "" if high is None else (f" and < {high:g}" if open_high else f" and <= {high:g}")
        raise UsageError(f"{what} must be {'>=' if low_inclusive else '>'} {low:g}{bound}, got {value:g}")
    return value


def default_batch_size(seq_len: int) -> int:
    """Nonces per forward when ``--batch-size`` is not given: ``BATCH_TOKENS // seq_len``, within [1, 256]."""
    return max(1, min(MAX_DEFAULT_BATCH, BATCH_TOKENS // max(1, seq_len)))


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads <= 0:
            raise UsageError(f"--threads must be positive, got {threads}")
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- models
def model_config(name: str) -> dict:
    """The built-in model's config (no model is built, transformers is not imported)."""
    from cpoc_kernels.integrations.hf.model_configs import MODEL_CONFIGS

    if name not in MODEL_CONFIGS:
        raise UsageError(f"unknown model {name!r}; built-in models: {', '.join(sorted(MODEL_CONFIGS))}")
    return MODEL_CONFIGS[name]


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def check_shape(model: str, seq_len: int, k: int, what: str = "") -> None:
    """``seq_len`` within the model's positions, ``k`` within its hidden size (``what``: where the values came
    from, for the message)."""
    cfg = model_config(model)
    if seq_len <= 0 or k <= 0:
        raise UsageError(f"seq_len and k must be positive{what}, got seq_len={seq_len}, k={k}")
    if seq_len > cfg["max_position_embeddings"]:
        raise UsageError(f"seq_len {seq_len}{what} exceeds {model}'s {cfg['max_position_embeddings']} positions")
    if k > cfg["hidden_size"]:
        raise UsageError(f"k {k}{what} exceeds {model}'s hidden size {cfg['hidden_size']}")


def require(module: str, extra: str, purpose: str) -> None:
    """Refuse now (without importing it) when ``module`` is not installed: it comes with
    ``pip install 'cpoc_kernels[<extra>]'``."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{purpose} needs the '{module}' package, which is not installed: "
                         f"pip install 'cpoc_kernels[{extra}]'") from None


def load_model(name: str, dtype: str):
    require("transformers", "hf", "building the model")
    import torch

    from cpoc_kernels.integrations.hf.models import build_model

    model_config(name)
    return build_model(name, dtype=getattr(torch, check_dtype(dtype)))


# ---------------------------------------------------------------------------------------------- paths
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(directory: Path, flag: str, target: Path) -> None:
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise UsageError(f"{flag} {target}: {base} is not a directory")
    try:  # the only reliable test (root passes os.access, /proc refuses files)
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".cpoc-write-test.")
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot write in {base} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def check_out_file(path: Path, flag: str = "--out") -> Path:
    """``path`` can be written as a regular file (not a directory, not a device; its directory writable)."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'artifacts.json'}")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} {path} exists and is not a regular file")
    _check_writable_dir(path.parent, flag, path)
    return path


def check_out_dir(path: Path, flag: str = "--out-dir") -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory")
    _check_writable_dir(path, flag, path)
    return path


def check_in_file(path: Path, what: str = "artifact file") -> Path:
    if not path.exists():
        raise UsageError(f"no such {what}: {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an {what}")
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {what} {path}: permission denied")
    return path


def save_file(doc, path: Path) -> None:
    try:
        doc.save(path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- arguments
def add_threads_arg(p: argparse.ArgumentParser, default: int | None = 1) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help="torch CPU threads (default %(default)s: the built-in models' small steps gain little from "
                        "more, and on a shared machine OpenMP threads stall whenever another process holds a core; "
                        "raise it for qwen3-0.6b-shaped on an idle many-core machine)")


def add_round_args(p: argparse.ArgumentParser, model_default: str = "cpoc-tiny") -> None:
    p.add_argument("--model", default=model_default, help="built-in model name (default %(default)s)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default %(default)s)")
    p.add_argument("--block-hash", default="TEST_BLOCK")
    p.add_argument("--public-key", default="test_pub_keys")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per nonce (default %(default)s)")
    p.add_argument("--k", type=int, default=12, help="artifact dimension k_dim (12 on chain)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"nonces per forward (default: {BATCH_TOKENS} // seq_len, at most {MAX_DEFAULT_BATCH}; "
                        f"256 at seq_len 64)")
    p.add_argument("--stronger-rng", action="store_true", help="the 8-sub-seed input RNG")


def check_round_args(args) -> None:
    """Model, dtype, sizes of a round (before any model is built)."""
    check_positive(args, "seq_len", "k", "batch_size")
    check_dtype(args.dtype)
    check_shape(args.model, args.seq_len, args.k)
    if args.batch_size is None:
        args.batch_size = default_batch_size(args.seq_len)
