"""The public SMST API (C++ core and pure-Python fallback) against the golden vectors and the oracle."""
import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from cpoc_kernels._native import native
from cpoc_kernels.merkle import (
    EMPTY_HASHES,
    SMST,
    ProofRejected,
    check_proof,
    oracle,
    verify_proof,
    verify_proofs,
)

from ._golden import arrival, case_id, elements, golden_trees, tree_ids, verifier_cases

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from smst_vs_go import partition_nonces  # noqa: E402  (the network's nonce layout, as the Go comparison uses it)


def build(tree, batch: bool = False) -> SMST:
    t = SMST()
    leaves = arrival(tree)
    if batch:
        t.extend([n for n, _ in leaves], [v for _, v in leaves])
    else:
        for nonce, vector in leaves:
            t.insert(nonce, vector)
    return t


def state(t: SMST):
    return (t.count, t.depth, t.root)


# ------------------------------------------------------------------------------ native primitives

@pytest.mark.parametrize("length", [0, 1, 28, 29, 54, 55, 56, 63, 64, 65, 119, 120, 200, 1000])
def test_native_sha256_matches_hashlib(sha_backend, length):
    lib = native()
    data = os.urandom(length)
    assert lib.sha256(data) == hashlib.sha256(data).digest()
    assert lib.smst_leaf_hash(data) == oracle.leaf_hash(data)


def test_native_node_and_empty_hashes(sha_backend, smst_golden):
    lib = native()
    left, right = os.urandom(32), os.urandom(32)
    for count in (0, 1, 0xFFFFFFFF):
        assert lib.smst_node_hash(left, right, count) == oracle.node_hash(left, right, count)
    assert [h.hex() for h in lib.smst_empty_hashes()] == smst_golden["empty_hashes"]
    with pytest.raises(ValueError, match="32 bytes"):
        lib.smst_node_hash(left[:31], right, 1)


# ------------------------------------------------------------------------------ golden trees

@pytest.mark.parametrize("batch", [False, True], ids=["insert", "extend"])
@pytest.mark.parametrize("tree", golden_trees(), ids=tree_ids())
def test_golden_tree_roots_proofs_artifacts(smst_backend, tree, batch):
    t = build(tree, batch)
    assert t.native == (smst_backend == "native")
    assert (t.count, t.depth, t.root.hex()) == (tree["count"], tree["depth"], tree["root"])
    for p in tree["proofs"]:
        assert t.proof(p["dense_index"]) == elements(p["proof_hex"])
    for i, leaf in enumerate(tree["leaves"]):
        assert t.artifact(i) == (leaf["nonce"], bytes.fromhex(leaf["vector_hex"]))


@pytest.mark.parametrize("tree", golden_trees(), ids=tree_ids())
def test_golden_snapshots(smst_backend, tree):
    t = build(tree)
    for snap in tree["snapshots"]:
        assert t.snapshot_root(snap["count"]).hex() == snap["root"]
        assert t.snapshot_depth(snap["count"]) == snap["depth"]
        for p in snap.get("proofs", []):
            assert t.proof(p["dense_index"], count=snap["count"]) == elements(p["proof_hex"])
            nonce, vector = t.artifact(p["dense_index"], count=snap["count"])
            assert oracle.leaf_data(nonce, vector).hex() == p["leaf_data_hex"]


def test_golden_trees_both_sha_backends(sha_backend):
    for tree in golden_trees():
        t = build(tree, batch=True)
        assert t.root.hex() == tree["root"]
        for snap in tree["snapshots"]:
            assert t.snapshot_root(snap["count"]).hex() == snap["root"]


@pytest.mark.parametrize("case", verifier_cases(), ids=case_id)
def test_verifier_matches_go(smst_backend, case):
    args = (bytes.fromhex(case["root"]), case["count"], case["dense_index"], case["nonce"],
            bytes.fromhex(case["leaf_data_hex"]), elements(case["proof_hex"]))
    assert verify_proof(*args) == case["expected_valid"]
    if case["expected_valid"]:
        check_proof(*args)
    else:
        with pytest.raises(ProofRejected, match="SMST proof rejected"):
            check_proof(*args)


