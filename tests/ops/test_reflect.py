"""cpoc_kernels.ops.masked_reflect_ (Triton under TRITON_INTERPRET=1, and the torch path) vs the reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpoc_kernels import ops
from cpoc_kernels import reference as R

from ._util import f32_from_hex

BACKENDS = ["triton", "auto", "torch"]


def _bf16_from_hex(rows) -> torch.Tensor:
    arr = np.array([[int(h, 16) for h in r] for r in rows], dtype=np.uint16).view(np.int16)
    return torch.from_numpy(arr.copy()).view(torch.bfloat16)


def _exact_dot(x: torch.Tensor, v: torch.Tensor) -> list[float]:
    """Exact (fsum) sum of the A-rounded products x*A(v) per row."""
    p = (x * v.to(x.dtype)).to(torch.float64)
    return [math.fsum(row.tolist()) for row in p]


def _robust_rows(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rows whose A(dot) is the same for every fp32 summation order of the A-rounded products.

    Any order's fp32 sum lies within (H-1)*2^-24*sum|p| of the exact sum (fsum); rounding is monotone,
    so the row is robust iff both ends of that interval round to the same A value.
    """
    p = (x * v.to(x.dtype)).to(torch.float64)
    out = []
    for exact, row in zip(_exact_dot(x, v), p):
        bound = (row.numel() - 1) * 2.0**-24 * math.fsum(row.abs().tolist())
        lo, hi = torch.tensor([exact - bound, exact + bound], dtype=torch.float64).to(torch.float32).to(x.dtype)
        out.append(bool(lo == hi))
    return torch.tensor(out)


