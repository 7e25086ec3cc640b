"""The artifact store's commitment bookkeeping: SMST roots and proofs at any committed count, no tree rebuilds.

The SMST (spec pocv2_protocol.md §1.3) is cut at height ``BUCKET_HEIGHT`` = 8: a *bucket* is the subtree over
the 256 nonce slots that share ``uint32(nonce) >> 8``. The index keeps
- the records in arrival order (uint32 keys, 24-byte vectors, leaf hashes) and their keys sorted, which finds
  the leaves of a bucket;
- the hash and count of every non-empty bucket and the small tree above the buckets (heights 8..32), updated
  along the changed paths at each commit: a commit costs what its new records touch, not the tree size;
- a count-indexed log: per commit, the buckets that changed, plus full copies of the bucket level now and then
  (never more than the log itself), from which the bucket level at any committed count is rebuilt; above it
  the tree is small (at most 2x the buckets).
A proof at a committed count hashes only the buckets its leaves sit in (arrival-filtered) and the tree above.
Every byte equals the SMST's (tests compare with the C++ tree and the oracle).
"""
from __future__ import annotations

import hashlib

import numpy as np

from cpoc_kernels._native import native
from cpoc_kernels.merkle.oracle import DEFAULT_DEPTH, EMPTY_HASHES, MAX_DEPTH, PROOF_ELEMENT_SIZE

BUCKET_HEIGHT = 8
TIER_HEIGHT = 4  # 16-slot subtrees kept for every non-empty slot range: a changed bucket rehashes from these
HASH = np.dtype("V32")  # one 32-byte hash per item: gathers and scatters are ~8x faster than on uint8 [m, 32]
_EMPTY = np.frombuffer(b"".join(EMPTY_HASHES), HASH)
_EMPTY_U8 = np.frombuffer(b"".join(EMPTY_HASHES), np.uint8).reshape(MAX_DEPTH + 1, 32)
_NO_KEYS = np.empty(0, np.uint32)


def _u8(hashes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hashes).view(np.uint8).reshape(-1, 32)


def _empties(height: int, n: int) -> np.ndarray:
    """HASH [n] filled with E[height]."""
    out = np.empty(n, HASH)
    out.view(np.uint8).reshape(n, 32)[:] = _EMPTY_U8[height]
    return out


