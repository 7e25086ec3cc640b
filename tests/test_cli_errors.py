"""Every bad CLI input of issue 12: one line ``cpoc: error: …``, exit 2, nothing written, and — where it can be
checked before work — refused before any model is built (in-process: ``build_model`` must not be called;
subprocess: neither torch nor transformers imported). Plus the validate verdict's exit codes and messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpoc_kernels.artifacts import ArtifactFile

ROOT = Path(__file__).resolve().parents[1]
LEAKS = ("Traceback", "invalid literal", "codec can't", "Sample larger", "object has no attribute", "NoneType")


def one_error_line(code: int, err: str, fragment: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpoc: error: "), err
    assert fragment in lines[0], lines[0]
    assert not any(leak in lines[0] for leak in LEAKS), lines[0]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built (the check must come first)."""
    import cpoc_kernels.integrations.hf.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(models, "build_model", refuse)


@pytest.fixture(scope="module")
def honest_file(tmp_path_factory):
    """A small honest artifact file (6 nonces, seq_len 8)."""
    pytest.importorskip("transformers")
    from cpoc_kernels.cli import main

    path = tmp_path_factory.mktemp("cli") / "honest.json"
    assert main(["generate", "--nonces", "0:6", "--seq-len", "8", "--out", str(path)]) == 0
    return path


