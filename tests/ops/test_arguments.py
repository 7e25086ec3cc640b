"""Bad arguments to the public ops (issue 12): a clear ValueError before dispatch, nothing written."""
import numpy as np
import pytest
import torch

from cpoc_kernels import ops
from cpoc_kernels import reference as R

BAD_NONCES = [[1.0], [1.5], ["3"], [True], [False], [None], [2**31], [-(2**31) - 1], [np.float32(2)], "12", 7, None,
              torch.tensor([1.0]), torch.tensor([True]), torch.tensor([[1, 2]])]


@pytest.mark.parametrize("nonces", BAD_NONCES, ids=repr)
def test_poc_inputs_refuses_bad_nonces(nonces):
    out = torch.full((4, 8), 7.0)
    with pytest.raises(ValueError):
        ops.poc_inputs("bh", "pk", nonces, 2, 8, torch.float32, out=out)
    assert torch.equal(out, torch.full((4, 8), 7.0))
    with pytest.raises(ValueError):
        R.poc_inputs("bh", "pk", nonces, 2, 8, torch.float32)


@pytest.mark.parametrize("nonces", BAD_NONCES, ids=repr)
def test_poc_readout_refuses_bad_nonces(nonces):
    with pytest.raises(ValueError):
        ops.poc_readout(torch.randn(1, 16), "bh", "pk", nonces)


def test_integer_nonce_forms_are_accepted_and_equal():
    ref = ops.poc_inputs("bh", "pk", [3, -2], 2, 8, torch.bfloat16)
    for form in ([np.int64(3), np.int32(-2)], torch.tensor([3, -2]), torch.tensor([3, -2], dtype=torch.int32), (3, -2)):
        assert torch.equal(ops.poc_inputs("bh", "pk", form, 2, 8, torch.bfloat16), ref)
    edge = ops.poc_inputs("bh", "pk", [2**31 - 1, -(2**31)], 1, 4, torch.bfloat16)
    assert torch.equal(edge, R.poc_inputs("bh", "pk", [2**31 - 1, -(2**31)], 1, 4, torch.bfloat16))


@pytest.mark.parametrize("kw", [
    {"stronger_rng": "False"}, {"stronger_rng": "true"}, {"stronger_rng": 1}, {"stronger_rng": None},
    {"seq_len": True}, {"seq_len": 2.0}, {"hidden": "8"}, {"row_offset": False, "out": torch.zeros(4, 8)},
    {"dtype": "float32"}, {"dtype": torch.int32}, {"device": "no-such-device"}, {"device": 3.5},
    {"block_hash": None}, {"public_key": 5}, {"backend": "cuda"},
    {"out": torch.zeros(8, 8).as_strided((4, 8), (1, 1))},
])
def test_poc_inputs_refuses_bad_arguments(kw):
    args = {"block_hash": "bh", "public_key": "pk", "nonces": [1], "seq_len": 2, "hidden": 8, "dtype": torch.float32}
    args.update(kw)
    with pytest.raises(ValueError):
        ops.poc_inputs(**args)


def test_numpy_bool_flag_is_a_bool():
    a = ops.poc_inputs("bh", "pk", [1], 1, 8, torch.bfloat16, stronger_rng=np.bool_(True))
    assert torch.equal(a, ops.poc_inputs("bh", "pk", [1], 1, 8, torch.bfloat16, stronger_rng=True))


