"""cpoc_kernels.ops.poc_readout (Triton under TRITON_INTERPRET=1, and the torch path) vs reference.output_stage."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from cpoc_kernels import ops
from cpoc_kernels import reference as R
from cpoc_kernels.ops.readout import haar_seed_table, pick_table

from ._util import bits16, f32_from_hex

BACKENDS = ["triton", "auto", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_output_stage(primitives, backend):
    for case in primitives["output_stage"]:
        hs = f32_from_hex(case["hs_f32_hex"])[None]
        res = ops.poc_readout(hs, case["block_hash"], case["public_key"], [case["nonce"]], case["k"], backend=backend)
        assert res.vectors.dtype == torch.float16 and res.vectors.shape == (1, case["k"])
        assert bits16(res.vectors[0]) == case["vector_f16_hex"], case["nonce"]
        assert res.payloads[0] == base64.b64decode(case["vector_b64"])
        assert len(res.payloads[0]) == 24 and res.emittable.tolist() == [True] and res.nan_rows == []


def test_golden_pick_order(primitives):
    for case in primitives["pick"]:
        got = pick_table(case["block_hash"], case["public_key"], [case["nonce"]], case["hidden"], case["k"])
        assert got[0].tolist() == case["indices_cuda_order_derived"]


def test_golden_haar_seeds(primitives):
    case = primitives["haar"][0]
    seeds = haar_seed_table(case["block_hash"], case["public_key"], [case["nonce"]], case["k"])
    for c in primitives["haar"]:
        if (c["block_hash"], c["public_key"], c["nonce"], c["k"]) == (case["block_hash"], case["public_key"],
                                                                      case["nonce"], case["k"]):
            assert seeds[c["j"], 0].item() == c["seed"]


def _fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    oa = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ob = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((oa - ob).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_vs_reference(dtype):
    """torch path: bit-equal. Triton path: fp16 bit-equal except values within fp32 ulps of an fp16
    rounding boundary (at most 1 fp16 ulp), which must be rare."""
    gen = torch.Generator().manual_seed(17)
    n_rows = n_equal = 0
    for hidden in (12, 64, 200, 4096, 9000):  # 9000: looping norm variant
        nonces = list(range(100, 106))
        hs = (torch.randn(len(nonces), hidden, generator=gen) * 5).to(dtype)
        ref = R.output_stage(hs, "bh-x", "pk-x", nonces)
        assert torch.equal(ops.poc_readout(hs, "bh-x", "pk-x", nonces, backend="torch").vectors, ref)
        got = ops.poc_readout(hs, "bh-x", "pk-x", nonces, backend="triton").vectors
        assert _fp16_ulps(got, ref) <= 1
        n_rows += len(nonces)
        n_equal += sum(torch.equal(got[i], ref[i]) for i in range(len(nonces)))
    assert n_equal >= n_rows - 2, (n_equal, n_rows)


@pytest.mark.parametrize("k", [1, 2, 12, 33])
def test_pick_table_equals_per_nonce_reference(k):
    """The batched pick table (one mmh/argsort over all nonces) is the reference's per-nonce picks, exactly."""
    nonces = [0, 1, 7, 2**31 - 1, 2**32 + 5] + list(range(1000, 1060))
    for hidden in (k, 64, 1000):
        got = pick_table("bh-p", "pk-p", nonces, hidden, k)
        want = torch.tensor([R.pick_indices("bh-p", "pk-p", n, hidden, k) for n in nonces], dtype=torch.int64)
        assert torch.equal(got, want), hidden
    assert pick_table("bh-p", "pk-p", [], 64, k).shape == (0, k)
    with pytest.raises(ValueError, match="0 < k <= hidden"):
        pick_table("bh-p", "pk-p", [1], k - 1 if k > 1 else 1, k + (k == 1))


def test_torch_path_bit_equal_many_rows():
    """The batched CPU output stage equals the per-row reference bit for bit over many rows, magnitudes
    from 1e-3 to 1e3, including rows with huge and tiny picked coordinates."""
    gen = torch.Generator().manual_seed(5)
    nonces = list(range(5000, 5400))
    hs = torch.randn(len(nonces), 96, generator=gen) * torch.exp(6 * torch.rand(len(nonces), 1, generator=gen) - 3)
    hs[::7, :5] *= 1e4
    ref = R.output_stage(hs, "bh-m", "pk-m", nonces)
    got = ops.poc_readout(hs, "bh-m", "pk-m", nonces, backend="torch")
    assert torch.equal(got.vectors, ref)
    assert torch.equal(ops.poc_readout(hs, "bh-m", "pk-m", nonces).vectors, ref)  # CPU auto: the custom op


