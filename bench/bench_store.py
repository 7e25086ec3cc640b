"""ArtifactStore at the network's design load (default 5 M records): flush, proofs at earlier counts, reopen, memory.

    python bench/bench_store.py [--records 5000000] [--layout partition|random24] [--flush-every 100000]

Workloads (say which when quoting):
- ``partition``: the network's nonce layout, nonce = node_id + group_id*node_count + x*(n_groups*node_count)
  (pocv2_protocol.md §4), for a host running node_id 0..3 of node_count 16 in group 0 of n_groups 2: four
  interleaved increasing streams, nonces spread to ~8x the count (past 2**24: depth 26 at 5 M).
- ``random24``: the network Go benchmark's inputs (distinct random 24-bit nonces, random arrival order).
The store is filled in batches of 1 000 records with a flush every ``--flush-every`` records (the network
flushes every 5 s; 100 000 is 5 s at 20 K artifacts/s), fsync on, on a local temp directory. Then:
- flush after 1 000 new records: median and max of ``--rounds`` rounds;
- 1 000 proofs (random dense indices) at earlier flushed counts (first, 25 %, 50 %, 75 %, last), each proof
  checked with the network's verifier outside the timing;
- reopen (every record checked against its checksum, every flushed root recomputed), in a fresh process that
  also reports its peak RSS; peak RSS of the filling process.
The network's Go store (``smst-phase-4.md``, Ryzen 9950X, its own workload): insert 355 K/s in memory,
187 K/s with flush, proofs 823 K/s, recovery ~3 s per 1 M leaves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpoc_kernels.merkle import ArtifactStore, verify_artifact_proof  # noqa: E402


def nonces_for(layout: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if layout == "random24":
        return rng.permutation(rng.choice(2**24, n, replace=False)).astype(np.int32)
    if layout == "partition":
        node_count, n_groups, group_id, nodes = 16, 2, 0, 4
        per_node = -(-n // nodes)
        x = np.arange(per_node, dtype=np.int64)
        streams = [node + group_id * node_count + x * (n_groups * node_count) for node in range(nodes)]
        # nodes deliver in batches of 250 of their own stream, interleaved
        batches = [s[i:i + 250] for i in range(0, per_node, 250) for s in streams]
        return np.concatenate(batches)[:n].astype(np.int32)
    raise ValueError(f"unknown layout {layout!r}")


def vectors(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 12)).astype("<f2").view(np.uint8).reshape(n, 24)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_reopen(directory: str, probe_counts: list[int]) -> None:
    """Reopens and serves proofs in a fresh process; prints JSON (its peak RSS is the serving footprint)."""
    t0, c0 = time.perf_counter(), time.process_time()
    store = ArtifactStore(directory, flush_interval_s=None)
    reopen_s, reopen_cpu = time.perf_counter() - t0, time.process_time() - c0
    rng = np.random.default_rng(7)
    proofs = {}
    for count in probe_counts:
        times = []
        for _ in range(3):
            dense = rng.integers(0, count, 1000).tolist()
            t0, c0 = time.perf_counter(), time.process_time()
            served = store.artifacts_and_proofs(dense, count)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        root = store.root_at(count)
        assert all(verify_artifact_proof(root, count, s.leaf_index, s.nonce, s.vector, s.proof) for s in served)
        proofs[count] = times
    store.close()
    print(json.dumps({"reopen_s": reopen_s, "reopen_cpu": reopen_cpu, "proofs": proofs, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5_000_000)
    ap.add_argument("--layout", choices=["partition", "random24"], default="partition")
    ap.add_argument("--flush-every", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="store directory (default: a fresh temp dir, removed after)")
    ap.add_argument("--child-reopen", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_reopen:
        child_reopen(args.child_reopen[0], [int(c) for c in args.child_reopen[1:]])
        return

    n, extra = args.records, 1000 * args.rounds
    nonces, rows = nonces_for(args.layout, n + extra), vectors(n + extra)
    tmp = tempfile.TemporaryDirectory(prefix="bench_store_") if args.dir is None else None
    directory = Path(args.dir or tmp.name) / "stage"
    store = ArtifactStore(directory, flush_interval_s=None)
    t0, c0 = time.perf_counter(), time.process_time()
    flush_s = []
    for start in range(0, n, 1000):
        store.extend(nonces[start:start + 1000], rows[start:start + 1000])
        if (start + 1000) % args.flush_every == 0 or start + 1000 >= n:
            t1 = time.perf_counter()
            store.flush()
            flush_s.append(time.perf_counter() - t1)
    fill_s, fill_cpu = time.perf_counter() - t0, time.process_time() - c0
    small, small_cpu = [], []
    for r in range(args.rounds):
        store.extend(nonces[n + 1000 * r:n + 1000 * (r + 1)], rows[n + 1000 * r:n + 1000 * (r + 1)])
        t1, c1 = time.perf_counter(), time.process_time()
        store.flush()
        small.append(time.perf_counter() - t1)
        small_cpu.append(time.process_time() - c1)
    counts = [c for c, _ in store.flushed]
    store.close()
    fill_rss = peak_rss_mb()
    probes = sorted({counts[0], counts[len(counts) // 4], counts[len(counts) // 2], counts[3 * len(counts) // 4],
                     counts[-2], counts[-1]})
    out = subprocess.run([sys.executable, __file__, "--child-reopen", str(directory), *map(str, probes)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = json.loads(out.stdout.strip().splitlines()[-1])
    total = n + extra
    lines = [
        f"machine: {platform.processor() or platform.machine()} / {os.cpu_count()} cpus; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f} "
        f"(wall times on a shared machine; CPU seconds of this process in brackets)",
        f"workload: {args.layout}, {total:,} records, flush every {args.flush_every:,}, batches of 1000, fsync on",
        f"fill: {fill_s:.1f} s [{fill_cpu:.1f} s] = {n / fill_s / 1e3:.0f} K records/s "
        f"[{n / fill_cpu / 1e3:.0f} K/s] including {len(flush_s)} flushes "
        f"(flush median {statistics.median(flush_s) * 1e3:.0f} ms, max {max(flush_s) * 1e3:.0f} ms)",
        f"flush after 1000 new records: median {statistics.median(small) * 1e3:.1f} ms "
        f"[{statistics.median(small_cpu) * 1e3:.1f} ms], max {max(small) * 1e3:.1f} ms ({args.rounds} rounds)",
    ]
    for count, times in child["proofs"].items():
        wall, cpu = [t for t, _ in times], [c for _, c in times]
        lines.append(f"1000 proofs at flushed count {int(count):,}: median {statistics.median(wall) * 1e3:.0f} ms "
                     f"[{statistics.median(cpu) * 1e3:.0f} ms], max {max(wall) * 1e3:.0f} ms")
    lines += [
        f"reopen (checksums + every one of {len(counts)} roots recomputed): {child['reopen_s']:.2f} s "
        f"[{child['reopen_cpu']:.2f} s] = {child['reopen_s'] / (total / 1e6):.2f} s per 1 M records "
        f"[{child['reopen_cpu'] / (total / 1e6):.2f} s]",
        f"peak RSS: filling process {fill_rss:.0f} MB (inputs included), reopen+serve process "
        f"{child['peak_rss_mb']:.0f} MB",
    ]
    print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
