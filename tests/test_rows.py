"""The per-step row contract (cpoc_kernels.rows) without any engine."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpoc_kernels.rows import NonceTracker, PoCRows, PoCSegment

S = 10


def flat_batch(requests):
    """requests: list of (request_id, start_position, n_rows) -> (cu_seq_lens_q, position_ids, ids)."""
    cu, pos, ids = [0], [], []
    for rid, p0, n in requests:
        cu.append(cu[-1] + n)
        pos.extend(range(p0, p0 + n))
        ids.append(rid)
    return cu, pos, ids


def test_segments_positions_and_readout():
    # chat decode, PoC chunk in the middle of its prefill, chat prefill, PoC finishing, PoC starting
    reqs = [("chat-a", 17, 1), ("p1", 3, 4), ("chat-b", 0, 5), ("p2", 6, 4), ("p3", 0, 2)]
    cu, pos, ids = flat_batch(reqs)
    rows = PoCRows.from_flat_batch(cu, pos, ids, {"p1": 101, "p2": 102, "p3": 103}, S)
    assert rows.num_rows == 16
    assert [(s.nonce, s.row_start, s.n_rows, s.position, s.completes) for s in rows.segments] == [
        (101, 1, 4, 3, False), (102, 10, 4, 6, True), (103, 14, 2, 0, False)]
    assert rows.row_index().tolist() == [1, 2, 3, 4, 10, 11, 12, 13, 14, 15]
    assert rows.positions().tolist() == [3, 4, 5, 6, 6, 7, 8, 9, 0, 1]
    assert rows.readout_rows().tolist() == [13]
    assert rows.readout_nonces() == [102]
    assert rows.num_poc_rows == 10
    mask = rows.row_mask()
    assert mask.dtype == torch.bool and mask.sum() == 10 and not mask[0] and not mask[5:10].any()
    assert rows.chat_rows() == [0, 5, 6, 7, 8, 9]


def test_chat_logit_selection_drops_poc_rows():
    reqs = [("chat-a", 17, 1), ("p2", 6, 4), ("chat-b", 0, 5)]
    cu, pos, ids = flat_batch(reqs)
    rows = PoCRows.from_flat_batch(cu, pos, ids, {"p2": 7}, S)
    # logits rows: last row of each request that samples (chat-a: 0, p2: 4, chat-b: 9)
    assert rows.chat_logit_selection([0, 4, 9]) == [0, 2]
    assert rows.chat_logit_selection([]) == []


def test_gather_inputs_uses_absolute_positions():
    inputs = {5: torch.arange(S * 3, dtype=torch.float32).view(S, 3), 6: -torch.arange(S * 3.0).view(S, 3)}
    cu, pos, ids = flat_batch([("chat", 0, 2), ("a", 7, 3), ("b", 0, 4)])
    rows = PoCRows.from_flat_batch(cu, pos, ids, {"a": 5, "b": 6}, S)
    got = rows.gather_inputs(inputs.__getitem__)
    assert torch.equal(got, torch.cat([inputs[5][7:10], inputs[6][0:4]]))
    # writing them into a flat buffer touches PoC rows only
    flat = torch.full((rows.num_rows, 3), 99.0)
    flat.index_copy_(0, rows.row_index(), got)
    assert torch.equal(flat[:2], torch.full((2, 3), 99.0))
    assert torch.equal(flat[2:5], inputs[5][7:10])


def test_no_poc_and_padding_rows():
    cu, pos, ids = flat_batch([("chat", 0, 3)])
    rows = PoCRows.from_flat_batch(cu + [3, 3], pos + [0, 0], ids, {}, S)  # padded tail
    assert not rows and rows.num_rows == 5 and rows.row_index().numel() == 0
    assert rows.row_mask().sum() == 0 and rows.readout_rows().numel() == 0
    with pytest.raises(ValueError):
        rows.gather_inputs(lambda n: torch.zeros(S, 1))


@pytest.mark.parametrize("reqs, err", [
    ([("p", 8, 4)], "seq_len"),                     # runs past the nonce's end
    ([("p", 0, 0), ("q", 0, 1)], None),             # empty request is skipped
])
def test_bounds(reqs, err):
    cu, pos, ids = flat_batch(reqs)
    lookup = {"p": 1, "q": 2}
    if err:
        with pytest.raises(ValueError, match=err):
            PoCRows.from_flat_batch(cu, pos, ids, lookup, S)
    else:
        rows = PoCRows.from_flat_batch(cu, pos, ids, lookup, S)
        assert [s.nonce for s in rows.segments] == [2]


def test_non_consecutive_positions_rejected():
    with pytest.raises(ValueError, match="consecutive"):
        PoCRows.from_flat_batch([0, 3], [0, 1, 3], ["p"], {"p": 1}, S)
    with pytest.raises(ValueError, match="entries"):
        PoCRows.from_flat_batch([0], [], ["p"], {"p": 1}, S)


def test_segment_validation():
    with pytest.raises(ValueError):  # overlapping
        PoCRows(5, S, (PoCSegment("a", 1, 0, 3, 0, False), PoCSegment("b", 2, 2, 2, 0, False)))
    with pytest.raises(ValueError):  # completes must match the position
        PoCRows(5, S, (PoCSegment("a", 1, 0, 3, 0, True),))
    with pytest.raises(ValueError):  # beyond the batch
        PoCRows(2, S, (PoCSegment("a", 1, 0, 3, 0, False),))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, S - 1), st.integers(1, S)), min_size=1, max_size=8))
def test_rows_partition_property(spec):
    """Random batches: PoC rows + chat rows partition the batch; readout rows are exactly the position S-1 rows."""
    reqs, lookup = [], {}
    for i, (is_poc, p0, n) in enumerate(spec):
        rid = f"r{i}"
        if is_poc:
            n = min(n, S - p0)
            lookup[rid] = 1000 + i
        reqs.append((rid, p0, n))
    cu, pos, ids = flat_batch(reqs)
    rows = PoCRows.from_flat_batch(cu, pos, ids, lookup, S)
    poc = rows.row_index().tolist()
    assert sorted(poc + rows.chat_rows()) == list(range(len(pos)))
    assert all(pos[r] == p for r, p in zip(poc, rows.positions().tolist()))
    expected_readout = [cu[i + 1] - 1 for i, (rid, p0, n) in enumerate(reqs) if rid in lookup and p0 + n == S]
    assert rows.readout_rows().tolist() == expected_readout
    expected_poc = sum(n for rid, _, n in reqs if rid in lookup)
    assert len(poc) == expected_poc


def test_tracker_lifecycle():
    tr = NonceTracker(seq_len=S, prefix="cpoc")
    rid = tr.request_id_for(42)
    assert tr.is_poc_request(rid) and not tr.is_poc_request("req_3") and not tr.is_poc_request("cpocx-1")
    assert tr.request_id_for(42) != rid  # unique even for the same nonce
    emb = torch.randn(S, 4)
    tr.admit(42, rid, emb)
    with pytest.raises(ValueError):
        tr.admit(43, rid, emb)
    with pytest.raises(ValueError):
        tr.admit(44, "cpoc-x", torch.zeros(S - 1, 4))
    assert tr.nonce_of(rid) == 42 and tr.nonce_of("other") is None
    assert tr.pending_tokens == S and tr.in_flight == 1
    cu, pos, ids = flat_batch([(rid, 0, 6)])
    tr.advance(PoCRows.from_flat_batch(cu, pos, ids, tr.nonce_of, S))
    assert tr.pending_tokens == S - 6 and torch.equal(tr.inputs_of_request(rid), emb)
    cu, pos, ids = flat_batch([(rid, 6, 4)])
    tr.advance(PoCRows.from_flat_batch(cu, pos, ids, tr.nonce_of, S))
    assert tr.pending_tokens == 0 and tr.in_flight == 0 and len(tr) == 1
    with pytest.raises(KeyError):
        tr.inputs_of_request(rid)  # dropped once read out
    assert tr.finish(rid).nonce == 42 and len(tr) == 0 and tr.finish(rid) is None
