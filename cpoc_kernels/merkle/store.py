"""Append-only on-disk artifact log with flushed (count, root) commitments (the network's layout).

Directory contents (pocv2_protocol.md §1.5):
- ``artifacts.data``: records ``[LE32 len = 4 + len(vector)][LE32 nonce][vector]`` in arrival order;
- ``flushed_roots.jsonl``: one ``{"count": c, "root": hex}`` line per flush.

Reopening replays the log into the same SMST. A torn final record (or roots line), as left by a
crash mid-write, is cut off the file and never used; anything else malformed raises ValueError.
Only PoC v2 vectors (24 bytes, finite fp16) are accepted and served.
"""
from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpoc_kernels.merkle.artifact import (
    POCV2_VECTOR_BYTES,
    first_non_finite,
    validate_pocv2_vector,
    validate_pocv2_vectors,
)
from cpoc_kernels.merkle.smst import SMST, _as_nonce, _nonce_array

DATA_FILE = "artifacts.data"
ROOTS_FILE = "flushed_roots.jsonl"
_HEADER = struct.Struct("<II")  # len, nonce (nonce as the uint32 bit pattern)
RECORD_BYTES = 8 + POCV2_VECTOR_BYTES  # every PoC v2 record: LE32 len (= 28), LE32 nonce, 24 bytes


@dataclass(frozen=True)
class ServedArtifact:
    """One answer of GetArtifactsAndProofs: the leaf at ``leaf_index`` of the snapshot and its proof."""

    leaf_index: int
    nonce: int
    vector: bytes
    proof: list[bytes]


def encode_record(nonce: int, vector: bytes) -> bytes:
    """``[LE32 4 + len(vector)][LE32 uint32(nonce)][vector]``."""
    return _HEADER.pack(4 + len(vector), nonce & 0xFFFFFFFF) + vector


