"""ArtifactStore under faults: second openers, threads, failed writes (ENOSPC), failed opens, corrupt files."""
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cpoc_kernels.merkle.store as store_module
from cpoc_kernels.merkle import SMST, verify_artifact_proof
from cpoc_kernels.merkle.store import DATA_FILE, ROOTS_FILE, SUMS_FILE, ArtifactStore, StoreLockedError

REPO = Path(__file__).resolve().parents[2]


def vec(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(12).astype("<f2").tobytes()


def vecs(nonces) -> np.ndarray:
    rng = np.random.default_rng(int(np.sum(nonces)) % 2**32)
    return rng.standard_normal((len(nonces), 12)).astype("<f2").view(np.uint8).reshape(-1, 24)


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def reference_roots(directory: Path) -> list:
    """(count, root) at each flushed count, rebuilt with the SMST from the log's arrival order."""
    raw = (directory / DATA_FILE).read_bytes()
    recs = np.frombuffer(raw, np.uint8).reshape(-1, 32)
    nonces = recs[:, 4:8].copy().view("<i4").ravel()
    tree = SMST()
    tree.extend(nonces, np.ascontiguousarray(recs[:, 8:]))
    counts = [json.loads(line)["count"] for line in (directory / ROOTS_FILE).read_text().splitlines()]
    return [(c, tree.snapshot_root(c)) for c in counts]


def make_store(directory: Path, flushes=(3, 7, 12)) -> None:
    with ArtifactStore(directory, flush_interval_s=None) as store:
        prev = 0
        for c in flushes:
            nonces = np.arange(prev, c, dtype=np.int32) * 5 + 1
            store.extend(nonces, vecs(nonces))
            store.flush()
            prev = c


# ------------------------------------------------------------------ one opener at a time
def test_second_opener_in_the_same_process_is_refused(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
        with pytest.raises(StoreLockedError, match="already open"):
            ArtifactStore(tmp_path)
        store.append(2, vec(2))  # the first opener is unaffected
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:  # released by close
        assert store.count == 2


def test_second_opener_in_another_process_is_refused(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from cpoc_kernels.merkle import ArtifactStore\n"
         f"s = ArtifactStore({str(tmp_path)!r}, flush_interval_s=None); print('open', flush=True); sys.stdin.read()"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(StoreLockedError, match="another process"):
            ArtifactStore(tmp_path)
    finally:
        child.communicate("", timeout=60)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:  # the lock dies with its holder
        store.append(1, vec(1))
        assert store.flush()[0] == 1


# ------------------------------------------------------------------ threads
def test_threads_appending_the_same_nonces_write_each_once(tmp_path):
    batches = [np.arange(k * 50, k * 50 + 50, dtype=np.int32) for k in range(40)]
    errors = []
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        def worker(seed):
            order = np.random.default_rng(seed).permutation(len(batches))
            for k in order:
                try:
                    store.extend(batches[k], vecs(batches[k]))
                except ValueError as exc:
                    assert "duplicate nonce" in str(exc)
                    errors.append(k)
                if k % 7 == 0:
                    store.flush()
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = store.flush()
        assert store.count == 2000 and len(errors) == 5 * len(batches)
    assert (tmp_path / DATA_FILE).stat().st_size == 2000 * 32
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 2000 and store.flushed[-1] == final
        assert store.flushed == reference_roots(tmp_path)


def test_threads_appending_single_records_and_serving(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([0], [vec(0)])
        store.flush()

        def writer(base):
            for i in range(300):
                try:
                    store.append(base + i % 200, vec(base + i))
                except ValueError:
                    pass
                if i % 50 == 0:
                    store.flush()

        def reader():
            for _ in range(30):
                count, root = store.flushed[-1]
                for s in store.artifacts_and_proofs([0, count - 1], count, root=root):
                    assert verify_artifact_proof(root, count, s.leaf_index, s.nonce, s.vector, s.proof)

        threads = [threading.Thread(target=writer, args=(b,)) for b in (1, 101, 1001)] + \
            [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.flush()
        count = store.count
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == count == 1 + 300 + 200
        assert store.flushed == reference_roots(tmp_path)


# ------------------------------------------------------------------ failed writes
class FailingWrites:
    """Replaces the store's pwrite: the next write to the armed file writes ``partial`` bytes, then ENOSPC."""

    def __init__(self, monkeypatch):
        self.fd = None
        self.partial = 0
        self.real = os.pwrite
        monkeypatch.setattr(store_module, "_pwrite", self)

    def arm(self, store, name, partial=5):
        self.fd, self.partial = store._fds[name], partial

    def __call__(self, fd, data, offset):
        if fd == self.fd:
            self.fd = None
            if self.partial:
                self.real(fd, bytes(data[:self.partial]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data, offset)


def test_enospc_on_the_roots_line_then_retry_writes_one_line(tmp_path, monkeypatch):
    fail = FailingWrites(monkeypatch)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1, 2], [vec(1), vec(2)])
        first = store.flush()
        store.append(3, vec(3))
        before = snapshot(tmp_path)
        for partial in (0, 9, 60):
            fail.arm(store, ROOTS_FILE, partial)
            with pytest.raises(OSError, match="No space"):
                store.flush()
            assert snapshot(tmp_path) == before and store.flushed == [first]
        second = store.flush()  # space is back
        assert second[0] == 3 and store.flush() == second
    lines = (tmp_path / ROOTS_FILE).read_text().splitlines()
    assert [json.loads(x)["count"] for x in lines] == [2, 3]
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.flushed == [first, second] == reference_roots(tmp_path)


@pytest.mark.parametrize("name", [DATA_FILE, SUMS_FILE])
def test_failed_extend_changes_nothing(tmp_path, monkeypatch, name):
    fail = FailingWrites(monkeypatch)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1, 2], [vec(1), vec(2)])
        committed = store.flush()
        before = snapshot(tmp_path)
        fail.arm(store, name, partial=40)
        with pytest.raises(OSError, match="No space"):
            store.extend([3, 4], [vec(3), vec(4)])
        assert snapshot(tmp_path) == before
        assert store.count == 2 and 3 not in store and store.flush() == committed
        store.extend([3, 4], [vec(3), vec(4)])  # the same records go in once space is back
        final = store.flush()
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 4 and store.flushed == [committed, final] == reference_roots(tmp_path)


def test_a_write_that_cannot_be_undone_stops_writes_and_reopens(tmp_path, monkeypatch):
    fail = FailingWrites(monkeypatch)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1, 2], [vec(1), vec(2)])
        committed = store.flush()
        fail.arm(store, DATA_FILE, partial=20)
        monkeypatch.setattr(store_module.os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        with pytest.raises(OSError):
            store.append(3, vec(3))
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="reopen the store"):
            store.append(4, vec(4))
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:  # the half record is cut as torn
        assert store.count == 2 and store.flushed == [committed] and store.torn_bytes_dropped == 20


