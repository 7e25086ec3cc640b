"""masked_reflect_ op family: in-place per-layer Householder reflection of selected rows (spec §5.2).

``y = x - 2 (x·v) v`` on the rows listed in ``rows`` of ``hidden`` and (same launch) ``residual``.
Rounding points, activation dtype A (bf16/fp16; fp32 = same expression in fp32):
``vb = A(v); p = A(x*vb); dot = A(sum_fp32(p)); td = A(2*dot); t = A(td*vb); y = A(x - t)``.

Exactness: every elementwise step is bit-identical to the reference (``reference.reflect``); the fp32
sum of the bf16/fp16 products runs in a fixed order per row (BLOCK lanes accumulated over the row in
block order, then a fixed tree), which may differ from torch's order. The output is therefore
bit-equal to the reference whenever ``A(dot)`` does not depend on the summation order (always true
for the golden rows, true for the vast majority of random rows). One program per selected row: a row's
result never depends on the other rows (batch-invariant). Rows not listed are never read or written.

Two selections, one kernel body (``_reflect_pair``), hence the same rounding points, reduction order and
exactness:

* ``cpoc::masked_reflect_(hidden, residual, v, rows)``: ``rows`` int64 indices [R], one program per listed row
  (the grid depends on R: the caller knows R on the host);
* ``cpoc::masked_reflect_rows_mask_(hidden, residual, v, row_mask)``: ``row_mask`` bool/uint8 [N] over all rows,
  N programs, each loads its mask entry and exits when it is 0 (the row is neither read nor written). The grid
  is fixed by hidden's shape and nothing is read on the host, so a captured CUDA graph stays valid when the mask
  content changes between replays. On CPU: ``where(mask, reference(x), x)`` (no host sync either).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from cpoc_kernels.reference.householder import reflect as reflect_reference

from ._checks import check_unit_vector
from ._common import (
    _unit_column_stride,
    FLOAT_DTYPES,
    _load_f32,
    _round_to,
    _store_from_f32,
    check_backend,
    dtype_kind,
    kernel_view,
    launch_opts,
)

_MAX_SINGLE_BLOCK = 8192
_LOOP_BLOCK = 2048


@triton.jit
def _reflect_row(x_ptr, v_ptr, H, KIND: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        m = offs < H
        x = _load_f32(x_ptr + offs, m, KIND)
        vb = _round_to(tl.load(v_ptr + offs, mask=m, other=0.0), KIND)
        p = _round_to(x * vb, KIND)
        dot = _round_to(tl.sum(p, axis=0), KIND)
        td = _round_to(2.0 * dot, KIND)
        t = _round_to(td * vb, KIND)
        y = _round_to(x - t, KIND)
        _store_from_f32(x_ptr + offs, y, m, KIND)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            m = start + offs < H
            x = _load_f32(x_ptr + start + offs, m, KIND)
            vb = _round_to(tl.load(v_ptr + start + offs, mask=m, other=0.0), KIND)
            acc += _round_to(x * vb, KIND)
        dot = _round_to(tl.sum(acc, axis=0), KIND)
        td = _round_to(2.0 * dot, KIND)
        for start in range(0, H, BLOCK):
            m = start + offs < H
            x = _load_f32(x_ptr + start + offs, m, KIND)
            vb = _round_to(tl.load(v_ptr + start + offs, mask=m, other=0.0), KIND)
            t = _round_to(td * vb, KIND)
            y = _round_to(x - t, KIND)
            _store_from_f32(x_ptr + start + offs, y, m, KIND)


@triton.jit
def _reflect_pair(h_ptr, r_ptr, v_ptr, row, H, h_stride, r_stride,
                  HAS_RES: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Reflect row ``row`` (int64) of hidden and, if HAS_RES, of residual: the body shared by both kernels."""
    _reflect_row(h_ptr + row * h_stride, v_ptr, H, KIND, BLOCK, SINGLE)
    if HAS_RES:
        _reflect_row(r_ptr + row * r_stride, v_ptr, H, KIND, BLOCK, SINGLE)


