"""The per-step row contract between an engine's flat token batch and the PoC ops (engine-independent).

An engine with continuous batching packs every forward step into one flat batch of ``T`` rows: request
``i`` owns rows ``cu_seq_lens_q[i]:cu_seq_lens_q[i+1]`` at absolute positions ``position_ids[...]``. A PoC
nonce is one such request of ``seq_len`` placeholder tokens; with chunked prefill its rows can span
several steps. :class:`PoCRows` says, for one step, which flat rows belong to which nonce at which
absolute positions, and which nonces complete their prefill in this step (their last row, at position
``seq_len - 1``, is read out). Ops consume the tensors derived from it (:attr:`PoCRows.row_index`,
:attr:`PoCRows.positions`, :attr:`PoCRows.readout_rows`); chat rows are never in any of them.

:class:`NonceTracker` is the per-nonce state across steps: which request id carries which nonce, its
input embeddings while it is in flight, and how many of its tokens are still to be computed.

Nothing here knows an engine: the glue passes plain sequences (``cu_seq_lens_q``, ``position_ids``,
request ids) and a nonce lookup.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class PoCSegment:
    """The rows of one PoC nonce in one step: flat rows ``row_start .. row_start + n_rows - 1`` hold
    positions ``position .. position + n_rows - 1`` of the nonce's sequence."""

    request_id: str
    nonce: int
    row_start: int
    n_rows: int
    position: int
    completes: bool
    """True when the nonce's last position (``seq_len - 1``) is in this step: its last row is read out."""

    @property
    def row_stop(self) -> int:
        return self.row_start + self.n_rows

    @property
    def readout_row(self) -> int:
        """Flat row of the last computed position (meaningful when ``completes``)."""
        return self.row_stop - 1


