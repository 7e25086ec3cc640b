"""The Triton SHA-256 path: kernels and smst_root_gpu against the oracle and the golden roots.

Unmarked tests run the kernels on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 from
tests/conftest.py), on small trees only; ``gpu`` tests run on a CUDA device when one is present.
"""
import hashlib
import os
import struct

import numpy as np
import pytest
import torch

from cpoc_kernels.merkle import SMST, oracle, smst_root_gpu
from cpoc_kernels.merkle.gpu import smst_leaf_hashes_gpu, smst_node_hashes_gpu

from ._golden import arrival, golden_trees

# Golden trees with <= 64 PoC v2 leaves (12 x fp16). Each root costs D+1 interpreted launches (~8 s on
# CPU), so four trees covering D = 24, 25 (deepening) and 32 (negative nonce) run by default, the rest
# are marked slow.
FAST_TREES = {"single_nonce_7", "zeros_0_1_2_3", "nonce_ge_2p24", "negative_nonce_5_m1"}
SMALL_TREES = [
    pytest.param(t, id=t["name"], marks=() if t["name"] in FAST_TREES else pytest.mark.slow)
    for t in golden_trees() if 0 < t["count"] <= 64
]


def words_to_bytes(words: torch.Tensor) -> bytes:
    return struct.pack(">8I", *[w & 0xFFFFFFFF for w in words.tolist()])


def bytes_to_words(digest: bytes) -> list[int]:
    return [w - 2**32 if w >= 2**31 else w for w in struct.unpack(">8I", digest)]


def as_tensors(leaves, device="cpu"):
    nonces = torch.tensor([n for n, _ in leaves], dtype=torch.int32, device=device)
    vectors = torch.from_numpy(np.stack([np.frombuffer(v, dtype="<f2") for _, v in leaves]).astype(np.float16))
    return nonces, vectors.to(device)


def test_leaf_kernel_matches_hashlib():
    rng = np.random.default_rng(5)
    nonces = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 123456789, 7], dtype=torch.int32)
    vectors = torch.from_numpy(rng.integers(0, 2**16, (7, 12), dtype=np.uint16).view(np.float16))  # any bits
    got = smst_leaf_hashes_gpu(nonces, vectors)
    for i in range(7):
        data = struct.pack("<I", int(nonces[i]) & 0xFFFFFFFF) + vectors[i].numpy().astype("<f2").tobytes()
        assert words_to_bytes(got[i]) == hashlib.sha256(b"\x00" + data).digest()


def test_node_kernel_matches_hashlib():
    left = [os.urandom(32) for _ in range(5)] + [oracle.EMPTY_HASHES[3]]
    right = [os.urandom(32) for _ in range(5)] + [oracle.EMPTY_HASHES[3]]
    counts = [0, 1, 255, 65536, 2**31 - 1, 0]
    got = smst_node_hashes_gpu(torch.tensor([bytes_to_words(x) for x in left], dtype=torch.int32),
                               torch.tensor([bytes_to_words(x) for x in right], dtype=torch.int32),
                               torch.tensor(counts, dtype=torch.int32))
    for i in range(6):
        expected = hashlib.sha256(b"\x01" + left[i] + right[i] + struct.pack("<I", counts[i])).digest()
        assert words_to_bytes(got[i]) == expected
    assert words_to_bytes(got[5]) == oracle.EMPTY_HASHES[4]


@pytest.mark.parametrize("tree", SMALL_TREES)
def test_root_gpu_reproduces_golden_root(tree):
    nonces, vectors = as_tensors(arrival(tree))
    assert smst_root_gpu(nonces, vectors).hex() == tree["root"]


def test_root_gpu_golden_snapshot_and_empty():
    tree = next(t for t in golden_trees() if t["name"] == "nonce_ge_2p24")
    snap = next(s for s in tree["snapshots"] if s["count"] == 5)  # D = 24 before 2^24 arrives
    nonces, vectors = as_tensors(arrival(tree)[:5])
    assert smst_root_gpu(nonces, vectors).hex() == snap["root"]
    empty = torch.empty(0, dtype=torch.int32), torch.empty((0, 12), dtype=torch.float16)
    assert smst_root_gpu(*empty) == oracle.EMPTY_HASHES[24]


def test_root_gpu_bad_input():
    nonces = torch.tensor([3, 9, 3], dtype=torch.int32)
    vectors = torch.zeros((3, 12), dtype=torch.float16)
    with pytest.raises(ValueError, match="duplicate nonce 3"):
        smst_root_gpu(nonces, vectors)
    with pytest.raises(ValueError, match="int32"):
        smst_root_gpu(nonces.long(), vectors)
    with pytest.raises(ValueError, match=r"fp16 \[N, 12\]"):
        smst_root_gpu(nonces, vectors.float())
    with pytest.raises(ValueError, match=r"fp16 \[N, 12\]"):
        smst_root_gpu(nonces, torch.zeros((3, 11), dtype=torch.float16))
    with pytest.raises(ValueError, match="3 nonces but 2 vectors"):
        smst_root_gpu(nonces, vectors[:2])


def random_leaf_tensors(n: int, seed: int, device: str, nonce_space: int = 2**31):
    g = torch.Generator().manual_seed(seed)
    nonces = torch.randperm(nonce_space, generator=g)[:n].to(torch.int32) if nonce_space <= 2**24 else \
        torch.unique(torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64))[:n].to(torch.int32)
    vectors = torch.randn((nonces.shape[0], 12), generator=g).to(torch.float16)
    return nonces.to(device), vectors.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("n,space", [(1, 2**20), (1000, 2**20), (100_000, 2**24), (50_000, 2**32)])
def test_root_gpu_on_device_equals_cpp(n, space):
    nonces, vectors = random_leaf_tensors(n, 11, "cuda", space)
    tree = SMST()
    tree.extend(nonces.cpu(), vectors.cpu())
    assert smst_root_gpu(nonces, vectors) == tree.root


AOT_SCRIPT = r"""
import collections, re, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from cpoc_kernels.merkle import gpu
ptr = "*i32"
sigs = {
    gpu._leaf_kernel: dict(keys_ptr=ptr, vec_ptr=ptr, out_ptr=ptr, k_ptr=ptr, h_ptr=ptr, n="i32", BLOCK="constexpr"),
    gpu._node_kernel: dict(left_ptr=ptr, right_ptr=ptr, count_ptr=ptr, out_ptr=ptr, k_ptr=ptr, h_ptr=ptr, n="i32",
                           BLOCK="constexpr"),
}
for fn, sig in sigs.items():
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 128}), target=GPUTarget("cuda", 90, 32))
    ops = collections.Counter(re.findall(r"arith\.(shrsi|shrui)", k.asm["ttir"]))
    print(fn.__name__, "ptx" in k.asm, ops.get("shrsi", 0), ops.get("shrui", 0))
"""


def test_kernels_compile_for_a_cuda_target():
    """Lowers both kernels to PTX for sm_90 (no GPU needed) in a process without TRITON_INTERPRET:
    the interpreter alone would not catch code the compiler rejects. All right shifts must be logical."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    for name in ("_leaf_kernel", "_node_kernel"):
        has_ptx, shrsi, shrui = lines[name].split()
        assert has_ptx == "True" and shrsi == "0" and int(shrui) > 0, lines[name]
