"""The artifact log: network record layout, flushed commitments, replay, torn-record recovery."""
import json
import struct

import numpy as np
import pytest

from cpoc_kernels.merkle import ArtifactStore, oracle, verify_artifact_proof
from cpoc_kernels.merkle.store import DATA_FILE, ROOTS_FILE, SUMS_FILE

from ._golden import arrival, elements, golden_trees

# Trees whose vectors are PoC v2 artifacts (24 bytes, finite fp16) and that have snapshots.
STORE_TREES = [t for t in golden_trees() if t["count"] > 0]


def fill(store, tree):
    """Appends the tree's leaves in arrival order, flushing at each golden snapshot count."""
    snaps = {s["count"] for s in tree["snapshots"]}
    for k, (nonce, vector) in enumerate(arrival(tree), start=1):
        store.append(nonce, vector)
        if k in snaps:
            store.flush()


def vec(seed: int) -> bytes:
    return np.random.default_rng(seed).standard_normal(12).astype("<f2").tobytes()


@pytest.mark.parametrize("tree", STORE_TREES, ids=[t["name"] for t in STORE_TREES])
def test_flushes_reopen_and_serve_match_golden(tmp_path, tree):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        fill(store, tree)
        assert [(c, r.hex()) for c, r in store.flushed] == [(s["count"], s["root"]) for s in tree["snapshots"]]
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:  # replay
        assert store.torn_bytes_dropped == 0
        assert store.count == tree["count"]
        assert store.flush() == (tree["count"], bytes.fromhex(tree["root"]))
        assert [(c, r.hex()) for c, r in store.flushed] == [(s["count"], s["root"]) for s in tree["snapshots"]]
        for snap in tree["snapshots"]:
            golden = snap.get("proofs", [])
            served = store.artifacts_and_proofs([p["dense_index"] for p in golden], snap["count"],
                                                root=bytes.fromhex(snap["root"]))
            for s, p in zip(served, golden):
                assert (s.leaf_index, s.nonce) == (p["dense_index"], p["nonce"])
                assert oracle.leaf_data(s.nonce, s.vector).hex() == p["leaf_data_hex"]
                assert s.proof == elements(p["proof_hex"])
                assert verify_artifact_proof(bytes.fromhex(snap["root"]), snap["count"], s.leaf_index,
                                             s.nonce, s.vector, s.proof)


def test_record_layout_is_the_networks(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(7, vec(1))
        store.append(-1, vec(2))
    raw = (tmp_path / DATA_FILE).read_bytes()
    expected = struct.pack("<II", 28, 7) + vec(1) + struct.pack("<II", 28, 0xFFFFFFFF) + vec(2)
    assert raw == expected


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 8, 20, 31])
def test_torn_final_record_is_truncated_not_used(tmp_path, cut):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        for n in range(5):
            store.append(n, vec(n))
        store.flush()
        store.append(5, vec(5))
    path = tmp_path / DATA_FILE
    full = path.read_bytes()
    path.write_bytes(full[:len(full) - 32 + cut])  # the last record (32 bytes) cut after `cut` bytes
    ref = oracle.OracleSMST()
    for n in range(5):
        ref.insert(n, vec(n))
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.torn_bytes_dropped == cut
        assert store.count == 5 and 5 not in store
        assert store.root_at(5) == ref.root_at(0)
        assert path.stat().st_size == len(full) - 32
        store.append(5, vec(5))  # appending continues cleanly after the cut
        assert store.flush()[0] == 6
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert store.count == 6 and store.torn_bytes_dropped == 0