def _reflect_given_dot(x: torch.Tensor, v: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """The reference's elementwise rounding points with a given A-valued dot [R, 1]."""
    vb = v.to(x.dtype)
    return x - (2 * dot) * vb


def _dot_candidates(x: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """A(fp32(exact dot)) and its two A-neighbours (bit pattern +-1), each [R, 1] in x.dtype."""
    d0 = torch.tensor(_exact_dot(x, v), dtype=torch.float64).to(torch.float32).to(x.dtype)[:, None]
    if x.dtype == torch.float32:
        return [d0]
    bits = d0.view(torch.int16)
    return [d0, (bits + 1).view(x.dtype), (bits - 1).view(x.dtype)]


# ------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_reflect_bf16(primitives, backend):
    for case in primitives["reflect_bf16"]:
        assert all(case["dot_rounding_robust"])
        v = f32_from_hex(case["v_f32_hex"])
        x = _bf16_from_hex(case["x_bf16_hex"])
        y = _bf16_from_hex(case["y_bf16_hex"])
        n, h = x.shape
        # embed the golden rows at odd positions of a larger batch, in hidden and residual
        gen = torch.Generator().manual_seed(n * h)
        hidden = torch.randn(2 * n + 1, h, generator=gen).to(torch.bfloat16)
        residual = torch.randn(2 * n + 1, h, generator=gen).to(torch.bfloat16)
        rows = list(range(1, 2 * n, 2))
        hidden[rows] = x
        residual[rows] = x
        h0, r0 = hidden.clone(), residual.clone()
        ops.masked_reflect_(hidden, residual, v, rows, backend=backend)
        assert torch.equal(hidden[rows], y) and torch.equal(residual[rows], y)
        other = [i for i in range(2 * n + 1) if i not in rows]
        assert torch.equal(hidden[other], h0[other]) and torch.equal(residual[other], r0[other])


# ------------------------------------------------------------------------------------------ random
def _case(n, h, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(h, generator=gen)
    v = v / torch.linalg.vector_norm(v)
    hidden = (torch.randn(n, h, generator=gen) * 3).to(dtype)
    residual = (torch.randn(n, h, generator=gen) * 20).to(dtype)
    return hidden, residual, v


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h", [16, 100, 1024, 9000])  # 9000 > 8192: the looping (two-pass) kernel variant
def test_random_vs_reference(backend, dtype, h):
    n = 10 if h < 9000 else 6
    hidden, residual, v = _case(n, h, dtype, seed=h)
    rows = torch.tensor([0, 3, 4, n - 1])
    h0, r0 = hidden.clone(), residual.clone()
    ops.masked_reflect_(hidden, residual, v, rows, backend=backend)
    for got, before in ((hidden, h0), (residual, r0)):
        ref = R.reflect(before[rows], v)
        if dtype == torch.float32:
            # only the summation order of the fp32 dot differs: |d dot| <= H*2^-24*sum|x*v|
            bound = 2 * h * 2.0**-24 * (before[rows].abs() * v.abs()).sum(-1, keepdim=True) * v.abs() * 2
            assert ((got[rows] - ref).abs() <= bound + 2 * 2.0**-24 * ref.abs()).all()
        else:
            x = before[rows]
            # 1) rows whose A(dot) is order-robust (worst-case bound): bit-equal to the reference
            robust = _robust_rows(x, v)
            assert torch.equal(got[rows][robust], ref[robust])
            # 2) every row: exactly the reference's elementwise rounding points, with a dot that is A(exact
            #    sum) or one A-ulp next to it (only the fp32 summation order may differ)
            cands = [_reflect_given_dot(x, v, d) for d in _dot_candidates(x, v)]
            for i in range(len(rows)):
                assert any(torch.equal(got[rows][i], c[i]) for c in cands), i
        keep = torch.ones(n, dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(got[keep], before[keep])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_random_rows_almost_all_bit_equal(dtype):
    """Summation-order differences are rare: nearly all random rows equal the reference bit for bit."""
    n_rows = n_equal = 0
    for h in (64, 1000, 4096):
        hidden, _, v = _case(16, h, dtype, seed=100 + h)
        x = hidden.clone()
        ops.masked_reflect_(hidden, None, v, list(range(16)), backend="triton")
        ref = R.reflect(x, v)
        n_rows += 16
        n_equal += sum(torch.equal(hidden[i], ref[i]) for i in range(16))
    assert n_equal >= n_rows - 2, (n_equal, n_rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_backend_is_reference(dtype):
    hidden, residual, v = _case(6, 40, dtype, seed=1)
    h0 = hidden.clone()
    ops.masked_reflect_(hidden, None, v, [1, 2, 5], backend="torch")
    assert torch.equal(hidden[[1, 2, 5]], R.reflect(h0[[1, 2, 5]], v))
    assert torch.equal(hidden[[0, 3, 4]], h0[[0, 3, 4]])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariance(backend, dtype):
    """A row's result is the same alone, among other selected rows, and with different neighbours."""
    hidden, residual, v = _case(9, 300, dtype, seed=7)
    target = hidden[4].clone()
    alone = target[None].clone()
    ops.masked_reflect_(alone, None, v, [0], backend=backend)
    a = hidden.clone()
    ops.masked_reflect_(a, None, v, list(range(9)), backend=backend)
    b = residual.clone()
    b[4] = target
    ops.masked_reflect_(b, None, v, [4, 8], backend=backend)
    assert torch.equal(a[4], alone[0]) and torch.equal(b[4], alone[0])


def test_mask_equals_index_list_and_residual_none():
    hidden, _, v = _case(8, 64, torch.bfloat16, seed=3)
    a, b = hidden.clone(), hidden.clone()
    mask = torch.tensor([True, False, False, True, True, False, False, True])
    ops.masked_reflect_(a, None, v, mask, backend="triton")
    ops.masked_reflect_(b, None, v, torch.tensor([0, 3, 4, 7]), backend="triton")
    assert torch.equal(a, b)
    assert torch.equal(a[~mask], hidden[~mask]) and not torch.equal(a[mask], hidden[mask])


def test_empty_rows_is_noop():
    hidden, residual, v = _case(4, 32, torch.bfloat16, seed=5)
    h0 = hidden.clone()
    ops.masked_reflect_(hidden, residual, v, [], backend="triton")
    assert torch.equal(hidden, h0)


@pytest.mark.parametrize(
    "bad",
    ["dup", "range", "neg", "vshape", "resshape", "resdtype", "maskshape", "intdtype", "float_rows", "alias"],
)
def test_bad_input_raises_untouched(bad):
    hidden, residual, v = _case(6, 32, torch.bfloat16, seed=11)
    rows = [0, 2]
    if bad == "dup":
        rows = [1, 2, 1]
    elif bad == "range":
        rows = [0, 6]
    elif bad == "neg":
        rows = [-1]
    elif bad == "vshape":
        v = v[:31]
    elif bad == "resshape":
        residual = residual[:5]
    elif bad == "resdtype":
        residual = residual.float()
    elif bad == "maskshape":
        rows = torch.ones(5, dtype=torch.bool)
    elif bad == "intdtype":
        hidden = hidden.to(torch.int32)
    elif bad == "float_rows":
        rows = torch.tensor([0.0, 1.0])
    elif bad == "alias":
        residual = hidden
    h0, r0 = hidden.clone(), residual.clone()
    with pytest.raises(ValueError):
        ops.masked_reflect_(hidden, residual, v, rows)
    assert torch.equal(hidden, h0) and torch.equal(residual, r0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_rows(backend):
    """Row stride > H (a column slice of a wider buffer): same result, padding columns untouched."""
    hidden, residual, v = _case(5, 48, torch.bfloat16, seed=21)
    wide_h = torch.full((5, 56), 3.0, dtype=torch.bfloat16)
    wide_r = torch.full((5, 56), 3.0, dtype=torch.bfloat16)
    wide_h[:, :48] = hidden
    wide_r[:, :48] = residual
    ops.masked_reflect_(wide_h[:, :48], wide_r[:, :48], v, [0, 2, 3], backend=backend)
    ops.masked_reflect_(hidden, residual, v, [0, 2, 3], backend=backend)
    assert torch.equal(wide_h[:, :48], hidden) and torch.equal(wide_r[:, :48], residual)
    assert (wide_h[:, 48:] == 3).all() and (wide_r[:, 48:] == 3).all()


# ------------------------------------------------------------------------------------------ row-mask variant
def _mask_of(n, rows, dtype=torch.bool):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(rows)] = True
    return m.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_reflect_bf16_rows_mask(primitives, backend):
    for case in primitives["reflect_bf16"]:
        v = f32_from_hex(case["v_f32_hex"])
        x = _bf16_from_hex(case["x_bf16_hex"])
        y = _bf16_from_hex(case["y_bf16_hex"])
        n, h = x.shape
        gen = torch.Generator().manual_seed(n * h + 1)
        hidden = torch.randn(2 * n + 1, h, generator=gen).to(torch.bfloat16)
        residual = torch.randn(2 * n + 1, h, generator=gen).to(torch.bfloat16)
        rows = list(range(1, 2 * n, 2))
        hidden[rows] = x
        residual[rows] = x
        h0, r0 = hidden.clone(), residual.clone()
        mask = _mask_of(2 * n + 1, rows)
        ops.masked_reflect_rows_mask_(hidden, residual, v, mask, backend=backend)
        assert torch.equal(hidden[rows], y) and torch.equal(residual[rows], y)
        assert torch.equal(hidden[~mask], h0[~mask]) and torch.equal(residual[~mask], r0[~mask])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h", [100, 1000, 9000])  # non-powers of two; 9000 > 8192: the looping variant
@pytest.mark.parametrize("with_residual", [True, False])
def test_rows_mask_vs_index_and_reference(backend, dtype, h, with_residual):
    """The mask path gives exactly the index path's bits (same kernel body) on selected rows, leaves the others."""
    n = 9 if h < 9000 else 5
    hidden, residual, v = _case(n, h, dtype, seed=h + 3)
    residual = residual if with_residual else None
    rows = [0, 2, 3, n - 1]
    mask = _mask_of(n, rows)
    got_h = hidden.clone()
    got_r = residual.clone() if with_residual else None
    ops.masked_reflect_(got_h, got_r, v, mask, backend=backend)  # bool rows: the mask path
    idx_h = hidden.clone()
    idx_r = residual.clone() if with_residual else None
    ops.masked_reflect_(idx_h, idx_r, v, torch.tensor(rows), backend=backend)
    assert torch.equal(got_h, idx_h)
    pairs = [(got_h, hidden)] + ([(got_r, residual)] if with_residual else [])
    if with_residual:
        assert torch.equal(got_r, idx_r)
    for got, before in pairs:
        assert torch.equal(got[~mask], before[~mask])
        ref = R.reflect(before[rows], v)
        if backend == "torch":
            assert torch.equal(got[rows], ref)
        elif dtype != torch.float32:
            robust = _robust_rows(before[rows], v)
            assert torch.equal(got[rows][robust], ref[robust])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_mask_uint8_equals_bool(backend):
    hidden, residual, v = _case(8, 64, torch.float16, seed=13)
    a, ra, b, rb = hidden.clone(), residual.clone(), hidden.clone(), residual.clone()
    rows = [1, 5, 6]
    ops.masked_reflect_rows_mask_(a, ra, v, _mask_of(8, rows), backend=backend)
    u8 = _mask_of(8, rows, torch.uint8) * 7  # any nonzero byte selects
    ops.masked_reflect_rows_mask_(b, rb, v, u8, backend=backend)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert not torch.equal(a[rows], hidden[rows])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_mask_batch_invariance(backend, dtype):
    """A row's result is the same alone, with every row selected, and among other rows/neighbours."""
    hidden, residual, v = _case(9, 300, dtype, seed=17)
    target = hidden[4].clone()
    alone = target[None].clone()
    ops.masked_reflect_rows_mask_(alone, None, v, torch.ones(1, dtype=torch.bool), backend=backend)
    a = hidden.clone()
    ops.masked_reflect_rows_mask_(a, None, v, torch.ones(9, dtype=torch.bool), backend=backend)
    b = residual.clone()
    b[4] = target
    ops.masked_reflect_rows_mask_(b, None, v, _mask_of(9, [4, 8]), backend=backend)
    assert torch.equal(a[4], alone[0]) and torch.equal(b[4], alone[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_mask_all_false_is_noop(backend):
    hidden, residual, v = _case(5, 40, torch.bfloat16, seed=19)
    hidden[2, 3] = float("nan")  # unselected non-finite values pass through bit-exactly
    residual[1, 0] = float("inf")
    h0, r0 = hidden.clone(), residual.clone()
    ops.masked_reflect_rows_mask_(hidden, residual, v, torch.zeros(5, dtype=torch.bool), backend=backend)
    assert torch.equal(hidden.view(torch.int16), h0.view(torch.int16))
    assert torch.equal(residual.view(torch.int16), r0.view(torch.int16))
    empty = torch.empty(0, 40, dtype=torch.bfloat16)
    ops.masked_reflect_rows_mask_(empty, None, v, torch.zeros(0, dtype=torch.bool), backend=backend)


def test_rows_mask_launch_grid_is_the_row_count(monkeypatch):
    """Graph safety by construction: N programs whatever the mask holds (never a count read from the mask)."""
    from cpoc_kernels.ops import reflect as mod

    grids = []
    kernel = mod._masked_reflect_rows_mask_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, "_masked_reflect_rows_mask_kernel", Recorder())
    hidden, residual, v = _case(6, 32, torch.float32, seed=23)
    for rows in ([], [3], [0, 1, 2, 3, 4, 5]):
        ops.masked_reflect_rows_mask_(hidden, residual, v, _mask_of(6, rows), backend="triton")
    assert grids == [(6,), (6,), (6,)]


def test_rows_mask_path_reads_nothing_on_the_host():
    """The public wrapper with a bool mask (CPU auto path) runs no host read (.item/.nonzero/...): no sync on CUDA,
    once ``v`` has been checked (its norm is read once per tensor version, then cached)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    hidden, residual, v = _case(6, 32, torch.bfloat16, seed=29)
    mask, index = _mask_of(6, [1, 4]), torch.tensor([1, 4])
    host_reads = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}
    with Record():  # first use of this v: its unit-norm check reads it once
        ops.masked_reflect_(hidden, residual, v, mask)
    assert "aten._local_scalar_dense" in seen
    for backend, must_see in (("auto", "cpoc.masked_reflect_rows_mask_"), ("torch", "aten.where")):
        seen.clear()
        with Record():  # auto: the wrapper then the opaque op; torch: the wrapper and the op's CPU body
            ops.masked_reflect_(hidden, residual, v, mask, backend=backend)
        assert must_see in seen and not host_reads & set(seen), seen
    seen.clear()
    with Record():  # the index path validates on the host (the reason CUDA-graph callers use the mask)
        ops.masked_reflect_(hidden, residual, v, index)
    assert "aten._local_scalar_dense" in seen


@pytest.mark.parametrize("bad", ["short", "long", "2d", "int32", "float", "list", "vshape", "alias"])
def test_rows_mask_bad_input_raises_untouched(bad):
    hidden, residual, v = _case(6, 32, torch.bfloat16, seed=31)
    mask = _mask_of(6, [0, 2])
    if bad == "short":
        mask = mask[:5]
    elif bad == "long":
        mask = torch.ones(7, dtype=torch.bool)
    elif bad == "2d":
        mask = mask[None]
    elif bad == "int32":
        mask = mask.to(torch.int32)
    elif bad == "float":
        mask = mask.float()
    elif bad == "list":
        mask = [True, False, True, False, False, False]
    elif bad == "vshape":
        v = v[:31]
    elif bad == "alias":
        residual = hidden
    h0, r0 = hidden.clone(), residual.clone()
    with pytest.raises(ValueError):
        ops.masked_reflect_rows_mask_(hidden, residual, v, mask)
    assert torch.equal(hidden, h0) and torch.equal(residual, r0)
    if bad in ("short", "long", "2d"):  # a bool mask of the wrong shape through masked_reflect_ too
        with pytest.raises(ValueError):
            ops.masked_reflect_(hidden, residual, v, mask)
        assert torch.equal(hidden, h0) and torch.equal(residual, r0)
