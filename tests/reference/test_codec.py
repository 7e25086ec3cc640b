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


# ----------------------------------------------------------------------------- strictness (issue 12)
# Outcomes of Go's base64.StdEncoding.DecodeString (the DAPI artifact callback's decoder), read off its
# documented rules: padded 4-char quanta, '\r'/'\n' ignored anywhere, nothing after the padding, unused
# low bits of the last character ignored (StdEncoding is not Strict).
GOOD = base64.b64encode(bytes(range(24))).decode()


@pytest.mark.parametrize("text", [
    GOOD + "=", GOOD + "==", GOOD + "====",  # extra padding (issue 12: was accepted)
    GOOD[:-1], GOOD[:-2], GOOD + "A",  # incomplete quantum
    " " + GOOD, GOOD + " ", GOOD[:8] + " " + GOOD[8:], GOOD + "\t", GOOD[:8] + "\v" + GOOD[8:],  # whitespace
    GOOD[:8] + "\u2028" + GOOD[8:],  # a Unicode line separator is not '\n'
    "AB=", "AB", "A===", "====", "=AAA", "AB=A", "AB==AB==", "AB==\nx", "ABC=A",  # padding in the wrong place
    GOOD.replace("A", "-", 1), GOOD.replace("A", "_", 1), "ÄB==",  # URL alphabet, non-ASCII
])
def test_decode_rejects_what_go_rejects(text):
    from cpoc_kernels.reference.codec import decode_base64_std

    with pytest.raises(ValueError):
        decode_base64_std(text)
    with pytest.raises(ValueError):
        decode_vector(text)


@pytest.mark.parametrize("text, raw", [
    (GOOD, bytes(range(24))),
    (GOOD[:12] + "\n" + GOOD[12:] + "\r\n", bytes(range(24))),  # newlines ignored anywhere
    ("\r\n" + GOOD, bytes(range(24))),
    ("AB==", b"\x00"), ("AB=\n=", b"\x00"), ("ABC=", b"\x00\x10"),  # non-zero unused bits: Go (non-strict) accepts
    ("", b""), ("\n", b""),
])
def test_decode_accepts_what_go_accepts(text, raw):
    from cpoc_kernels.reference.codec import decode_base64_std

    assert decode_base64_std(text) == raw
    assert decode_base64_std(text.encode("ascii")) == raw


def test_decode_property_against_the_standard_encoder():
    """Any payload's standard encoding (optionally with newlines inserted) decodes back; one extra '=' or a
    space anywhere is refused."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cpoc_kernels.reference.codec import decode_base64_std

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.binary(min_size=1, max_size=40), st.integers(0, 100), st.sampled_from(["\n", "\r", "=", " "]))
    def check(raw, pos, insert):
        enc = base64.b64encode(raw).decode()
        at = pos % (len(enc) + 1)
        mutated = enc[:at] + insert + enc[at:]
        if insert in "\r\n":
            assert decode_base64_std(mutated) == raw
        else:
            with pytest.raises(ValueError):
                decode_base64_std(mutated)

    check()


@pytest.mark.parametrize("vec", [
    torch.ones(12, dtype=torch.int32), torch.ones(12, dtype=torch.bool), torch.ones(12, dtype=torch.int64),
    np.ones(12, dtype=np.int16), np.ones(12, dtype=bool), np.ones(12, dtype=np.complex64), [1] * 12, [True] * 12,
    torch.ones(12, dtype=torch.complex64), 1.0, None, "AAAA", np.array(["a"] * 12), [[1.0]] * 12,
    np.full(12, 7e4), torch.full((12,), float("nan")),
])
def test_encode_refuses_non_float_or_non_finite_vectors(vec):
    with pytest.raises(ValueError):
        encode_vector(vec)
