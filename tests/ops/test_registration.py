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
    for name in ("poc_inputs_", "masked_reflect_", "poc_readout"):
        assert hasattr(torch.ops.cpoc, name)


@pytest.mark.parametrize("stronger", [False, True])
def test_opcheck_poc_inputs(stronger):
    out = torch.zeros(10, 16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.cpoc.poc_inputs_.default, (out, input_seeds("bh", "pk", [1, 2], stronger), 3, 2))


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_masked_reflect(residual):
    torch.library.opcheck(torch.ops.cpoc.masked_reflect_.default, _reflect_args(residual))


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
