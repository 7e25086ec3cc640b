"""CPU benchmark of the SMST commitment: C++ core vs the pure-hashlib oracle.

Run: python -m pytest bench/bench_merkle.py --benchmark-enable
Against the network's Go code side by side (same inputs, roots compared): bench/smst_vs_go.py.
Go figures quoted by issue 12 (one core of a 2-vCPU machine): 1 M inserts + root 7.1 s on 1 M random
24-bit nonces; 100 K proofs 0.66 s, 100 K verifies 0.42 s. Goals: >= 10x on the build, <= 66 ms,
<= 0.2 s.
Build workloads: ``random24`` (1 M distinct random nonces < 2**24, Go's workload), ``partition`` (the
network's nonce layout, see bench/smst_vs_go.py, D = 25) and ``dense`` (a permutation of 0..N-1, the
easiest case); 24-byte finite fp16 vectors. Proofs/verifies use the dense tree. The oracle runs 10x
smaller sizes (it is slow).
"""
import numpy as np
import pytest

from cpoc_kernels._native import native
from cpoc_kernels.merkle import SMST, oracle, verify_proof, verify_proofs

N_LEAVES = 1_000_000
N_PROOFS = 100_000
ORACLE_SCALE = 10

needs_native = pytest.mark.skipif(native() is None, reason="cpoc_kernels._C not built")


def make_leaves(n: int, seed: int = 0, nonce_space: int | None = None):
    rng = np.random.default_rng(seed)
    if nonce_space is None:
        nonces = rng.permutation(n).astype(np.int32)
    else:
        nonces = rng.choice(nonce_space, n, replace=False)
        nonces = (nonces - 2**31 if nonce_space > 2**31 else nonces).astype(np.int32)
    vectors = rng.standard_normal((n, 12)).astype("<f2").view(np.uint8)  # [n, 24], finite
    return nonces, vectors


def build_native(nonces, vectors) -> SMST:
    t = SMST()
    t.extend(nonces, vectors)
    _ = t.root
    return t


@pytest.fixture(scope="module")
def leaves_1m():
    return make_leaves(N_LEAVES)


@pytest.fixture(scope="module")
def tree_1m(leaves_1m):
    return build_native(*leaves_1m)


@pytest.fixture(scope="module")
def sample(tree_1m):
    """100 K random dense indices with their proofs and leaf data (for the verify benchmarks)."""
    rng = np.random.default_rng(1)
    idx = rng.integers(0, N_LEAVES, N_PROOFS).astype(np.int64)
    proofs = tree_1m.proofs(idx)
    arts = [tree_1m.artifact(int(i)) for i in idx]
    nonces = np.array([a[0] for a in arts], np.int32)
    leaf = np.stack([np.frombuffer(oracle.leaf_data(n, v), np.uint8) for n, v in arts])
    return idx, nonces, leaf, proofs


# ------------------------------------------------------------------------------- insert + root
@needs_native
@pytest.mark.benchmark(group="insert+root 1M leaves")
def test_insert_root_1m_cpp(benchmark, leaves_1m):
    t = benchmark.pedantic(build_native, args=leaves_1m, rounds=5, iterations=1, warmup_rounds=1)
    assert t.count == N_LEAVES


@needs_native
@pytest.mark.benchmark(group="insert+root 1M leaves")
def test_insert_root_1m_random24_cpp(benchmark):
    """Go's workload: 1 M distinct random nonces below 2**24."""
    leaves = make_leaves(N_LEAVES, seed=4, nonce_space=2**24)
    benchmark.pedantic(build_native, args=leaves, rounds=5, iterations=1, warmup_rounds=1)


@needs_native
@pytest.mark.benchmark(group="insert+root 1M leaves")
def test_insert_root_1m_partition_cpp(benchmark):
    """The network's nonce layout (node_count 32, n_groups 8, two active nodes; D = 25)."""
    from smst_vs_go import partition_nonces  # bench/ is on sys.path (pytest prepends the file's folder)

    nonces = partition_nonces(N_LEAVES)
    vectors = np.random.default_rng(5).standard_normal((N_LEAVES, 12)).astype("<f2").view(np.uint8)
    benchmark.pedantic(build_native, args=(nonces, vectors), rounds=5, iterations=1, warmup_rounds=1)


