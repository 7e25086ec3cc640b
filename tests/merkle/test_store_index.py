"""The store's count-indexed commitment bookkeeping against the SMST (C++ core) and the hashlib oracle."""
import numpy as np
import pytest

import cpoc_kernels.merkle.store_index as store_index
from cpoc_kernels.merkle import SMST, oracle
from cpoc_kernels.merkle.store_index import CommitmentIndex

LAYOUTS = {
    "random24": lambda rng, n: rng.choice(2**24, n, replace=False),
    "dense": lambda rng, n: np.arange(n),
    "partition": lambda rng, n: 3 + 7 * np.arange(n),  # node_id + group_id*node_count + x*(n_groups*node_count)
    "deepening": lambda rng, n: np.concatenate([np.arange(n - 3), [2**24, 2**30 + 5, -1]]),  # D 24 -> 25 -> 31 -> 32
    "int32": lambda rng, n: rng.choice(2**32, n, replace=False) - 2**31,
}


def records(layout, n, seed=0):
    rng = np.random.default_rng(seed)
    nonces = LAYOUTS[layout](rng, n).astype(np.int64).astype(np.int32)
    rng.shuffle(nonces[: n // 2])  # arrival order is not nonce order
    rows = rng.integers(0, 2**14, (n, 12)).astype("<u2").view(np.uint8).reshape(n, 24)
    return nonces, rows


def cuts_for(n, rng):
    inner = sorted(set(rng.integers(1, n, 6).tolist()) | {1, n})
    return inner


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_commits_proofs_and_replay_equal_the_smst(layout):
    n = 3000
    nonces, rows = records(layout, n)
    cuts = cuts_for(n, np.random.default_rng(1))
    tree = SMST()
    tree.extend(nonces, rows)
    live = CommitmentIndex()
    prev = 0
    for c in cuts:
        live.append(nonces[prev:c], rows[prev:c])
        assert live.commit() == (c, tree.snapshot_root(c))
        prev = c
    replayed = CommitmentIndex()
    replayed.append(nonces, rows)
    assert replayed.replay(cuts) == [tree.snapshot_root(c) for c in cuts]
    rng = np.random.default_rng(2)
    for index in (live, replayed):
        for i, c in enumerate(cuts):
            dense = rng.integers(0, c, min(c, 40))
            proofs, arrival, root = index.proofs(i, dense)
            assert root == tree.snapshot_root(c)
            assert np.array_equal(proofs, tree.proofs(dense, count=c))
            assert [index.record(int(a)) for a in arrival] == [tree.artifact(int(d), count=c) for d in dense]


def test_hashlib_fallback_equals_the_oracle(monkeypatch):
    monkeypatch.setattr(store_index, "native", lambda: None)
    nonces, rows = records("random24", 300, seed=5)
    ref = oracle.OracleSMST()
    index = CommitmentIndex()
    for k in (1, 120, 300):
        index.append(nonces[ref.count:k], rows[ref.count:k])
        for nonce, row in zip(nonces[ref.count:k], rows[ref.count:k]):
            ref.insert(int(nonce), row.tobytes())
        assert index.commit() == (k, ref.root_at(0))
    proofs, arrival, _ = index.proofs(1, np.array([0, 57, 119]))
    for d, p in zip([0, 57, 119], proofs):
        assert p.tobytes() == ref.proof(d, 120)


def test_commit_is_idempotent_and_needs_records():
    index = CommitmentIndex()
    with pytest.raises(ValueError, match="nothing to commit"):
        index.commit()
    nonces, rows = records("dense", 10)
    index.append(nonces, rows)
    first = index.commit()
    assert index.commit() == first and index.commit_counts == [10]


@pytest.mark.parametrize("layout", ["random24", "partition", "deepening"])
def test_commits_after_a_replay_continue_the_same_tree(layout):
    """A reopened store replays its flushes, then keeps committing live (records after the last flush included)."""
    nonces, rows = records(layout, 2000, seed=3)
    tree = SMST()
    tree.extend(nonces, rows)
    index = CommitmentIndex()
    index.append(nonces[:1300], rows[:1300])  # 1300 on disk, flushed at 400 and 1000
    assert index.replay([400, 1000]) == [tree.snapshot_root(400), tree.snapshot_root(1000)]
    for c in (1300, 1301, 1700, 2000):
        index.append(nonces[index.count:c], rows[index.count:c])
        assert index.commit() == (c, tree.snapshot_root(c))
    proofs, _, root = index.proofs(1, np.arange(0, 1000, 37))
    assert root == tree.snapshot_root(1000)
    assert np.array_equal(proofs, tree.proofs(np.arange(0, 1000, 37), count=1000))
