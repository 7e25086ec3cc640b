"""CPU benchmark: PoC input embeddings through the native C++ RNG vs the plain-torch reference.

Run: python -m pytest bench/bench_inputs_cpu.py --benchmark-enable
Shape: 8 nonces × seq_len 256 × hidden 1024 (2.1 M normals), bf16 output, legacy RNG.
"""
import pytest
import torch

from cpoc_kernels._native import native
from cpoc_kernels.ops.inputs import nonce_normals_cpu
from cpoc_kernels.reference import poc_inputs

NONCES, SEQ_LEN, HIDDEN = list(range(8)), 256, 1024


def native_inputs():
    flat = nonce_normals_cpu("TEST_BLOCK", "test_pub_keys", NONCES, SEQ_LEN * HIDDEN)
    return flat.view(len(NONCES), SEQ_LEN, HIDDEN).to(torch.bfloat16)


def reference_inputs():
    return poc_inputs("TEST_BLOCK", "test_pub_keys", NONCES, SEQ_LEN, HIDDEN, torch.bfloat16)


@pytest.mark.benchmark(group="poc_inputs cpu 8x256x1024 bf16")
def test_reference_torch(benchmark):
    benchmark(reference_inputs)


@pytest.mark.skipif(native() is None, reason="cpoc_kernels._C not built")
@pytest.mark.benchmark(group="poc_inputs cpu 8x256x1024 bf16")
def test_native_cpp(benchmark):
    out = benchmark(native_inputs)
    ref = reference_inputs()
    # bf16 of fp32 values within a few ulp: nearly all elements are identical
    assert (out != ref).float().mean() < 1e-4
