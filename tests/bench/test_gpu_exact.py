"""The open GPU checks (../shared/spec/OPEN_GPU_CHECKS.md 1-3), the readout op and the device SMST root, as tests
that a CUDA device settles: they assert what the spec derives (the pick order, libdevice normals, bit-equal
reflection) with the comparison logic of bench/gpu_check_exact.py, on smaller shapes than bench/gpu_check.py.

They need compiled kernels: run ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/`` (tests/conftest.py
otherwise selects the Triton interpreter, which would not test the CUDA code; bench/gpu_check.py runs them so).
Without a CUDA device they are skipped (tests/conftest.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_check_exact as X  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    from cpoc_kernels.ops._common import interpreting

    if interpreting():
        pytest.skip("Triton kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0 on a GPU")
    return torch.device("cuda")


def assert_all_pass(checks):
    text = "\n".join(c.line() for c in checks)
    assert all(c.ok for c in checks), text


def test_pick_order_of_cuda_topk_is_the_derived_order(cuda):
    """OPEN_GPU_CHECKS 1: torch.topk(-scores, 12, sorted=False) on CUDA (per-nonce [H] and batched [B, H] calls,
    H = 1024/4096/7168, B = 1/32/200) returns pick_indices' order, and the golden indices_cuda_order_derived."""
    assert_all_pass(X.check_pick(cuda, rounds=3, per_nonce_rows=8))


def test_cuda_normals_match_the_libdevice_emulation(cuda):
    """OPEN_GPU_CHECKS 2a: torch's normal() on CUDA and the Triton normals equal the golden
    *_cuda_libdevice_emulated values bit for bit (normal, stronger_normal, Haar raw normals, inputs sha256)."""
    assert_all_pass(X.check_normals_golden(cuda))


def test_triton_inputs_equal_torch_on_the_same_card(cuda):
    """OPEN_GPU_CHECKS 2b: ops.poc_inputs (Triton) == reference.poc_inputs (torch) on CUDA: fp32 bits, bf16, fp16."""
    assert_all_pass(X.check_inputs_vs_torch(cuda, [(4, 256, 4096, False), (4, 256, 4096, True),
                                                   (2, 64, 7168, False), (8, 32, 1024, True)]))


def test_reflect_ops_equal_the_reference_expression_in_bf16(cuda):
    """OPEN_GPU_CHECKS 3: masked_reflect_ and masked_reflect_rows_mask_ vs the reference on CUDA, bf16 random rows of
    H = 1024/4096/7168: bit-equal except rows whose bf16 dot flips with the fp32 summation order (explained exactly);
    unselected rows untouched; the golden reflect_bf16 rows exact."""
    assert_all_pass(X.check_reflect(cuda, [(4096, 1024), (2048, 4096), (1024, 7168)]))


def test_reflect_mask_op_in_a_cuda_graph_follows_the_mask_of_each_replay(cuda):
    assert_all_pass([X.check_reflect_cuda_graph(cuda, rows=256, hidden=4096, replays=3)])


def test_readout_op_equals_the_reference_output_stage(cuda):
    """poc_readout (Triton) vs reference.output_stage on CUDA: fp16 bits equal except values within 64 fp32 ulps of an
    fp16 boundary; the golden output_stage rows give vector_b64_with_cuda_libdevice_emulated_haar."""
    assert_all_pass(X.check_readout(cuda, [(128, 1024, torch.float32), (128, 4096, torch.float32),
                                           (64, 7168, torch.float32), (64, 4096, torch.bfloat16)]))


def test_smst_root_on_the_device_equals_cpp_and_go(cuda):
    assert_all_pass(X.check_smst(cuda, [(1, 2**20), (5000, 2**20), (100_000, 2**24), (20_000, 2**32)]))
