"""Pure-Python (``hashlib``) SMST, written straight from the spec (pocv2_protocol.md §1.3).

It is the test oracle for the C++ and GPU paths and the fallback when ``cpoc_kernels._C`` is not
built. Every byte is exact; it is simply slow (dicts of nodes, one ``hashlib`` call per hash).
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DEFAULT_DEPTH = 24
MAX_DEPTH = 32
PROOF_ELEMENT_SIZE = 36

# Verification outcome codes, shared with the C++ core (csrc/smst.h VerifyCode).
VALID = 0
VERIFY_REASONS = {
    0: "valid",
    1: "empty proof",
    2: "proof longer than 32 elements",
    3: "count is 0",
    4: "dense index >= count",
    5: "a proof element is not 36 bytes",
    6: "sibling counts overflow uint32",
    7: "the proof's leaf count differs from count",
    8: "the recomputed root differs from root",
    9: "the proof's dense index differs from dense_index",
}


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def leaf_hash(leaf_data: bytes) -> bytes:
    """SHA256(0x00 || leaf_data)."""
    return hashlib.sha256(b"\x00" + leaf_data).digest()


def leaf_data(nonce: int, vector: bytes) -> bytes:
    """LE32(uint32(nonce)) || vector (the int32 nonce cast bitwise)."""
    return struct.pack("<I", nonce & 0xFFFFFFFF) + bytes(vector)


def node_hash(left: bytes, right: bytes, count: int) -> bytes:
    """SHA256(0x01 || left || right || LE32(count))."""
    return hashlib.sha256(b"\x01" + left + right + struct.pack("<I", count)).digest()


def _make_empty_hashes() -> list[bytes]:
    e = [sha256(b"\x00")]
    for _ in range(MAX_DEPTH):
        e.append(node_hash(e[-1], e[-1], 0))
    return e


EMPTY_HASHES: list[bytes] = _make_empty_hashes()  # E[0..32]


def depth_for(max_key: int) -> int:
    """max(24, bitlen(max uint32 nonce)), bitlen(0) = 1."""
    return max(DEFAULT_DEPTH, max(1, int(max_key).bit_length()))


class OracleTree:
    """The tree over a fixed leaf set {uint32 key: (leaf hash)}: one dict per level."""

    def __init__(self, leaf_hashes: dict[int, bytes]):
        self.count = len(leaf_hashes)
        self.keys = sorted(leaf_hashes)  # dense order
        self.depth = depth_for(self.keys[-1]) if self.keys else DEFAULT_DEPTH
        level = {k: (h, 1) for k, h in leaf_hashes.items()}
        self.levels = [level]
        for height in range(self.depth):
            empty = (EMPTY_HASHES[height], 0)
            parents = {}
            for parent_key in {k >> 1 for k in level}:
                lh, lc = level.get(2 * parent_key, empty)
                rh, rc = level.get(2 * parent_key + 1, empty)
                parents[parent_key] = (node_hash(lh, rh, lc + rc), lc + rc)
            level = parents
            self.levels.append(level)

    @property
    def root(self) -> bytes:
        return self.levels[self.depth][0][0] if self.count else EMPTY_HASHES[self.depth]

    def proof(self, dense_index: int) -> list[bytes]:
        key = self.keys[dense_index]
        elements = []
        for height in range(self.depth):
            sib_hash, sib_count = self.levels[height].get(key ^ 1, (EMPTY_HASHES[height], 0))
            elements.append(sib_hash + struct.pack("<I", sib_count))
            key >>= 1
        return elements[::-1]  # root -> leaf


class OracleSMST:
    """Same interface as the native ``_C.Smst`` (count 0 = current tree), pure Python."""

    def __init__(self):
        self._leaves: list[tuple[int, bytes]] = []  # arrival order: (uint32 nonce, vector)
        self._slots: dict[int, int] = {}  # uint32 nonce -> arrival index
        self._max_key = 0
        self._trees: dict[int, OracleTree] = {}

    @staticmethod
    def _bits(nonce: int) -> int:
        if not -(2**31) <= nonce < 2**31:
            raise ValueError(f"nonce {nonce} is not an int32")
        return nonce & 0xFFFFFFFF

    def insert(self, nonce: int, vector: bytes) -> None:
        self.extend([nonce], [vector])

    def extend(self, nonces: Sequence[int], vectors: Sequence[bytes]) -> None:
        if len(nonces) != len(vectors):
            raise ValueError("nonces and vectors must have the same length")
        for i, v in enumerate(vectors):
            if len(v) == 0:
                raise ValueError(f"empty vector at batch position {i} (the SMST commits non-empty byte strings only)")
        seen = set()
        bits = [self._bits(int(n)) for n in nonces]
        for i, b in enumerate(bits):
            if b in self._slots or b in seen:
                raise ValueError(f"duplicate nonce {int(nonces[i])} at batch position {i} (nothing was inserted)")
            seen.add(b)
        for b in bits:
            self._slots[b] = len(self._slots)
            self._max_key = max(self._max_key, b)
        self._leaves.extend(zip(bits, (bytes(v) for v in vectors)))

    @property
    def count(self) -> int:
        return len(self._leaves)

    @property
    def depth(self) -> int:
        return depth_for(self._max_key)

    def contains(self, nonce: int) -> bool:
        return self._bits(nonce) in self._slots

    def _tree(self, count: int) -> OracleTree:
        if count == 0:
            count = self.count
            if count == 0:
                return OracleTree({})
        elif not 1 <= count <= self.count:
            raise KeyError(f"no snapshot at count {count}: the tree has {self.count} leaves")
        if count not in self._trees:
            self._trees[count] = OracleTree({n: leaf_hash(leaf_data(n, v)) for n, v in self._leaves[:count]})
        return self._trees[count]

    def _checked(self, dense_index: int, count: int) -> OracleTree:
        tree = self._tree(count)
        if not 0 <= dense_index < tree.count:
            raise IndexError(f"dense index {dense_index} out of range: the tree at count {tree.count} "
                             f"has {tree.count} leaves")
        return tree

    def root_at(self, count: int = 0) -> bytes:
        return self._tree(count).root

    def depth_at(self, count: int = 0) -> int:
        return self._tree(count).depth

    def proof(self, dense_index: int, count: int = 0) -> bytes:
        return b"".join(self._checked(dense_index, count).proof(dense_index))

    def artifact(self, dense_index: int, count: int = 0) -> tuple[int, bytes]:
        key = self._checked(dense_index, count).keys[dense_index]
        return self.arrival_leaf(self._slots[key])

    def arrival_leaf(self, arrival_index: int) -> tuple[int, bytes]:
        key, vector = self._leaves[arrival_index]
        return (key - 2**32 if key >= 2**31 else key), vector


def verify_code(root: bytes, count: int, dense_index: int, nonce: int, leaf_data_: bytes,
                proof: Sequence[bytes]) -> int:
    """VerifySMSTProofWithDenseIndex as a code (0 = valid, else a key of VERIFY_REASONS)."""
    depth = len(proof)
    if depth == 0:
        return 1
    if depth > MAX_DEPTH:
        return 2
    if count == 0:
        return 3
    if dense_index >= count:
        return 4
    if any(len(e) != PROOF_ELEMENT_SIZE for e in proof):
        return 5
    key = nonce & 0xFFFFFFFF
    h, c, index = leaf_hash(bytes(leaf_data_)), 1, 0
    for i in range(depth - 1, -1, -1):
        sib, sib_count = bytes(proof[i][:32]), struct.unpack("<I", proof[i][32:])[0]
        c += sib_count
        if c > 0xFFFFFFFF:
            return 6
        if (key >> (depth - 1 - i)) & 1:  # right
            index += sib_count
            h = node_hash(sib, h, c)
        else:
            h = node_hash(h, sib, c)
    if c != count:
        return 7
    if h != root:
        return 8
    if index != dense_index:
        return 9
    return VALID
