"""cpoc generate / validate and the one-line usage errors."""
import json

import pytest

from cpoc_kernels.artifacts import ArtifactFile
from cpoc_kernels.cli import main, parse_nonces


def test_generate_then_validate_honest_file(tmp_path, cli):
    out = tmp_path / "a.json"
    code, stdout, _ = cli(["generate", "--nonces", "0:6", "--seq-len", "8", "--batch-size", "4", "--out", str(out)])
    assert code == 0 and "6 artifacts" in stdout
    doc = json.loads(out.read_text())
    assert [a["nonce"] for a in doc["artifacts"]] == list(range(6))
    assert doc["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
    code, stdout, _ = cli(["validate", str(out), "--batch-size", "5"])
    assert code == 0 and "0/6 mismatches" in stdout and "fraud=False" in stdout


def test_validate_flags_a_tampered_file(tmp_path, capsys, cli):
    honest = tmp_path / "h.json"
    other = tmp_path / "o.json"
    assert main(["generate", "--nonces", "0:12", "--seq-len", "8", "--out", str(honest)]) == 0
    assert main(["generate", "--nonces", "0:12", "--seq-len", "8", "--block-hash", "X", "--out", str(other)]) == 0
    doc, fake = ArtifactFile.load(honest), ArtifactFile.load(other)
    doc.artifacts = fake.artifacts  # vectors computed for another block: fabricated for this round
    doc.save(honest)
    capsys.readouterr()
    code, stdout, _ = cli(["validate", str(honest)])
    assert code == 1 and "12/12 mismatches" in stdout and "fraud=True" in stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["generate", "--nonces", "5:3", "--out", "x.json"], "empty"),
        (["generate", "--nonces", "a:b", "--out", "x.json"], "cannot read nonces"),
        (["generate", "--nonces", "0:2", "--model", "nope", "--out", "x.json"], "unknown model"),
        (["generate", "--nonces", "0:2", "--seq-len", "0", "--out", "x.json"], "--seq-len must be positive"),
        (["generate", "--nonces", "0:2", "--dtype", "int8", "--out", "x.json"], "unknown dtype"),
        (["validate", "/nonexistent/file.json"], "no such artifact file"),
        (["frobnicate"], "invalid choice"),
        (["generate", "--bogus"], "arguments"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, fragment, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpoc: error:") and fragment in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_parse_nonces():
    assert parse_nonces("3:6") == [3, 4, 5]
    assert parse_nonces("1,-2,9") == [1, -2, 9]


def test_other_modules_register_subcommands_with_one_entry(monkeypatch, cli):
    """The three registrar forms (set_defaults(func=), returning the handler, filling COMMANDS) all dispatch."""
    import cpoc_kernels.cli as cli_module

    def with_defaults(sub):
        sub.add_parser("x-defaults").set_defaults(func=lambda args: 11)

    def returning(sub):
        sub.add_parser("x-returning")
        return lambda args: 12

    def filling(sub, commands):
        sub.add_parser("x-filling")
        commands["x-filling"] = lambda args: 13

    monkeypatch.setattr(cli_module, "REGISTRARS", [*cli_module.REGISTRARS, with_defaults, returning, filling])
    monkeypatch.setattr(cli_module, "COMMANDS", {})
    assert [cli([name])[0] for name in ("x-defaults", "x-returning", "x-filling")] == [11, 12, 13]
    code, _, err = cli(["x-unknown"])
    assert code == 2 and "invalid choice" in err
