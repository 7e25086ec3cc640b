"""reference.pick_indices / haar_vectors / output_stage against the golden vectors."""
import pytest
import torch

from bits import f32_from_hex, u16_from_hex, ulp_distance
from cpoc_kernels.reference import encode_vector, haar_vectors, mmh, output_stage, pick_indices, seed32


def test_pick_golden_cuda_order(primitives):
    for case in primitives["pick"]:
        assert seed32(case["seed_string"]) == case["seed"]
        idx = pick_indices(case["block_hash"], case["public_key"], case["nonce"], case["hidden"], case["k"])
        assert idx == case["indices_cuda_order_derived"]
        assert sorted(idx) == case["indices_sorted"]


def test_pick_order_rule():
    """k-1 smallest-score indices ascending, then the k-th smallest (derived from the scores directly)."""
    hidden, k = 300, 12
    idx = pick_indices("bh", "pk", 9, hidden, k)
    scores = mmh(torch.arange(hidden), seed32("bh_pk_nonce_9_pick_12")).tolist()
    by_score = sorted(range(hidden), key=lambda d: scores[d])
    assert idx[:-1] == sorted(by_score[: k - 1]) and idx[-1] == by_score[k - 1]


def test_pick_bad_k():
    with pytest.raises(ValueError):
        pick_indices("bh", "pk", 0, 8, 12)


def test_haar_vectors_golden(primitives):
    for case in primitives["haar"]:
        u = haar_vectors(case["block_hash"], case["public_key"], case["nonce"], case["k"])[case["j"]]
        d_cpu = ulp_distance(u, f32_from_hex(case["u_f32_hex"]))
        d_cuda = ulp_distance(u, f32_from_hex(case["u_f32_hex_cuda_libdevice_emulated"]))
        assert (torch.minimum(d_cpu, d_cuda) <= 4).all(), case["seed_string"]


def test_output_stage_golden_bit_exact(primitives):
    for case in primitives["output_stage"]:
        hs = f32_from_hex(case["hs_f32_hex"])[None]
        vec = output_stage(hs, case["block_hash"], case["public_key"], [case["nonce"]], case["k"])
        assert vec.shape == (1, case["k"]) and vec.dtype == torch.float16
        assert torch.equal(vec[0].view(torch.int16), u16_from_hex(case["vector_f16_hex"]))
        assert encode_vector(vec[0]) == case["vector_b64"]


def test_output_stage_batch_equals_single():
    hs = torch.randn(4, 64, dtype=torch.float64).float()
    batch = output_stage(hs, "bh", "pk", [3, 1, 4, 1000])
    for i, n in enumerate([3, 1, 4, 1000]):
        assert torch.equal(batch[i], output_stage(hs[i : i + 1], "bh", "pk", [n])[0])


def test_output_stage_nan_row_stays_nan():
    hs = torch.ones(2, 32)
    hs[1, 5] = float("nan")
    out = output_stage(hs, "bh", "pk", [0, 1])
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


def test_output_stage_shape_mismatch():
    with pytest.raises(ValueError):
        output_stage(torch.ones(2, 32), "bh", "pk", [0])
