"""torch.library registration of the cpoc ops: opcheck (schema, fake/meta, autograd registration, AOT dispatch)
and a torch.compile(fullgraph=True) smoke test on CPU."""
from __future__ import annotations

import pytest
import torch

import cpoc_kernels.ops  # noqa: F401  (registers torch.ops.cpoc.*)
from cpoc_kernels import reference as R
from cpoc_kernels.ops.inputs import input_seeds
from cpoc_kernels.ops.readout import haar_normals_torch, haar_seed_table, pick_table


def _reflect_args(residual: bool):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    r = torch.randn(6, 32, generator=gen).to(torch.bfloat16) if residual else None
    v = torch.randn(32, generator=gen)
    return (h, r, v / v.norm(), torch.tensor([1, 4, 5]))


def _readout_args():
    hs = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    nonces = [3, 4, 5]
    haar = haar_normals_torch(haar_seed_table("bh", "pk", nonces), 12, "cpu").view(3, 11, 12)
    return (hs, pick_table("bh", "pk", nonces, 64), haar)


def test_ops_are_registered():
    for name in ("poc_inputs_", "masked_reflect_", "masked_reflect_rows_mask_", "poc_readout"):
        assert hasattr(torch.ops.cpoc, name)


@pytest.mark.parametrize("stronger", [False, True])
def test_opcheck_poc_inputs(stronger):
    out = torch.zeros(10, 16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.cpoc.poc_inputs_.default, (out, input_seeds("bh", "pk", [1, 2], stronger), 3, 2))


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_masked_reflect(residual):
    torch.library.opcheck(torch.ops.cpoc.masked_reflect_.default, _reflect_args(residual))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_opcheck_masked_reflect_rows_mask(residual, mask_dtype):
    h, r, v, rows = _reflect_args(residual)
    mask = torch.zeros(h.shape[0], dtype=torch.bool)
    mask[rows] = True
    torch.library.opcheck(torch.ops.cpoc.masked_reflect_rows_mask_.default, (h, r, v, mask.to(mask_dtype)))


def test_opcheck_poc_readout():
    torch.library.opcheck(torch.ops.cpoc.poc_readout.default, _readout_args())


def test_torch_compile_fullgraph_smoke():
    """A small PoC step compiled with fullgraph=True: inputs into a mixed buffer, reflect, read out."""
    torch._dynamo.reset()

    def step(buf, seeds, residual, v, rows, idx, haar, last_rows):
        torch.ops.cpoc.poc_inputs_(buf, seeds, 4, 2)
        torch.ops.cpoc.masked_reflect_(buf, residual, v, rows)
        hs = buf.index_select(0, last_rows).float() * 2.0
        return torch.ops.cpoc.poc_readout(hs, idx, haar)

    nonces, seq_len, hidden = [7, 8], 4, 64
    seeds = input_seeds("bh", "pk", nonces)
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(hidden, generator=gen)
    v = v / v.norm()
    rows = torch.arange(2, 2 + len(nonces) * seq_len)
    last_rows = torch.tensor([2 + seq_len - 1, 2 + 2 * seq_len - 1])
    idx = pick_table("bh", "pk", nonces, hidden)
    haar = haar_normals_torch(haar_seed_table("bh", "pk", nonces), 12, "cpu").view(2, 11, 12)
    chat = torch.randn(12, hidden, generator=gen).to(torch.bfloat16)
    res0 = torch.randn(12, hidden, generator=gen).to(torch.bfloat16)

    args_eager = (chat.clone(), seeds, res0.clone(), v, rows, idx, haar, last_rows)
    args_comp = (chat.clone(), seeds, res0.clone(), v, rows, idx, haar, last_rows)
    want = step(*args_eager)
    got = torch.compile(step, fullgraph=True)(*args_comp)
    assert torch.equal(got, want)
    assert torch.equal(args_comp[0], args_eager[0]) and torch.equal(args_comp[2], args_eager[2])
    # the eager step itself is the reference: inputs rows, reflected, chat rows untouched
    x = R.poc_inputs("bh", "pk", nonces, seq_len, hidden, torch.bfloat16).view(-1, hidden)
    assert torch.equal(args_eager[0][rows], R.reflect(x, v))
    keep = torch.ones(12, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(args_eager[0][keep], chat[keep]) and torch.equal(args_eager[2][keep], res0[keep])
    hs = args_eager[0].index_select(0, last_rows).float() * 2.0
    assert torch.equal(want, R.output_stage(hs, "bh", "pk", nonces))


def test_torch_compile_fullgraph_rows_mask_no_recompile():
    """The mask op under fullgraph=True: a static mask buffer whose content changes between calls (as between
    CUDA-graph replays) takes effect without a retrace; results equal eager and the reference."""
    torch._dynamo.reset()

    def step(buf, residual, vecs, mask, layer_rows):
        n = buf.shape[0]
        for slot in range(vecs.shape[0]):
            torch.ops.cpoc.masked_reflect_rows_mask_(buf, residual, vecs[slot], mask[slot, :n])
        return buf.index_select(0, layer_rows).float() * 2.0

    gen = torch.Generator().manual_seed(9)
    vecs = torch.randn(2, 48, generator=gen)
    vecs = vecs / vecs.norm(dim=-1, keepdim=True)
    mask = torch.zeros(2, 16, dtype=torch.bool)  # static buffer sized for 16 rows, the step uses 10
    h0 = torch.randn(10, 48, generator=gen).to(torch.bfloat16)
    r0 = torch.randn(10, 48, generator=gen).to(torch.bfloat16)
    compiled = torch.compile(step, fullgraph=True)
    sel = torch.tensor([0, 3, 9])
    for rows0, rows1 in (([1, 2], [7]), ([], [0, 3, 9]), ([4, 5, 6], [])):
        mask.zero_()
        mask[0, rows0] = True
        mask[1, rows1] = True
        eager = (h0.clone(), r0.clone())
        comp = (h0.clone(), r0.clone())
        want = step(eager[0], eager[1], vecs, mask, sel)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(comp[0], comp[1], vecs, mask, sel)
        assert torch.equal(got, want) and torch.equal(comp[0], eager[0]) and torch.equal(comp[1], eager[1])
        for slot, rows in ((0, rows0), (1, rows1)):
            if rows:
                assert torch.equal(eager[0][rows], R.reflect(h0[rows], vecs[slot]))
                assert torch.equal(eager[1][rows], R.reflect(r0[rows], vecs[slot]))
        keep = torch.ones(10, dtype=torch.bool)
        keep[rows0 + rows1] = False
        assert torch.equal(eager[0][keep], h0[keep]) and torch.equal(eager[1][keep], r0[keep])