# ------------------------------------------------------------------------------------------ before any work
PROC = "/proc/cpoc-test-x.json"


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--nonces", "0:10000000000", "--out", "x.json"], "int32"),
    (["generate", "--nonces=-2147483649:0", "--out", "x.json"], "int32"),
    (["generate", "--nonces", "0:2000000", "--out", "x.json"], "at most 1000000"),
    (["generate", "--nonces", "2147483648", "--out", "x.json"], "int32"),
    (["generate", "--nonces", ",", "--out", "x.json"], "no nonces"),
    (["generate", "--nonces", "", "--out", "x.json"], "no nonces"),
    (["generate", "--nonces", "1,2,1,2", "--out", "x.json"], "duplicate nonces: 1, 2"),
    (["generate", "--nonces", "1,x", "--out", "x.json"], "'x' is not an integer"),
    (["generate", "--nonces", "1:2:3", "--out", "x.json"], "cannot read nonces"),
    (["generate", "--nonces", "0:4", "--seq-len", "1000000", "--out", "x.json"], "exceeds cpoc-tiny's 4096"),
    (["generate", "--nonces", "0:4", "--k", "65", "--out", "x.json"], "hidden size 64"),
    (["generate", "--nonces", "0:4", "--batch-size", "0", "--out", "x.json"], "--batch-size must be positive"),
    (["generate", "--nonces", "0:4", "--threads", "0", "--out", "x.json"], "--threads must be positive"),
    (["generate", "--nonces", "0:4", "--out", "."], "is a directory"),
    (["demo", "--pure", "--out", "."], "is a directory"),
    (["demo", "--out", "."], "is a directory"),
    (["demo", "--pure", "--nonces", "0", "--out", "x.json"], "--nonces must be positive"),
    (["demo", "--pure", "--nonces", "5000000", "--out", "x.json"], "at most"),
    (["demo", "--chat-rate", "-1", "--out", "x.json"], "--chat-rate must be >= 0"),
    (["demo", "--duration", "nan", "--out", "x.json"], "finite"),
    (["bench-mixed", "--repeats", "0", "--out-dir", "o"], "--repeats must be positive"),
    (["bench-mixed", "--tag", "../up", "--out-dir", "o"], "--tag"),
    (["bench-mixed", "--out-dir", "x.json"], "not a directory"),
    (["validate", "nothing-here.json"], "no such artifact file"),
    (["validate", "."], "is a directory"),
    (["validate", "nothing-here.json", "--dist-threshold", "inf"], "--dist-threshold must be a finite number"),
    (["validate", "nothing-here.json", "--dist-threshold", "nan"], "finite"),
    (["validate", "nothing-here.json", "--dist-threshold", "0"], "--dist-threshold must be positive"),
    (["validate", "nothing-here.json", "--p-mismatch", "1"], "--p-mismatch must be > 0 and < 1"),
    (["validate", "nothing-here.json", "--fraud-threshold", "0"], "--fraud-threshold"),
    (["validate", "nothing-here.json", "--sample", "-1"], "--sample must be positive"),
    (["validate", "nothing-here.json", "--batch-size", "0"], "--batch-size must be positive"),
])
def test_bad_input_refused_before_any_model(argv, fragment, cli, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text("not an artifact file")  # a regular file where a directory is wanted
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli(argv)
    one_error_line(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no directory created


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("argv", [["generate", "--nonces", "0:4", "--out", PROC], ["demo", "--pure", "--out", PROC],
                                  ["demo", "--out", PROC], ["bench-mixed", "--out-dir", "/proc/cpoc-test-dir"]])
def test_unwritable_output_refused_before_any_model(argv, cli, no_model):
    code, _, err = cli(argv)
    one_error_line(code, err, "cannot write in /proc")


def test_existing_device_is_never_replaced(cli, no_model):
    code, _, err = cli(["generate", "--nonces", "0:4", "--out", "/dev/null"])
    one_error_line(code, err, "not a regular file")
    assert Path("/dev/null").is_char_device()


def test_missing_transformers_names_the_extra(cli, tmp_path, monkeypatch, no_model):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    for argv in (["generate", "--nonces", "0:4", "--out", str(tmp_path / "a.json")],
                 ["demo", "--pure", "--out", str(tmp_path / "a.json")],
                 ["bench-mixed", "--out-dir", str(tmp_path / "b")]):
        code, _, err = cli(argv)
        one_error_line(code, err, "pip install 'cpoc_kernels[hf]'")
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_refused_before_the_sweep(cli, tmp_path, monkeypatch, no_model):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = cli(["bench-mixed", "--out-dir", str(tmp_path / "b")])
    one_error_line(code, err, "pip install 'cpoc_kernels[plot]'")
    assert not (tmp_path / "b").exists()


def run_cpoc(*argv, block: str = "") -> subprocess.CompletedProcess:
    """``cpoc ARGV`` in a fresh interpreter; ``block``: a module made unimportable. The child reports which heavy
    modules it imported on its last stderr line."""
    code = ("import sys\n"
            + (f"sys.modules[{block!r}] = None\n" if block else "")
            + "from cpoc_kernels.cli import main\n"
            "code = main(sys.argv[1:])\n"
            "heavy = [m for m in ('torch', 'transformers') if sys.modules.get(m) is not None]\n"
            "print('imported:', *heavy, file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("argv, block, fragment", [
    (["generate", "--nonces", "1,1", "--out", "/tmp/cpoc-never.json"], "", "duplicate nonces"),
    (["generate", "--nonces", "0:10000000000", "--out", "/tmp/cpoc-never.json"], "", "int32"),
    (["generate", "--nonces", "0:4", "--k", "999", "--out", "/tmp/cpoc-never.json"], "", "hidden size"),
    (["generate", "--nonces", "0:4", "--out", "/tmp/cpoc-never.json"], "transformers", "cpoc_kernels[hf]"),
    (["bench-mixed", "--repeats", "0"], "", "--repeats"),
    (["bench-mixed", "--out-dir", "/tmp/cpoc-never-dir"], "matplotlib", "cpoc_kernels[plot]"),
    (["demo", "--seq-len", "1000000"], "", "exceeds"),
    (["validate", "/nonexistent.json", "--dist-threshold", "inf"], "", "finite"),
])
def test_subprocess_refusal_imports_neither_torch_nor_transformers(argv, block, fragment):
    """The checks run before the heavy imports, so they answer at once (no timing asserted: the imports tell)."""
    proc = run_cpoc(*argv, block=block)
    *lines, imported = proc.stderr.strip().splitlines()
    one_error_line(proc.returncode, "\n".join(lines), fragment)
    assert imported == "imported:", imported
    assert not Path("/tmp/cpoc-never.json").exists() and not Path("/tmp/cpoc-never-dir").exists()


def test_version(cli):
    import tomllib

    import cpoc_kernels

    code, out, _ = cli(["--version"])
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert code == 0 and out.strip() == f"cpoc {expected}" == f"cpoc {cpoc_kernels.__version__}"


def test_help_says_how_to_change_speed_defaults(cli):
    for command in ("generate", "validate"):
        code, out, _ = cli([command, "--help"])
        assert code == 0 and "--threads" in out and "--batch-size" in out and "default 1" in out


def test_default_batch_size_follows_seq_len():
    from cpoc_kernels.cli.common import default_batch_size

    assert default_batch_size(64) == 256 and default_batch_size(1024) == 16 and default_batch_size(10**5) == 1


# ------------------------------------------------------------------------------------------ malformed files
@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"{not json", "not a valid artifact file"),
    (b"[]", "not a valid artifact file"),
    (b"null", "not a valid artifact file"),
])
def test_malformed_files_are_named(content, fragment, cli, tmp_path, no_model):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    code, _, err = cli(["validate", str(path)])
    line = one_error_line(code, err, fragment)
    assert str(path) in line