def test_bulk_verify_golden_proofs(smst_backend):
    for tree in golden_trees():
        if not tree["proofs"]:
            continue
        t = build(tree)
        idx = np.array([p["dense_index"] for p in tree["proofs"]])
        proofs = t.proofs(idx)
        assert proofs.shape == (len(idx), tree["depth"], 36)
        for row, p in zip(proofs, tree["proofs"]):
            assert row.tobytes().hex() == "".join(p["proof_hex"])
        nonces = np.array([p["nonce"] for p in tree["proofs"]], dtype=np.int32)
        leaf = np.stack([np.frombuffer(bytes.fromhex(p["leaf_data_hex"]), np.uint8) for p in tree["proofs"]])
        ok = verify_proofs(t.root, t.count, idx, nonces, leaf, proofs)
        assert ok.all()
        bad = proofs.copy()
        bad[0, -1, 0] ^= 1
        assert verify_proofs(t.root, t.count, idx, nonces, leaf, bad).tolist() == [False] + [True] * (len(idx) - 1)


# ------------------------------------------------------------------------------ against the oracle

def random_leaves(rng: random.Random, n: int, nonce_bits: int = 20, signed: bool = False):
    pool = set()
    while len(pool) < n:
        x = rng.getrandbits(nonce_bits)
        if signed:
            x -= 2 ** (nonce_bits - 1)
        pool.add(x)
    nonces = list(pool)
    rng.shuffle(nonces)
    return [(x, os.urandom(rng.choice([1, 24, 24, 57, 257]))) for x in nonces]


def test_incremental_roots_match_oracle(smst_backend):
    """Roots after each batch (the native tree reuses clean subtrees between roots), deepening included."""
    rng = random.Random(7)
    leaves = random_leaves(rng, 300, 20) + [(1 << 24, b"x"), (-5, b"y")] + random_leaves(rng, 200, 32, True)
    seen, unique = set(), []
    for n, v in leaves:
        if (n & 0xFFFFFFFF) not in seen:
            seen.add(n & 0xFFFFFFFF)
            unique.append((n, v))
    t, ref = SMST(), oracle.OracleSMST()
    pos = 0
    for size in (1, 2, 50, 1, 200, 48, 2, 100, 96):
        chunk = unique[pos:pos + size]
        pos += size
        t.extend([n for n, _ in chunk], [v for _, v in chunk])
        ref.extend([n for n, _ in chunk], [v for _, v in chunk])
        assert (t.count, t.depth, t.root) == (ref.count, ref.depth, ref.root_at(0))
    for c in (1, 3, 53, 300, 301, 302, t.count):
        assert t.snapshot_root(c) == ref.root_at(c)
    for i in rng.sample(range(t.count), 20):
        assert b"".join(t.proof(i)) == ref.proof(i)
        assert t.artifact(i) == ref.artifact(i)
    for i in (0, 1, 52):
        assert b"".join(t.proof(i, count=53)) == ref.proof(i, 53)


def test_bulk_proofs_equal_single_proofs(smst_backend):
    rng = random.Random(3)
    t = SMST()
    leaves = random_leaves(rng, 400, 26)
    t.extend([n for n, _ in leaves], [v for _, v in leaves])
    idx = np.array(rng.sample(range(400), 100) + [0, 399, 0])
    bulk = t.proofs(idx)
    for row, i in zip(bulk, idx):
        assert [row[k].tobytes() for k in range(row.shape[0])] == t.proof(int(i))
    out = np.zeros_like(bulk)
    assert t.proofs(idx, out=out) is out and np.array_equal(out, bulk)
    snap = t.proofs(np.array([0, 5]), count=10)
    assert snap[1].tobytes() == b"".join(t.proof(5, count=10))


def test_fixed_width_and_fp16_extend_equal_bytes_extend(smst_backend):
    rng = np.random.default_rng(1)
    nonces = rng.permutation(5000)[:64].astype(np.int32)
    vec16 = rng.standard_normal((64, 12)).astype(np.float16)
    a, b, c = SMST(), SMST(), SMST()
    a.extend(nonces.tolist(), [v.astype("<f2").tobytes() for v in vec16])
    b.extend(nonces, vec16)
    c.extend(nonces, vec16.view(np.uint8))
    assert a.root == b.root == c.root


# ------------------------------------------------------------------------------ bad input, state intact

