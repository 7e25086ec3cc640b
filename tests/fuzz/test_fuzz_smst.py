"""Fuzzing the SMST (issue 12): bad arguments, aliasing buffers and other threads changing inputs.

Cases that could crash the interpreter (a segfault in the C++ core) run in a subprocess that must
exit cleanly; the rest run in-process with hypothesis against the pure-Python oracle (same
exceptions, same state). Bounded: a few seconds each.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpoc_kernels._native import native

ROOT = Path(__file__).resolve().parents[2]
needs_native = pytest.mark.skipif(native() is None, reason="cpoc_kernels._C not built")

PRELUDE = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from cpoc_kernels.merkle import SMST, verify_proofs, oracle

    def tree(n, seed=0):
        rng = np.random.default_rng(seed)
        nonces = rng.choice(2**24, n, replace=False).astype(np.int32)
        t = SMST()
        t.extend(nonces, rng.integers(0, 256, (n, 24), dtype=np.uint8))
        assert t.native
        return t

    def consistent(t):
        # every leaf once, every sampled proof verifies against the tree's own root
        arrivals = [t.arrival_leaf(i)[0] for i in range(t.count)]
        assert len(set(arrivals)) == t.count, (len(set(arrivals)), t.count)
        idx = np.arange(0, t.count, max(1, t.count // 300))
        nonces, vectors = t.artifacts(idx)
        leaf = np.stack([np.frombuffer(oracle.leaf_data(int(n), v), np.uint8) for n, v in zip(nonces, vectors)])
        assert verify_proofs(t.root, t.count, idx, nonces, leaf, t.proofs(idx)).all()
""")


def run_script(body: str, timeout: float = 120) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative = killed by a signal)\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("OK"), proc.stdout[-2000:]
    return proc.stdout


@needs_native
def test_proofs_out_aliasing_or_overlapping_the_indices():
    """Regression: `out` sharing memory with `dense_indices` segfaulted for 2-63 indices."""
    run_script("""
        t = tree(5000)
        D = t.depth
        for n in list(range(1, 64)) + [64, 65, 200, 1000]:
            for shift in (0, 8, 36, 100):  # idx at the start of out, or overlapping later bytes
                buf = np.zeros(n * D * 36 + shift + 8 * n, np.uint8)
                out = buf[:n * D * 36].reshape(n, D, 36)
                idx = buf[shift:shift + 8 * n].view(np.uint64)
                want = np.random.default_rng(n).integers(0, t.count, n).astype(np.uint64)
                idx[:] = want
                expected = t.proofs(want.copy())
                got = t.proofs(idx, out=out)
                assert got is out and np.array_equal(out, expected), (n, shift)
        print("OK")
    """)


@needs_native
def test_another_thread_changing_the_indices_during_proofs():
    """Regression: a second thread rewriting `idx` crashed proofs() within 30 s."""
    run_script("""
        t = tree(20000)
        n = 4000
        a = np.random.default_rng(1).integers(0, t.count, n).astype(np.uint64)
        b = np.random.default_rng(2).integers(0, t.count, n).astype(np.uint64)
        huge = np.full(n, 2**40, np.uint64)
        pa, pb = t.proofs(a), t.proofs(b)
        idx = a.copy()
        stop = False
        def flip():
            k = 0
            while not stop:
                idx[:] = (a, b, huge)[k % 3]
                k += 1
        th = threading.Thread(target=flip)
        th.start()
        end = time.time() + 3
        ok = errors = 0
        while time.time() < end:
            try:
                got = t.proofs(idx)
            except IndexError:
                errors += 1
                continue
            rows_a = (got == pa).all(axis=(1, 2))
            rows_b = (got == pb).all(axis=(1, 2))
            assert (rows_a | rows_b).all()
            ok += 1
        stop = True
        th.join()
        print(ok, errors, "OK")
    """)


@needs_native
def test_another_thread_changing_the_nonces_during_extend():
    """Regression: extend() checked the caller's nonces, released the GIL and read them again, so a
    duplicate got in (200 001 leaves, 200 000 unique; every sampled proof then failed)."""
    run_script("""
        rng = np.random.default_rng(3)
        t = SMST()
        base = rng.choice(2**24, 4000, replace=False).astype(np.int32)
        t.extend(base, rng.integers(0, 256, (4000, 24), dtype=np.uint8))
        stop = False
        batch = np.zeros(20000, np.int32)
        def scribble():
            r = np.random.default_rng(4)
            while not stop:
                batch[r.integers(0, 20000, 64)] = base[r.integers(0, 4000, 64)]  # duplicates of leaves in the tree
        th = threading.Thread(target=scribble)
        th.start()
        accepted = rejected = 0
        for k in range(40):
            fresh = (2**24 + k * 20000 + np.arange(20000)).astype(np.int32)
            batch[:] = fresh
            before = t.count
            try:
                t.extend(batch, np.zeros((20000, 24), np.uint8))
                accepted += 1
            except ValueError:
                assert t.count == before
                rejected += 1
        stop = True
        th.join()
        consistent(t)
        print(accepted, rejected, "OK")
    """)


