"""Artifact codec against the golden round trips and every fleet golden artifact."""
import base64
import json

import numpy as np
import pytest
import torch

from bits import f32_from_hex, u16_from_hex
from conftest import GOLDEN_DIR
from cpoc_kernels.reference import decode_vector, encode_vector

FLEET_FILES = sorted((GOLDEN_DIR / "fleet").glob("*.json"))


def test_round_trips_golden(primitives):
    for case in primitives["artifact_codec"]["round_trips"]:
        v32 = f32_from_hex(case["vector_f32_hex"])
        v16 = v32.to(torch.float16)
        assert torch.equal(v16.view(torch.int16), u16_from_hex(case["vector_f16_hex"])), case["label"]
        assert encode_vector(v16) == case["vector_b64"]
        assert encode_vector(v16.numpy()) == case["vector_b64"]
        assert bytes.fromhex(case["le_bytes_hex"]) == base64.b64decode(case["vector_b64"])
        dec = decode_vector(case["vector_b64"])
        assert dec.dtype == np.float32
        assert np.array_equal(dec.view(np.uint32), f32_from_hex(case["decoded_f32_hex"]).numpy().view(np.uint32))


def test_golden_file_decodes(primitives):
    for case in primitives["artifact_codec"]["golden_file_decodes"]:
        dec = decode_vector(case["vector_b64"])
        assert np.array_equal(dec.view(np.uint32), f32_from_hex(case["decoded_f32_hex"]).numpy().view(np.uint32))


@pytest.mark.parametrize("path", FLEET_FILES, ids=lambda p: p.name)
def test_every_fleet_artifact_decodes_to_a_unit_vector(path):
    doc = json.loads(path.read_text())
    assert doc["artifacts"]
    for art in doc["artifacts"]:
        v = decode_vector(art["vector_b64"])
        assert v.shape == (12,) and np.isfinite(v).all()
        # fp16 rounding of 12 unit-vector coordinates: |‖v‖ − 1| ≤ 12 · 2^-11
        assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) < 12 * 2.0**-11, art["nonce"]


@pytest.mark.parametrize(
    "b64",
    [
        base64.b64encode(b"\x00" * 22).decode(),  # 11 values
        base64.b64encode(b"\x00" * 26).decode(),  # 13 values
        base64.b64encode(b"\x00\x7c" + b"\x00" * 22).decode(),  # +Inf
        base64.b64encode(b"\x01\x7e" + b"\x00" * 22).decode(),  # NaN
        "not base64!!",
        "",
    ],
)
def test_decode_rejects_malformed(b64):
    with pytest.raises(ValueError):
        decode_vector(b64)


def test_encode_rejects_wrong_length_and_non_finite():
    with pytest.raises(ValueError):
        encode_vector(np.zeros(11, dtype=np.float16))
    bad = np.zeros(12, dtype=np.float16)
    bad[3] = np.inf
    with pytest.raises(ValueError):
        encode_vector(bad)
