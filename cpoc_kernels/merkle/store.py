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

from cpoc_kernels.merkle.artifact import POCV2_VECTOR_BYTES, validate_pocv2_vector
from cpoc_kernels.merkle.smst import SMST, _as_nonce

DATA_FILE = "artifacts.data"
ROOTS_FILE = "flushed_roots.jsonl"
_HEADER = struct.Struct("<II")  # len, nonce (nonce as the uint32 bit pattern)


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
        nonces, vectors = [], []
        pos = 0
        while pos < len(blob):
            if pos + 8 > len(blob):
                break  # torn header
            length, bits = _HEADER.unpack_from(blob, pos)
            if length < 5:
                raise ValueError(f"{path}: corrupt record at byte {pos}: length {length} < 5 (empty vector)")
            if pos + 4 + length > len(blob):
                break  # torn body
            vector = blob[pos + 8:pos + 4 + length]
            try:
                validate_pocv2_vector(vector)
            except ValueError as exc:
                raise ValueError(f"{path}: corrupt record at byte {pos}: {exc}") from None
            nonces.append(bits - 2**32 if bits >= 2**31 else bits)
            vectors.append(vector)
            pos += 4 + length
        if pos < len(blob):
            self.torn_bytes_dropped = len(blob) - pos
            with open(path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        if nonces:
            rows = np.frombuffer(b"".join(vectors), np.uint8).reshape(len(vectors), POCV2_VECTOR_BYTES)
            try:
                self.tree.extend(np.array(nonces, np.int32), rows)
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

    def extend(self, nonces: Sequence[int], vectors: Sequence[bytes]) -> None:
        """Adds artifacts in order, all or nothing (validated before anything is written)."""
        self._check_usable()
        nonces = [_as_nonce(n) for n in nonces]
        vectors = [validate_pocv2_vector(v) for v in vectors]
        self.tree.extend(nonces, vectors)  # atomic: duplicates raise before any change
        self._write(b"".join(encode_record(n, v) for n, v in zip(nonces, vectors)))
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