def small_tree() -> SMST:
    t = SMST()
    t.extend([3, 1, -7], [b"a" * 24, b"b" * 24, b"c" * 24])
    return t


def test_duplicate_nonce_rejected_state_intact(smst_backend):
    t = small_tree()
    before = state(t)
    with pytest.raises(ValueError, match="duplicate nonce 1"):
        t.insert(1, b"z")
    with pytest.raises(ValueError, match="duplicate nonce -7"):
        t.insert(2**32 - 7 - 2**32, b"z")
    with pytest.raises(ValueError, match="duplicate nonce 9"):
        t.extend([8, 9, 9], [b"x", b"y", b"z"])
    with pytest.raises(ValueError, match="duplicate nonce 3"):
        t.extend(np.array([10, 3], np.int32), np.ones((2, 24), np.uint8))
    assert state(t) == before and 8 not in t and 10 not in t
    t.insert(8, b"x")  # the rejected batch left no trace
    assert t.count == 4


def test_empty_vector_and_bad_nonce_rejected(smst_backend):
    t = small_tree()
    before = state(t)
    with pytest.raises(ValueError, match="empty vector"):
        t.insert(5, b"")
    with pytest.raises(ValueError, match="empty vector"):
        t.extend([5, 6], [b"x", b""])
    with pytest.raises(ValueError, match="empty"):
        t.extend([5, 6], np.zeros((2, 0), np.uint8))
    with pytest.raises(ValueError, match="int32"):
        t.insert(2**31, b"x")
    with pytest.raises(ValueError, match="int32"):
        t.extend([5, 2**40], [b"x", b"y"])
    with pytest.raises(TypeError):
        t.insert(5, "text")
    with pytest.raises(ValueError, match="same length|vectors"):
        t.extend([5, 6], [b"x"])
    assert state(t) == before and 5 not in t


def test_index_and_snapshot_errors(smst_backend):
    t = small_tree()
    before = state(t)
    with pytest.raises(IndexError, match="dense index 3"):
        t.proof(3)
    with pytest.raises(IndexError):
        t.proof(-1)
    with pytest.raises(IndexError, match="dense index 1"):
        t.proof(1, count=1)
    with pytest.raises(IndexError):
        t.artifact(3)
    with pytest.raises(IndexError):
        t.proofs(np.array([0, 3]))
    for bad in (0, 4, -1):
        with pytest.raises(KeyError, match="no snapshot"):
            t.snapshot_root(bad)
        with pytest.raises(KeyError, match="no snapshot"):
            t.proof(0, count=bad)
    assert state(t) == before


def test_empty_tree():
    t = SMST()
    assert (t.count, t.depth, t.root) == (0, 24, EMPTY_HASHES[24])
    with pytest.raises(IndexError):
        t.proof(0)
    with pytest.raises(KeyError):
        t.snapshot_root(0)


def test_verify_malformed_inputs(smst_backend):
    t = small_tree()
    proof = t.proof(0)
    nonce, vector = t.artifact(0)
    leaf = oracle.leaf_data(nonce, vector)
    assert verify_proof(t.root, 3, 0, nonce, leaf, proof)
    cases = {
        "not 36 bytes": proof[:5] + [proof[5][:35]] + proof[6:],
        "empty proof": [],
        "longer than 32": [proof[0]] * 9 + proof,
    }
    for reason, bad in cases.items():
        assert not verify_proof(t.root, 3, 0, nonce, leaf, bad)
        with pytest.raises(ProofRejected, match=reason):
            check_proof(t.root, 3, 0, nonce, leaf, bad)
    with pytest.raises(ProofRejected, match="dense index >= count"):
        check_proof(t.root, 3, 3, nonce, leaf, proof)
    with pytest.raises(ProofRejected, match="count is 0"):
        check_proof(t.root, 0, 0, nonce, leaf, proof)
    with pytest.raises(ValueError, match="root must be 32 bytes"):
        verify_proof(t.root[:31], 3, 0, nonce, leaf, proof)
    with pytest.raises(ValueError, match="int32"):
        verify_proof(t.root, 3, 0, 2**31, leaf, proof)
    with pytest.raises(TypeError):
        verify_proof(t.root, 3, 0, nonce, leaf, ["x" * 36] * 24)


