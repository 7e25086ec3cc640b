"""cpoc_kernels.ops.poc_inputs (Triton under TRITON_INTERPRET=1, and the C++ CPU path) vs the reference."""
from __future__ import annotations

import pytest
import torch

from cpoc_kernels import ops
from cpoc_kernels import reference as R
from cpoc_kernels.ops.inputs import input_seeds, normals_into_triton

from bits import box_muller_fp64_libm

from ._util import DTYPES, f32_from_hex, sha256_le, ulp_diff

BH, PK = "TEST_BLOCK", "test_pub_keys"
BACKENDS = ["triton", "auto"]  # auto on CPU tensors = the C++ RNG path
MAX_ULP = 4


def _check_against_reference(got, ref):
    if got.dtype == torch.float32:
        assert ulp_diff(got, ref).max().item() <= MAX_ULP
    else:
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------ golden
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_inputs(primitives, backend):
    for case in primitives["inputs"]:
        dt = DTYPES[case["dtype"]]
        got = ops.poc_inputs(case["block_hash"], case["public_key"], [case["nonce"]], case["seq_len"],
                             case["hidden"], dt, stronger_rng=case["stronger_rng"], backend=backend)[0]
        assert got.shape == (case["seq_len"], case["hidden"])
        flat = got.flatten()
        if dt == torch.float32:
            assert ulp_diff(flat[:16], f32_from_hex(case["first_16_hex"])).max() <= MAX_ULP
            assert ulp_diff(flat[-16:], f32_from_hex(case["last_16_hex"])).max() <= MAX_ULP
        else:
            # every bf16/fp16 golden case is libm-robust (n_elements_cpu_vs_libdevice_emulated_differ == 0)
            assert case["n_elements_cpu_vs_libdevice_emulated_differ"] == 0
            assert sha256_le(got) == case["sha256_le_bytes"], case


def _triton_normals(seeds: list[int], n: int) -> torch.Tensor:
    out = torch.full((1, n), float("nan"))
    normals_into_triton(out, torch.tensor([seeds], dtype=torch.int64), seq_len=1)
    return out[0]


def test_golden_normal_triton(primitives):
    for case in primitives["normal"]:
        got = _triton_normals([case["seed"]], case["n"])
        if "values_f32_hex" in case:
            want = f32_from_hex(case["values_f32_hex"])
            assert ulp_diff(got, want).max() <= MAX_ULP, case
            if case["n_elements_cpu_vs_correctly_rounded_ops_differ"] == 0:
                # the interpreter's log/cos/sin are fp64 rounded once (correctly rounded ops): where the
                # CPU reference agrees with correctly rounded ops (incl. the signed-zero and 2pi edges)
                # the kernel must be bit-equal -- on the elements whose fp64 results lie far (> 2**10 fp64
                # ulps) from an fp32 rounding boundary, so that no host's fp64 libm can change the bits
                _, margin = box_muller_fp64_libm(case["seed"], case["n"])
                robust = margin > 2**10
                assert robust.float().mean() > 0.9, case  # the check is not vacuous
                assert torch.equal(got.view(torch.int32)[robust], want.view(torch.int32)[robust]), case
        else:
            assert ulp_diff(got[:64], f32_from_hex(case["first_64_f32_hex"])).max() <= MAX_ULP
            assert ulp_diff(got[-64:], f32_from_hex(case["last_64_f32_hex"])).max() <= MAX_ULP


def test_golden_stronger_normal_triton(primitives):
    for case in primitives["stronger_normal"]:
        if case["n"] > 5000:
            continue  # 65541 elements: too slow for the interpreter on CI; covered by smaller cases
        got = _triton_normals(case["sub_seeds"], case["n"])
        assert ulp_diff(got[:32], f32_from_hex(case["first_32_f32_hex"])).max() <= MAX_ULP
        assert ulp_diff(got[-32:], f32_from_hex(case["last_32_f32_hex"])).max() <= MAX_ULP
        assert ulp_diff(got, R.stronger_normal(case["sub_seeds"], case["n"])).max() <= MAX_ULP


# ------------------------------------------------------------------------------------------ random
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stronger", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 10), (5, 33), (1, 7), (2, 64)])
def test_random_vs_reference(backend, stronger, dtype, shape):
    seq_len, hidden = shape
    nonces = [0, 7, -3, 2**31 - 1]
    got = ops.poc_inputs("bh-r", "pk-r", nonces, seq_len, hidden, dtype, stronger_rng=stronger, backend=backend)
    ref = R.poc_inputs("bh-r", "pk-r", nonces, seq_len, hidden, dtype, stronger_rng=stronger)
    assert got.shape == ref.shape and got.dtype == dtype
    _check_against_reference(got, ref)


def test_torch_backend_is_reference():
    got = ops.poc_inputs(BH, PK, [1, 2], 3, 20, torch.bfloat16, stronger_rng=True, backend="torch")
    assert torch.equal(got, R.poc_inputs(BH, PK, [1, 2], 3, 20, torch.bfloat16, stronger_rng=True))


