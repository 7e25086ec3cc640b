"""Fuzzed ``cpoc`` command lines (hypothesis, bounded: a few hundred examples, no model ever built).

Every command line either is refused with exactly one line ``cpoc: error: …`` and exit 2 leaving the working directory
untouched, or gets past every check to the model build (stopped there by the test), or is --help/--version (exit 0).
Never a traceback, never a Python-internal message, never another exit code.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpoc_kernels.cli import main

LEAKS = ("Traceback", "invalid literal", "codec can't", "Sample larger", "object has no attribute", "NoneType",
         "unsupported operand", "not subscriptable")


class ModelBuildReached(Exception):
    """Raised instead of building a model: the command line passed every check."""


def refuse_build(*args, **kwargs):
    raise ModelBuildReached


SPECIAL = ["inf", "-inf", "nan", "1e309", "-0", "0", "-1", "1", "7", "64", "4097", "2147483647", "2147483648",
           "-2147483649", "0:0", "5:3", "0:10000000000", "1,1", ":", ",", "", " ", "0:4", "1,2,3", "a:b", "1:2:3",
           "fill", "off", "greedy", "float32", "int8", "bfloat16", "cpoc-tiny", "nope", ".", "/proc/x.json",
           "/dev/null", "sub/dir/out.json", "x\ny", "é", "--", "-h"]
value = st.one_of(st.sampled_from(SPECIAL), st.integers(-2**40, 2**40).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=10))

OPTIONS = {
    "generate": ["--nonces", "--out", "--seq-len", "--k", "--batch-size", "--threads", "--model", "--dtype"],
    "validate": ["--model", "--dtype", "--batch-size", "--sample", "--seed", "--dist-threshold", "--p-mismatch",
                 "--fraud-threshold", "--threads"],
    "demo": ["--nonces", "--out", "--seq-len", "--k", "--duration", "--mode", "--load", "--chat-rate", "--threads",
             "--prompt-len", "--output-len", "--max-batch-tokens", "--idle-max-ms", "--dtype"],
    "bench-mixed": ["--loads", "--repeats", "--out-dir", "--tag", "--duration", "--slo-overhead", "--page-size",
                    "--seq-len", "--k", "--idle-max-tokens"],
}


@st.composite
def command_lines(draw, files):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    if command == "validate":
        argv.append(draw(st.sampled_from(files)))
    if command == "demo" and draw(st.booleans()):
        argv.append("--pure")
    for flag in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=4, unique=True)):
        argv.append(f"{flag}={draw(value)}")  # '=': a value starting with '-' stays a value
    if command == "generate" and not any(a.startswith("--nonces=") for a in argv) and draw(st.booleans()):
        argv.append("--nonces=0:4")
    if command == "generate" and not any(a.startswith("--out=") for a in argv):
        argv.append("--out=a.json")
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-cli")
    (work / "garbage.json").write_bytes(b"\xff{not json")
    (work / "null.json").write_text("null")
    (work / "empty.json").write_text('{"model": "cpoc-tiny", "block_hash": "b", "public_key": "p", "seq_len": 8, '
                                     '"k_dim": 12, "artifacts": []}')
    return work


FILES = ["garbage.json", "null.json", "empty.json", "missing.json", ".", "/proc/self/status"]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.skipif(not hasattr(os, "fchdir"), reason="POSIX only")
def test_fuzzed_command_lines_fail_cleanly(workdir):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
              derandomize=True)  # the same 300 command lines on every CI run
    @given(argv=command_lines(FILES))
    def check(argv):
        before = listing(workdir)
        out, err = io.StringIO(), io.StringIO()
        with mock.patch("cpoc_kernels.integrations.hf.models.build_model", refuse_build), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except ModelBuildReached:
                code = None
        if code is None:  # passed every check: nothing may have been reported as an error
            assert "cpoc: error" not in err.getvalue(), (argv, err.getvalue())
            return
        if code == 0:  # --help / -h / --version reached through a fuzzed value
            assert "usage" in out.getvalue() or "cpoc " in out.getvalue(), argv
            return
        assert code == 2, (argv, code, err.getvalue())
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cpoc: error: "), (argv, err.getvalue())
        assert not any(leak in lines[0] for leak in LEAKS), (argv, lines[0])
        assert listing(workdir) == before, argv

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        check()
    finally:
        os.chdir(cwd)