@pytest.mark.parametrize("k", [1, 2, 5])
def test_other_k(k):
    hs = torch.randn(3, 40, generator=torch.Generator().manual_seed(k))
    ref = R.output_stage(hs, "bh", "pk", [1, 2, 3], k=k)
    for backend in ("triton", "torch"):
        res = ops.poc_readout(hs, "bh", "pk", [1, 2, 3], k=k, backend=backend)
        assert res.vectors.shape == (3, k)
        assert _fp16_ulps(res.vectors, ref) <= 1
        assert all(len(p) == 2 * k for p in res.payloads)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_reported_not_emitted(backend):
    gen = torch.Generator().manual_seed(3)
    hs = torch.randn(5, 64, generator=gen)
    hs[1, 7] = float("nan")
    hs[3, pick_table("bh", "pk", [13], 64)[0, 4]] = float("inf")  # inf/inf at a picked coordinate -> NaN
    hs[4, pick_table("bh", "pk", [14], 64)[0, 4] ^ 1] = float("inf")  # maybe unpicked: as the reference says
    res = ops.poc_readout(hs, "bh", "pk", [10, 11, 12, 13, 14], backend=backend)
    ref = R.output_stage(hs, "bh", "pk", [10, 11, 12, 13, 14])
    assert R.is_emittable(ref, hs).tolist() == res.emittable.tolist() == [True, False, True, False, False]
    assert res.nan_rows == [1, 3, 4]  # issue 12: an unpicked Inf gave an all-zero artifact, not reported
    hs[4] = torch.randn(64, generator=gen)
    res = ops.poc_readout(hs, "bh", "pk", [10, 11, 12, 13, 14], backend=backend)
    assert res.emittable.tolist() == [True, False, True, False, True]
    assert res.nan_rows == [1, 3]
    assert res.payloads[1] is None and res.payloads[3] is None
    for b in (0, 2, 4):
        assert res.payloads[b] == R.vector_bytes(res.vectors[b])


def _inf_unpicked_row(nonce, hidden, gen):
    row = torch.randn(hidden, generator=gen)
    picked = set(pick_table("bh", "pk", [nonce], hidden)[0].tolist())
    row[next(i for i in range(hidden) if i not in picked)] = float("-inf")
    return row


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_degenerate_states_are_never_emitted(backend, dtype):
    """Regression (issue 12): ±Inf (unpicked), all-zero and norm-overflowing rows gave the same all-zero vector for
    every nonce and were emitted. Only finite unit vectors from finite states are emitted; the rest are reported."""
    gen = torch.Generator().manual_seed(21)
    hidden, nonces = 64, [30, 31, 32, 33, 34, 35, 36]
    hs = torch.randn(len(nonces), hidden, generator=gen)
    hs[1] = _inf_unpicked_row(nonces[1], hidden, gen)
    hs[2] = 0.0
    hs[3] = float("inf") if dtype == torch.float16 else 3e38  # fp32 sum of squares overflows: x = hs / inf
    # (an fp16 row cannot overflow it: 65504^2 * H < fp32 max, so the fp16 case uses an all-Inf row)
    hs[4, 5] = float("nan")
    hs[5] = 1e-30 if dtype != torch.float16 else 0.0  # squares underflow to 0
    hs = hs.to(dtype)
    res = ops.poc_readout(hs, "bh", "pk", nonces, backend=backend)
    assert res.emittable.tolist() == [True, False, False, False, False, False, True]
    assert res.nan_rows == [1, 2, 3, 4, 5]
    assert [p is None for p in res.payloads] == [False, True, True, True, True, True, False]
    for b in (0, 6):
        v = R.decode_payload(res.payloads[b])
        assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1) <= R.UNIT_TOL
    assert R.is_emittable(R.output_stage(hs, "bh", "pk", nonces), hs).tolist() == res.emittable.tolist()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batch_invariance(backend):
    gen = torch.Generator().manual_seed(9)
    hs = torch.randn(6, 300, generator=gen).to(torch.bfloat16)
    nonces = [5, 6, 7, 8, 9, 10]
    full = ops.poc_readout(hs, "bh", "pk", nonces, backend=backend).vectors
    alone = ops.poc_readout(hs[2:3].clone(), "bh", "pk", [7], backend=backend).vectors
    other = hs.clone()
    other[[0, 1, 3]] = float("nan")
    mixed = ops.poc_readout(other, "bh", "pk", nonces, backend=backend).vectors
    assert torch.equal(full[2], alone[0]) and torch.equal(mixed[2], alone[0])


def test_empty_batch():
    res = ops.poc_readout(torch.empty(0, 32), "bh", "pk", [], backend="triton")
    assert res.vectors.shape == (0, 12) and res.payloads == [] and res.nan_rows == []


@pytest.mark.parametrize("bad", ["dim", "count", "k_big", "k_zero", "int", "backend"])
def test_bad_input(bad):
    hs, nonces, k, backend = torch.randn(2, 16), [1, 2], 12, "auto"
    if bad == "dim":
        hs = hs[0]
    elif bad == "count":
        nonces = [1]
    elif bad == "k_big":
        k = 17
    elif bad == "k_zero":
        k = 0
    elif bad == "int":
        hs = hs.to(torch.int64)
    elif bad == "backend":
        backend = "numpy"
    with pytest.raises(ValueError):
        ops.poc_readout(hs, "bh", "pk", nonces, k=k, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_last_token_rows(dtype):
    """hs as the last-token slice of a [B, S, H] buffer (row stride S*H) gives the contiguous result."""
    full = torch.randn(4, 3, 80, generator=torch.Generator().manual_seed(2)).to(dtype)
    hs = full[:, -1, :]
    assert hs.stride(0) == 3 * 80
    ref = R.output_stage(hs.contiguous(), "bh", "pk", [1, 2, 3, 4])
    for backend in ("triton", "torch"):
        got = ops.poc_readout(hs, "bh", "pk", [1, 2, 3, 4], backend=backend).vectors
        assert _fp16_ulps(got, ref) <= 1 and (backend == "triton" or torch.equal(got, ref))
