"""Hypothesis properties of the SMST: native vs oracle, order independence, proofs verify, and any
single-bit change of a proof, the leaf data, the dense index or the nonce's path bits fails."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpoc_kernels._native import native
from cpoc_kernels.merkle import SMST, oracle, verify_proof, verify_proofs

INT32 = st.integers(-(2**31), 2**31 - 1)
NONCE = st.one_of(st.integers(0, 2**12), st.integers(0, 2**20), st.integers(2**24 - 3, 2**24 + 3), INT32)
VECTOR = st.binary(min_size=1, max_size=40)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

needs_native = pytest.mark.skipif(native() is None, reason="cpoc_kernels._C not built")


@st.composite
def leaf_sets(draw, min_size=1, max_size=40):
    """Distinct int32 nonces (distinct uint32 slots) with non-empty vectors, in a random order."""
    nonces = draw(st.lists(NONCE, min_size=min_size, max_size=max_size, unique=True))
    vectors = draw(st.lists(VECTOR, min_size=len(nonces), max_size=len(nonces)))
    return list(zip(nonces, vectors))


def build(leaves) -> SMST:
    t = SMST()
    t.extend([n for n, _ in leaves], [v for _, v in leaves])
    return t


@needs_native
@SETTINGS
@given(leaves=leaf_sets(), data=st.data())
def test_native_equals_oracle(leaves, data):
    t, ref = build(leaves), oracle.OracleSMST()
    ref.extend([n for n, _ in leaves], [v for _, v in leaves])
    assert (t.count, t.depth, t.root) == (ref.count, ref.depth, ref.root_at(0))
    snap = data.draw(st.integers(1, len(leaves)), label="snapshot count")
    assert t.snapshot_root(snap) == ref.root_at(snap)
    i = data.draw(st.integers(0, snap - 1), label="dense index")
    assert b"".join(t.proof(i, count=snap)) == ref.proof(i, snap)
    assert t.artifact(i, count=snap) == ref.artifact(i, snap)


@SETTINGS
@given(leaves=leaf_sets(), seed=st.integers(0, 2**32 - 1))
def test_root_independent_of_insertion_order(leaves, seed):
    shuffled = list(leaves)
    np.random.default_rng(seed).shuffle(shuffled)
    a, b = build(leaves), SMST()
    for n, v in shuffled:
        b.insert(n, v)
    assert (a.root, a.depth) == (b.root, b.depth)
    # dense order is the uint32 order of the nonces, whatever the arrival order
    assert [b.artifact(i)[0] & 0xFFFFFFFF for i in range(b.count)] == sorted(n & 0xFFFFFFFF for n, _ in leaves)


@SETTINGS
@given(leaves=leaf_sets(), data=st.data())
def test_every_proof_verifies(leaves, data):
    t = build(leaves)
    counts = [t.count, data.draw(st.integers(1, t.count), label="snapshot count")]
    for count in counts:
        root = t.root if count == t.count else t.snapshot_root(count)
        idx = np.arange(count)
        proofs = t.proofs(idx, count=count)
        arts = [t.artifact(i, count=count) for i in range(count)]
        for i, (nonce, vector) in enumerate(arts):
            assert verify_proof(root, count, i, nonce, oracle.leaf_data(nonce, vector), t.proof(i, count=count))
        width = max(len(v) for _, v in arts)
        if all(len(v) == width for _, v in arts):
            leaf = np.stack([np.frombuffer(oracle.leaf_data(n, v), np.uint8) for n, v in arts])
            assert verify_proofs(root, count, idx, [n for n, _ in arts], leaf, proofs).all()


@needs_native
@SETTINGS
@given(leaves=leaf_sets(), data=st.data())
def test_any_single_bit_change_fails(leaves, data):
    """Exhaustive over the bits of one proof, its leaf data, the dense index and the nonce's D path bits."""
    t = build(leaves)
    i = data.draw(st.integers(0, t.count - 1), label="dense index")
    nonce, vector = t.artifact(i)
    leaf = np.frombuffer(oracle.leaf_data(nonce, vector), np.uint8)
    proof = t.proofs(np.array([i]))[0]
    depth = proof.shape[0]

    def check(idx, nonces, leaves_, proofs):
        return verify_proofs(t.root, t.count, idx, nonces, leaves_, proofs)

    assert check([i], [nonce], leaf[None], proof[None]).all()
    # every bit of the proof
    nbits = proof.size * 8
    flipped = np.repeat(proof.reshape(1, -1), nbits, axis=0)
    flipped[np.arange(nbits), np.arange(nbits) // 8] ^= (1 << (np.arange(nbits) % 8)).astype(np.uint8)
    assert not check([i] * nbits, [nonce] * nbits, np.repeat(leaf[None], nbits, 0),
                     flipped.reshape(nbits, depth, 36)).any()
    # every bit of the leaf data
    lbits = leaf.size * 8
    bad_leaf = np.repeat(leaf[None], lbits, axis=0)
    bad_leaf[np.arange(lbits), np.arange(lbits) // 8] ^= (1 << (np.arange(lbits) % 8)).astype(np.uint8)
    assert not check([i] * lbits, [nonce] * lbits, bad_leaf, np.repeat(proof[None], lbits, 0)).any()
    # every bit of the dense index (as uint32) and of the nonce's path bits
    for b in range(32):
        assert not verify_proof(t.root, t.count, i ^ (1 << b), nonce, leaf.tobytes(), list(map(bytes, proof)))
    for b in range(depth):
        flipped_nonce = ((nonce & 0xFFFFFFFF) ^ (1 << b))
        flipped_nonce = flipped_nonce - 2**32 if flipped_nonce >= 2**31 else flipped_nonce
        assert not verify_proof(t.root, t.count, i, flipped_nonce, leaf.tobytes(), list(map(bytes, proof)))


@SETTINGS
@given(leaves=leaf_sets(min_size=2, max_size=12), data=st.data())
def test_duplicate_in_batch_leaves_tree_unchanged(leaves, data):
    t = build(leaves[:1])
    before = (t.count, t.root)
    dup = data.draw(st.sampled_from([n for n, _ in leaves]), label="duplicate")
    batch = leaves[1:] + [(dup, b"x")]
    with pytest.raises(ValueError, match="duplicate nonce"):
        t.extend([n for n, _ in batch], [v for _, v in batch])
    assert (t.count, t.root) == before
    t.extend([n for n, _ in leaves[1:]], [v for _, v in leaves[1:]])
    assert t.count == len(leaves)
