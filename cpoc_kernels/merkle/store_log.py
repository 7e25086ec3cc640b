"""The artifact store's files: the network's record layout, the record checksums, and read-only parsing.

- ``artifacts.data`` (network layout, pocv2_protocol.md §1.5): records ``[LE32 len = 28][LE32 nonce][24-byte vector]``.
- ``flushed_roots.jsonl`` (network layout): one ``{"count": c, "root": hex}`` line per flush.
- ``artifacts.sums`` (this package's side file; the network's code ignores it): one LE32 checksum per record,
  ``record_checksums`` of the record's 32 bytes and its position, written before the record itself.
Everything here only reads and checks; the store decides what to cut or write.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np

from cpoc_kernels.merkle.artifact import POCV2_VECTOR_BYTES, first_non_finite

DATA_FILE = "artifacts.data"
ROOTS_FILE = "flushed_roots.jsonl"
SUMS_FILE = "artifacts.sums"
LOCK_FILE = "store.lock"
RECORD_BYTES = 8 + POCV2_VECTOR_BYTES  # LE32 len (= 28), LE32 nonce, 24 bytes
RECORD_LEN = 4 + POCV2_VECTOR_BYTES
_HEX = set("0123456789abcdefABCDEF")


def encode_record(nonce: int, vector: bytes) -> bytes:
    """``[LE32 4 + len(vector)][LE32 uint32(nonce)][vector]``."""
    return struct.pack("<II", 4 + len(vector), nonce & 0xFFFFFFFF) + vector


def encode_records(nonces: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Records of int32 nonces [n] and 24-byte vectors uint8 [n, 24]: uint8 [n, 32]."""
    out = np.empty((len(nonces), RECORD_BYTES), np.uint8)
    out[:, :4] = np.frombuffer(struct.pack("<I", RECORD_LEN), np.uint8)
    out[:, 4:8] = np.ascontiguousarray(nonces, "<i4").view(np.uint8).reshape(-1, 4)
    out[:, 8:] = rows
    return out


def record_checksums(records: np.ndarray, first_index: int) -> np.ndarray:
    """uint32 [n]: a checksum of each 32-byte record (uint8 [n, 32]) and its position first_index + i.

    Each step maps (state, word) through a bijection of the state, so any change confined to one 4-byte word
    of a record (a flipped byte or bit) always changes its checksum; other changes do with probability 1 - 2**-32.
    The position is mixed in, so records swapped or shifted in the log do not match their sums either.
    """
    words = np.ascontiguousarray(records).view("<u4").reshape(-1, 8).astype(np.uint32)
    pos = np.arange(first_index, first_index + len(words), dtype=np.uint64)
    h = ((pos * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ np.uint32(0x2545F491)
    for i in range(8):
        h ^= words[:, i]
        h *= np.uint32(0x85EBCA77)
        h ^= h >> np.uint32(15)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0xC2B2AE3D)
    h ^= h >> np.uint32(13)
    return h


def read_regular(path: Path) -> bytes | None:
    """The bytes of a regular file, None if absent; ValueError for a FIFO, device, directory, ... (never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a regular file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (mode {stat.filemode(st.st_mode)}); refusing to read it")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def scan_records(blob: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(nonces int32 [n], vectors uint8 [n, 24], end of the last whole record). Bytes after it are a torn
    record unless impossible as one (ValueError). Every whole record is checked at once."""
    n = len(blob) // RECORD_BYTES
    records = np.frombuffer(blob, np.uint8, count=n * RECORD_BYTES).reshape(n, RECORD_BYTES)
    header = np.ascontiguousarray(records[:, :8]).view("<u4")  # [n, 2]: len, nonce bits
    wrong = np.flatnonzero(header[:, 0] != RECORD_LEN)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"{path}: corrupt record at byte {i * RECORD_BYTES}: length {int(header[i, 0])} "
                         f"(a PoC v2 record is {RECORD_LEN})")
    rows = records[:, 8:]
    bad = first_non_finite(rows)
    if bad is not None:
        i, j, bits = bad
        raise ValueError(f"{path}: corrupt record at byte {i * RECORD_BYTES}: PoC v2 vector element {j} "
                         f"is NaN/Inf (fp16 0x{bits:04x})")
    tail = blob[n * RECORD_BYTES:]
    if len(tail) >= 4:
        (length,) = struct.unpack_from("<I", tail)
        if length != RECORD_LEN:  # a whole record would not fit in < 32 bytes either
            raise ValueError(f"{path}: corrupt record at byte {n * RECORD_BYTES}: length {length} "
                             f"(a PoC v2 record is {RECORD_LEN})")
    return np.ascontiguousarray(header[:, 1]).view(np.int32), np.ascontiguousarray(rows), n * RECORD_BYTES


def check_sums(blob: bytes, n_records: int, sums: bytes, path: Path) -> None:
    """ValueError naming the first of the first n_records records whose checksum in ``sums`` differs."""
    records = np.frombuffer(blob, np.uint8, count=n_records * RECORD_BYTES).reshape(n_records, RECORD_BYTES)
    want = np.frombuffer(sums, "<u4", count=n_records)
    chunk = 1 << 20
    for start in range(0, n_records, chunk):
        got = record_checksums(records[start:start + chunk], start)
        bad = np.flatnonzero(got != want[start:start + chunk])
        if bad.size:
            i = start + int(bad[0])
            raise ValueError(f"{path}: record {i} (byte {i * RECORD_BYTES}) does not match its checksum in "
                             f"{SUMS_FILE}: the record or the checksum file is corrupt")


def _parse_root_line(line: bytes) -> tuple[int, bytes]:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    if set(entry) != {"count", "root"}:
        raise ValueError(f"expected exactly the keys 'count' and 'root', got {sorted(entry)}")
    count, root = entry["count"], entry["root"]
    if type(count) is not int:  # bool, float and str are refused
        raise ValueError(f"'count' must be an integer, got {type(count).__name__} {count!r}")
    if count < 1:
        raise ValueError(f"'count' must be >= 1, got {count}")
    if not (isinstance(root, str) and len(root) == 64 and set(root) <= _HEX):
        raise ValueError(f"'root' must be 64 hex digits, got {root!r}")
    return count, bytes.fromhex(root)


def parse_roots(raw: bytes, n_records: int, path: Path) -> tuple[list[tuple[int, bytes]], int]:
    """(every (count, root) committed, end of the last whole line). A final line without its newline is a
    torn write (ignored); any other malformed line, counts that do not increase, or a count beyond the log's
    n_records raise ValueError naming the line."""
    flushed: list[tuple[int, bytes]] = []
    end = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines[:-1]):  # the last piece has no newline: empty or torn
        try:
            count, root = _parse_root_line(line)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"{path}: corrupt line {i + 1}: {exc}") from None
        if flushed and count <= flushed[-1][0]:
            raise ValueError(f"{path}: line {i + 1}: flushed counts must increase ({flushed[-1][0]} then {count})")
        if count > n_records:
            raise ValueError(f"{path}: line {i + 1}: flushed count {count} but the log holds only "
                             f"{n_records} records")
        flushed.append((count, root))
        end += len(line) + 1
    return flushed, end
