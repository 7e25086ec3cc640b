"""1 M inserts + root: the C++ SMST against the network's Go SMST, side by side on the same inputs.

Workloads (1 M leaves, 24-byte finite fp16 vectors, random arrival order):
- ``random24``: 1 M distinct random nonces below 2**24 (the Go figure's workload; D = 24);
- ``partition``: the network's nonce layout, nonce = node_id + group*node_count + x*n_groups*node_count,
  node_count 32, n_groups 8, two active nodes (3, 17), 16 streams at rates 0.8-1.2x, arrivals in time
  order (max nonce ~1.9e7 > 2**24: D = 25);
- ``dense``: a random permutation of 0..N-1 (the earlier, easiest comparison).

Ours: ``SMST.extend(nonces int32 array, vectors uint8 [n, 24])`` then ``.root``, medians of --rounds.
Go: ``--go PATH`` runs bench/go_smst (see its README) on the very same bytes; roots are compared.
Both wall time and CPU time (all threads) are printed: on a shared machine the CPU time is the
steadier measure of work.
Run: python bench/smst_vs_go.py [--go bench/go_smst/gobench] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import tempfile
import time

import numpy as np

from cpoc_kernels._native import native
from cpoc_kernels.merkle import SMST

N = 1_000_000


def partition_nonces(n: int, node_ids=(3, 17), node_count: int = 32, n_groups: int = 8, seed: int = 0):
    """The network's layout: nonce = node_id + group*node_count + x*n_groups*node_count, streams at
    different rates, arrivals interleaved in time (int32, ``n`` distinct nonces)."""
    rng = np.random.default_rng(seed)
    streams = [(nid, g) for nid in node_ids for g in range(n_groups)]
    rates = rng.uniform(0.8, 1.2, len(streams))
    per = np.floor(rates / rates.sum() * n).astype(int)
    per[0] += n - per.sum()
    nonces = np.concatenate([nid + g * node_count + np.arange(m) * n_groups * node_count
                             for (nid, g), m in zip(streams, per)])
    t = np.concatenate([np.arange(m) / r for m, r in zip(per, rates)])
    return nonces[np.argsort(t, kind="stable")].astype(np.int32)


def workloads(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "random24": rng.choice(2**24, n, replace=False).astype(np.int32),
        "partition": partition_nonces(n),
        "dense": rng.permutation(n).astype(np.int32),
    }


def time_ours(nonces, vectors, rounds: int) -> tuple[float, float, bytes]:
    """(median wall s, median CPU s of the whole process, root)."""
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        t = SMST()
        t.extend(nonces, vectors)
        root = t.root
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), root


def time_go(binary: str, nonces, vectors, rounds: int) -> tuple[float, float, bytes]:
    """(median wall s, mean CPU s per round of the Go process, all its threads, root)."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(nonces.astype("<i4").tobytes() + vectors.tobytes())
        f.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([binary, f.name, str(rounds)], capture_output=True, text=True, check=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / rounds
    median = float(re.search(r"median ([0-9.]+) s", out).group(1))
    root = bytes.fromhex(re.search(r"root ([0-9a-f]{64})", out).group(1))
    return median, cpu, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--go", help="the bench/go_smst binary (omit to time ours only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--go-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workloads", nargs="+", default=["random24", "partition", "dense"])
    ap.add_argument("-n", type=int, default=N)
    args = ap.parse_args()
    lib = native()
    if lib is None:
        raise SystemExit("cpoc: error: cpoc_kernels._C is not built")
    vectors = np.random.default_rng(1).standard_normal((args.n, 12)).astype("<f2").view(np.uint8)
    for name, nonces in workloads(args.n).items():
        if name not in args.workloads:
            continue
        depth = max(24, int(nonces.astype(np.uint32).max()).bit_length())
        line = f"{name:10s} D={depth}"
        ours = {}
        for threads in args.threads:
            lib.smst_set_threads(threads)
            wall, cpu, root = time_ours(nonces, vectors, args.rounds)
            ours[threads] = (wall, cpu)
            line += f"  ours[{threads} thr] wall {wall:.3f} s cpu {cpu:.3f} s"
        if args.go:
            go_wall, go_cpu, go_root = time_go(args.go, nonces, vectors, args.go_rounds)
            assert go_root == root, "Go and C++ roots differ"
            line += f"  Go wall {go_wall:.2f} s cpu {go_cpu:.2f} s  ratios wall/cpu: " + "  ".join(
                f"[{k} thr] {go_wall / w:.1f}x/{go_cpu / c:.1f}x" for k, (w, c) in ours.items())
        print(line, flush=True)


if __name__ == "__main__":
    main()
