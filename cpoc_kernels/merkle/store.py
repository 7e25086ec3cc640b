"""Append-only on-disk artifact log with flushed (count, root) commitments (the network's layout).

Directory contents (pocv2_protocol.md §1.5; see ``store_log``): ``artifacts.data`` (records in arrival order),
``flushed_roots.jsonl`` (one ``{"count", "root"}`` line per flush), plus this package's ``artifacts.sums``
(a checksum per record) and ``store.lock``; the network's code reads the first two unchanged.

- One opener at a time: an exclusive ``flock`` on ``store.lock`` (StoreLockedError for a second opener, in
  this or another process). All methods are serialized by a lock, so threads can share a store.
- Opening checks everything before it changes anything: every record against its checksum, the record
  layout, no duplicate nonce, and the root at *every* flushed count recomputed from the log. Only then is a
  torn tail (a crash mid-write: a partial record, records without a checksum after the last flush, a
  partial roots line) cut off. A failed open leaves every file byte for byte as it was.
- Writes go to known offsets (``pwrite``); a failed write is cut back to the last whole state before the
  error is raised, and the in-memory state changes only after the bytes are on disk. A retried flush after
  e.g. ENOSPC writes its line once.
- Roots and proofs come from ``store_index.CommitmentIndex``: a flush costs what was added since the last
  one, proofs at any flushed count need no tree rebuild.
Only PoC v2 vectors (24 bytes, finite fp16) are accepted and served.
"""
from __future__ import annotations

import fcntl
import json
import operator
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpoc_kernels.merkle.artifact import validate_pocv2_vector, validate_pocv2_vectors
from cpoc_kernels.merkle.smst import _as_nonce, _nonce_array
from cpoc_kernels.merkle.store_index import CommitmentIndex
from cpoc_kernels.merkle.store_log import (
    DATA_FILE,
    LOCK_FILE,
    RECORD_BYTES,
    ROOTS_FILE,
    SUMS_FILE,
    check_sums,
    encode_record,
    encode_records,
    parse_roots,
    read_regular,
    record_checksums,
    scan_records,
)

__all__ = ["ArtifactStore", "ServedArtifact", "StoreLockedError", "encode_record", "encode_records",
           "DATA_FILE", "ROOTS_FILE", "SUMS_FILE", "LOCK_FILE", "RECORD_BYTES"]

_pwrite = os.pwrite  # the one write primitive (tests inject failures here)


class StoreLockedError(RuntimeError):
    """The store directory is already open (another process, or another ArtifactStore in this one)."""


@dataclass(frozen=True)
class ServedArtifact:
    """One answer of GetArtifactsAndProofs: the leaf at ``leaf_index`` of the snapshot and its proof."""

    leaf_index: int
    nonce: int
    vector: bytes
    proof: list[bytes]


def _write_at(fd: int, payload: bytes, offset: int) -> None:
    view = memoryview(payload)
    while view:
        n = _pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"short write ({n}) at offset {offset}")
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file")
    return fd


