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


# ----------------------------------------------------------------------------- malformed documents (issue 12)
def _valid_doc():
    return {"model": "m", "block_hash": "bh", "public_key": "pk", "seq_len": 4, "k_dim": 12, "block_height": 3,
            "node_id": 0, "node_count": 2, "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"},
            "artifacts": [{"nonce": 1, "vector_b64": "x"}, {"nonce": -2, "vector_b64": "y"}]}


def test_valid_document_loads():
    doc = ArtifactFile.from_json(_valid_doc())
    assert (doc.seq_len, doc.k_dim, doc.node_id, doc.node_count, doc.block_height) == (4, 12, 0, 2, 3)
    assert [a.nonce for a in doc.artifacts] == [1, -2]


@pytest.mark.parametrize("doc", [None, 5, 1.5, "text", [], [{"nonce": 1}], True])
def test_non_object_documents_are_refused(doc, tmp_path):
    with pytest.raises(ValueError, match="JSON object"):
        ArtifactFile.from_json(doc)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="a.json"):
        ArtifactFile.load(path)


BAD_FIELDS = [
    ("k_dim", 0), ("k_dim", -5), ("k_dim", 12.9), ("k_dim", "12"), ("k_dim", True), ("k_dim", None), ("k_dim", 10**6),
    ("seq_len", 0), ("seq_len", -1), ("seq_len", 10**30), ("seq_len", 4.0), ("seq_len", "4"), ("seq_len", None),
    ("seq_len", False),
    ("block_hash", None), ("block_hash", 123), ("block_hash", ""), ("block_hash", ["bh"]),
    ("public_key", None), ("public_key", 7), ("public_key", ""),
    ("model", None), ("model", 3),
    ("node_id", 2), ("node_id", 5), ("node_id", -1), ("node_id", 1.0), ("node_id", "0"),
    ("node_count", 0), ("node_count", -3), ("node_count", 2.5), ("node_count", True), ("node_count", 10**30),
    ("block_height", -1), ("block_height", 1.5), ("block_height", "3"), ("block_height", 10**30),
    ("encoding", "f16"), ("encoding", None), ("encoding", []),
    ("artifacts", None), ("artifacts", {}), ("artifacts", "x"), ("artifacts", 3),
    ("dtype", 16), ("poc_stronger_rng", "yes"), ("poc_stronger_rng", 1),
]


@pytest.mark.parametrize("name, value", BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_every_field_is_validated_by_name(name, value):
    doc = _valid_doc()
    doc[name] = value
    with pytest.raises(ValueError, match=name):
        ArtifactFile.from_json(doc)


@pytest.mark.parametrize("encoding", [{"dtype": "f32"}, {"endian": "be"}, {"k_dim": 8}, {"k_dim": "12"}, {"k_dim": 0}])
def test_encoding_block_is_checked(encoding):
    doc = _valid_doc()
    doc["encoding"] = encoding
    with pytest.raises(ValueError, match="encoding|k_dim"):
        ArtifactFile.from_json(doc)


@pytest.mark.parametrize("item", [None, 5, "x", [], {"nonce": 1}, {"vector_b64": "x"}, {"nonce": 1.0, "vector_b64": "x"},
                                  {"nonce": True, "vector_b64": "x"}, {"nonce": "1", "vector_b64": "x"},
                                  {"nonce": 2**31, "vector_b64": "x"}, {"nonce": 1, "vector_b64": None},
                                  {"nonce": 1, "vector_b64": 12}, {"nonce": 1, "vector_b64": ["x"]}])
def test_malformed_artifact_entries_name_their_index(item):
    doc = _valid_doc()
    doc["artifacts"] = [{"nonce": 5, "vector_b64": "x"}, item]
    with pytest.raises(ValueError, match=r"artifacts\[1\]"):
        ArtifactFile.from_json(doc)


def test_artifact_constructor_validates():
    with pytest.raises(ValueError):
        Artifact(1.0, "x")
    with pytest.raises(ValueError):
        Artifact(1, None)
    with pytest.raises(ValueError):
        Artifact.from_vector(1, 3.0)
    with pytest.raises(ValueError):
        Artifact.from_vector(1, np.ones(12, dtype=np.int32))


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"[" * 100000, b'{"seq_len": NaN}', b"", b"\x00"])
def test_undecodable_files_give_value_error(raw, tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(raw)
    with pytest.raises(ValueError):
        ArtifactFile.load(path)
