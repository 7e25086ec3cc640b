"""Artifact / ArtifactFile: fleet file format, round trip, bad input."""
import json

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from cpoc_kernels.artifacts import Artifact, ArtifactFile, check_nonce


def test_fleet_files_load_and_round_trip(tmp_path):
    for path in sorted((GOLDEN_DIR / "fleet").glob("*.json")):
        doc = ArtifactFile.load(path)
        original = json.loads(path.read_text())
        assert [a.nonce for a in doc.artifacts] == [a["nonce"] for a in original["artifacts"]]
        out = tmp_path / path.name
        doc.save(out)
        again = json.loads(out.read_text())
        for key in ("model", "block_hash", "public_key", "seq_len", "k_dim", "artifacts", "encoding"):
            if key in original:
                assert again[key] == original[key], key


def test_artifact_from_vector_round_trip():
    v = np.linspace(-0.5, 0.5, 12).astype(np.float16)
    a = Artifact.from_vector(-5, v)
    assert a.nonce == -5 and np.array_equal(a.vector(), v.astype(np.float32))


@pytest.mark.parametrize("bad", [2**31, -(2**31) - 1, 1.5, "3", True])
def test_check_nonce_rejects(bad):
    with pytest.raises(ValueError):
        check_nonce(bad)


def test_duplicate_nonce_and_missing_fields(tmp_path):
    doc = {"block_hash": "b", "public_key": "p", "seq_len": 4,
           "artifacts": [{"nonce": 1, "vector_b64": "x"}, {"nonce": 1, "vector_b64": "y"}]}
    with pytest.raises(ValueError, match="duplicate"):
        ArtifactFile.from_json(doc)
    with pytest.raises(ValueError, match="lacks"):
        ArtifactFile.from_json({"block_hash": "b"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        ArtifactFile.load(bad)


def test_save_is_atomic_on_error(tmp_path):
    path = tmp_path / "a.json"
    ArtifactFile(model="m", block_hash="b", public_key="p", seq_len=4).save(path)
    before = path.read_text()
    broken = ArtifactFile(model="m", block_hash="b", public_key="p", seq_len=4, extra={"x": object()})
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
