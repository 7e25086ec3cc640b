"""GPU benchmark of the SMST root from device-resident artifacts (Triton SHA-256), when a GPU is lent.

Run: python bench/merkle_gpu.py [--sizes 65536 1048576 4194304] [--no-check]
For each N: nonces = random permutation of 0..N-1 (int32, on the device), vectors fp16 [N, 12] on the
device; reports the median (triton.testing.do_bench) of smst_root_gpu, leaves/s, the leaf and node
kernels alone (hashes/s, and bytes read / time against a measured device-to-device copy), the C++ SMST
root time on the host for the same leaves (the path it replaces), and checks the root against it (bit for
bit) up to ``--check-max`` leaves. ``bench/gpu_check.py`` calls :func:`run`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from gpu_timing import copy_bandwidth_gbs, make_timer

LEAF_BYTES = 4 + 24 + 32  # read nonce + vector, write digest
NODE_BYTES = 32 + 32 + 4 + 32  # read two children + count, write digest


def run(device: torch.device, sizes, check_max: int = 1 << 20, log: Callable[[str], None] = print, timer=None,
        copy_gbs: float | None = None, cpp_max: int = 1 << 20, time_root: bool = True) -> dict:
    """Time ``smst_root_gpu`` and its kernels for each N in ``sizes``; returns ``{"copy_gbs", "rows": [dict]}``.

    ``time_root=False`` times the two kernels only (the CPU dry run: an interpreted root costs tens of seconds).
    """
    from cpoc_kernels.merkle import SMST, smst_root_gpu
    from cpoc_kernels.merkle.gpu import smst_leaf_hashes_gpu, smst_node_hashes_gpu

    timer = timer or make_timer(device, rep_ms=200)
    if copy_gbs is None:
        copy_gbs = copy_bandwidth_gbs(device, timer, 1 << 28 if device.type == "cuda" else 1 << 16)
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        nonces = torch.randperm(n, generator=g).to(torch.int32)
        vectors = torch.randn((n, 12), generator=g).to(torch.float16)
        d_nonces, d_vectors = nonces.to(device), vectors.to(device)
        root_ms = timer(lambda: smst_root_gpu(d_nonces, d_vectors)) if time_root else None
        leaf_ms = timer(lambda: smst_leaf_hashes_gpu(d_nonces, d_vectors))
        left = torch.randint(-(2**31), 2**31 - 1, (n, 8), dtype=torch.int32, device=device)
        right = torch.randint(-(2**31), 2**31 - 1, (n, 8), dtype=torch.int32, device=device)
        counts = torch.ones(n, dtype=torch.int32, device=device)
        node_ms = timer(lambda: smst_node_hashes_gpu(left, right, counts))
        cpp_ms, same = None, None
        if n <= max(check_max, cpp_max):
            t0 = time.perf_counter()
            tree = SMST()
            tree.extend(nonces, vectors)
            cpp_root = tree.root
            cpp_ms = (time.perf_counter() - t0) * 1e3
            if n <= check_max:
                same = smst_root_gpu(d_nonces, d_vectors) == cpp_root
        r = dict(n=n, root_ms=root_ms, leaves_per_s=n / root_ms * 1e3 if root_ms else None,
                 leaf_hashes_per_s=n / leaf_ms * 1e3, leaf_gbs=n * LEAF_BYTES / leaf_ms / 1e6,
                 node_hashes_per_s=n / node_ms * 1e3, node_gbs=n * NODE_BYTES / node_ms / 1e6, cpp_ms=cpp_ms,
                 speedup_vs_cpp=cpp_ms / root_ms if cpp_ms and root_ms else None, root_equals_cpp=same)
        rows.append(r)
        root_text = "not timed" if root_ms is None else f"{root_ms:.3f} ms ({r['leaves_per_s']:.3e} leaves/s)"
        log(f"  N={n}: root {root_text}, leaf kernel {r['leaf_hashes_per_s']:.3e}"
            f" hashes/s, node kernel {r['node_hashes_per_s']:.3e} hashes/s, C++ host root "
            f"{'-' if cpp_ms is None else f'{cpp_ms:.1f} ms'}, root == C++: {same}")
        d_nonces = d_vectors = left = right = counts = None  # free before the next size
    return {"copy_gbs": copy_gbs, "rows": rows}


def markdown(result: dict) -> list[str]:
    lines = ["| N leaves | root ms (median) | leaves/s | leaf kernel hashes/s (GB/s) | node kernel hashes/s (GB/s) | "
             "C++ host root ms | speedup | root == C++ |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        cpp = "–" if r["cpp_ms"] is None else f"{r['cpp_ms']:.1f}"
        sp = "–" if r["speedup_vs_cpp"] is None else f"{r['speedup_vs_cpp']:.1f}x"
        same = "not checked" if r["root_equals_cpp"] is None else str(r["root_equals_cpp"])
        root = "–" if r["root_ms"] is None else f"{r['root_ms']:.3f}"
        leaves = "–" if r["leaves_per_s"] is None else f"{r['leaves_per_s']:.3g}"
        lines.append(f"| {r['n']} | {root} | {leaves} | {r['leaf_hashes_per_s']:.3g} "
                     f"({r['leaf_gbs']:.0f}) | {r['node_hashes_per_s']:.3g} ({r['node_gbs']:.0f}) | {cpp} | {sp} | {same} |")
    lines += ["", f"Copy bandwidth (read + write): {result['copy_gbs']:.0f} GB/s. Kernel GB/s = bytes read + written "
              f"({LEAF_BYTES} B per leaf hash, {NODE_BYTES} B per node hash) / median time; SHA-256 is compute-bound, "
              "so these sit far below the copy."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 16, 1 << 20, 1 << 22])
    parser.add_argument("--no-check", action="store_true", help="skip the C++ root comparison")
    parser.add_argument("--check-max", type=int, default=1 << 20, help="compare with C++ up to this many leaves")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the interpreter path is tested in tests/merkle/test_gpu.py)")
        return 0
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    result = run(torch.device("cuda"), args.sizes, check_max=0 if args.no_check else args.check_max)
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