def _case(n=4, h=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(h, generator=gen)
    return torch.randn(n, h, generator=gen).to(torch.bfloat16), torch.randn(n, h, generator=gen).to(torch.bfloat16), \
        v / torch.linalg.vector_norm(v)


def _bad_vs(h):
    v = torch.randn(h, generator=torch.Generator().manual_seed(1))
    unit = v / torch.linalg.vector_norm(v)
    nan = unit.clone()
    nan[3] = float("nan")
    inf = unit.clone()
    inf[0] = float("inf")
    return {"zero": torch.zeros(h), "nan": nan, "inf": inf, "double": 2 * unit, "half": 0.5 * unit, "raw": v * 3}


@pytest.mark.parametrize("which", ["zero", "nan", "inf", "double", "half", "raw"])
@pytest.mark.parametrize("path", ["index", "mask"])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_masked_reflect_refuses_non_unit_v(which, path, backend):
    hidden, residual, _ = _case()
    before = hidden.clone(), residual.clone()
    v = _bad_vs(16)[which]
    with pytest.raises(ValueError, match="unit"):
        if path == "index":
            ops.masked_reflect_(hidden, residual, v, [0, 2], backend=backend)
        else:
            ops.masked_reflect_rows_mask_(hidden, residual, v, torch.tensor([True, False, True, False]), backend=backend)
    assert torch.equal(hidden, before[0]) and torch.equal(residual, before[1])


def test_v_check_follows_in_place_changes():
    """The unit check is cached per tensor version: changing v in place is seen."""
    hidden, residual, v = _case()
    ops.masked_reflect_(hidden, residual, v, [0])
    v.mul_(2)
    with pytest.raises(ValueError, match="unit"):
        ops.masked_reflect_(hidden, residual, v, [0])


def test_bf16_rounded_unit_v_is_accepted():
    hidden, residual, v = _case(h=4096)
    ops.masked_reflect_(hidden, residual, v.to(torch.bfloat16), [1])


def test_uint8_rows_are_ambiguous_for_the_index_op():
    """Regression (issue 12): uint8 meant indices in masked_reflect_ and a mask in masked_reflect_rows_mask_."""
    hidden, residual, v = _case()
    before = hidden.clone()
    with pytest.raises(ValueError, match="uint8"):
        ops.masked_reflect_(hidden, residual, v, torch.tensor([1, 0, 1, 0], dtype=torch.uint8))
    assert torch.equal(hidden, before)
    # the mask op keeps accepting a uint8 mask, and means a mask by it
    ops.masked_reflect_rows_mask_(hidden, residual, v, torch.tensor([1, 0, 1, 0], dtype=torch.uint8))
    assert torch.equal(hidden[1], before[1]) and not torch.equal(hidden[0], before[0])


@pytest.mark.parametrize("rows", ["01", b"\x00", [0.0], [True], [None], 3, None, torch.tensor([0.5]),
                                  torch.tensor([[0]]), [9], [-1], [0, 0]])
def test_masked_reflect_refuses_bad_rows(rows):
    hidden, residual, v = _case()
    before = hidden.clone()
    with pytest.raises(ValueError):
        ops.masked_reflect_(hidden, residual, v, rows)
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("kw", [{"k": True}, {"k": 12.0}, {"block_hash": None}, {"public_key": b"pk"}])
def test_poc_readout_refuses_bad_arguments(kw):
    args = {"hs": torch.randn(1, 16), "block_hash": "bh", "public_key": "pk", "nonces": [1]}
    args.update(kw)
    with pytest.raises(ValueError):
        ops.poc_readout(**args)


def test_empty_or_single_column_tensors_with_any_column_stride_are_accepted():
    """Fuzz finding: ``(torch.randn(0, 1) * 2)`` has strides (1, 0) and was refused as 'not unit stride'; a stride
    along a dimension of size <= 1 never addresses memory."""
    hidden = torch.randn(0, 1) * 2
    assert hidden.stride() == (1, 0)
    ops.masked_reflect_(hidden, None, torch.ones(1), [])
    ops.masked_reflect_rows_mask_(hidden, None, torch.ones(1), torch.zeros(0, dtype=torch.bool))
    col = torch.zeros(4, 3)[:, :1]  # [4, 1], strides (3, 1)
    wide = torch.zeros(4, 2).t().contiguous().t()[:, :1]  # [4, 1] column of a column-major buffer
    for out in (col, wide):
        ops.poc_inputs("bh", "pk", [1, 2], 2, 1, torch.float32, out=out)
        assert torch.allclose(out.view(2, 2, 1), R.poc_inputs("bh", "pk", [1, 2], 2, 1, torch.float32), rtol=1e-6)