def test_bf16_is_rne_of_own_fp32():
    """The kernel's bf16/fp16 output is exactly the RNE cast of its own fp32 normals."""
    f32 = ops.poc_inputs(BH, PK, [3, 4], 4, 50, torch.float32, backend="triton")
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(ops.poc_inputs(BH, PK, [3, 4], 4, 50, dt, backend="triton"), f32.to(dt))


# ------------------------------------------------------------------------------------------ out buffer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_buffer_mixed_batch(backend, dtype):
    seq_len, hidden, nonces = 3, 24, [11, 12, 13]
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(20, hidden + 8, generator=gen).to(dtype)
    out = wide[:, :hidden]  # row stride hidden + 8
    before = wide.clone()
    ret = ops.poc_inputs(BH, PK, nonces, seq_len, hidden, dtype, out=out, row_offset=5, backend=backend)
    assert ret is out
    poc = slice(5, 5 + len(nonces) * seq_len)
    ref = R.poc_inputs(BH, PK, nonces, seq_len, hidden, dtype).view(-1, hidden)
    _check_against_reference(out[poc], ref)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[poc] = False
    assert torch.equal(wide[untouched], before[untouched])
    assert torch.equal(wide[:, hidden:], before[:, hidden:])


@pytest.mark.parametrize("stronger", [False, True])
def test_batch_composition_invariance(stronger):
    """A nonce's rows are identical whatever its neighbours and offset are."""
    seq_len, hidden = 2, 30
    alone = ops.poc_inputs(BH, PK, [42], seq_len, hidden, torch.float32, stronger_rng=stronger, backend="triton")[0]
    out = torch.zeros(16, hidden)
    ops.poc_inputs(BH, PK, [1, 42, 99, 5], seq_len, hidden, torch.float32, stronger_rng=stronger,
                   out=out, row_offset=3, backend="triton")
    assert torch.equal(out[5:7], alone)
    other = ops.poc_inputs(BH, PK, [42, 7], seq_len, hidden, torch.float32, stronger_rng=stronger, backend="triton")
    assert torch.equal(other[0], alone)


def test_input_seeds_table():
    s = input_seeds(BH, PK, [0, 1], stronger_rng=False)
    assert s.tolist() == [[R.seed32(f"{BH}_{PK}_nonce0")], [R.seed32(f"{BH}_{PK}_nonce1")]]
    st = input_seeds(BH, PK, [0], stronger_rng=True)
    assert st.shape == (1, 8) and st[0, 0].item() == s[0, 0].item()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(out_shape=(5, 16)),                   # too small for row_offset + B*S
        dict(out_shape=(20, 17)),                  # wrong hidden
        dict(out_dtype=torch.float16),             # dtype mismatch
        dict(row_offset=-1),
        dict(row_offset=15),                       # 15 + 2*3 > 20
        dict(backend="cuda"),
        dict(dtype=torch.float64),
    ],
)
def test_bad_input_raises_and_leaves_buffer(kwargs):
    out = torch.randn(*kwargs.get("out_shape", (20, 16))).to(kwargs.get("out_dtype", torch.float32))
    before = out.clone()
    with pytest.raises(ValueError):
        ops.poc_inputs(BH, PK, [1, 2], 3, 16, kwargs.get("dtype", torch.float32), out=out,
                       row_offset=kwargs.get("row_offset", 0), backend=kwargs.get("backend", "auto"))
    assert torch.equal(out, before)


def test_bad_sizes():
    with pytest.raises(ValueError):
        ops.poc_inputs(BH, PK, [1], 0, 16, torch.float32)
    with pytest.raises(ValueError):
        ops.poc_inputs(BH, PK, [1], 2, 16, torch.float32, row_offset=3)  # offset without out
    with pytest.raises(ValueError):
        ops.poc_inputs(BH, PK, [1], 2, 16, torch.float32, out=torch.zeros(4, 16).t().contiguous().t())


def test_empty_nonces():
    assert ops.poc_inputs(BH, PK, [], 2, 8, torch.float32).shape == (0, 2, 8)


@pytest.mark.parametrize("stronger", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("size", ["flat", "blocked"])
def test_kernel_layouts(stronger, strided, size):
    """Both grid layouts (flattened small segments / per-segment blocks, >1 block per segment) and both
    address modes (contiguous rows / row stride > H) against the reference, neighbours untouched."""
    if size == "flat":
        seq_len, hidden = 3, 20
    else:  # >= 1024 pairs per segment, and not a multiple of the block
        seq_len, hidden = (4, 4100) if stronger else (2, 1100)
    nonces = [21, 22]
    pad = 5 if strided else 0
    rows = 1 + len(nonces) * seq_len + 2
    wide = torch.full((rows, hidden + pad), -7.0, dtype=torch.bfloat16)
    out = wide[:, :hidden]
    ops.poc_inputs(BH, PK, nonces, seq_len, hidden, torch.bfloat16, stronger_rng=stronger, out=out, row_offset=1,
                   backend="triton")
    ref = R.poc_inputs(BH, PK, nonces, seq_len, hidden, torch.bfloat16, stronger_rng=stronger).view(-1, hidden)
    assert torch.equal(out[1 : 1 + len(nonces) * seq_len], ref)
    assert (wide[0] == -7).all() and (wide[1 + len(nonces) * seq_len :] == -7).all()
    assert (wide[:, hidden:] == -7).all()