@dataclass(frozen=True)
class PoCRows:
    """Which rows of a flat batch of ``num_rows`` rows are PoC rows (one :class:`PoCSegment` per nonce).

    Build it with :meth:`from_flat_batch`. Segments are in flat-row order and never overlap.
    """

    num_rows: int
    seq_len: int
    segments: tuple[PoCSegment, ...] = ()

    def __post_init__(self) -> None:
        end = 0
        for seg in self.segments:
            if seg.n_rows <= 0 or seg.row_start < end or seg.row_stop > self.num_rows:
                raise ValueError(f"bad PoC segment {seg} (previous end {end}, {self.num_rows} rows)")
            if seg.position < 0 or seg.position + seg.n_rows > self.seq_len:
                raise ValueError(f"PoC segment {seg} exceeds seq_len {self.seq_len}")
            if seg.completes != (seg.position + seg.n_rows == self.seq_len):
                raise ValueError(f"PoC segment {seg}: completes must mean its last position is seq_len-1")
            end = seg.row_stop

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_flat_batch(
        cls,
        cu_seq_lens_q: Sequence[int],
        position_ids: Sequence[int],
        request_ids: Sequence[str],
        nonce_of: Mapping[str, int] | Callable[[str], int | None],
        seq_len: int,
        num_rows: int | None = None,
    ) -> "PoCRows":
        """The PoC rows of one step.

        ``cu_seq_lens_q``: cumulative query lengths (``len(request_ids) + 1`` entries used; trailing padded
        entries are ignored); ``position_ids``: absolute position of every flat row; ``request_ids``: the
        requests of the step in flat order; ``nonce_of``: request id → nonce (None / missing = chat).
        ``num_rows`` defaults to ``len(position_ids)`` (may include padding rows past the last request).

        A PoC request's rows must hold consecutive positions within ``0..seq_len-1`` → else ValueError
        (the engine and the tracker disagree; better to fail than to compute a wrong nonce).
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        cu = [int(c) for c in cu_seq_lens_q]
        if len(cu) < len(request_ids) + 1:
            raise ValueError(f"cu_seq_lens_q has {len(cu)} entries for {len(request_ids)} requests")
        lookup = nonce_of.get if isinstance(nonce_of, Mapping) else nonce_of
        pos = position_ids if isinstance(position_ids, list) else [int(p) for p in position_ids]
        total = len(pos) if num_rows is None else int(num_rows)
        segments = []
        for i, rid in enumerate(request_ids):
            nonce = lookup(rid)
            if nonce is None:
                continue
            start, stop = cu[i], cu[i + 1]
            if stop <= start:
                continue
            if stop > len(pos):
                raise ValueError(f"request {rid!r}: rows {start}:{stop} beyond {len(pos)} position ids")
            p0 = int(pos[start])
            if pos[start:stop] != list(range(p0, stop - start + p0)):  # list comparison: one C loop
                raise ValueError(f"PoC request {rid!r}: positions {pos[start:stop]} are not consecutive")
            if p0 + (stop - start) > seq_len:
                raise ValueError(f"PoC request {rid!r}: positions up to {p0 + stop - start - 1} >= seq_len {seq_len}")
            segments.append(PoCSegment(rid, int(nonce), start, stop - start, p0, p0 + stop - start == seq_len))
        return cls(total, seq_len, tuple(segments))

    # ------------------------------------------------------------------------------------ queries
    def __bool__(self) -> bool:
        return bool(self.segments)

    @property
    def num_poc_rows(self) -> int:
        return sum(s.n_rows for s in self.segments)

    @property
    def completing(self) -> tuple[PoCSegment, ...]:
        """Segments whose nonce finishes its prefill this step, in flat order."""
        return tuple(s for s in self.segments if s.completes)

    @cached_property
    def _row_list(self) -> list[int]:
        return [r for s in self.segments for r in range(s.row_start, s.row_stop)]

    def is_poc_row(self, row: int) -> bool:
        return any(s.row_start <= row < s.row_stop for s in self.segments)

    def chat_logit_selection(self, logits_indices: Sequence[int]) -> list[int]:
        """Indices ``j`` into ``logits_indices`` (flat rows whose logits the engine computes) that are chat rows.

        The engine's LM head should see only these; the others are PoC rows (their logits are discarded).
        """
        poc = set(self._row_list)
        return [j for j, row in enumerate(logits_indices) if int(row) not in poc]

    def chat_rows(self) -> list[int]:
        """All non-PoC rows of the step (chat rows and padding), ascending."""
        poc = set(self._row_list)
        return [r for r in range(self.num_rows) if r not in poc]

    # ------------------------------------------------------------------------------------ tensors for ops
    def row_index(self, device=None) -> torch.Tensor:
        """int64 [P]: flat rows of all PoC rows, segment by segment (ascending)."""
        return torch.tensor(self._row_list, dtype=torch.int64, device=device)

    def positions(self, device=None) -> torch.Tensor:
        """int64 [P]: absolute position (row of the nonce's [seq_len, H] inputs) of every PoC row."""
        return torch.tensor([p for s in self.segments for p in range(s.position, s.position + s.n_rows)],
                            dtype=torch.int64, device=device)

    def row_mask(self, device=None) -> torch.Tensor:
        """bool [num_rows]: True on PoC rows."""
        mask = torch.zeros(self.num_rows, dtype=torch.bool, device=device)
        if self.segments:
            mask[self.row_index(device)] = True
        return mask

    def readout_rows(self, device=None) -> torch.Tensor:
        """int64 [R]: flat row of the last position of each completing nonce (order of :attr:`completing`)."""
        return torch.tensor([s.readout_row for s in self.completing], dtype=torch.int64, device=device)

    def readout_nonces(self) -> list[int]:
        return [s.nonce for s in self.completing]

    def gather_inputs(self, inputs_of: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """[P, H]: each segment's slice ``inputs[position : position + n_rows]`` of its nonce's [seq_len, H]
        input embeddings (rows in :meth:`row_index` order)."""
        parts = [inputs_of(s.nonce)[s.position : s.position + s.n_rows] for s in self.segments]
        if not parts:
            raise ValueError("no PoC rows in this step")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@dataclass
class NonceState:
    """One in-flight nonce: its request id, its [seq_len, H] input embeddings and progress."""

    nonce: int
    request_id: str
    inputs: torch.Tensor | None
    computed: int = 0
    """Highest position + 1 computed so far (a restarted prefill starts over at 0)."""
    done: bool = False


@dataclass
class NonceTracker:
    """Which request carries which nonce, across steps (thread-safe: the engine thread and the caller).

    ``admit`` a nonce under a request id with its inputs; each step ``advance`` with the step's
    :class:`PoCRows`; when the engine delivers the request's (discarded) output, ``finish`` it.
    """

    seq_len: int
    prefix: str = "cpoc"
    _by_request: dict[str, NonceState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    def request_id_for(self, nonce: int) -> str:
        """A fresh, unique request id for ``nonce`` (prefix, admission counter, nonce)."""
        with self._lock:
            self._counter += 1
            return f"{self.prefix}-{self._counter}-n{int(nonce)}"

    def is_poc_request(self, request_id: str) -> bool:
        """True for ids this tracker issued (in flight or finished): PoC outputs are routed by this."""
        return isinstance(request_id, str) and request_id.startswith(self.prefix + "-")

    def admit(self, nonce: int, request_id: str, inputs: torch.Tensor | None) -> NonceState:
        if inputs is not None and inputs.shape[0] != self.seq_len:
            raise ValueError(f"inputs for nonce {nonce} have {inputs.shape[0]} rows, expected seq_len {self.seq_len}")
        with self._lock:
            if request_id in self._by_request:
                raise ValueError(f"request id {request_id!r} already in flight")
            state = NonceState(int(nonce), request_id, inputs)
            self._by_request[request_id] = state
            return state

    def nonce_of(self, request_id: str) -> int | None:
        state = self._by_request.get(request_id)
        return None if state is None else state.nonce

    def state(self, request_id: str) -> NonceState | None:
        return self._by_request.get(request_id)

    def inputs_of_request(self, request_id: str) -> torch.Tensor:
        state = self._by_request[request_id]
        if state.inputs is None:
            raise KeyError(f"no inputs cached for {request_id!r}")
        return state.inputs

    def advance(self, rows: PoCRows) -> None:
        """Record the step's computed positions; completing nonces are marked done and drop their inputs."""
        with self._lock:
            for seg in rows.segments:
                state = self._by_request.get(seg.request_id)
                if state is None:
                    continue
                state.computed = seg.position + seg.n_rows
                if seg.completes:
                    state.done = True
                    state.inputs = None

    def finish(self, request_id: str) -> NonceState | None:
        """Forget a request (its output arrived, or it was cancelled)."""
        with self._lock:
            return self._by_request.pop(request_id, None)

    def clear(self) -> list[NonceState]:
        with self._lock:
            states = list(self._by_request.values())
            self._by_request.clear()
            return states

    def states(self) -> list[NonceState]:
        """In-flight states in admission order."""
        with self._lock:
            return list(self._by_request.values())

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._by_request)

    def __len__(self) -> int:
        return len(self._by_request)

    @property
    def in_flight(self) -> int:
        """Nonces admitted and not yet read out."""
        with self._lock:
            return sum(1 for s in self._by_request.values() if not s.done)

    @property
    def pending_tokens(self) -> int:
        """Prefill tokens of in-flight nonces not computed yet."""
        with self._lock:
            return sum(self.seq_len - s.computed for s in self._by_request.values() if not s.done)