# ------------------------------------------------------------------ opening
def corruptions(directory: Path):
    """(what, mutate(directory), error regex): each must fail the open and leave every file as it was."""
    def edit_roots(i, entry):
        def mutate(d):
            lines = (d / ROOTS_FILE).read_text().splitlines()
            lines[i] = entry if isinstance(entry, str) else json.dumps(entry)
            (d / ROOTS_FILE).write_text("\n".join(lines) + "\n")
        return mutate

    def flip(name, byte):
        def mutate(d):
            raw = bytearray((d / name).read_bytes())
            raw[byte] ^= 0x01
            (d / name).write_bytes(raw)
        return mutate

    def swap_records(d):  # same last root, different earlier roots; sums rewritten to match the new order
        raw = bytearray((d / DATA_FILE).read_bytes())
        raw[0:32], raw[11 * 32:12 * 32] = raw[11 * 32:12 * 32], raw[0:32]
        (d / DATA_FILE).write_bytes(raw)
        recs = np.frombuffer(bytes(raw), np.uint8).reshape(-1, 32)
        (d / SUMS_FILE).write_bytes(store_module.record_checksums(recs, 0).astype("<u4").tobytes())

    def torn_and_mismatch(d):
        edit_roots(0, {"count": 3, "root": "11" * 32})(d)
        with open(d / DATA_FILE, "ab") as f:
            f.write(b"\x1c\x00\x00")  # a torn record that a successful open would cut
        with open(d / ROOTS_FILE, "ab") as f:
            f.write(b'{"count": 1')

    root0 = json.loads((directory / ROOTS_FILE).read_text().splitlines()[0])["root"]
    return [
        ("earlier root wrong", edit_roots(0, {"count": 3, "root": "00" * 32}), "line 1: flushed root at count 3"),
        ("middle root wrong", edit_roots(1, {"count": 7, "root": root0}), "line 2: flushed root at count 7"),
        ("records reordered", swap_records, "line 1: flushed root at count 3"),
        ("count as string", edit_roots(0, {"count": "3", "root": root0}), "'count' must be an integer, got str"),
        ("count as float", edit_roots(0, {"count": 3.0, "root": root0}), "got float"),
        ("count as bool", edit_roots(0, {"count": True, "root": root0}), "got bool"),
        ("count zero", edit_roots(0, {"count": 0, "root": root0}), "must be >= 1"),
        ("count decreasing", edit_roots(1, {"count": 2, "root": root0}), "must increase"),
        ("count beyond log", edit_roots(2, {"count": 13, "root": root0}), "holds only 12"),
        ("root too short", edit_roots(0, {"count": 3, "root": "ab"}), "64 hex digits"),
        ("root not hex", edit_roots(0, {"count": 3, "root": "zz" * 32}), "64 hex digits"),
        ("extra key", edit_roots(0, {"count": 3, "root": root0, "x": 1}), "exactly the keys"),
        ("not an object", edit_roots(0, "[3]"), "JSON object"),
        ("not json", edit_roots(0, "{count"), "corrupt line 1"),
        ("deep json", edit_roots(0, "[" * 100000 + "]" * 100000), "corrupt line 1"),
        ("flipped byte, flushed record", flip(DATA_FILE, 2 * 32 + 17), "record 2 .* checksum"),
        ("flipped byte, nonce", flip(DATA_FILE, 5 * 32 + 4), "record 5 .* checksum"),
        ("flipped checksum", flip(SUMS_FILE, 4 * 9), "record 9 .* checksum"),
        ("torn tail and wrong root", torn_and_mismatch, "line 1: flushed root"),
        ("sums lost for flushed records", lambda d: (d / SUMS_FILE).write_bytes((d / SUMS_FILE).read_bytes()[:40]),
         "checksums for only 10 records, but 12 were flushed"),
    ]