def test_concurrent_writers_and_readers_keep_the_tree_consistent():
    """The C++ core releases the GIL for bulk work and locks per tree: threads may share one SMST."""
    import threading

    rng = np.random.default_rng(9)
    nonces = rng.permutation(40_000).astype(np.int32)
    vectors = rng.integers(0, 256, (40_000, 24), dtype=np.uint8)
    t = SMST()
    errors = []

    def writer(part):
        try:
            for chunk in np.array_split(part, 20):
                t.extend(nonces[chunk], vectors[chunk])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(20):
                c = t.count
                if c:
                    assert len(t.snapshot_root(c)) == 32
                    t.proofs(np.arange(min(c, 50)), count=c)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    halves = np.array_split(np.arange(40_000), 2)
    threads = [threading.Thread(target=writer, args=(h,)) for h in halves] + [threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    ref = SMST()
    ref.extend(np.sort(nonces), vectors[np.argsort(nonces)])
    assert (t.count, t.root) == (40_000, ref.root)


# ------------------------------------------------------------------------------ one tree, three ways

@pytest.mark.parametrize("layout", ["partition", "random32"])
def test_bulk_incremental_and_snapshot_paths_agree(sha_backend, layout):
    """The bulk build, the incremental insert path and the snapshot recomputation are three code paths
    in the C++ core: a tree grown batch by batch equals one built at once, and a snapshot read from
    the grown tree equals a tree built from that prefix alone (roots, proofs, artifacts)."""
    n = 30_000
    rng = np.random.default_rng(5)
    nonces = partition_nonces(n) if layout == "partition" else \
        (rng.choice(2**32, n, replace=False) - 2**31).astype(np.int32)
    vectors = rng.integers(0, 256, (n, 24), dtype=np.uint8)
    bulk = SMST()
    bulk.extend(nonces, vectors)
    grown = SMST()
    for lo in range(0, n, 700):  # 700 < 4096: every batch after the first goes through the insert path
        grown.extend(nonces[lo:lo + 700], vectors[lo:lo + 700])
        _ = grown.root
    assert grown.root == bulk.root
    counts = [1, 2, 699, 701, 12_345, n - 1]
    replay = SMST()
    replay.extend(nonces, vectors)
    roots = replay.snapshot_roots(counts + [n])
    for c, r in zip(counts, roots):
        prefix = SMST()
        prefix.extend(nonces[:c], vectors[:c])
        assert bulk.snapshot_root(c) == prefix.root == r
        assert bulk.snapshot_depth(c) == prefix.depth
        idx = rng.integers(0, c, 50)
        assert np.array_equal(bulk.proofs(idx, count=c), prefix.proofs(idx))
        got_n, got_v = bulk.artifacts(idx, count=c)
        exp = [prefix.artifact(int(i)) for i in idx]
        assert got_n.tolist() == [e[0] for e in exp] and got_v == [e[1] for e in exp]
    assert roots[-1] == bulk.root


def test_thread_count_does_not_change_bytes():
    lib = native()
    if lib is None:
        pytest.skip("cpoc_kernels._C not built")
    rng = np.random.default_rng(8)
    nonces = rng.choice(2**24, 60_000, replace=False).astype(np.int32)
    vectors = rng.integers(0, 256, (60_000, 24), dtype=np.uint8)
    before = lib.smst_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            lib.smst_set_threads(threads)
            t = SMST()
            t.extend(nonces, vectors)
            results.append((t.root, t.proofs(np.arange(0, 60_000, 7)).tobytes()))
    finally:
        lib.smst_set_threads(before)
    assert results[0] == results[1] == results[2]


def test_oracle_agrees_on_the_partition_layout(smst_backend):
    nonces = partition_nonces(3000)
    vectors = [bytes([i % 251]) * 24 for i in range(3000)]
    t, ref = SMST(), oracle.OracleSMST()
    for lo in range(0, 3000, 1000):
        t.extend(nonces[lo:lo + 1000], vectors[lo:lo + 1000])
    ref.extend([int(x) for x in nonces], vectors)
    assert (t.depth, t.root) == (ref.depth, ref.root_at(0))
    assert t.snapshot_root(1500) == ref.root_at(1500)
    assert b"".join(t.proof(700, count=1500)) == ref.proof(700, 1500)


# ------------------------------------------------------------------------------ same API, same errors

def test_snapshot_root_needs_a_count(smst_backend):
    t = small_tree()
    for bad in (None, 1.0, "2", True):
        with pytest.raises(TypeError, match="count must be an integer"):
            t.snapshot_root(bad)
        with pytest.raises(TypeError):
            t.snapshot_depth(bad)


BAD_CALLS = [
    ("proof(3)", lambda t: t.proof(3)),
    ("proof(2**64)", lambda t: t.proof(2**64)),
    ("proof(-1)", lambda t: t.proof(-1)),
    ("proof(1, count=1)", lambda t: t.proof(1, count=1)),
    ("proof(0, count=2**70)", lambda t: t.proof(0, count=2**70)),
    ("proof(0, count=0)", lambda t: t.proof(0, count=0)),
    ("proof(1.0)", lambda t: t.proof(1.0)),
    ("proof(True)", lambda t: t.proof(True)),
    ("artifact(3)", lambda t: t.artifact(3)),
    ("artifact(2**63)", lambda t: t.artifact(2**63)),
    ("artifacts([0, 3])", lambda t: t.artifacts([0, 3])),
    ("proofs([0, 3])", lambda t: t.proofs(np.array([0, 3]))),
    ("proofs([2**64-1])", lambda t: t.proofs(np.array([2**64 - 1], np.uint64))),
    ("proofs([-1])", lambda t: t.proofs([-1])),
    ("proofs([[0]])", lambda t: t.proofs([[0]])),
    ("proofs([0.5])", lambda t: t.proofs([0.5])),
    ("proofs(out=wrong shape)", lambda t: t.proofs([0], out=np.zeros((1, 23, 36), np.uint8))),
    ("proofs(out=int32)", lambda t: t.proofs([0], out=np.zeros((1, 24, 36), np.int32))),
    ("proofs(count=5)", lambda t: t.proofs([0], count=5)),
    ("snapshot_root(0)", lambda t: t.snapshot_root(0)),
    ("snapshot_root(4)", lambda t: t.snapshot_root(4)),
    ("snapshot_root(-1)", lambda t: t.snapshot_root(-1)),
    ("snapshot_roots([1, 9])", lambda t: t.snapshot_roots([1, 9])),
    ("snapshot_depth(2**40)", lambda t: t.snapshot_depth(2**40)),
    ("arrival_leaf(3)", lambda t: t.arrival_leaf(3)),
    ("arrival_leaf(-1)", lambda t: t.arrival_leaf(-1)),
    ("insert(2**31)", lambda t: t.insert(2**31, b"x")),
    ("insert(1.5)", lambda t: t.insert(1.5, b"x")),
    ("insert(str vector)", lambda t: t.insert(5, "x")),
    ("insert(duplicate)", lambda t: t.insert(3, b"x")),
    ("insert(empty)", lambda t: t.insert(5, b"")),
    ("extend(float nonces)", lambda t: t.extend([1.5], [b"x"])),
    ("extend(2-D nonces)", lambda t: t.extend([[5]], [b"x"])),
    ("extend(lengths differ)", lambda t: t.extend([5, 6], [b"x"])),
    ("extend(uint16 rows)", lambda t: t.extend([5], np.zeros((1, 12), np.uint16))),
    ("extend(dup in batch)", lambda t: t.extend([5, 5], [b"x", b"y"])),
    ("contains(2**32)", lambda t: 2**32 in t),
]


def _error_of(call, backend_native: bool, monkeypatch):
    import cpoc_kernels.merkle.smst as smst_module

    if not backend_native:
        monkeypatch.setattr(smst_module, "native", lambda: None)
    t = small_tree()
    before = state(t)
    try:
        call(t)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        assert state(t) == before
        return type(exc)
    finally:
        monkeypatch.undo()
    return None


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_native_and_oracle_raise_the_same_exception(name, call, monkeypatch):
    if native() is None:
        pytest.skip("cpoc_kernels._C not built")
    got_native = _error_of(call, True, monkeypatch)
    got_oracle = _error_of(call, False, monkeypatch)
    assert got_native is not None, f"{name} did not raise"
    assert got_native is got_oracle, f"{name}: native {got_native.__name__}, oracle {got_oracle}"
    assert issubclass(got_native, (TypeError, ValueError, KeyError, IndexError))
