"""cpoc demo (mixed chat + continuous PoC, and --pure) and cpoc bench-mixed, with tiny settings."""
from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("transformers")

from cpoc_kernels.artifacts import ArtifactFile  # noqa: E402

TINY = ["--seq-len", "16", "--max-batch-tokens", "32", "--num-blocks", "64", "--max-requests", "8",
        "--prompt-len", "4:12", "--output-len", "2:5"]


def test_demo_mixed_writes_and_validates_artifacts(tmp_path, cli):
    out = tmp_path / "demo.json"
    code, stdout, err = cli(["demo", "--duration", "1", "--chat-rate", "15", "--out", str(out), *TINY])
    assert code == 0, stdout + err
    assert "chat latency p50" in stdout and "with PoC" in stdout and "chat outputs identical: True" in stdout
    assert "nonces/s" in stdout and "PoC share of tokens" in stdout
    doc = ArtifactFile.load(out)
    assert doc.seq_len == 16 and doc.model == "cpoc-tiny" and len(doc.artifacts) > 0
    nonces = [a.nonce for a in doc.artifacts]
    assert len(set(nonces)) == len(nonces)
    assert f"validation: 0/{len(doc.artifacts)} mismatches" in stdout and "fraud=False" in stdout
    assert "chat requests" in err  # progress bar on stderr
    # the file is the fleet format the validator reads
    assert json.loads(out.read_text())["encoding"] == {"dtype": "f16", "k_dim": 12, "endian": "le"}
    code, stdout, _ = cli(["validate", str(out)])
    assert code == 0 and f"0/{len(doc.artifacts)} mismatches" in stdout


def test_demo_pure_still_reachable(tmp_path, cli):
    out = tmp_path / "pure.json"
    code, stdout, _ = cli(["demo", "--pure", "--nonces", "6", "--seq-len", "8", "--out", str(out)])
    assert code == 0 and "generated 6 artifacts" in stdout and "0/6 mismatches" in stdout


def test_bench_mixed_writes_csv_and_png(tmp_path, cli):
    pytest.importorskip("matplotlib", reason="the PNG plot needs the 'plot' extra (pip install 'cpoc_kernels[plot]')")
    code, stdout, err = cli(["bench-mixed", "--loads", "0,0.5", "--duration", "0.6", "--out-dir", str(tmp_path),
                             "--tag", "t", *TINY])
    assert code == 0, stdout + err
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [float(r["load"]) for r in rows] == [0.0, 0.5]
    assert float(rows[0]["nonces_per_s"]) > 0 and float(rows[0]["pure_poc_nonces_per_s"]) > 0
    assert int(rows[0]["chat_requests"]) == 0 and int(rows[1]["chat_requests"]) > 0
    assert float(rows[1]["chat_p50_on_ms"]) > 0 and float(rows[1]["chat_p50_off_ms"]) > 0
    assert 0 <= float(rows[1]["poc_token_share"]) <= 1
    # idle share: all of it without chat; measured from the chat-alone run with chat
    assert float(rows[0]["idle_share"]) == 1.0 and 0 <= float(rows[1]["idle_share"]) < 1
    assert float(rows[1]["goal_fraction_idle"]) == pytest.approx(0.9 * float(rows[1]["idle_share"]), rel=1e-4)
    assert float(rows[0]["of_engine_idle_rate"]) == 1.0  # the load-0 row is the engine's own idle rate
    assert float(rows[1]["of_engine_idle_rate"]) == pytest.approx(
        float(rows[1]["nonces_per_s"]) / float(rows[0]["nonces_per_s"]), rel=1e-4)
    png = (tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--mode", "greedy"], "unknown governor mode"),
    (["demo", "--duration", "0"], "--duration must be positive"),
    (["demo", "--prompt-len", "9:3"], "--prompt-len"),
    (["bench-mixed", "--loads", "a,b"], "cannot read --loads"),
    (["bench-mixed", "--loads", "0,7"], "fractions in"),
    (["bench-mixed", "--max-batch-tokens", "0"], "--max-batch-tokens must be positive"),
    (["bench-mixed", "--idle-max-ms", "0"], "--idle-max-ms must be positive"),
    (["demo", "--idle-max-tokens", "-3"], "--idle-max-tokens must be positive"),
])
def test_bad_mixed_arguments_one_line_exit_2(argv, fragment, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpoc: error:") and fragment in lines[0]
