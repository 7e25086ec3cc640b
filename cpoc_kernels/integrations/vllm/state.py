"""Per-worker PoC state: static buffers read inside the (compiled) model, and the per-step row contract.

No vLLM import here: the runner hooks pass plain arrays (request ids in batch order, ``query_start_loc``,
computed-token counts) and a request lookup. Each step:

1. :meth:`CpocWorkerState.begin_step` builds one :class:`~cpoc_kernels.rows.PoCRows` per round present in
   the batch and writes, in place, the PoC rows' input embeddings (``embeds``/``mask``) and each round slot's
   row mask (``row_mask[slot]``), and prepares the logits-stage plan;
2. inside the model, the OOT embedding selects ``embeds`` on masked rows, and the OOT RMSNorm calls
   ``torch.ops.cpoc_vllm.reflect_rows_`` (→ ``torch.ops.cpoc.masked_reflect_rows_mask_`` once per slot) on
   (hidden, residual) at the entry of layer *i*'s ``input_layernorm`` (vector *i−1*) and of the final norm
   (vector *L−1*);
3. the OOT logits processor calls :meth:`take_logits_plan`: LM head on chat rows only, readout of the
   completing PoC rows (:meth:`read_out`) into the artifact queue (outside the compiled/graphed forward);
4. :meth:`end_forward` clears the row buffers (dummy/profile runs then see no PoC rows).

CUDA-graph safety of the in-model part (by construction; not verified on a GPU): everything the forward reads
is a buffer allocated once at attach (``mask``/``embeds`` [T], ``row_mask`` [slots, T], ``vecs``), sized for
``max_num_batched_tokens`` (vLLM caps every CUDA-graph capture size at it) and updated in place before each
step; the forward slices them by its own row count ``n`` (the padded batch under a graph: rows ``>= n_real``
are 0 in every mask because the masks are zeroed after each forward and only real PoC rows are set), launches
kernels whose grids depend on ``n`` and the slot count only, and reads nothing on the host.

Rows of a request that cannot be computed exactly (malformed payload, prefix-cache read, wrong prompt
length, lost progress, no free round slot) are *refused*: never reflected, never read out, reported by
:meth:`drain` with a reason — never a wrong artifact.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.reference.householder import layer_vector
from cpoc_kernels.rows import NonceTracker, PoCRows

from .requests import PoCRequestError, PoCRound, check_poc_sampling, parse_poc_payload

DEFAULT_ROUND_SLOTS = 2


# --------------------------------------------------------------------------------------------- in-graph op
@torch.library.custom_op("cpoc_vllm::reflect_rows_", mutates_args=("hidden", "residual"))
def reflect_rows_(hidden: torch.Tensor, residual: torch.Tensor, vecs: torch.Tensor, row_mask: torch.Tensor,
                  layer: int) -> None:
    """Reflect PoC rows of (hidden, residual) [n, H] in place with each slot's vector of global layer ``layer``.

    vecs fp32 [slots, L, H]; row_mask bool [slots, T] with T >= n (slot s reflects the rows where
    ``row_mask[s, :n]`` is set). One ``torch.ops.cpoc.masked_reflect_rows_mask_`` per slot: launch grids fixed by
    ``n`` and the slot count, no host read of any count, no allocation — CUDA-graph safe (the masks' content
    may change between replays). Opaque to torch.compile; the math is spec §5.2's rounding points. Chat rows
    keep their bits (the CUDA kernel never writes them; the CPU path writes them back unchanged).
    """
    reflect_rows_impl(hidden, residual, vecs, row_mask, layer)


def reflect_rows_impl(hidden: torch.Tensor, residual: torch.Tensor, vecs: torch.Tensor, row_mask: torch.Tensor,
                      layer: int) -> None:
    """The body of ``cpoc_vllm::reflect_rows_`` (a plain function: tests trace what it dispatches)."""
    n = hidden.shape[0]
    if n > row_mask.shape[1]:
        raise RuntimeError(f"cpoc: the forward has {n} rows, the PoC row buffers hold {row_mask.shape[1]}")
    for slot in range(vecs.shape[0]):
        torch.ops.cpoc.masked_reflect_rows_mask_(hidden, residual, vecs[slot, layer], row_mask[slot, :n])


@reflect_rows_.register_fake
def _(hidden, residual, vecs, row_mask, layer):
    return None


class CpocBuffers(torch.nn.Module):
    """The static buffers the model reads (registered under the compiled module, updated in place).

    Allocated once (before the first trace/capture), never rebound: ``mask`` bool [T] (PoC rows of any slot:
    embedding injection), ``embeds`` [T, H], ``row_mask`` bool [slots, T] (rows reflected with slot s's
    vectors), ``vecs`` fp32 [slots, L, H]. ``counts`` (int64 [slots], on the host) is bookkeeping of the row
    contract only: nothing inside the model forward reads it.
    """

    def __init__(self, max_tokens: int, hidden: int, num_layers: int, dtype: torch.dtype, device,
                 slots: int = DEFAULT_ROUND_SLOTS):
        import cpoc_kernels.ops  # noqa: F401  (registers torch.ops.cpoc.*: the forward calls them from the first run)

        super().__init__()
        self.register_buffer("mask", torch.zeros(max_tokens, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("embeds", torch.zeros(max_tokens, hidden, dtype=dtype, device=device), persistent=False)
        self.register_buffer("vecs", torch.zeros(slots, num_layers, hidden, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("row_mask", torch.zeros(slots, max_tokens, dtype=torch.bool, device=device),
                             persistent=False)
        self.counts = torch.zeros(slots, dtype=torch.int64)  # host bookkeeping, not a buffer of the model

    def inject(self, out: torch.Tensor) -> torch.Tensor:
        """Embedding output with PoC rows replaced by their input embeddings (exact select, static buffers)."""
        n = out.shape[0]
        return torch.where(self.mask[:n, None], self.embeds[:n], out)

    def reflect_(self, hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
        torch.ops.cpoc_vllm.reflect_rows_(hidden, residual, self.vecs, self.row_mask, layer)

    def slot_rows(self, slot: int) -> list[int]:
        """The rows slot ``slot`` reflects this step (host read: for tests and diagnostics, never in the forward)."""
        return self.row_mask[slot].nonzero().flatten().tolist()


# --------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class RequestView:
    """What the runner knows about one scheduled request (engine-neutral)."""

    extra_args: object
    skip_reading_prefix_cache: object
    max_tokens: object
    prompt_len: int


@dataclass(frozen=True)
class Completion:
    logits_row: int
    request_id: str
    round: PoCRound
    nonce: int


@dataclass(frozen=True)
class LogitsPlan:
    """For one step's ``compute_logits`` call (one row per request, batch order)."""

    num_rows: int
    poc_rows: tuple[int, ...]
    completions: tuple[Completion, ...]

    def chat_rows(self) -> list[int]:
        poc = set(self.poc_rows)
        return [j for j in range(self.num_rows) if j not in poc]


