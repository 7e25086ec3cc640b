"""The SMST commitment API (chain v0.2.14 bytes), backed by the C++ core or, without it, the oracle.

All roots, snapshot roots and proofs are exact (byte for byte those of the network's Go code).
Nonces are int32 (their uint32 bit pattern places the leaf); vectors are any non-empty bytes.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from cpoc_kernels._native import native
from cpoc_kernels.merkle import oracle
from cpoc_kernels.merkle.oracle import MAX_DEPTH, PROOF_ELEMENT_SIZE, VALID, VERIFY_REASONS

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class ProofRejected(ValueError):
    """An inclusion proof failed verification; ``code`` is the reason code, the message explains it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None


def _as_nonce(nonce) -> int:
    n = _as_int(nonce, "nonce")
    if not INT32_MIN <= n <= INT32_MAX:
        raise ValueError(f"nonce {n} is not an int32")
    return n


def _as_bytes(data, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} must be bytes-like, got {type(data).__name__}")


def _nonce_array(nonces) -> np.ndarray:
    """int32 [n] from a sequence, numpy array or torch tensor of int32 values (range checked)."""
    if hasattr(nonces, "detach"):  # torch.Tensor
        nonces = nonces.detach().cpu().numpy()
    arr = np.asarray(nonces)
    if arr.ndim != 1:
        raise ValueError(f"nonces must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"nonces must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32 and (arr.min() < INT32_MIN or arr.max() > INT32_MAX):
        raise ValueError("nonces must be int32 values")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _vector_rows(vectors, n: int):
    """Vectors as uint8 [n, L] (fixed width) or a list of bytes. fp16 arrays/tensors become their
    little-endian bit patterns (the artifact encoding)."""
    if hasattr(vectors, "detach"):  # torch.Tensor
        vectors = vectors.detach().cpu().numpy()
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise ValueError(f"vectors must have shape ({n}, L), got {vectors.shape}")
        if vectors.dtype == np.float16:
            vectors = vectors.astype("<f2", copy=False).view(np.uint8)
        elif vectors.dtype != np.uint8:
            raise TypeError(f"vector arrays must be uint8 or float16, got {vectors.dtype}")
        if vectors.shape[1] == 0:
            raise ValueError("empty vectors (the SMST commits non-empty byte strings only)")
        return np.ascontiguousarray(vectors)
    rows = [_as_bytes(v, "vector") for v in vectors]
    if len(rows) != n:
        raise ValueError(f"got {n} nonces but {len(rows)} vectors")
    return rows


class SMST:
    """Sparse Merkle Sum Tree keyed by nonce (depth 24, growing to 32 for larger uint32 nonces).

    ``insert``/``extend`` reject duplicate nonces and empty vectors (ValueError) and leave the tree
    unchanged then. Snapshots are the trees of the first ``count`` leaves in arrival order; any count
    in ``1..self.count`` is known (KeyError otherwise). Dense index = rank by uint32 nonce.

    Native core: one compressed tree over all leaves, updated incrementally (a root after k new leaves
    costs ~k * depth hashes) or rebuilt in bulk; snapshots are read from it (unchanged subtrees keep
    their hashes; only those holding later leaves are recomputed). Memory ~130 bytes per leaf plus the
    vectors. The native core and the pure-Python fallback give the same bytes and raise the same
    exceptions.
    """

    def __init__(self):
        lib = native()
        self._impl = lib.Smst() if lib is not None else oracle.OracleSMST()
        self.native = lib is not None

    # ---- building
    def insert(self, nonce: int, vector: bytes) -> None:
        """Adds one leaf (nonce int32, vector non-empty bytes)."""
        self._impl.insert(_as_nonce(nonce), _as_bytes(vector, "vector"))

    def extend(self, nonces, vectors) -> None:
        """Adds leaves in order, all or nothing. nonces: int32 [n] (list/array/tensor); vectors: list of
        bytes, uint8 [n, L] or float16 [n, k] (stored as little-endian fp16 bytes)."""
        arr = _nonce_array(nonces)
        rows = _vector_rows(vectors, len(arr))
        if not self.native:
            self._impl.extend([int(x) for x in arr], [bytes(r) for r in rows])
        elif isinstance(rows, np.ndarray):
            self._impl.extend_fixed(arr, rows)
        else:
            self._impl.extend(arr, rows)

    # ---- reading
    @property
    def count(self) -> int:
        return int(self._impl.count)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, nonce) -> bool:
        return bool(self._impl.contains(_as_nonce(nonce)))

    @property
    def depth(self) -> int:
        """Current depth D = max(24, bitlen(max uint32 nonce))."""
        return int(self._impl.depth)

    @property
    def root(self) -> bytes:
        """32-byte root of all leaves so far (E[24] for an empty tree; a commit needs count > 0)."""
        return self._impl.root_at(0)

    # Every argument is checked here, before the backend sees it, so that the C++ core and the
    # oracle raise the same exceptions: TypeError (not an integer), KeyError (no snapshot at that
    # count), IndexError (dense index outside the snapshot), ValueError (malformed array / buffer).
    def _count(self, count) -> int:
        """A snapshot count in 1..self.count (KeyError otherwise)."""
        c = _as_int(count, "count")
        n = self.count
        if not 1 <= c <= n:
            raise KeyError(f"no snapshot at count {c}: the tree has {n} leaves (snapshot counts are 1..{n})")
        return c

    def _snapshot(self, count) -> int:
        """count, or 0 (the current tree) for None."""
        return 0 if count is None else self._count(count)

    def _size(self, snap: int) -> int:
        return snap if snap else self.count

    def _dense(self, dense_index, snap: int) -> int:
        d = _as_int(dense_index, "dense_index")
        size = self._size(snap)
        if not 0 <= d < size:
            raise IndexError(f"dense index {d} out of range: the tree at count {size} has dense indices "
                             f"0..{size - 1}" if size else f"dense index {d} out of range: the tree is empty")
        return d

    def _dense_array(self, dense_indices, snap: int) -> np.ndarray:
        """A private uint64 copy (never the caller's buffer) of valid dense indices."""
        if hasattr(dense_indices, "detach"):  # torch.Tensor
            dense_indices = dense_indices.detach().cpu().numpy()
        idx = np.array(dense_indices, copy=True)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError("dense_indices must be a 1-D integer array")
        size = self._size(snap)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            bad = int(idx[(idx < 0) | (idx >= size)][0])
            raise IndexError(f"dense index {bad} out of range: the tree at count {size} has dense indices "
                             f"0..{size - 1}")
        return np.ascontiguousarray(idx, dtype=np.uint64)

    def snapshot_root(self, count: int) -> bytes:
        """Root of the tree holding exactly the first ``count`` inserted leaves (1 <= count <= self.count)."""
        return self._impl.root_at(self._count(count))

    def snapshot_roots(self, counts) -> list[bytes]:
        """Roots at many counts (each 1..self.count). Native: counts not yet built into the tree are
        reached by growing it through them in order, so replaying a log and checking every committed
        root costs about one build (the way to verify a reopened store)."""
        cs = [self._count(c) for c in counts]
        if self.native:
            return list(self._impl.roots_at(cs))
        return [self._impl.root_at(c) for c in cs]

    def snapshot_depth(self, count: int) -> int:
        return int(self._impl.depth_at(self._count(count)))

    def proof(self, dense_index: int, count: int | None = None) -> list[bytes]:
        """Inclusion proof: D elements root -> leaf, each sibling_hash(32) || LE32(sibling_count)."""
        snap = self._snapshot(count)
        flat = self._impl.proof(self._dense(dense_index, snap), snap)
        return [flat[i:i + PROOF_ELEMENT_SIZE] for i in range(0, len(flat), PROOF_ELEMENT_SIZE)]

    def proofs(self, dense_indices, count: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Many proofs as uint8 [n, D, 36] (into ``out`` when given). All indices are checked first.

        ``out`` may share memory with ``dense_indices`` (the indices are copied first)."""
        snap = self._snapshot(count)
        size = self._size(snap)
        idx = self._dense_array(dense_indices, snap)
        depth = int(self._impl.depth_at(size)) if size else int(self._impl.depth_at(0))
        if out is not None and not (isinstance(out, np.ndarray) and out.dtype == np.uint8
                                    and out.shape == (len(idx), depth, PROOF_ELEMENT_SIZE)
                                    and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"out must be a writable C-contiguous uint8 array of shape ({len(idx)}, {depth}, 36)")
        if self.native:
            return self._impl.proofs(idx, size, out)
        res = np.empty((len(idx), depth, PROOF_ELEMENT_SIZE), np.uint8)
        for k, i in enumerate(idx):
            res[k] = np.frombuffer(self._impl.proof(int(i), snap), np.uint8).reshape(depth, PROOF_ELEMENT_SIZE)
        if out is not None:
            out[...] = res
            return out
        return res

    def artifact(self, dense_index: int, count: int | None = None) -> tuple[int, bytes]:
        """(nonce, vector) of the leaf at dense_index (of the snapshot at count)."""
        snap = self._snapshot(count)
        return self._impl.artifact(self._dense(dense_index, snap), snap)

    def artifacts(self, dense_indices, count: int | None = None) -> tuple[np.ndarray, list[bytes]]:
        """(nonces int32 [n], vectors) of the leaves at dense_indices (of the snapshot at count)."""
        snap = self._snapshot(count)
        idx = self._dense_array(dense_indices, snap)
        if self.native:
            return self._impl.artifacts(idx, snap)
        leaves = [self._impl.artifact(int(i), snap) for i in idx]
        return np.array([n for n, _ in leaves], dtype=np.int32), [v for _, v in leaves]

    def arrival_leaf(self, arrival_index: int) -> tuple[int, bytes]:
        """(nonce, vector) of the i-th inserted leaf (arrival order)."""
        i = _as_int(arrival_index, "arrival_index")
        if not 0 <= i < self.count:
            raise IndexError(f"arrival index {i} out of range (count {self.count})")
        return self._impl.arrival_leaf(i)


def _verify_args(root, count, dense_index, nonce, leaf_data, proof):
    root = _as_bytes(root, "root")
    if len(root) != 32:
        raise ValueError(f"root must be 32 bytes, got {len(root)}")
    count, dense_index = _as_int(count, "count"), _as_int(dense_index, "dense_index")
    if count < 0 or dense_index < 0:
        raise ValueError("count and dense_index must be >= 0")
    proof = [_as_bytes(e, "proof element") for e in proof]
    return root, count, dense_index, _as_nonce(nonce), _as_bytes(leaf_data, "leaf_data"), proof


def _verify_code(root, count, dense_index, nonce, leaf_data, proof) -> int:
    args = _verify_args(root, count, dense_index, nonce, leaf_data, proof)
    lib = native()
    if lib is None or args[1] >= 2**63 or args[2] >= 2**63:
        return oracle.verify_code(*args)
    return int(lib.smst_verify(*args))


def verify_proof(root: bytes, count: int, dense_index: int, nonce: int, leaf_data: bytes,
                 proof: Sequence[bytes]) -> bool:
    """VerifySMSTProofWithDenseIndex (Go v0.2.14 semantics, index binding included).

    False for any proof the network rejects, malformed elements included (use ``check_proof`` for the
    reason). As in Go, ``nonce`` only chooses the path and ``leaf_data`` only feeds the leaf hash.
    Raises TypeError/ValueError only for caller mistakes (root not 32 bytes, nonce not int32, ...).
    """
    return _verify_code(root, count, dense_index, nonce, leaf_data, proof) == VALID


def check_proof(root: bytes, count: int, dense_index: int, nonce: int, leaf_data: bytes,
                proof: Sequence[bytes]) -> None:
    """Like ``verify_proof`` but raises ProofRejected (a ValueError) saying why the proof fails."""
    code = _verify_code(root, count, dense_index, nonce, leaf_data, proof)
    if code != VALID:
        detail = VERIFY_REASONS.get(code, "unknown")
        if code == 5:
            bad = [(i, len(e)) for i, e in enumerate(proof) if len(e) != PROOF_ELEMENT_SIZE]
            detail += f" (element {bad[0][0]} has {bad[0][1]} bytes)"
        elif code == 2:
            detail += f" ({len(proof)} > {MAX_DEPTH})"
        raise ProofRejected(code, f"SMST proof rejected: {detail}")


def verify_proofs(root: bytes, count: int, dense_indices, nonces, leaf_data: np.ndarray,
                  proofs: np.ndarray) -> np.ndarray:
    """Bulk verify against one (root, count): dense_indices [n], nonces int32 [n], leaf_data uint8
    [n, L], proofs uint8 [n, D, 36]. Returns bool [n]."""
    root = _as_bytes(root, "root")
    if len(root) != 32:
        raise ValueError(f"root must be 32 bytes, got {len(root)}")
    idx = np.ascontiguousarray(dense_indices, dtype=np.uint64)
    nonce_arr = _nonce_array(nonces)
    leaf_data = np.ascontiguousarray(leaf_data, dtype=np.uint8)
    proofs = np.ascontiguousarray(proofs, dtype=np.uint8)
    if proofs.ndim != 3 or proofs.shape[2] != PROOF_ELEMENT_SIZE or leaf_data.ndim != 2:
        raise ValueError("expected leaf_data [n, L] and proofs [n, D, 36]")
    if not (len(idx) == len(nonce_arr) == len(leaf_data) == len(proofs)):
        raise ValueError("dense_indices, nonces, leaf_data and proofs must have the same length")
    lib = native()
    if lib is None:
        return np.array([oracle.verify_code(root, int(count), int(i), int(n), bytes(ld),
                                            [bytes(e) for e in p]) == VALID
                         for i, n, ld, p in zip(idx, nonce_arr, leaf_data, proofs)], dtype=bool)
    return lib.smst_verify_many(root, int(count), idx, nonce_arr, leaf_data, proofs) == VALID