def test_file_with_duplicate_or_no_nonces(cli, tmp_path, honest_file, no_model):
    doc = json.loads(honest_file.read_text())
    dup = dict(doc, artifacts=doc["artifacts"] + doc["artifacts"][:1])
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    code, _, err = cli(["validate", str(tmp_path / "dup.json")])
    one_error_line(code, err, "duplicate nonce 0")
    (tmp_path / "empty.json").write_text(json.dumps(dict(doc, artifacts=[])))
    code, _, err = cli(["validate", str(tmp_path / "empty.json")])
    one_error_line(code, err, "holds no artifacts")


def test_file_parameters_checked_against_the_model(cli, tmp_path, honest_file, no_model):
    doc = json.loads(honest_file.read_text())
    for change, fragment in (({"model": "gpt-9"}, "'gpt-9' (from the file) is not a built-in model"),
                             ({"seq_len": 999999}, "(from the file) exceeds"),
                             ({"extra_dtype": "int4"}, "unknown dtype 'int4' (from the file)")):
        bad = dict(doc)
        if "extra_dtype" in change:
            bad["dtype"] = change["extra_dtype"]
        else:
            bad.update(change)
        (tmp_path / "f.json").write_text(json.dumps(bad))
        code, _, err = cli(["validate", str(tmp_path / "f.json")])
        one_error_line(code, err, fragment)
    code, _, err = cli(["validate", str(honest_file), "--dtype", "int8"])
    one_error_line(code, err, "unknown dtype 'int8'")


# ------------------------------------------------------------------------------------------ validate verdicts
def test_validate_says_where_judging_parameters_come_from(cli, honest_file):
    code, out, _ = cli(["validate", str(honest_file)])
    assert code == 0
    assert "model cpoc-tiny (from the file)" in out and "dtype float32 (from the file)" in out
    assert "(command line)" in out and "verdict: honest" in out


def test_validate_dtype_is_honoured_and_said(cli, honest_file, monkeypatch):
    import cpoc_kernels.integrations.hf.models as models

    seen = []
    real = models.build_model

    def spy(name, dtype, **kw):
        seen.append(dtype)
        return real(name, dtype=dtype, **kw)

    monkeypatch.setattr(models, "build_model", spy)
    code, out, _ = cli(["validate", str(honest_file), "--dtype", "bfloat16"])
    import torch

    assert seen == [torch.bfloat16]
    assert "dtype bfloat16 (command line)" in out
    assert "note: the file says dtype float32; recomputing in bfloat16 (--dtype)" in out
    assert code in (0, 1) and "verdict:" in out


def test_validate_names_mismatching_nonces_and_exits_1(cli, tmp_path, honest_file):
    from cpoc_kernels.cli import main

    other = tmp_path / "other.json"
    assert main(["generate", "--nonces", "0:6", "--seq-len", "8", "--block-hash", "ELSE", "--out", str(other)]) == 0
    doc, fake = ArtifactFile.load(honest_file), ArtifactFile.load(other)
    tampered = {1, 4, 5}
    doc.artifacts = [f if f.nonce in tampered else a for a, f in zip(doc.artifacts, fake.artifacts)]
    doc.save(tmp_path / "t.json")
    code, out, _ = cli(["validate", str(tmp_path / "t.json"), "--p-mismatch", "0.01"])
    assert "3/6 mismatches" in out and "mismatching nonces: 1, 4, 5" in out
    assert code == 1 and "verdict: fraud" in out


def test_validate_no_verdict_exit_3_when_nonces_are_not_recomputed(cli, honest_file, monkeypatch):
    from cpoc_kernels.integrations.hf.runner import PoCRunner

    real = PoCRunner.run

    def drops_one(self, nonces, progress=None):  # the validator's own non-finite row for nonce 3
        return [a for a in real(self, nonces, progress) if a.nonce != 3]

    monkeypatch.setattr(PoCRunner, "run", drops_one)
    code, out, _ = cli(["validate", str(honest_file)])
    assert code == 3
    assert "verdict: no verdict" in out and "not recomputed" in out and ": 3" in out


def test_generate_writes_nothing_when_saving_fails(cli, tmp_path, monkeypatch):
    """A write failure after the work (disk full) is one line and exit 2 too."""
    pytest.importorskip("transformers")

    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ArtifactFile, "save", full)
    code, _, err = cli(["generate", "--nonces", "0:2", "--seq-len", "8", "--out", str(tmp_path / "a.json")])
    bar, _, last = err.rstrip("\n").rpartition("\n")  # the progress bar ran before the failure
    assert "2/2" in bar
    one_error_line(code, last, "No space left on device")