class ArtifactStore:
    """The artifact log of one PoC stage and model, with its commitments.

    ``append``/``extend`` validate first (ValueError: bad vector, duplicate nonce; nothing written then),
    write the records, and flush when ``flush_interval_s`` has passed since the last flush (None: only
    explicit ``flush()``); if that periodic flush fails, its error is raised but the records are in the
    log (retry ``flush()``, not the append). ``flush()`` makes the log durable, then records
    ``(count, root)``. Proofs are served only for flushed commitments.
    """

    def __init__(self, directory: str | os.PathLike, *, flush_interval_s: float | None = 5.0,
                 fsync: bool = True, clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.flush_interval_s = flush_interval_s
        self._fsync = fsync
        self._clock = clock
        self._mu = threading.RLock()
        self._fds: dict[str, int] = {}
        self._closed = True
        self._broken: BaseException | None = None
        self.torn_bytes_dropped = 0  # bytes cut off the end of the log when it was opened
        self.sums_created = False    # True when the log had no checksum file (e.g. written by another program)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _open_regular(self.directory / LOCK_FILE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLockedError(f"{self.directory}: the artifact store is already open (another process or "
                                   f"another ArtifactStore in this process holds {LOCK_FILE}); close it first") from None
        try:
            self._open()
        except BaseException:
            for fd in self._fds.values():
                os.close(fd)
            os.close(self._lock_fd)
            raise
        self._closed = False
        self._last_flush = self._clock()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        d = self.directory
        data_path, roots_path, sums_path = d / DATA_FILE, d / ROOTS_FILE, d / SUMS_FILE
        blob = read_regular(data_path) or b""
        raw_roots = read_regular(roots_path) or b""
        sums = read_regular(sums_path)
        nonces, rows, end = scan_records(blob, data_path)
        flushed, roots_end = parse_roots(raw_roots, len(nonces), roots_path)
        committed = flushed[-1][0] if flushed else 0
        if sums is None:
            n = len(nonces)
        else:
            n = min(len(sums) // 4, len(nonces))
            check_sums(blob, n, sums, data_path)
            if n < committed:
                raise ValueError(f"{sums_path}: checksums for only {n} records, but {committed} were flushed "
                                 f"({roots_path}); the checksum file is damaged")
        nonces, rows = nonces[:n], rows[:n]
        order = np.argsort(nonces.view(np.uint32), kind="stable")
        same = np.flatnonzero(nonces[order][1:] == nonces[order][:-1])
        if same.size:
            a, b = sorted((int(order[same[0]]), int(order[same[0] + 1])))
            raise ValueError(f"{data_path}: corrupt log: duplicate nonce {int(nonces[a])} (records {a} and {b})")
        index = CommitmentIndex()
        index.append(nonces, rows)
        roots = index.replay([c for c, _ in flushed])
        for i, ((count, root), got) in enumerate(zip(flushed, roots)):
            if got != root:
                raise ValueError(f"{roots_path}: line {i + 1}: flushed root at count {count} does not match the "
                                 f"log's first {count} records (root {root.hex()}, log gives {got.hex()})")
        # Everything checked: only now cut torn tails and create what is missing.
        self._fds = {name: _open_regular(d / name) for name in (DATA_FILE, ROOTS_FILE, SUMS_FILE)}
        if n * RECORD_BYTES < len(blob):
            self.torn_bytes_dropped = len(blob) - n * RECORD_BYTES
            self._cut(DATA_FILE, n * RECORD_BYTES)
        if roots_end < len(raw_roots):
            self._cut(ROOTS_FILE, roots_end)
        if sums is None:
            self.sums_created = n > 0
            if n:
                records = np.frombuffer(blob, np.uint8, count=n * RECORD_BYTES).reshape(n, RECORD_BYTES)
                _write_at(self._fds[SUMS_FILE], record_checksums(records, 0).astype("<u4").tobytes(), 0)
                os.fsync(self._fds[SUMS_FILE])
        elif len(sums) != 4 * n:
            self._cut(SUMS_FILE, 4 * n)
        self._index = index
        self._n = n
        self._roots_size = roots_end
        self._flushed = list(flushed)
        self._commit_of = {count: i for i, (count, _) in enumerate(flushed)}
        self._pending: set[int] = set()  # nonces added since the index last saw them (none after a replay)

    def _cut(self, name: str, size: int) -> None:
        fd = self._fds[name]
        os.ftruncate(fd, size)
        os.fsync(fd)

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if self._closed:
            raise ValueError("the artifact store is closed")
        if self._broken is not None:
            raise RuntimeError(f"a write to the artifact store failed and could not be undone ({self._broken!r}); "
                               f"reopen the store")

    def append(self, nonce: int, vector: bytes) -> None:
        """Adds one artifact (nonce int32, 24-byte finite fp16 vector)."""
        with self._mu:
            self._check_writable()
            nonce, vector = _as_nonce(nonce), validate_pocv2_vector(vector)
            self._add(np.array([nonce], np.int32), np.frombuffer(vector, np.uint8).reshape(1, -1))

    def extend(self, nonces, vectors) -> None:
        """Adds artifacts in order, all or nothing (validated before anything is written). nonces: int32
        [n] (list/array/tensor); vectors: list of 24-byte bytes, uint8 [n, 24] or fp16 [n, 12]."""
        with self._mu:
            self._check_writable()
            nonce_arr = _nonce_array(nonces)
            rows = validate_pocv2_vectors(vectors)
            if len(rows) != len(nonce_arr):
                raise ValueError(f"got {len(nonce_arr)} nonces but {len(rows)} vectors")
            if len(nonce_arr):
                self._add(nonce_arr, rows)

    def _add(self, nonces: np.ndarray, rows: np.ndarray) -> None:
        self._check_duplicates(nonces)
        n0 = self._n
        records = encode_records(nonces, rows)
        try:
            _write_at(self._fds[SUMS_FILE], record_checksums(records, n0).astype("<u4").tobytes(), 4 * n0)
            _write_at(self._fds[DATA_FILE], records.tobytes(), RECORD_BYTES * n0)
            self._index.append(nonces, rows)
        except BaseException:
            self._undo_write(n0)
            raise
        self._n += len(nonces)
        self._pending.update(nonces.tolist())
        self._maybe_flush()

    def _check_duplicates(self, nonces: np.ndarray) -> None:
        s = np.sort(nonces)
        inside = np.flatnonzero(s[1:] == s[:-1])
        if inside.size:
            raise ValueError(f"duplicate nonce {int(s[inside[0]])} inside the batch (nothing was written)")
        known = np.flatnonzero(self._index.contains_any(nonces.view(np.uint32)))
        if known.size:
            raise ValueError(f"duplicate nonce {int(nonces[known[0]])} (already in the log; nothing was written)")
        if self._pending:
            for x in nonces.tolist():
                if x in self._pending:
                    raise ValueError(f"duplicate nonce {x} (already in the log; nothing was written)")

    def _undo_write(self, n0: int) -> None:
        """Cuts both files back to n0 records; a store whose cut fails refuses further writes."""
        try:
            os.ftruncate(self._fds[DATA_FILE], RECORD_BYTES * n0)
            os.ftruncate(self._fds[SUMS_FILE], 4 * n0)
            if self._index.count != n0:
                raise RuntimeError("in-memory records changed during a failed write")
        except BaseException as exc:
            self._broken = exc

    def _maybe_flush(self) -> None:
        if self.flush_interval_s is not None and self._clock() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> tuple[int, bytes] | None:
        """Makes the log durable and records (count, root); None while the log is empty."""
        with self._mu:
            self._check_writable()
            self._last_flush = self._clock()
            if self._fsync:
                os.fsync(self._fds[SUMS_FILE])
                os.fsync(self._fds[DATA_FILE])
            count = self._n
            if count == 0:
                return None
            if self._flushed and self._flushed[-1][0] == count:
                return self._flushed[-1]
            try:
                _, root = self._index.commit()
            except BaseException as exc:
                self._broken = exc
                raise
            self._pending.clear()
            line = json.dumps({"count": count, "root": root.hex()}).encode() + b"\n"
            fd = self._fds[ROOTS_FILE]
            try:
                _write_at(fd, line, self._roots_size)
                if self._fsync:
                    os.fsync(fd)
                    if not self._flushed:
                        _fsync_dir(self.directory)
            except BaseException:
                try:
                    os.ftruncate(fd, self._roots_size)
                except BaseException as exc:
                    self._broken = exc
                raise
            self._roots_size += len(line)
            self._commit_of[count] = len(self._index.commit_counts) - 1
            self._flushed.append((count, root))
            return count, root

    # ------------------------------------------------------------------ reading
    @property
    def count(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    def __contains__(self, nonce) -> bool:
        with self._mu:
            n = _as_nonce(nonce)
            return n in self._pending or bool(self._index.contains_any(np.array([n], np.int32).view(np.uint32))[0])

    @property
    def flushed(self) -> list[tuple[int, bytes]]:
        """Every (count, root) flushed so far, oldest first."""
        return list(self._flushed)

    def root_at(self, count: int) -> bytes:
        """Root of a flushed commitment; KeyError for any count that was not flushed."""
        c = operator.index(count)
        if c not in self._commit_of:
            raise KeyError(f"count {c} is not a flushed commitment (flushed: {[c for c, _ in self._flushed]})")
        return self._index.commit_roots[self._commit_of[c]]

    def artifacts_and_proofs(self, dense_indices: Sequence[int], count: int,
                             root: bytes | None = None) -> list[ServedArtifact]:
        """GetArtifactsAndProofs: artifacts at dense indices of the flushed snapshot ``count`` with their
        proofs. KeyError: count not flushed; ValueError: ``root`` is not the flushed root at count;
        IndexError: an index >= count."""
        with self._mu:
            if self._closed:
                raise ValueError("the artifact store is closed")
            flushed_root = self.root_at(count)
            if root is not None and bytes(root) != flushed_root:
                raise ValueError(f"root {bytes(root).hex()} is not the flushed root at count {count}")
            indices = [operator.index(i) for i in dense_indices]
            for i in indices:
                if not 0 <= i < count:
                    raise IndexError(f"leaf index {i} out of range for count {count}")
            if not indices:
                return []
            proofs, arrival, recomputed = self._index.proofs(self._commit_of[count], np.array(indices, np.int64))
            if recomputed != flushed_root:
                raise ValueError(f"the log no longer gives the flushed root at count {count}; refusing to serve")
            served = []
            for i, p, a in zip(indices, proofs, arrival):
                nonce, vector = self._index.record(int(a))
                served.append(ServedArtifact(i, nonce, validate_pocv2_vector(vector), [e.tobytes() for e in p]))
            return served

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Makes the log durable (not a commitment), closes the files and releases the lock."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
            try:
                if self._fsync and self._broken is None:
                    os.fsync(self._fds[SUMS_FILE])
                    os.fsync(self._fds[DATA_FILE])
            finally:
                for fd in self._fds.values():
                    os.close(fd)
                os.close(self._lock_fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