def test_failed_opens_leave_every_file_byte_identical(tmp_path):
    make_store(tmp_path / "good")
    for k, (what, mutate, match) in enumerate(corruptions(tmp_path / "good")):
        d = tmp_path / f"case{k}"
        d.mkdir()
        for name, data in snapshot(tmp_path / "good").items():
            (d / name).write_bytes(data)
        mutate(d)
        before = snapshot(d)
        with pytest.raises(ValueError, match=match):
            ArtifactStore(d)
        assert snapshot(d) == before, what
        with pytest.raises(ValueError, match=match):  # and fails the same way again
            ArtifactStore(d)


def test_flipped_byte_in_an_unflushed_record_is_detected(tmp_path):
    make_store(tmp_path)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1000, 1001], [vec(7), vec(8)])  # not flushed
    raw = (tmp_path / DATA_FILE).read_bytes()
    for byte in range(12 * 32, 14 * 32):
        bad = bytearray(raw)
        bad[byte] ^= 0x40 if byte % 32 in (1, 2, 3) else 0x01  # lengths stay plausible, vectors finite
        (tmp_path / DATA_FILE).write_bytes(bad)
        with pytest.raises(ValueError, match=f"record {byte // 32} .* checksum|corrupt record"):
            ArtifactStore(tmp_path)
    (tmp_path / DATA_FILE).write_bytes(raw)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 14


def test_crash_between_checksum_and_record_write_reopens(tmp_path):
    make_store(tmp_path)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1000], [vec(7)])
    with open(tmp_path / SUMS_FILE, "ab") as f:
        f.write(b"\x01\x02\x03\x04\x05\x06")  # sums of a record never written, one of them torn
    with open(tmp_path / DATA_FILE, "ab") as f:
        f.write(b"\x1c\x00\x00\x00\x09")  # the record torn after 5 bytes
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 13 and store.torn_bytes_dropped == 5
    assert (tmp_path / SUMS_FILE).stat().st_size == 13 * 4
    assert (tmp_path / DATA_FILE).stat().st_size == 13 * 32


def test_records_without_checksums_after_the_last_flush_are_dropped_as_torn(tmp_path):
    make_store(tmp_path)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([1000, 1001], [vec(7), vec(8)])
    sums = tmp_path / SUMS_FILE
    sums.write_bytes(sums.read_bytes()[:12 * 4])  # e.g. a power loss took the last sums, not the records
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 12 and store.torn_bytes_dropped == 64 and 1000 not in store


@pytest.mark.parametrize("name", [DATA_FILE, ROOTS_FILE, SUMS_FILE])
def test_a_fifo_instead_of_a_file_fails_fast(tmp_path, name):
    os.mkfifo(tmp_path / name)
    code = ("from cpoc_kernels.merkle import ArtifactStore\n"
            f"try:\n    ArtifactStore({str(tmp_path)!r})\n"
            "except ValueError as exc:\n    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "not a regular file" in out.stdout


def test_a_directory_instead_of_a_file_is_refused(tmp_path):
    (tmp_path / DATA_FILE).mkdir()
    with pytest.raises(ValueError, match="directory"):
        ArtifactStore(tmp_path)


def test_a_closed_store_refuses_everything_and_changes_nothing(tmp_path):
    store = ArtifactStore(tmp_path, flush_interval_s=None)
    store.extend([1, 2], [vec(1), vec(2)])
    count, root = store.flush()
    store.close()
    before = snapshot(tmp_path)
    for call in (lambda: store.extend([3], [vec(3)]), lambda: store.append(3, vec(3)), store.flush,
                 lambda: store.artifacts_and_proofs([0], count)):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert store.count == 2 and 3 not in store and store.flushed == [(count, root)]
    assert snapshot(tmp_path) == before
    store.close()  # idempotent


def test_a_failed_periodic_flush_keeps_the_records_and_a_retry_commits_them(tmp_path, monkeypatch):
    fail = FailingWrites(monkeypatch)
    now = [0.0]
    with ArtifactStore(tmp_path, flush_interval_s=5.0, clock=lambda: now[0]) as store:
        store.append(1, vec(1))
        now[0] = 5.0
        fail.arm(store, ROOTS_FILE, partial=3)
        with pytest.raises(OSError, match="No space"):
            store.append(2, vec(2))  # written, then its periodic flush failed
        assert store.count == 2 and 2 in store and store.flushed == []
        with pytest.raises(ValueError, match="duplicate nonce 2"):
            store.append(2, vec(2))
        assert store.flush()[0] == 2
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.flushed == reference_roots(tmp_path) and store.count == 2
