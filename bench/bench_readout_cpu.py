"""CPU benchmark: the output stage (readout) op vs the per-nonce plain-torch reference.

Run: python -m pytest bench/bench_readout_cpu.py --benchmark-enable
Shape: 32 nonces, hidden 1024, k 12 (fp32 final hidden states). The op's CPU path batches the reference's
ops over rows (picks, Haar normals, 11 reflections) and is bit-equal to it (asserted here and in the tests).
"""
import pytest
import torch

from cpoc_kernels import ops
from cpoc_kernels.reference import output_stage

NONCES, HIDDEN = list(range(32)), 1024
HS = torch.randn(len(NONCES), HIDDEN, generator=torch.Generator().manual_seed(0))


def op_readout():
    return ops.poc_readout(HS, "TEST_BLOCK", "test_pub_keys", NONCES).vectors


def reference_readout():
    return output_stage(HS, "TEST_BLOCK", "test_pub_keys", NONCES)


@pytest.mark.benchmark(group="readout cpu 32 nonces x 1024")
def test_reference_torch(benchmark):
    benchmark(reference_readout)


@pytest.mark.benchmark(group="readout cpu 32 nonces x 1024")
def test_op_batched(benchmark):
    out = benchmark(op_readout)
    assert torch.equal(out, reference_readout())
