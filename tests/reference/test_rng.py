"""reference.rng / seeds against the network reference's golden vectors."""
import numpy as np
import pytest
import torch

from bits import f32_from_hex, ulp_distance
from cpoc_kernels.reference import mmh, normal, seed32, stronger_normal, uniform
from cpoc_kernels.reference.rng import normal_rows
from cpoc_kernels.reference.seeds import stronger_sub_seeds

MAX_ULP = 4  # fp32 values through log/cos/sin: CPU torch vs CUDA libdevice differ by a few ulp


def within_ulp_of_cpu_or_cuda(got, case, field):
    """≤ 4 ulp from the CPU-torch field, or from the libdevice-emulated field (golden README)."""
    cpu = f32_from_hex(case[field])
    cuda = f32_from_hex(case[f"{field}_cuda_libdevice_emulated"])
    return bool((torch.minimum(ulp_distance(got, cpu), ulp_distance(got, cuda)) <= MAX_ULP).all())


def test_seed32_golden(primitives):
    for case in primitives["seed32"]:
        assert seed32(case["string"]) == case["seed"], case["string"]


def test_seed32_is_big_endian_prefix_of_sha256(primitives):
    for case in primitives["seed32"]:
        assert seed32(case["string"]) == int(case["sha256_hex"][:8], 16)


def test_mmh_golden_including_key_wraparound(primitives):
    for case in primitives["mmh"]:
        keys = torch.arange(case["keys_start"], case["keys_start"] + case["n"], dtype=torch.int64)
        got = mmh(keys, case["seed"])
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.tensor(case["values"], dtype=torch.int64)), case["seed"]


def test_mmh_matches_spec_formula_in_numpy():
    """An independent uint32 numpy transcription of spec §3.2."""
    keys = np.arange(0, 5000, 7, dtype=np.uint32)
    seed = np.uint32(0xDEADBEEF)

    def rotl(x, r):
        return (x << np.uint32(r)) | (x >> np.uint32(32 - r))

    with np.errstate(over="ignore"):
        k = keys * np.uint32(0xCC9E2D51)
        k = rotl(k, 15) * np.uint32(0x1B873593)
        h = rotl(seed ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    assert torch.equal(mmh(torch.from_numpy(keys.astype(np.int64)), int(seed)), torch.from_numpy(h.astype(np.int64)))


def test_mmh_rejects_bad_seed():
    with pytest.raises(ValueError):
        mmh(torch.arange(3), -1)
    with pytest.raises(ValueError):
        mmh(torch.arange(3), 2**32)
    with pytest.raises(ValueError, match="uint32"):
        mmh(torch.arange(3), torch.tensor([[0], [2**32]]))
    with pytest.raises(ValueError, match="integer tensor"):
        mmh(torch.arange(3), torch.tensor([1.0]))


def test_mmh_tensor_seeds_broadcast_like_per_seed_calls():
    seeds = torch.tensor([0, 1, 2**31, 2**32 - 1, 12345])
    keys = torch.arange(40)
    want = torch.stack([mmh(keys, int(s)) for s in seeds])
    assert torch.equal(mmh(keys.view(1, -1), seeds.view(-1, 1)), want)


@pytest.mark.parametrize("n", [0, 1, 2, 11, 12, 13, 64, 1025])
def test_normal_rows_bit_equal_to_per_seed_normal(n):
    """normal_rows batches the reference ops over seeds; every row must equal normal(seed, n) bit for bit."""
    rng = np.random.default_rng(n)
    seeds = torch.from_numpy(rng.integers(0, 2**32, size=300 if n < 100 else 40).astype(np.int64))
    seeds[:3] = torch.tensor([0, 2**32 - 1, 1])
    want = torch.stack([normal(int(s), n) for s in seeds])
    got = normal_rows(seeds, n)
    assert got.shape == (len(seeds), n) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert normal_rows(torch.empty(0, dtype=torch.int64), n).shape == (0, n)


def test_uniform_golden_bit_exact(primitives):
    for case in primitives["uniform"]:
        got = uniform(case["seed"], case["n"])
        assert torch.equal(got.view(torch.int32), f32_from_hex(case["values_f32_hex"]).view(torch.int32)), case


def test_normal_golden(primitives):
    for case in primitives["normal"]:
        got = normal(case["seed"], case["n"])
        assert got.shape == (case["n"],) and got.dtype == torch.float32
        if "values_f32_hex" in case:
            assert within_ulp_of_cpu_or_cuda(got, case, "values_f32_hex"), case.get("edge", case["seed"])
        else:
            assert within_ulp_of_cpu_or_cuda(got[:64], case, "first_64_f32_hex")
            assert within_ulp_of_cpu_or_cuda(got[-64:], case, "last_64_f32_hex")


def test_normal_edge_cases_signed_zero_and_clamp(primitives):
    edges = {c["edge"]: c for c in primitives["normal"] if "edge" in c}
    for case in edges.values():
        got = normal(case["seed"], case["n"])
        want = f32_from_hex(case["values_f32_hex"])
        # sign bits and exact zeros must match exactly
        assert torch.equal(torch.signbit(got), torch.signbit(want)), case["edge"]


def test_normal_split_halves_layout():
    """Element i < P uses keys (i, P+i) with cos; i >= P uses (i-P, i) with sin — spec §3.4."""
    n, seed = 9, 12345
    p = 5
    u = uniform(seed, 2 * p)
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u[:p], min=1e-10)))
    a = 6.2831855 * u[p:]
    want = torch.cat([r * torch.cos(a), r * torch.sin(a)])[:n]
    assert (ulp_distance(normal(seed, n), want) <= MAX_ULP).all()


def test_stronger_normal_golden(primitives):
    for case in primitives["stronger_normal"]:
        subs = stronger_sub_seeds(case["block_hash"], case["public_key"], case["nonce"])
        assert subs == case["sub_seeds"]
        got = stronger_normal(subs, case["n"])
        assert got.shape == (case["n"],)
        assert within_ulp_of_cpu_or_cuda(got[:32], case, "first_32_f32_hex")
        assert within_ulp_of_cpu_or_cuda(got[-32:], case, "last_32_f32_hex")


def test_stronger_normal_segments_have_their_own_halves():
    subs = list(range(100, 108))
    n = 37  # L = 5, the last segment is shorter (2)
    got = stronger_normal(subs, n)
    want = torch.cat([normal(s, min(5, n - k * 5)) for k, s in enumerate(subs) if k * 5 < n])
    assert torch.equal(got, want)


def test_stronger_sub_seed_zero_is_legacy_seed():
    assert stronger_sub_seeds("bh", "pk", 3)[0] == seed32("bh_pk_nonce3")