@needs_native
@pytest.mark.benchmark(group="insert+root 1M leaves")
def test_insert_root_1m_sparse_nonces_cpp(benchmark):
    """Not the goal's case: 1 M nonces spread over all of uint32 (D = 32, ~12 M internal nodes)."""
    leaves = make_leaves(N_LEAVES, seed=2, nonce_space=2**32)
    benchmark.pedantic(build_native, args=leaves, rounds=2, iterations=1)


@pytest.mark.benchmark(group="insert+root 1M leaves")
def test_insert_root_100k_oracle(benchmark):
    nonces, vectors = make_leaves(N_LEAVES // ORACLE_SCALE)

    def build():
        t = oracle.OracleSMST()
        t.extend(nonces.tolist(), [v.tobytes() for v in vectors])
        return t.root_at(0)

    benchmark.pedantic(build, rounds=1, iterations=1)


# ------------------------------------------------------------------------------- proofs
@needs_native
@pytest.mark.benchmark(group="100K proofs (1M-leaf tree)")
def test_proofs_100k_cpp_bulk_into_buffer(benchmark, tree_1m, sample):
    idx = sample[0]
    out = np.empty((N_PROOFS, tree_1m.depth, 36), np.uint8)
    benchmark.pedantic(tree_1m.proofs, args=(idx,), kwargs={"out": out}, rounds=20, iterations=1,
                       warmup_rounds=1)
    assert np.array_equal(out, sample[3])


@needs_native
@pytest.mark.benchmark(group="100K proofs (1M-leaf tree)")
def test_proofs_100k_cpp_bulk_new_array(benchmark, tree_1m, sample):
    benchmark.pedantic(tree_1m.proofs, args=(sample[0],), rounds=10, iterations=1, warmup_rounds=1)


@needs_native
@pytest.mark.benchmark(group="100K proofs (1M-leaf tree)")
def test_proofs_100k_cpp_one_call_each(benchmark, tree_1m, sample):
    """The list[bytes] API in a Python loop (per-call overhead + 24 bytes objects per proof)."""
    idx = sample[0].tolist()
    benchmark.pedantic(lambda: [tree_1m.proof(i) for i in idx], rounds=3, iterations=1)


@pytest.mark.benchmark(group="100K proofs (1M-leaf tree)")
def test_proofs_10k_oracle_100k_tree(benchmark):
    nonces, vectors = make_leaves(N_LEAVES // ORACLE_SCALE)
    t = oracle.OracleSMST()
    t.extend(nonces.tolist(), [v.tobytes() for v in vectors])
    t.root_at(0)
    idx = np.random.default_rng(3).integers(0, len(nonces), N_PROOFS // ORACLE_SCALE).tolist()
    benchmark.pedantic(lambda: [t.proof(i) for i in idx], rounds=3, iterations=1)


# ------------------------------------------------------------------------------- verify
@needs_native
@pytest.mark.benchmark(group="100K verifies (D=24)")
def test_verify_100k_cpp_bulk(benchmark, tree_1m, sample):
    idx, nonces, leaf, proofs = sample
    root = tree_1m.root
    ok = benchmark.pedantic(verify_proofs, args=(root, N_LEAVES, idx, nonces, leaf, proofs), rounds=10,
                            iterations=1, warmup_rounds=1)
    assert ok.all()


@needs_native
@pytest.mark.benchmark(group="100K verifies (D=24)")
def test_verify_100k_cpp_one_call_each(benchmark, tree_1m, sample):
    idx, nonces, leaf, proofs = sample
    root = tree_1m.root
    args = [(int(i), int(n), ld.tobytes(), [e.tobytes() for e in p]) for i, n, ld, p in zip(idx, nonces, leaf, proofs)]

    def run():
        return all(verify_proof(root, N_LEAVES, i, n, ld, p) for i, n, ld, p in args)

    assert benchmark.pedantic(run, rounds=3, iterations=1)


@needs_native  # uses the C++-built tree's proofs as input
@pytest.mark.benchmark(group="100K verifies (D=24)")
def test_verify_10k_oracle(benchmark, tree_1m, sample):
    idx, nonces, leaf, proofs = (a[: N_PROOFS // ORACLE_SCALE] for a in sample)
    root = tree_1m.root
    args = [(int(i), int(n), ld.tobytes(), [e.tobytes() for e in p]) for i, n, ld, p in zip(idx, nonces, leaf, proofs)]

    def run():
        return all(oracle.verify_code(root, N_LEAVES, i, n, ld, p) == oracle.VALID for i, n, ld, p in args)

    assert benchmark.pedantic(run, rounds=1, iterations=1)