@needs_native
def test_random_bad_calls_never_crash_and_leave_the_tree_unchanged():
    run_script("""
        t = tree(3000)
        state = (t.count, t.depth, t.root)
        rng = np.random.default_rng(11)
        dtypes = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint64, np.float32, np.float16, bool]
        def rand_array():
            shape = tuple(int(x) for x in rng.integers(0, 5, rng.integers(0, 4)))
            a = rng.integers(-2**40, 2**40, shape) if rng.random() < 0.5 else rng.integers(0, 4000, shape)
            return a.astype(dtypes[rng.integers(len(dtypes))]) if a.size or rng.random() < 0.5 else a
        calls = [
            lambda: t.proofs(rand_array()),
            lambda: t.proofs(rand_array(), count=int(rng.integers(-5, 4000))),
            lambda: t.proofs(rand_array(), out=rand_array()),
            lambda: t.artifacts(rand_array(), count=int(rng.integers(-5, 4000))),
            lambda: t.extend(rand_array(), rand_array()),
            lambda: t.extend(rand_array(), [b""] * int(rng.integers(0, 3))),
            lambda: t.snapshot_root(int(rng.integers(-2**40, 2**40))),
            lambda: t.snapshot_roots(list(rng.integers(-5, 5000, 4))),
            lambda: t.proof(int(rng.integers(-2**63, 2**63 - 1)), count=int(rng.integers(-5, 4000))),
            lambda: t.insert(int(rng.integers(-2**40, 2**40)), bytes(int(rng.integers(0, 3)))),
        ]
        for k in range(1500):
            call = calls[k % len(calls)]
            snap = (t.count, t.depth, t.root)
            try:
                call()
            except (TypeError, ValueError, KeyError, IndexError, OverflowError):
                assert (t.count, t.depth, t.root) == snap
        consistent(t)
        print("OK")
    """)


# ---------------------------------------------------------------- in-process: native vs oracle

OPS = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.integers(-(2**31) - 2, 2**31 + 1), st.binary(max_size=30)),
    st.tuples(st.just("extend"), st.lists(st.integers(-40, 2**25), max_size=8), st.binary(min_size=0, max_size=3)),
    st.tuples(st.just("proof"), st.integers(-3, 40), st.one_of(st.none(), st.integers(-2, 40))),
    st.tuples(st.just("proofs"), st.lists(st.integers(-3, 40), max_size=6), st.one_of(st.none(), st.integers(-2, 40))),
    st.tuples(st.just("root"), st.integers(-2, 40), st.none()),
    st.tuples(st.just("artifact"), st.integers(-3, 40), st.one_of(st.none(), st.integers(-2, 40))),
), max_size=25)


def _apply(t, op):
    kind, a, b = op
    if kind == "insert":
        return t.insert(a, b)
    if kind == "extend":
        return t.extend(a, [b] * len(a))
    if kind == "proof":
        return b"".join(t.proof(a, count=b))
    if kind == "proofs":
        return t.proofs(np.array(a, dtype=np.int64), count=b).tobytes()
    if kind == "root":
        return t.snapshot_root(a)
    return t.artifact(a, count=b)


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_operation_sequences_match_the_oracle(ops):
    import cpoc_kernels.merkle.smst as smst_module
    from cpoc_kernels.merkle import SMST

    t = SMST()
    real_native = smst_module.native
    smst_module.native = lambda: None
    try:
        ref = SMST()
    finally:
        smst_module.native = real_native
    assert t.native and not ref.native
    for op in ops:
        outcome = []
        for tree in (t, ref):
            try:
                outcome.append(("ok", _apply(tree, op)))
            except Exception as exc:  # noqa: BLE001 - compared below
                outcome.append(("error", type(exc)))
        assert outcome[0] == outcome[1], op
        assert (t.count, t.depth, t.root) == (ref.count, ref.depth, ref.root)
