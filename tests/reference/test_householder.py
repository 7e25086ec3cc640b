"""reference.layer_vector / reflect against the golden vectors."""
import pytest
import torch

from bits import bf16_from_hex, f32_from_hex, ulp_distance
from cpoc_kernels.reference import layer_vector, normal, reflect, seed32


def test_layer_vectors_golden(primitives):
    for case in primitives["layer_vectors"]:
        assert seed32(case["seed_string"]) == case["seed"]
        v = layer_vector(case["block_hash"], case["layer"], case["hidden"])
        assert v.shape == (case["hidden"],) and v.dtype == torch.float32
        raw = normal(case["seed"], case["hidden"])[:16]
        cpu = f32_from_hex(case["raw_first_16_f32_hex"])
        assert (ulp_distance(raw, cpu) <= 4).all()
        d_cpu = ulp_distance(v[:16], f32_from_hex(case["first_16_f32_hex"]))
        d_cuda = ulp_distance(v[:16], f32_from_hex(case["first_16_f32_hex_cuda_libdevice_emulated"]))
        assert (torch.minimum(d_cpu, d_cuda) <= 4).all()
        assert abs(float(torch.linalg.vector_norm(v.double())) - 1.0) < 1e-6


def test_reflect_bf16_golden_bit_exact(primitives):
    for case in primitives["reflect_bf16"]:
        v = f32_from_hex(case["v_f32_hex"])
        assert torch.equal(v.to(torch.bfloat16), bf16_from_hex(case["vb_bf16_hex"]))
        x = torch.stack([bf16_from_hex(row) for row in case["x_bf16_hex"]])
        y = reflect(x, v)
        want = torch.stack([bf16_from_hex(row) for row in case["y_bf16_hex"]])
        assert y.dtype == torch.bfloat16
        assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def test_reflect_rounding_points():
    """bf16 rounding after every op: compare with an explicit op-by-op fp32 emulation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    v = torch.randn(48, generator=g)
    v = v / v.norm()
    vb = v.to(torch.bfloat16).float()
    p = (x.float() * vb).to(torch.bfloat16).float()
    dot = p.sum(-1, keepdim=True).to(torch.bfloat16).float()
    t = ((2 * dot).to(torch.bfloat16).float() * vb).to(torch.bfloat16).float()
    want = (x.float() - t).to(torch.bfloat16)
    got = reflect(x, v)
    # the dot's fp32 summation order is free; all other steps are fixed
    assert (got.float() - want.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * x.float().abs().max()


def test_reflect_is_an_involution_in_fp32():
    v = layer_vector("bh", 0, 32)
    x = torch.randn(3, 32, dtype=torch.float64).float()
    assert torch.allclose(reflect(reflect(x, v), v), x, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(reflect(x, v), dim=-1), torch.linalg.vector_norm(x, dim=-1), rtol=1e-5)


def test_reflect_shape_mismatch():
    with pytest.raises(ValueError):
        reflect(torch.zeros(2, 8), torch.zeros(9))