@dataclass
class _Known:
    round: PoCRound | None
    nonce: int = 0
    refused: str | None = None


class CpocWorkerState:
    """PoC bookkeeping of one model replica (one TP/PP rank)."""

    def __init__(self, buffers: CpocBuffers, num_layers: int, hidden: int, dtype: torch.dtype, device,
                 max_artifacts: int = 1_000_000):
        self.buffers = buffers
        self.num_layers, self.hidden, self.dtype, self.device = num_layers, hidden, dtype, torch.device(device)
        self.slots = buffers.vecs.shape[0]
        self.max_tokens = buffers.mask.shape[0]
        self._slot_hash: list[str | None] = [None] * self.slots
        self._known: dict[str, _Known] = {}
        self._trackers: dict[PoCRound, NonceTracker] = {}
        self._artifacts: deque[dict] = deque(maxlen=max_artifacts)
        self._lock = threading.Lock()
        self._plan: LogitsPlan | None = None
        self._dirty = False
        self._last_step_start: float | None = None
        self.has_logits_stage = False
        self.marked_norms = 0
        self.step_log: deque[dict] = deque(maxlen=4096)
        self.counters = {"steps": 0, "poc_steps": 0, "poc_rows": 0, "chat_rows": 0, "artifacts": 0, "refused": 0,
                         "nan_dropped": 0, "lm_head_rows": 0, "resumed_segments": 0}

    # ----------------------------------------------------------------------------------------- registry
    def _classify(self, request_id: str, view: RequestView | None) -> _Known:
        known = self._known.get(request_id)
        if known is not None:
            return known
        try:
            parsed = parse_poc_payload(None if view is None else view.extra_args)
        except PoCRequestError as exc:
            known = _Known(None)
            self._refuse(request_id, known, str(exc))
            parsed = None
        if parsed is not None:
            round_, nonce = parsed
            known = _Known(round_, nonce)
            try:
                check_poc_sampling(view.skip_reading_prefix_cache, view.max_tokens, view.prompt_len, round_)
                if round_.k > self.hidden:
                    raise PoCRequestError(f"k={round_.k} exceeds the model's hidden size {self.hidden}")
            except PoCRequestError as exc:
                self._refuse(request_id, known, str(exc))
        elif known is None:
            known = _Known(None)
        self._known[request_id] = known
        return known

    def _refuse(self, request_id: str, known: _Known, reason: str) -> None:
        if known.round is not None:
            tracker = self._trackers.get(known.round)
            if tracker is not None:
                tracker.finish(request_id)
        known.refused = reason
        self.counters["refused"] += 1
        payload = {"request_id": request_id, "nonce": known.nonce if known.round else None, "vector_b64": None,
                   "error": reason}
        if known.round is not None:
            payload.update(block_hash=known.round.block_hash, public_key=known.round.public_key,
                           seq_len=known.round.seq_len)
        with self._lock:
            self._artifacts.append(payload)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Drop requests the engine no longer holds (finished, aborted, or preempted in MRV2)."""
        for rid in request_ids:
            known = self._known.pop(rid, None)
            if known is not None and known.round is not None:
                tracker = self._trackers.get(known.round)
                if tracker is not None:
                    tracker.finish(rid)

    def known_request_ids(self) -> list[str]:
        return list(self._known)

    # ----------------------------------------------------------------------------------------- slots
    def _slot_for(self, block_hash: str, busy_hashes: set[str]) -> int | None:
        if block_hash in self._slot_hash:
            return self._slot_hash.index(block_hash)
        for slot, owner in enumerate(self._slot_hash):
            if owner is None or owner not in busy_hashes:
                vecs = torch.stack([layer_vector(block_hash, i, self.hidden) for i in range(self.num_layers)])
                self.buffers.vecs[slot].copy_(vecs)
                self._slot_hash[slot] = block_hash
                return slot
        return None

    def _busy_hashes(self) -> set[str]:
        return {r.block_hash for r, t in self._trackers.items() if len(t)}

    # ----------------------------------------------------------------------------------------- steps
    def clear_rows(self) -> None:
        if self._dirty:
            self.buffers.counts.zero_()
            self.buffers.mask.zero_()
            self.buffers.row_mask.zero_()
            self._dirty = False

    def begin_step(self, request_ids: Sequence[str], query_start_loc: Sequence[int],
                   num_computed_tokens: Sequence[int], view_of: Callable[[str], RequestView | None]) -> None:
        """Build this step's PoC rows from the runner's batch and write them into the buffers.

        ``request_ids[i]`` owns flat rows ``query_start_loc[i]:query_start_loc[i+1]`` at absolute positions
        starting at ``num_computed_tokens[i]``; the logits stage gets one row per request in this order.
        """
        self.clear_rows()
        now = time.perf_counter()
        num_reqs = len(request_ids)
        qsl = np.asarray(query_start_loc[: num_reqs + 1], dtype=np.int64)
        start = np.asarray(num_computed_tokens[:num_reqs], dtype=np.int64)
        num_rows = int(qsl[-1]) if num_reqs else 0
        if num_rows > self.max_tokens:
            raise RuntimeError(f"cpoc: step has {num_rows} rows, buffers hold {self.max_tokens}")
        groups: dict[PoCRound, dict[str, int]] = {}
        poc_rows: list[int] = []
        for i, rid in enumerate(request_ids):
            known = self._classify(rid, view_of(rid))
            if known.round is None and known.refused is None:
                continue
            poc_rows.append(i)
            if known.refused is not None:
                continue
            tracker = self._trackers.setdefault(known.round, NonceTracker(known.round.seq_len, prefix=""))
            state = tracker.state(rid)
            pos0 = int(start[i])
            if state is not None and state.done:
                continue  # read out already; rows after completion are not PoC work
            if pos0 == 0 and (state is None or state.computed != 0):
                tracker.finish(rid)  # (re)start from position 0, e.g. after preemption
                state = None
            if state is None and pos0 != 0:
                self._refuse(rid, known, f"PoC prefill started at position {pos0}, not 0 (prefix-cache read or "
                                         f"lost state)")
                continue
            if state is not None and state.computed != pos0:
                self._refuse(rid, known, f"PoC rows resume at position {pos0}, computed {state.computed}")
                continue
            if state is None:
                tracker.admit(known.nonce, rid, None)
            groups.setdefault(known.round, {})[rid] = known.nonce

        step_poc_rows = 0
        completions: list[Completion] = []
        if groups:
            positions = np.arange(num_rows, dtype=np.int64) - np.repeat(qsl[:-1] - start, np.diff(qsl))
            busy = self._busy_hashes()
            for round_, nonces in groups.items():
                tracker = self._trackers[round_]
                slot = self._slot_for(round_.block_hash, busy - {round_.block_hash})
                if slot is None:
                    for rid in nonces:
                        self._refuse(rid, self._known[rid], f"more than {self.slots} concurrent block hashes")
                    continue
                rows = PoCRows.from_flat_batch(qsl, positions, request_ids, nonces, round_.seq_len, num_rows)
                if not rows:
                    continue
                self._write_rows(slot, round_, tracker, rows)
                self.counters["resumed_segments"] += sum(1 for seg in rows.segments if seg.position > 0)
                tracker.advance(rows)
                step_poc_rows += rows.num_poc_rows
                index = {rid: i for i, rid in enumerate(request_ids)}
                for seg in rows.completing:
                    completions.append(Completion(index[seg.request_id], seg.request_id, round_, seg.nonce))
        self._plan = LogitsPlan(num_reqs, tuple(poc_rows), tuple(sorted(completions, key=lambda c: c.logits_row)))
        self.counters["steps"] += 1
        self.counters["poc_rows"] += step_poc_rows
        self.counters["chat_rows"] += num_rows - step_poc_rows
        self.counters["poc_steps"] += bool(step_poc_rows)
        if self._last_step_start is not None:
            self.step_log.append({"rows": num_rows, "poc_rows": step_poc_rows,
                                  "seconds_since_previous": now - self._last_step_start})
        self._last_step_start = now

    def _write_rows(self, slot: int, round_: PoCRound, tracker: NonceTracker, rows: PoCRows) -> None:
        from cpoc_kernels import ops

        for seg in rows.segments:
            state = tracker.state(seg.request_id)
            if state.inputs is None:
                state.inputs = ops.poc_inputs(round_.block_hash, round_.public_key, [seg.nonce], round_.seq_len,
                                              self.hidden, self.dtype, device=self.device,
                                              stronger_rng=round_.stronger_rng)[0]
        row_index = rows.row_index()
        b = self.buffers
        dev_index = row_index.to(self.device)
        b.embeds.index_copy_(0, dev_index, rows.gather_inputs(lambda n: _inputs_of(tracker, rows, n)))
        b.mask.index_fill_(0, dev_index, True)
        b.row_mask[slot].index_fill_(0, dev_index, True)
        b.counts[slot] += row_index.numel()
        self._dirty = True

    def end_forward(self) -> None:
        """After the model's forward: clear the rows so that forwards outside a step see none."""
        self.clear_rows()

    # ----------------------------------------------------------------------------------------- logits stage
    def take_logits_plan(self, num_rows: int) -> LogitsPlan | None:
        """The plan of the current step for its first ``compute_logits`` call (then disarmed).

        A call with a row count that does not match (e.g. prompt logprobs) gets None: pass through.
        """
        plan, self._plan = self._plan, None
        if plan is None or plan.num_rows != num_rows:
            return None
        return plan

    def read_out(self, plan: LogitsPlan, hidden: torch.Tensor) -> None:
        """Output stage (spec §6) for the plan's completing PoC rows of ``hidden`` (final-norm states)."""
        from cpoc_kernels import ops

        by_round: dict[PoCRound, list[Completion]] = {}
        for c in plan.completions:
            by_round.setdefault(c.round, []).append(c)
        for round_, items in by_round.items():
            index = torch.tensor([c.logits_row for c in items], dtype=torch.int64, device=hidden.device)
            hs = hidden.index_select(0, index).float()
            nonces = [c.nonce for c in items]
            result = ops.poc_readout(hs, round_.block_hash, round_.public_key, nonces, k=round_.k)
            vectors = result.vectors.cpu()
            tracker = self._trackers.get(round_)
            with self._lock:
                for c, vec, ok in zip(items, vectors, result.emittable.tolist()):
                    record = {"request_id": c.request_id, "block_hash": round_.block_hash,
                              "public_key": round_.public_key, "seq_len": round_.seq_len, "nonce": c.nonce,
                              "vector_b64": Artifact.from_vector(c.nonce, vec).vector_b64 if ok else None,
                              "error": None if ok else "NaN/Inf in the output vector (not emitted)"}
                    self._artifacts.append(record)
                    self.counters["artifacts" if ok else "nan_dropped"] += 1
                    if tracker is not None:
                        tracker.finish(c.request_id)

    # ----------------------------------------------------------------------------------------- results
    def drain(self, keys: Sequence[Sequence] | None = None) -> list[dict]:
        """Artifacts (and refusals, with ``vector_b64=None`` and ``error``) since the last drain; msgpack-safe.

        ``keys``: only the records of these ``[block_hash, public_key, seq_len, nonce]`` are taken, the others
        stay for their own client (several clients may share one engine); None: all records."""
        if keys is not None:
            try:
                wanted = {(str(k[0]), str(k[1]), int(k[2]), int(k[3])) for k in keys}
            except (TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"drain keys must be [block_hash, public_key, seq_len, nonce] lists: {exc}") from None
        with self._lock:
            if keys is None:
                out = list(self._artifacts)
                self._artifacts.clear()
                return out
            out, kept = [], []
            for rec in self._artifacts:
                key = (rec.get("block_hash"), rec.get("public_key"), rec.get("seq_len"), rec.get("nonce"))
                (out if key in wanted else kept).append(rec)
            self._artifacts.clear()
            self._artifacts.extend(kept)
        return out

    def stats(self) -> dict:
        in_flight = sum(t.in_flight for t in self._trackers.values())
        pending = sum(t.pending_tokens for t in self._trackers.values())
        steps = list(self.step_log)[-64:]
        return {**self.counters, "in_flight": in_flight, "pending_tokens": pending, "slots": list(self._slot_hash),
                "recent_steps": steps}


def _inputs_of(tracker: NonceTracker, rows: PoCRows, nonce: int) -> torch.Tensor:
    for seg in rows.segments:
        if seg.nonce == nonce:
            return tracker.state(seg.request_id).inputs
    raise KeyError(nonce)
