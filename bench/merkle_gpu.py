"""GPU benchmark of the SMST root from device-resident artifacts (Triton SHA-256), when a GPU is lent.

Run: python bench/merkle_gpu.py [--sizes 65536 1048576 4194304]
For each N: nonces = random permutation of 0..N-1 (int32, on the device), vectors fp16 [N, 12] on the
device; reports the median (triton.testing.do_bench) of smst_root_gpu, leaves/s, the leaf and node
kernels alone (hashes/s), and checks the root against the C++ SMST (bit for bit).
"""
import argparse
import sys

import torch
import triton.testing

from cpoc_kernels.merkle import SMST, smst_root_gpu
from cpoc_kernels.merkle.gpu import smst_leaf_hashes_gpu, smst_node_hashes_gpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 20, 1 << 22])
    parser.add_argument("--no-check", action="store_true", help="skip the C++ root comparison")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the interpreter path is tested in tests/merkle/test_gpu.py)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'N':>10} {'root ms':>10} {'leaves/s':>12} {'leaf-kernel hashes/s':>22} {'node-kernel hashes/s':>22} {'root == C++':>12}")
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        nonces = torch.randperm(n, generator=g).to(torch.int32).cuda()
        vectors = torch.randn((n, 12), generator=g).to(torch.float16).cuda()
        root_ms = triton.testing.do_bench(lambda: smst_root_gpu(nonces, vectors), warmup=50, rep=500,
                                          return_mode="median")
        leaf_ms = triton.testing.do_bench(lambda: smst_leaf_hashes_gpu(nonces, vectors), return_mode="median")
        left = torch.randint(-(2**31), 2**31 - 1, (n, 8), dtype=torch.int32, device="cuda")
        right = torch.randint(-(2**31), 2**31 - 1, (n, 8), dtype=torch.int32, device="cuda")
        counts = torch.ones(n, dtype=torch.int32, device="cuda")
        node_ms = triton.testing.do_bench(lambda: smst_node_hashes_gpu(left, right, counts), return_mode="median")
        same = "skipped"
        if not args.no_check:
            tree = SMST()
            tree.extend(nonces.cpu(), vectors.cpu())
            same = str(smst_root_gpu(nonces, vectors) == tree.root)
        print(f"{n:>10} {root_ms:>10.3f} {n / root_ms * 1e3:>12.3e} {n / leaf_ms * 1e3:>22.3e} "
              f"{n / node_ms * 1e3:>22.3e} {same:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