def _scan_log(blob: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Parses the log: (nonces int32 [n], vectors uint8 [n, 24], end of the last whole record).

    Every valid record is 32 bytes (24-byte vectors), so the whole records are checked at once. Bytes
    after them are a torn record (cut mid-write) unless their header is impossible (ValueError).
    """
    n = len(blob) // RECORD_BYTES
    records = np.frombuffer(blob, np.uint8, count=n * RECORD_BYTES).reshape(n, RECORD_BYTES)
    header = np.ascontiguousarray(records[:, :8]).view("<u4")  # [n, 2]: len, nonce bits
    wrong = np.flatnonzero(header[:, 0] != 4 + POCV2_VECTOR_BYTES)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"{path}: corrupt record at byte {i * RECORD_BYTES}: length {int(header[i, 0])} "
                         f"(a PoC v2 record is {4 + POCV2_VECTOR_BYTES})")
    rows = records[:, 8:]
    bad = first_non_finite(rows)
    if bad is not None:
        i, j, bits = bad
        raise ValueError(f"{path}: corrupt record at byte {i * RECORD_BYTES}: PoC v2 vector element {j} "
                         f"is NaN/Inf (fp16 0x{bits:04x})")
    tail = blob[n * RECORD_BYTES:]
    if len(tail) >= 4:
        (length,) = struct.unpack_from("<I", tail)
        if length != 4 + POCV2_VECTOR_BYTES:  # a whole record would not fit in < 32 bytes either
            raise ValueError(f"{path}: corrupt record at byte {n * RECORD_BYTES}: length {length} "
                             f"(a PoC v2 record is {4 + POCV2_VECTOR_BYTES})")
    return header[:, 1].view(np.int32), np.ascontiguousarray(rows), n * RECORD_BYTES


def encode_records(nonces: np.ndarray, rows: np.ndarray) -> bytes:
    """Records of int32 nonces [n] and 24-byte vectors uint8 [n, 24], concatenated."""
    out = np.empty((len(nonces), RECORD_BYTES), np.uint8)
    out[:, :4] = np.frombuffer(struct.pack("<I", 4 + POCV2_VECTOR_BYTES), np.uint8)
    out[:, 4:8] = nonces.astype("<i4").view(np.uint8).reshape(-1, 4)
    out[:, 8:] = rows
    return out.tobytes()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """The artifact log of one PoC stage and model, with its SMST.

    ``append``/``extend`` validate first (ValueError: bad vector, duplicate nonce; nothing written
    then), append to the log and the tree, and flush when ``flush_interval_s`` has passed since the
    last flush (None: only explicit ``flush()``). ``flush()`` makes the log durable, then records
    ``(count, root)``. Proofs are served only for flushed commitments.
    """

    def __init__(self, directory: str | os.PathLike, *, flush_interval_s: float | None = 5.0,
                 fsync: bool = True, clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._clock = clock
        self.tree = SMST()
        self._flushed: list[tuple[int, bytes]] = []
        self.torn_bytes_dropped = 0  # bytes cut off the end of the log when it was opened
        self._replay_log()
        self._replay_roots()
        self._data = open(self.directory / DATA_FILE, "ab")
        self._roots = open(self.directory / ROOTS_FILE, "ab")
        self._last_flush = self._clock()
        self._broken: BaseException | None = None

    # ------------------------------------------------------------------ opening
    def _replay_log(self) -> None:
        path = self.directory / DATA_FILE
        blob = path.read_bytes() if path.exists() else b""
        nonces, rows, end = _scan_log(blob, path)
        if end < len(blob):
            self.torn_bytes_dropped = len(blob) - end
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if len(nonces):
            try:
                self.tree.extend(nonces, rows)
            except ValueError as exc:
                raise ValueError(f"{path}: corrupt log: {exc}") from None

    def _replay_roots(self) -> None:
        path = self.directory / ROOTS_FILE
        if not path.exists():
            return
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        good_end = 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and line == b"":
                break
            try:
                entry = json.loads(line)
                count, root = int(entry["count"]), bytes.fromhex(entry["root"])
                if len(root) != 32:
                    raise ValueError("root is not 32 bytes")
            except (ValueError, KeyError, TypeError) as exc:
                if last:  # a torn final line (no newline): drop it
                    break
                raise ValueError(f"{path}: corrupt line {i + 1}: {exc}") from None
            if last:  # complete JSON but no newline: still a torn write, drop it
                break
            if self._flushed and count <= self._flushed[-1][0]:
                raise ValueError(f"{path}: line {i + 1}: flushed counts must increase ({count})")
            if count > self.tree.count:
                raise ValueError(f"{path}: line {i + 1}: flushed count {count} but the log holds only "
                                 f"{self.tree.count} records")
            self._flushed.append((count, root))
            good_end += len(line) + 1
        if good_end < len(raw):
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        if self._flushed:
            count, root = self._flushed[-1]
            if self.tree.snapshot_root(count) != root:
                raise ValueError(f"{path}: flushed root at count {count} does not match the log's tree")

    # ------------------------------------------------------------------ writing
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"a write to the artifact log failed ({self._broken!r}); reopen the store")

    def _write(self, payload: bytes) -> None:
        try:
            self._data.write(payload)
        except BaseException as exc:
            self._broken = exc
            raise

    def append(self, nonce: int, vector: bytes) -> None:
        """Adds one artifact (nonce int32, 24-byte finite fp16 vector)."""
        self._check_usable()
        nonce, vector = _as_nonce(nonce), validate_pocv2_vector(vector)
        if nonce in self.tree:
            raise ValueError(f"duplicate nonce {nonce} (already in the log)")
        self._write(encode_record(nonce, vector))
        self.tree.insert(nonce, vector)
        self._maybe_flush()

    def extend(self, nonces, vectors) -> None:
        """Adds artifacts in order, all or nothing (validated before anything is written). nonces: int32
        [n] (list/array/tensor); vectors: list of 24-byte bytes, uint8 [n, 24] or fp16 [n, 12]."""
        self._check_usable()
        nonce_arr = _nonce_array(nonces)
        rows = validate_pocv2_vectors(vectors)
        if len(rows) != len(nonce_arr):
            raise ValueError(f"got {len(nonce_arr)} nonces but {len(rows)} vectors")
        self.tree.extend(nonce_arr, rows)  # atomic: duplicates raise before any change
        self._write(encode_records(nonce_arr, rows))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.flush_interval_s is not None and self._clock() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> tuple[int, bytes] | None:
        """Makes the log durable and records (count, root); None while the log is empty."""
        self._check_usable()
        self._last_flush = self._clock()
        self._data.flush()
        if self._fsync:
            os.fsync(self._data.fileno())
        count = self.tree.count
        if count == 0:
            return None
        if self._flushed and self._flushed[-1][0] == count:
            return self._flushed[-1]
        root = self.tree.root
        self._roots.write(json.dumps({"count": count, "root": root.hex()}).encode() + b"\n")
        self._roots.flush()
        if self._fsync:
            os.fsync(self._roots.fileno())
            if len(self._flushed) == 0:
                _fsync_dir(self.directory)
        self._flushed.append((count, root))
        return count, root

    # ------------------------------------------------------------------ reading
    @property
    def count(self) -> int:
        return self.tree.count

    @property
    def flushed(self) -> list[tuple[int, bytes]]:
        """Every (count, root) flushed so far, oldest first."""
        return list(self._flushed)

    def root_at(self, count: int) -> bytes:
        """Root of a flushed commitment; KeyError for any count that was not flushed."""
        for c, root in self._flushed:
            if c == count:
                return root
        raise KeyError(f"count {count} is not a flushed commitment (flushed: {[c for c, _ in self._flushed]})")

    def artifacts_and_proofs(self, dense_indices: Sequence[int], count: int,
                             root: bytes | None = None) -> list[ServedArtifact]:
        """GetArtifactsAndProofs: artifacts at dense indices of the flushed snapshot ``count`` with their
        proofs. KeyError: count not flushed; ValueError: ``root`` is not the flushed root at count;
        IndexError: an index >= count."""
        flushed_root = self.root_at(count)
        if root is not None and bytes(root) != flushed_root:
            raise ValueError(f"root {bytes(root).hex()} is not the flushed root at count {count}")
        indices = [int(i) for i in dense_indices]
        for i in indices:
            if not 0 <= i < count:
                raise IndexError(f"leaf index {i} out of range for count {count}")
        proofs = self.tree.proofs(np.array(indices, dtype=np.int64), count=count)
        served = []
        for i, p in zip(indices, proofs):
            nonce, vector = self.tree.artifact(i, count=count)
            validate_pocv2_vector(vector)
            served.append(ServedArtifact(i, nonce, vector, [row.tobytes() for row in p]))
        return served

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flushes the log's buffer (not a commitment) and closes the files."""
        if not self._data.closed:
            self._data.flush()
            if self._fsync:
                os.fsync(self._data.fileno())
            self._data.close()
            self._roots.close()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
