"""Fuzzing the artifact file and the vector codec (issue 12): malformed documents, fields and base64 give a
ValueError (never TypeError/AttributeError/OverflowError), the file on disk is never touched, and what loads
round-trips. Pure Python: run in process, bounded by ``CPOC_FUZZ_EXAMPLES`` (default 100)."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpoc_kernels.artifacts import ArtifactFile
from cpoc_kernels.reference import decode_vector, encode_vector
from cpoc_kernels.reference.codec import decode_base64_std

EXAMPLES = int(os.environ.get("CPOC_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)
FIELDS = ["model", "block_hash", "public_key", "seq_len", "k_dim", "block_height", "node_id", "node_count", "encoding",
          "artifacts", "dtype", "poc_stronger_rng"]


def _valid_doc():
    v = encode_vector(np.linspace(-0.3, 0.3, 12).astype(np.float16))
    return {"model": "m", "block_hash": "bh", "public_key": "pk", "seq_len": 8, "k_dim": 12, "block_height": 1,
            "node_id": 1, "node_count": 3, "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"},
            "artifacts": [{"nonce": 4, "vector_b64": v}, {"nonce": -7, "vector_b64": "junk"}]}


def _check_loaded(doc: ArtifactFile) -> None:
    """What loads is well-typed and in range, and survives a save/load round trip unchanged."""
    assert isinstance(doc.block_hash, str) and doc.block_hash and isinstance(doc.public_key, str) and doc.public_key
    assert type(doc.seq_len) is int and 1 <= doc.seq_len < 2**31
    assert type(doc.k_dim) is int and 1 <= doc.k_dim <= 1024
    assert 0 <= doc.node_id < doc.node_count and type(doc.block_height) is int and doc.block_height >= 0
    assert len({a.nonce for a in doc.artifacts}) == len(doc.artifacts)
    assert all(type(a.nonce) is int and -(2**31) <= a.nonce < 2**31 and isinstance(a.vector_b64, str) for a in doc.artifacts)
    again = ArtifactFile.from_json(json.loads(json.dumps(doc.to_json())))
    assert again == doc


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS + ["nonce", "vector_b64", "drop"]), json_values), max_size=3))
def test_fuzz_mutated_documents(mutations):
    doc = _valid_doc()
    for name, value in mutations:
        if name in ("nonce", "vector_b64"):
            doc["artifacts"] = [dict(doc["artifacts"][0], **{name: value})] if isinstance(doc.get("artifacts"), list) else value
        elif name == "drop":
            doc.pop(FIELDS[len(str(value)) % len(FIELDS)], None)
        else:
            doc[name] = value
    try:
        loaded = ArtifactFile.from_json(doc)
    except ValueError as exc:
        assert str(exc)  # a message, naming what is wrong
        return
    _check_loaded(loaded)


@FUZZ
@given(doc=json_values)
def test_fuzz_arbitrary_json_documents(doc):
    try:
        loaded = ArtifactFile.from_json(doc)
    except ValueError:
        return
    _check_loaded(loaded)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_fuzz_files_on_disk_are_read_not_written(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "a.json"
    path.write_bytes(raw)
    try:
        ArtifactFile.load(path)
    except ValueError:
        pass
    assert path.read_bytes() == raw
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


@FUZZ
@given(text=st.one_of(st.text(alphabet="ABCDEFGHab01+/=\n\r \t-_", max_size=40), st.text(max_size=40), st.binary(max_size=40)))
def test_fuzz_base64_decoder(text):
    """decode_base64_std accepts exactly canonical-length padded standard base64 (CR/LF ignored)."""
    try:
        raw = decode_base64_std(text)
    except ValueError:
        stripped = (text.decode("latin-1") if isinstance(text, bytes) else text).replace("\r", "").replace("\n", "")
        try:  # anything refused must not be the standard encoding of its own decode
            assert base64.b64encode(base64.b64decode(stripped, validate=True)).decode() != stripped
        except (ValueError, UnicodeEncodeError):
            pass
        return
    stripped = (text.decode("latin-1") if isinstance(text, bytes) else text).replace("\r", "").replace("\n", "")
    assert len(stripped) % 4 == 0 and base64.b64decode(stripped, validate=True) == raw
    try:
        decode_vector(text)
    except ValueError:
        pass