def test_torn_roots_line_is_dropped(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
        store.flush()
        store.append(2, vec(2))
        store.flush()
    roots = tmp_path / ROOTS_FILE
    good = roots.read_bytes()
    roots.write_bytes(good + b'{"count": 3, "ro')
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        assert [c for c, _ in store.flushed] == [1, 2]
    assert roots.read_bytes() == good


def test_corrupt_log_raises(tmp_path):
    """Layout checks (a log without the checksum side file, as the network's own code writes it)."""
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
        store.append(2, vec(2))
    (tmp_path / SUMS_FILE).unlink()
    path = tmp_path / DATA_FILE
    raw = bytearray(path.read_bytes())
    bad_len = bytearray(raw)
    bad_len[0:4] = struct.pack("<I", 4)  # empty vector in the middle
    path.write_bytes(bad_len)
    with pytest.raises(ValueError, match="corrupt record at byte 0"):
        ArtifactStore(tmp_path)
    nan = bytearray(raw)
    nan[8:10] = b"\x00\x7e"  # fp16 NaN
    path.write_bytes(nan)
    with pytest.raises(ValueError, match="NaN/Inf"):
        ArtifactStore(tmp_path)
    dup = bytes(raw[:32]) * 2
    path.write_bytes(dup)
    with pytest.raises(ValueError, match="duplicate nonce 1 .records 0 and 1"):
        ArtifactStore(tmp_path)
    assert not (tmp_path / SUMS_FILE).exists()  # failed opens create nothing
    path.write_bytes(raw)
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:  # a log without sums: they are created
        assert store.sums_created and store.count == 2
    assert (tmp_path / SUMS_FILE).stat().st_size == 8


def test_flushed_root_mismatch_or_lost_records_raise(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
        store.flush()
    roots = tmp_path / ROOTS_FILE
    roots.write_text(json.dumps({"count": 1, "root": "00" * 32}) + "\n")
    with pytest.raises(ValueError, match="does not match"):
        ArtifactStore(tmp_path)
    roots.write_text(json.dumps({"count": 2, "root": "00" * 32}) + "\n")
    with pytest.raises(ValueError, match="log holds only 1"):
        ArtifactStore(tmp_path)


def test_bad_input_leaves_store_intact(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
        committed = store.flush()
        size = (tmp_path / DATA_FILE).stat().st_size
        inf = bytearray(vec(3))
        inf[2:4] = b"\x00\x7c"
        for nonce, vector, match in [(1, vec(2), "duplicate nonce 1"), (2, vec(2)[:23], "24 bytes"),
                                     (2, b"", "24 bytes"), (2, bytes(inf), "NaN/Inf"),
                                     (2**31, vec(2), "int32")]:
            with pytest.raises(ValueError, match=match):
                store.append(nonce, vector)
        with pytest.raises(ValueError, match="duplicate nonce"):
            store.extend([5, 6, 5], [vec(5), vec(6), vec(7)])
        with pytest.raises(ValueError, match="NaN/Inf"):
            store.extend([5, 6], [vec(5), bytes(inf)])
        assert store.flush() == committed
        assert ((tmp_path / DATA_FILE).stat().st_size, store.flushed) == (size, [committed])


def test_serving_errors(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.extend([4, 2, 9], [vec(4), vec(2), vec(9)])
        count, root = store.flush()
        store.append(11, vec(11))  # not flushed
        with pytest.raises(KeyError, match="not a flushed commitment"):
            store.artifacts_and_proofs([0], 4)
        with pytest.raises(KeyError):
            store.root_at(2)
        with pytest.raises(ValueError, match="not the flushed root"):
            store.artifacts_and_proofs([0], 3, root=bytes(32))
        with pytest.raises(IndexError, match="out of range"):
            store.artifacts_and_proofs([0, 3], 3)
        served = store.artifacts_and_proofs([0, 1, 2], count, root=root)
        assert [s.nonce for s in served] == [2, 4, 9]


def test_periodic_flush_uses_the_interval(tmp_path):
    now = [0.0]
    with ArtifactStore(tmp_path, flush_interval_s=5.0, clock=lambda: now[0]) as store:
        store.append(1, vec(1))
        assert store.flushed == []
        now[0] = 5.0
        store.append(2, vec(2))
        assert [c for c, _ in store.flushed] == [2]
        now[0] = 6.0
        store.extend([3, 4], [vec(3), vec(4)])
        assert [c for c, _ in store.flushed] == [2]
        now[0] = 10.0
        store.append(5, vec(5))
        assert [c for c, _ in store.flushed] == [2, 5]


def test_extend_accepts_arrays_and_tensors_with_the_same_log(tmp_path):
    import torch

    nonces = [9, -3, 4]
    vecs = [vec(9), vec(3), vec(4)]
    fp16 = np.stack([np.frombuffer(v, "<f2") for v in vecs]).astype(np.float16)
    logs = []
    for k, (n_in, v_in) in enumerate([(nonces, vecs), (np.array(nonces, np.int32), fp16),
                                      (torch.tensor(nonces, dtype=torch.int32), torch.from_numpy(fp16)),
                                      (nonces, fp16.view(np.uint8))]):
        with ArtifactStore(tmp_path / str(k), flush_interval_s=None) as store:
            store.extend(n_in, v_in)
            logs.append(((tmp_path / str(k) / DATA_FILE).read_bytes() if store.flush() else None))
    expected = b"".join(struct.pack("<Ii", 28, n) + v for n, v in zip(nonces, vecs))
    assert logs == [expected] * 4
    with ArtifactStore(tmp_path / "bad", flush_interval_s=None) as store:
        with pytest.raises(ValueError, match=r"fp16 \[n, 12\]"):
            store.extend([1], np.zeros((1, 11), np.float16))
        with pytest.raises(ValueError, match="2 nonces but 1 vectors"):
            store.extend([1, 2], [vec(1)])
        assert store.count == 0


def test_impossible_length_in_the_tail_is_corruption_not_a_torn_record(tmp_path):
    with ArtifactStore(tmp_path, flush_interval_s=None) as store:
        store.append(1, vec(1))
    path = tmp_path / DATA_FILE
    path.write_bytes(path.read_bytes() + struct.pack("<II", 9, 2) + b"abcde")  # a whole 5-byte-vector record
    with pytest.raises(ValueError, match="corrupt record at byte 32: length 9"):
        ArtifactStore(tmp_path)