@triton.jit
def _masked_reflect_kernel(
    h_ptr, r_ptr, v_ptr, rows_ptr, H, h_stride, r_stride,
    HAS_RES: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    """Program i reflects row rows[i] of hidden (and of residual): whole-row reduction in one program."""
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    _reflect_pair(h_ptr, r_ptr, v_ptr, row, H, h_stride, r_stride, HAS_RES, KIND, BLOCK, SINGLE)


@triton.jit
def _masked_reflect_rows_mask_kernel(
    h_ptr, r_ptr, v_ptr, mask_ptr, H, h_stride, r_stride, m_stride,
    HAS_RES: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    """Program i reflects row i iff mask[i] != 0 (uint8), else exits without touching the row.

    The grid is the number of rows of hidden (a shape, never the mask's content): a captured CUDA graph stays
    valid when the mask changes between replays.
    """
    row = tl.program_id(0).to(tl.int64)
    if tl.load(mask_ptr + row * m_stride) != 0:
        _reflect_pair(h_ptr, r_ptr, v_ptr, row, H, h_stride, r_stride, HAS_RES, KIND, BLOCK, SINGLE)


def _block_for(hidden: int) -> tuple[int, bool]:
    """Block size depends on H only (never on the number of rows): batch-invariant reduction order."""
    p2 = triton.next_power_of_2(hidden)
    return (p2, True) if p2 <= _MAX_SINGLE_BLOCK else (_LOOP_BLOCK, False)


def _launch(kernel, programs: int, hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
            selector: torch.Tensor, *selector_args) -> None:
    """Launch ``kernel`` on ``programs`` programs: (hidden, residual, v, selector, H, strides, *selector_args)."""
    H = hidden.shape[1]
    block, single = _block_for(H)
    res = residual if residual is not None else hidden
    kernel[(programs,)](
        kernel_view(hidden), kernel_view(res), v, selector, H, hidden.stride(0), res.stride(0), *selector_args,
        HAS_RES=residual is not None, KIND=dtype_kind(hidden.dtype), BLOCK=block, SINGLE=single,
        num_warps=8 if block >= 4096 else 4, **launch_opts(hidden.device),
    )


def masked_reflect_triton(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                          rows: torch.Tensor) -> None:
    """Triton launch (no validation): hidden/residual [N, H] (unit column stride), v fp32 [H], rows int64 [R]."""
    if rows.numel() == 0:
        return
    _launch(_masked_reflect_kernel, rows.numel(), hidden, residual, v, rows)


def masked_reflect_rows_mask_triton(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                                    row_mask: torch.Tensor) -> None:
    """Triton launch (no validation): row_mask bool/uint8 [N] on hidden's device; grid = N programs.

    No host read of the mask and no allocation: safe to capture in a CUDA graph (the mask is read at replay).
    """
    if hidden.shape[0] == 0:
        return
    mask = row_mask.view(torch.uint8) if row_mask.dtype == torch.bool else row_mask
    _launch(_masked_reflect_rows_mask_kernel, hidden.shape[0], hidden, residual, v, mask, mask.stride(0))


def masked_reflect_torch(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                         rows: torch.Tensor) -> None:
    """Plain-torch path: the reference expression on the gathered rows, scattered back in place."""
    if rows.numel() == 0:
        return
    for x in (hidden, residual):
        if x is not None:
            x.index_copy_(0, rows, reflect_reference(x.index_select(0, rows), v))


def masked_reflect_rows_mask_torch(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                                   row_mask: torch.Tensor) -> None:
    """Plain-torch mask path without a host sync: the reference on every row, ``where(mask, R(x), x)`` in place.

    Selected rows get the reference's values (each row's dot is its own reduction); the others are written back
    with their own bits (``where`` passes them exactly, NaN/Inf included).
    """
    sel = row_mask.to(device=hidden.device, dtype=torch.bool)[:, None]
    for x in (hidden, residual):
        if x is not None:
            x.copy_(torch.where(sel, reflect_reference(x, v), x))


@torch.library.custom_op("cpoc::masked_reflect_", mutates_args=("hidden", "residual"))
def masked_reflect_op(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                      rows: torch.Tensor) -> None:
    """In place on rows ``rows`` (int64 [R], distinct, in range) of hidden and residual ([N, H]); v fp32 [H].

    CUDA -> Triton; CPU -> the reference expression. No validation (see ``masked_reflect_``).
    """
    if hidden.device.type == "cuda":
        masked_reflect_triton(hidden, residual, v, rows)
    else:
        masked_reflect_torch(hidden, residual, v, rows)


@masked_reflect_op.register_fake
def _(hidden, residual, v, rows):
    return None


@torch.library.custom_op("cpoc::masked_reflect_rows_mask_", mutates_args=("hidden", "residual"))
def masked_reflect_rows_mask_op(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                                row_mask: torch.Tensor) -> None:
    """In place on the rows of hidden and residual ([N, H]) where ``row_mask`` (bool/uint8 [N]) is set; v fp32 [H].

    CUDA -> Triton, N programs whatever the mask holds (CUDA-graph safe: no host sync, no allocation, a launch
    grid fixed by the shape); CPU -> ``where(mask, reference, x)``. No validation (see ``masked_reflect_``).
    """
    if hidden.device.type == "cuda":
        masked_reflect_rows_mask_triton(hidden, residual, v, row_mask)
    else:
        masked_reflect_rows_mask_torch(hidden, residual, v, row_mask)


@masked_reflect_rows_mask_op.register_fake
def _(hidden, residual, v, row_mask):
    return None


_MASK_DTYPES = (torch.bool, torch.uint8)


def _rows_index(rows, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        if rows.dtype == torch.uint8:
            raise ValueError("rows of dtype uint8 are ambiguous (indices here, a mask in masked_reflect_rows_mask_): "
                             "pass int64 indices or a bool mask")
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dim() != 1:
            raise ValueError(f"rows must be a 1-D integer index tensor or a bool mask, got {rows.dtype} {tuple(rows.shape)}")
        idx = rows.to(device=device, dtype=torch.int64)
    elif isinstance(rows, (Sequence, range)) and not isinstance(rows, (str, bytes)):
        if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows):
            raise ValueError("rows must be ints")
        idx = torch.tensor(list(rows), dtype=torch.int64, device=device)
    else:
        raise ValueError(f"rows must be a tensor, a bool mask or a sequence of ints, got {type(rows).__name__}")
    if idx.numel():
        host = idx.cpu()
        if host.min().item() < 0 or host.max().item() >= n:
            raise ValueError(f"row index out of range [0, {n})")
        if torch.unique(host).numel() != host.numel():
            raise ValueError("duplicate rows in the index list")
    return idx.contiguous()


def _row_mask(row_mask, n: int, device: torch.device) -> torch.Tensor:
    """Checks shape and dtype only (metadata, no host read of the content)."""
    if not isinstance(row_mask, torch.Tensor) or row_mask.dtype not in _MASK_DTYPES:
        raise ValueError(f"row mask must be a bool or uint8 tensor, got {getattr(row_mask, 'dtype', type(row_mask))}")
    if row_mask.shape != (n,):
        raise ValueError(f"row mask must have shape ({n},), got {tuple(row_mask.shape)}")
    return row_mask.to(device)


def _check_tensors(hidden, residual, v) -> tuple[int, int]:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D [N, H] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden dtype must be one of {FLOAT_DTYPES}, got {hidden.dtype}")
    if not _unit_column_stride(hidden):
        raise ValueError("hidden must have unit stride along the hidden dimension")
    n, h = hidden.shape
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != hidden.shape:
            raise ValueError(f"residual must have hidden's shape {tuple(hidden.shape)}")
        if residual.dtype != hidden.dtype or residual.device != hidden.device:
            raise ValueError("residual must have hidden's dtype and device")
        if not _unit_column_stride(residual):
            raise ValueError("residual must have unit stride along the hidden dimension")
        if residual.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
            raise ValueError("residual must not share memory with hidden")
    if not isinstance(v, torch.Tensor) or v.shape != (h,) or not v.dtype.is_floating_point:
        raise ValueError(f"v must be a floating [{h}] tensor, got {getattr(v, 'shape', type(v))}")
    if v.device != hidden.device and v.device.type != "cpu":
        raise ValueError(f"v is on {v.device}, hidden on {hidden.device}")
    check_unit_vector(v)
    return n, h


def masked_reflect_(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor, rows,
                    backend: str = "auto") -> None:
    """Reflect the selected rows of ``hidden`` and ``residual`` in place; other rows stay bit-identical.

    hidden, residual: [N, H] fp32/fp16/bf16 (same shape/dtype/device, unit column stride; residual may be
    None); v: [H] finite unit vector (cast to fp32; zero, NaN or non-unit → ValueError, checked once per tensor
    version); rows: int index list/tensor (distinct, in [0, N)) or a bool mask [N] (uint8 is refused here:
    ambiguous). Exact per the module docstring (bit-equal to ``reference.reflect`` whenever the row's
    bf16/fp16 dot is summation-order robust). An index list is validated on the host (a sync); a bool mask
    goes to :func:`masked_reflect_rows_mask_` as it is (never converted to indices: no host read).
    backend: "auto" (Triton on CUDA, torch on CPU), "triton", "torch".
    """
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
        masked_reflect_rows_mask_(hidden, residual, v, rows, backend)
        return
    n, _ = _check_tensors(hidden, residual, v)
    path = check_backend(backend, hidden.device)
    idx = _rows_index(rows, n, hidden.device)
    vf = v.to(device=hidden.device, dtype=torch.float32).contiguous()
    if backend == "auto":
        torch.ops.cpoc.masked_reflect_(hidden, residual, vf, idx)
    elif path == "triton":
        masked_reflect_triton(hidden, residual, vf, idx)
    else:
        masked_reflect_torch(hidden, residual, vf, idx)


def masked_reflect_rows_mask_(hidden: torch.Tensor, residual: torch.Tensor | None, v: torch.Tensor,
                              row_mask: torch.Tensor, backend: str = "auto") -> None:
    """Reflect the rows of ``hidden`` and ``residual`` where ``row_mask`` (bool or uint8 [N], nonzero) is set.

    Same arithmetic and exactness as :func:`masked_reflect_` (the same kernel body); unselected rows are never
    written by the Triton kernel. Validation reads metadata only (shapes, dtypes) plus ``v``'s norm once per
    tensor version (cached; skipped while a CUDA graph is captured): no per-call host sync, no data-dependent
    shape — the launch has N programs whatever the mask holds (CUDA-graph callers use
    ``torch.ops.cpoc.masked_reflect_rows_mask_`` on static buffers directly).
    """
    n, _ = _check_tensors(hidden, residual, v)
    path = check_backend(backend, hidden.device)
    mask = _row_mask(row_mask, n, hidden.device)
    vf = v.to(device=hidden.device, dtype=torch.float32).contiguous()
    if backend == "auto":
        torch.ops.cpoc.masked_reflect_rows_mask_(hidden, residual, vf, mask)
    elif path == "triton":
        masked_reflect_rows_mask_triton(hidden, residual, vf, mask)
    else:
        masked_reflect_rows_mask_torch(hidden, residual, vf, mask)