def node_hashes(left: np.ndarray, right: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """SHA256(0x01 || left || right || LE32(count)) per item: HASH [m] from HASH [m], HASH [m], uint32 [m]."""
    counts = np.ascontiguousarray(counts, np.uint32)
    lib = native()
    if lib is not None and hasattr(lib, "smst_node_hashes"):
        return lib.smst_node_hashes(_u8(left), _u8(right), counts).view(HASH).ravel()
    pre = np.empty((len(counts), 69), np.uint8)
    pre[:, 0] = 1
    pre[:, 1:33], pre[:, 33:65] = _u8(left), _u8(right)
    pre[:, 65:] = counts.astype("<u4").view(np.uint8).reshape(-1, 4)
    return _digests(pre)


def leaf_hashes(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """SHA256(0x00 || LE32(key) || row) per record: HASH [n] from uint32 keys [n] and uint8 rows [n, L]."""
    lib = native()
    if lib is not None and hasattr(lib, "smst_leaf_hashes"):
        return lib.smst_leaf_hashes(np.ascontiguousarray(keys).view(np.int32),
                                    np.ascontiguousarray(rows)).view(HASH).ravel()
    pre = np.empty((len(keys), 5 + rows.shape[1]), np.uint8)
    pre[:, 0] = 0
    pre[:, 1:5] = np.ascontiguousarray(keys, "<u4").view(np.uint8).reshape(-1, 4)
    pre[:, 5:] = rows
    return _digests(pre)


def _digests(preimages: np.ndarray) -> np.ndarray:
    width, blob = preimages.shape[1], preimages.tobytes()
    sha = hashlib.sha256
    out = b"".join(sha(blob[i:i + width]).digest() for i in range(0, len(blob), width))
    return np.frombuffer(out, HASH).copy()


def _dedupe(sorted_keys: np.ndarray) -> np.ndarray:
    """Unique values of a sorted array (np.unique without its sort or hash table)."""
    if len(sorted_keys) < 2:
        return sorted_keys
    keep = np.empty(len(sorted_keys), bool)
    keep[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=keep[1:])
    return sorted_keys[keep]


def depth_for(max_key: int) -> int:
    return max(DEFAULT_DEPTH, int(max_key).bit_length())


class Level:
    """Nodes of one height: sorted unique uint32 keys [m], hashes HASH [m], counts uint32 [m]."""

    __slots__ = ("keys", "hashes", "counts")

    def __init__(self, keys=_NO_KEYS, hashes=None, counts=None):
        self.keys = keys
        self.hashes = np.empty(0, HASH) if hashes is None else hashes
        self.counts = np.empty(0, np.uint32) if counts is None else counts

    def lookup(self, keys: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(hashes HASH [n], counts [n]) of the given keys; absent keys give (E[height], 0)."""
        m = len(self.keys)
        if m == 0:
            return _empties(height, len(keys)), np.zeros(len(keys), np.uint32)
        pos = np.minimum(np.searchsorted(self.keys, keys), m - 1)
        found = self.keys[pos] == keys
        hashes = self.hashes[pos]
        counts = self.counts[pos]
        if not found.all():
            missing = ~found
            hashes[missing] = _EMPTY[height]
            counts[missing] = 0
        return hashes, counts

    def merge(self, other: Level) -> None:
        """Sets other's nodes (sorted unique keys) in this level, inserting the new ones."""
        if len(other.keys) == 0:
            return
        pos = np.searchsorted(self.keys, other.keys)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        found = (pos < len(self.keys)) & (self.keys[pos_c] == other.keys) if len(self.keys) else \
            np.zeros(len(other.keys), bool)
        self.hashes[pos_c[found]], self.counts[pos_c[found]] = other.hashes[found], other.counts[found]
        new = ~found
        if not new.any():
            return
        keys, hashes, counts = other.keys[new], other.hashes[new], other.counts[new]
        if len(self.keys) == 0 or keys[0] > self.keys[-1]:  # all after the existing ones: amortized append
            self.keys, self.hashes, self.counts = (_append(self.keys, keys), _append(self.hashes, hashes),
                                                   _append(self.counts, counts))
        else:
            self.keys = np.insert(self.keys, pos[new], keys)
            self.hashes = np.insert(self.hashes, pos[new], hashes)
            self.counts = np.insert(self.counts, pos[new], counts)


def _append(arr: np.ndarray, more: np.ndarray) -> np.ndarray:
    """arr followed by more, as a view of a buffer with spare room (arr must be such a view or own its data)."""
    base = arr.base if arr.base is not None and arr.base.ndim == 1 and arr.base.dtype == arr.dtype else None
    n, k = len(arr), len(more)
    if base is not None and base.size >= n + k and \
            base.__array_interface__["data"][0] == arr.__array_interface__["data"][0]:
        buf = base
    else:
        buf = np.empty(max(2 * (n + k), 1024), arr.dtype)
        buf[:n] = arr
    buf[n:n + k] = more
    return buf[:n + k]


def level_up(level: Level, height: int) -> Level:
    """The parents (height + 1) of all nodes of ``level`` (height ``height``)."""
    keys = level.keys
    if len(keys) == 0:
        return Level()
    parent = keys >> np.uint32(1)
    first = np.ones(len(keys), bool)
    first[1:] = parent[1:] != parent[:-1]
    slot = np.cumsum(first) - 1
    m = int(slot[-1]) + 1
    left = _empties(height, m)
    right = left.copy()
    lc = np.zeros(m, np.uint32)
    rc = np.zeros(m, np.uint32)
    is_right = (keys & np.uint32(1)).astype(bool)
    is_left = ~is_right
    left[slot[is_left]], lc[slot[is_left]] = level.hashes[is_left], level.counts[is_left]
    right[slot[is_right]], rc[slot[is_right]] = level.hashes[is_right], level.counts[is_right]
    counts = lc + rc
    return Level(parent[first], node_hashes(left, right, counts), counts)


def parents_of(child: Level, keys: np.ndarray, height: int) -> Level:
    """Nodes at height + 1 with the given sorted unique keys, from their children in ``child`` (height)."""
    lh, lc = child.lookup(keys << np.uint32(1), height)
    rh, rc = child.lookup((keys << np.uint32(1)) | np.uint32(1), height)
    counts = lc + rc
    return Level(keys, node_hashes(lh, rh, counts), counts)


class _Grow:
    """A numpy array that grows by doubling (rows of a fixed shape)."""

    def __init__(self, dtype, row_shape=()):
        self._buf = np.empty((1024, *row_shape), dtype)
        self.n = 0

    def extend(self, rows: np.ndarray) -> None:
        k = len(rows)
        if self.n + k > len(self._buf):
            cap = max(2 * len(self._buf), self.n + k)
            buf = np.empty((cap, *self._buf.shape[1:]), self._buf.dtype)
            buf[:self.n] = self._buf[:self.n]
            self._buf = buf
        self._buf[self.n:self.n + k] = rows
        self.n += k

    @property
    def view(self) -> np.ndarray:
        return self._buf[:self.n]


class CommitmentIndex:
    """Records in arrival order and the SMST commitments at every committed count (see the module doc)."""

    def __init__(self):
        self._keys = _Grow(np.uint32)
        self._rows = _Grow(np.uint8, (24,))
        self._leaf = _Grow(HASH)
        self._sorted_keys = _NO_KEYS
        self._sorted_arrival = np.empty(0, np.uint32)
        self._tier = Level()  # every non-empty node of height TIER_HEIGHT, as of the last commit
        self._upper = [Level() for _ in range(MAX_DEPTH + 1)]  # heights BUCKET_HEIGHT..MAX_DEPTH used
        self._commit_max = 0  # largest key among the committed records
        # The count-indexed log: commit i covers the first commit_counts[i] records.
        self.commit_counts: list[int] = []
        self.commit_depths: list[int] = []
        self.commit_roots: list[bytes] = []
        self._deltas: list[Level] = []            # buckets changed by commit i
        self._checkpoints: list[tuple[int, Level]] = []  # (commit i, copy of the bucket level after it)
        self._since_checkpoint = 0

    # ------------------------------------------------------------------ records
    @property
    def count(self) -> int:
        return self._keys.n

    def append(self, nonces: np.ndarray, rows: np.ndarray) -> None:
        """Adds records (int32 nonces [n], uint8 rows [n, 24]); duplicates must be refused by the caller."""
        keys = np.ascontiguousarray(nonces, np.int32).view(np.uint32)
        self._keys.extend(keys)
        self._rows.extend(rows)

    def contains_any(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: which uint32 keys are among the records indexed so far (those up to the last commit)."""
        pos = np.searchsorted(self._sorted_keys, keys)
        pos_c = np.minimum(pos, max(len(self._sorted_keys) - 1, 0))
        if len(self._sorted_keys) == 0:
            return np.zeros(len(keys), bool)
        return (pos < len(self._sorted_keys)) & (self._sorted_keys[pos_c] == keys)

    @property
    def indexed(self) -> int:
        return len(self._sorted_keys)

    def record(self, arrival: int) -> tuple[int, bytes]:
        return int(self._keys.view[arrival].view(np.int32)), self._rows.view[arrival].tobytes()

    def _index_new_records(self) -> None:
        start, n = len(self._sorted_keys), self.count
        if start == n:
            return
        keys = self._keys.view[start:n]
        self._leaf.extend(leaf_hashes(keys, self._rows.view[start:n]))
        order = np.argsort(keys, kind="stable")
        new_keys, new_arrival = keys[order], (order + start).astype(np.uint32)
        if start == 0:
            self._sorted_keys, self._sorted_arrival = new_keys, new_arrival
        else:
            pos = np.searchsorted(self._sorted_keys, new_keys)
            self._sorted_keys = np.insert(self._sorted_keys, pos, new_keys)
            self._sorted_arrival = np.insert(self._sorted_arrival, pos, new_arrival)

    # ------------------------------------------------------------------ buckets
    def _bucket_leaves(self, buckets: np.ndarray, count: int, height: int = BUCKET_HEIGHT) -> np.ndarray:
        """Arrival indices of the leaves (arrival < count) under the given sorted nodes of ``height``,
        sorted by key."""
        lo = np.searchsorted(self._sorted_keys, buckets << np.uint32(height), "left")
        hi = np.searchsorted(self._sorted_keys, (buckets << np.uint32(height)) |
                             np.uint32((1 << height) - 1), "right")
        lengths = hi - lo
        total = int(lengths.sum())
        starts = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
        arrival = self._sorted_arrival[np.arange(total) + starts]
        return arrival[arrival < count] if count < self.count else arrival

    def _buckets_from_tier(self, buckets: np.ndarray) -> Level:
        """The given sorted buckets, hashed from the current tier nodes under them."""
        shift = np.uint32(BUCKET_HEIGHT - TIER_HEIGHT)
        tier = self._tier
        lo = np.searchsorted(tier.keys, buckets << shift, "left")
        hi = np.searchsorted(tier.keys, (buckets << shift) | np.uint32((1 << int(shift)) - 1), "right")
        lengths = hi - lo
        at = np.arange(int(lengths.sum())) + np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
        level = Level(tier.keys[at], tier.hashes[at], tier.counts[at])
        for h in range(TIER_HEIGHT, BUCKET_HEIGHT):
            level = level_up(level, h)
        return level

    def _bottom_levels(self, arrival: np.ndarray, top: int = BUCKET_HEIGHT) -> list[Level]:
        """Levels 0..top over the given leaves (arrival indices sorted by key)."""
        levels = [Level(self._keys.view[arrival], self._leaf.view[arrival], np.ones(len(arrival), np.uint32))]
        for h in range(top):
            levels.append(level_up(levels[-1], h))
        return levels

    def _upper_from(self, buckets: Level, depth: int) -> list[Level]:
        """The tree above a bucket level: levels[h] for h = BUCKET_HEIGHT..depth (index = height)."""
        levels: list[Level] = [Level()] * BUCKET_HEIGHT + [buckets]
        for h in range(BUCKET_HEIGHT, depth):
            levels.append(level_up(levels[-1], h))
        return levels

    # ------------------------------------------------------------------ commits
    def commit(self) -> tuple[int, bytes]:
        """Commits every record added so far: (count, root). Cost follows the records added since the last one."""
        count = self.count
        if count == 0:
            raise ValueError("nothing to commit")
        if self.commit_counts and self.commit_counts[-1] == count:
            return count, self.commit_roots[-1]
        prev = self.commit_counts[-1] if self.commit_counts else 0
        self._index_new_records()
        return self._commit_range(prev, count)

    def _commit_range(self, prev: int, count: int, buckets: Level | None = None) -> tuple[int, bytes]:
        """Commits records [prev, count); ``buckets``: their changed buckets when already hashed (replay)."""
        if buckets is None:  # a live commit (count == self.count): rehash the changed tier nodes, then buckets
            tier_keys = _dedupe(np.sort(self._keys.view[prev:count] >> np.uint32(TIER_HEIGHT)))
            leaves = self._bucket_leaves(tier_keys, count, TIER_HEIGHT)
            self._tier.merge(self._bottom_levels(leaves, TIER_HEIGHT)[TIER_HEIGHT])
            buckets = self._buckets_from_tier(_dedupe(tier_keys >> np.uint32(BUCKET_HEIGHT - TIER_HEIGHT)))
        self._upper[BUCKET_HEIGHT].merge(buckets)
        keys = buckets.keys
        for h in range(BUCKET_HEIGHT, MAX_DEPTH):
            keys = _dedupe(keys >> np.uint32(1))
            self._upper[h + 1].merge(parents_of(self._upper[h], keys, h))
        self._commit_max = max(self._commit_max, int(self._keys.view[prev:count].max()))
        depth = depth_for(self._commit_max)
        root = self._upper[depth].hashes[0].tobytes()
        self.commit_counts.append(count)
        self.commit_depths.append(depth)
        self.commit_roots.append(root)
        self._deltas.append(buckets)
        self._since_checkpoint += len(buckets.keys)
        bucket_level = self._upper[BUCKET_HEIGHT]
        if self._since_checkpoint >= len(bucket_level.keys):
            self._checkpoints.append((len(self.commit_counts) - 1, Level(bucket_level.keys.copy(),
                                                                        bucket_level.hashes.copy(),
                                                                        bucket_level.counts.copy())))
            self._since_checkpoint = 0
        return count, root

    def replay(self, counts_in: list[int]) -> list[bytes]:
        """Commits at each of the given increasing counts (records already appended, none committed yet)
        and returns their roots. The final node set below the buckets is known up front, so each commit
        rehashes only the paths of its new leaves (no bucket is rehashed from all its leaves)."""
        if self.commit_counts:
            raise RuntimeError("replay() needs an index without commits")
        self._index_new_records()
        if not counts_in:
            return []
        # The final node set of heights 0..BUCKET_HEIGHT, with child/parent links; hashes start empty (E, 0)
        # and fill as leaves arrive. Row -1 of each level is a sentinel (E[h], 0) for absent children.
        keys = self._sorted_keys
        hashes = [_empties(0, len(keys) + 1)]
        counts = [np.zeros(len(keys) + 1, np.uint32)]
        parent, left, right, keys_at = [], [None], [None], [keys]
        for h in range(1, BUCKET_HEIGHT + 1):
            up = keys >> np.uint32(1)
            first = np.empty(len(up), bool)
            first[0] = True
            np.not_equal(up[1:], up[:-1], out=first[1:])
            parent.append((np.cumsum(first, dtype=np.int32) - 1))
            starts = np.flatnonzero(first).astype(np.int32)  # first child of each parent
            m = len(starts)
            lead_is_right = (keys[starts] & np.uint32(1)).astype(bool)
            pair = np.zeros(m, bool)
            pair[:-1] = np.diff(starts) == 2
            pair[-1] = len(keys) - starts[-1] == 2
            left.append(np.where(lead_is_right, np.int32(-1), starts))
            right.append(np.where(lead_is_right, starts, np.where(pair, starts + 1, np.int32(-1))).astype(np.int32))
            keys = up[first]
            keys_at.append(keys)
            hashes.append(_empties(h, m + 1))
            counts.append(np.zeros(m + 1, np.uint32))
        bucket_keys = keys
        leaf_at = np.empty(self.count, np.int32)
        leaf_at[self._sorted_arrival] = np.arange(len(self._sorted_arrival), dtype=np.int32)
        roots, prev = [], 0
        for c in counts_in:
            at = leaf_at[prev:c]
            hashes[0][at] = self._leaf.view[prev:c]
            counts[0][at] = 1
            pos = np.sort(at)
            for h in range(1, BUCKET_HEIGHT + 1):
                pos = _dedupe(parent[h - 1][pos])
                lp, rp = left[h][pos], right[h][pos]
                cnt = counts[h - 1][lp] + counts[h - 1][rp]
                hashes[h][pos] = node_hashes(hashes[h - 1][lp], hashes[h - 1][rp], cnt)
                counts[h][pos] = cnt
            node = Level(bucket_keys[pos], hashes[BUCKET_HEIGHT][pos], counts[BUCKET_HEIGHT][pos])
            roots.append(self._commit_range(prev, c, node)[1])
            prev = c
        tier_keys = keys_at[TIER_HEIGHT]
        live = counts[TIER_HEIGHT][:-1] > 0
        self._tier = Level(tier_keys[live], hashes[TIER_HEIGHT][:-1][live], counts[TIER_HEIGHT][:-1][live])
        return roots

    def _buckets_at(self, i: int) -> Level:
        """The bucket level after commit i: the last checkpoint <= i, then the deltas after it."""
        base_i, base = -1, Level()
        for ci, level in reversed(self._checkpoints):
            if ci <= i:
                base_i, base = ci, level
                break
        if base_i == i:
            return base
        parts = [base] + self._deltas[base_i + 1:i + 1]
        keys = np.concatenate([p.keys for p in parts])
        order = np.argsort(keys, kind="stable")  # later parts win: keep the last of each key
        keys = keys[order]
        last = np.ones(len(keys), bool)
        last[:-1] = keys[1:] != keys[:-1]
        take = order[last]
        return Level(keys[last], np.concatenate([p.hashes for p in parts])[take],
                     np.concatenate([p.counts for p in parts])[take])

    # ------------------------------------------------------------------ proofs
    def proofs(self, i: int, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytes]:
        """At commit i: (proofs uint8 [n, D, 36], arrival indices [n] of the leaves, recomputed root).

        The bucket level comes from the log; the leaves' buckets are rehashed from the records and must
        equal it (ValueError otherwise), and the root is rebuilt from it (the caller compares it)."""
        count, depth = self.commit_counts[i], self.commit_depths[i]
        buckets = self._buckets_at(i)
        upper = self._upper_from(buckets, depth)
        root = upper[depth].hashes[0].tobytes()
        dense = np.asarray(dense, np.int64)
        cum = np.cumsum(buckets.counts, dtype=np.int64)
        which = np.searchsorted(cum, dense, "right")
        local = dense - (cum[which] - buckets.counts[which])
        touched, slot = np.unique(which, return_inverse=True)
        arrival = self._bucket_leaves(buckets.keys[touched], count)
        bottom = self._bottom_levels(arrival)
        if not (np.array_equal(bottom[BUCKET_HEIGHT].keys, buckets.keys[touched]) and
                np.array_equal(bottom[BUCKET_HEIGHT].hashes, buckets.hashes[touched]) and
                np.array_equal(bottom[BUCKET_HEIGHT].counts, buckets.counts[touched])):
            raise ValueError(f"the records do not match the committed buckets at count {count}")
        first = np.cumsum(bottom[BUCKET_HEIGHT].counts, dtype=np.int64) - bottom[BUCKET_HEIGHT].counts
        leaf_pos = first[slot] + local
        leaf_arrival = arrival[leaf_pos]
        keys = self._keys.view[leaf_arrival]
        out = np.empty((len(dense), depth, PROOF_ELEMENT_SIZE), np.uint8)
        for h in range(depth):
            level = bottom[h] if h < BUCKET_HEIGHT else upper[h]
            sib_hash, sib_count = level.lookup((keys >> np.uint32(h)) ^ np.uint32(1), h)
            out[:, depth - 1 - h, :32] = _u8(sib_hash)
            out[:, depth - 1 - h, 32:] = sib_count.astype("<u4").view(np.uint8).reshape(-1, 4)
        return out, leaf_arrival, root
