"""What happens to PoC rows inside one engine forward: the forward hooks.

Owns: the per-step row map (:class:`Step`, built from ``cu_seq_lens_q`` / ``position_ids`` / the batch's requests),
the hooks and their arming (registered only for steps with PoC rows):

* model forward pre-hook: builds the step's :class:`~cpoc_kernels.rows.PoCRows`; model forward hook: advances the
  in-flight nonces and books the hooks' time on the step clock;
* ``embed_tokens``: a PoC request's rows get its nonce's input embeddings at their absolute positions;
* decoder layers: Householder reflection of the layer output on PoC rows only (:func:`reflect_rows_`);
* final norm: the last-position hidden state of each nonce completing its prefill is copied out (read out right
  there on a PoC-only CPU step, else queued to the worker);
* ``lm_head`` pre/post: PoC rows are removed from the LM head input and get zero logits back.

Every hook body is guarded: an exception disables PoC (:meth:`SharedState.fail`) and the forward goes on for chat.
May not: schedule, admit or preempt requests, or read engine internals except through ``CBInternals``.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cpoc_kernels import ops
from cpoc_kernels.rows import PoCRows

from .state import PoCFailure, SharedState


def reflect_rows_(hidden2d: torch.Tensor, rows: torch.Tensor | slice, v: torch.Tensor) -> None:
    """In place: ``hidden2d[rows] = R_v(hidden2d[rows])`` with the reference's rounding points
    (``vb = v.to(dtype); dot = sum(x*vb); x - (2*dot)*vb``); other rows untouched.

    CUDA: the fused ``cpoc_kernels.ops.masked_reflect_`` (v fp32). CPU: the reference expression inline
    (the op's dispatch costs more than the math for a few rows); ``v`` may already be in the hidden dtype.
    """
    if isinstance(rows, slice):  # a contiguous block of rows: work on the view
        vb = v if v.dtype == hidden2d.dtype and v.device == hidden2d.device else v.to(hidden2d.device, hidden2d.dtype)
        x = hidden2d[rows]
        dot = torch.sum(x * vb, dim=-1, keepdim=True)
        x.sub_((2 * dot) * vb)
        return
    if hidden2d.device.type != "cpu":
        ops.masked_reflect_(hidden2d, None, v.float(), rows)
        return
    vb = v if v.dtype == hidden2d.dtype and v.device == hidden2d.device else v.to(hidden2d.device, hidden2d.dtype)
    x = hidden2d.index_select(0, rows)
    dot = torch.sum(x * vb, dim=-1, keepdim=True)
    hidden2d.index_copy_(0, rows, x - (2 * dot) * vb)


@dataclass
class Step:
    """What the hooks of one forward step share (engine thread only)."""

    rows: PoCRows | None = None
    lm_keep: list[int] | None = None  # lm_head input rows that are chat (None: no PoC logits this step)
    lm_rows_in: int = 0
    poc_rows: int = 0
    compute: bool = False  # PoC compute hooks active this step
    row_index: torch.Tensor | None = None
    readout: torch.Tensor | None = None
    inputs: list[tuple[int, int, torch.Tensor]] | None = None  # (row_start, row_stop, input rows) per segment
    lm_full: int = 0
    lm_index: torch.Tensor | None = None
    thread: int = 0  # the engine thread running this step: hooks ignore forwards from other threads
    block: slice | None = None  # the PoC rows as one contiguous block (the usual case: PoC is scheduled last)
    overhead: float = 0.0  # seconds spent in PoC code on the engine thread for this step
    chat_requests: int = 0  # chat requests scheduled in this step


class ForwardHooks:
    """The PoC hooks on one model (``model_parts``: embed, layers, final norm, lm_head). ``readout(hs, nonces)``
    is the output stage (the worker's), called inline on PoC-only CPU steps."""

    def __init__(self, shared: SharedState, model: torch.nn.Module, parts, device: torch.device,
                 readout: Callable[[torch.Tensor, list[int]], None]):
        self.shared = shared
        self.embed, self.layers, self.norm, self.lm_head = parts
        self.device = device
        self._readout = readout
        self.step: Step | None = None
        # the hooks, armed by the scheduler only for steps with PoC rows (a module with hooks leaves PyTorch's fast
        # call path: on a chat-only step each hook would cost a few µs per module for nothing)
        self._specs = [
            (functools.partial(model.register_forward_pre_hook, with_kwargs=True), self._guard(self._on_step_start)),
            (model.register_forward_hook, self._guard(self._on_step_end)),
            (self.embed.register_forward_hook, self._guard(self._on_embed)),
            (self.norm.register_forward_hook, self._guard(self._on_final_norm)),
            (self.lm_head.register_forward_pre_hook, self._on_lm_head_in),
            (self.lm_head.register_forward_hook, self._on_lm_head_out),
        ] + [(layer.register_forward_hook, self._guard(self._make_layer_hook(i))) for i, layer in enumerate(self.layers)]
        self._armed: list = []

    def arm(self) -> None:
        """Register the PoC hooks (engine thread, between forwards)."""
        if not self._armed:
            # prepend: PoC's hooks run before any hook registered since attach, as if registered at attach
            self._armed = [register(hook, prepend=True) for register, hook in self._specs]

    def disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    def _guard(self, fn):
        """Run a hook body; any exception disables PoC instead of reaching the engine loop."""
        name = getattr(fn, "__name__", "hook")

        def guarded(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - never let PoC break chat
                self.shared.fail(exc, name)
                return None
            finally:
                step = self.step
                if step is not None and step.poc_rows:
                    step.overhead += time.perf_counter() - t0

        return guarded

    def _current(self) -> Step | None:
        """This thread's step, if a manager step is running in it (other forwards of the model are ignored)."""
        step = self.step
        return step if step is not None and step.thread == threading.get_ident() else None

    # ------------------------------------------------------------------ model forward
    def _on_step_start(self, module, args, kwargs):
        sh, cb = self.shared, self.shared.cb
        self.step = None
        tracker = sh.tracker
        cu = kwargs.get("cu_seq_lens_q")
        pos = kwargs.get("position_ids")
        num_rows = int(pos.shape[-1]) if torch.is_tensor(pos) else 0
        step = Step(thread=threading.get_ident())
        self.step = step
        if tracker is None or not len(tracker) or cu is None or pos is None:
            return None
        reqs = cb.requests_in_batch()
        ids = [cb.request_id(fs) for fs in reqs]
        if not any(tracker.is_poc_request(r) for r in ids):
            return None
        step.chat_requests = sum(1 for r in ids if not tracker.is_poc_request(r))
        # LM-head row selection first (needs only ids): it must hold even if everything else fails
        # logits_indices has one entry per request: first the rows of requests that sample a token (in batch
        # order), then unused entries (row 0); only the chat entries among the first kind are kept
        logit_owner = [rid for rid, fs in zip(ids, reqs) if cb.has_new_token(fs)]
        step.lm_keep = [j for j, rid in enumerate(logit_owner) if not tracker.is_poc_request(rid)]
        li = kwargs.get("logits_indices")
        step.lm_rows_in = int(li.numel()) if torch.is_tensor(li) else len(logit_owner)
        rows = PoCRows.from_flat_batch(cu.tolist(), pos.reshape(-1).tolist(), ids, tracker.nonce_of,
                                       tracker.seq_len, num_rows=num_rows)
        step.rows = rows
        step.poc_rows = rows.num_poc_rows
        step.compute = bool(rows) and sh.failed is None
        if step.compute:
            segs = rows.segments
            if all(a.row_stop == b.row_start for a, b in zip(segs, segs[1:])):
                step.block = slice(segs[0].row_start, segs[-1].row_stop)
            else:  # the row index tensor is only needed when the PoC rows are not one block
                step.row_index = rows.row_index(self.device)
            step.readout = rows.readout_rows(self.device)
            # each segment's slice of its nonce's inputs, copied straight into its rows by _on_embed
            # (no [P, H] concatenation); looked up here so a missing input fails before the forward
            step.inputs = [(seg.row_start, seg.row_stop,
                            tracker.inputs_of_request(seg.request_id)[seg.position:seg.position + seg.n_rows])
                           for seg in segs]
        return None

    def _on_step_end(self, module, args, output):
        sh = self.shared
        step = self._current()
        if step is None:
            return None
        self.step = None
        clock = sh.clock
        if clock is not None:
            clock.hook_seconds += step.overhead
        if step.rows is not None:
            sh.counters["nonces_split"] += sum(1 for seg in step.rows.segments
                                               if seg.position == 0 and not seg.completes)
            if sh.tracker is not None:
                sh.tracker.advance(step.rows)
        return None

    # ------------------------------------------------------------------ PoC rows
    def _on_embed(self, module, args, output):
        step = self._current()
        if step is None or not step.compute or self.shared.failed is not None:
            return None
        flat = output.view(-1, output.shape[-1])
        for start, stop, inputs in step.inputs:  # copy_ converts device/dtype as .to() would
            flat[start:stop].copy_(inputs)
        return output

    def _make_layer_hook(self, i: int):
        def layer_hook(module, args, output):
            step = self._current()
            if step is None or not step.compute or self.shared.failed is not None:
                return None
            v = self.shared.round["vectors"][i]
            hs = output if torch.is_tensor(output) else output[0]
            reflect_rows_(hs.view(-1, hs.shape[-1]), step.block if step.block is not None else step.row_index, v)
            return output

        layer_hook.__name__ = f"layer_{i}"
        return layer_hook

    def _on_final_norm(self, module, args, output):
        sh = self.shared
        step = self._current()
        if step is None or not step.compute or sh.failed is not None or not step.readout.numel():
            return None
        flat = output.view(-1, output.shape[-1])
        hs = flat.index_select(0, step.readout).float()  # a copy: the output stage may run in the worker thread
        if step.chat_requests == 0 and self.device.type == "cpu":
            # a PoC-only step on CPU: read out here, where it delays no chat step (in the worker it would compete with
            # the next chat steps for the GIL, which on a small model costs them more than the readout itself)
            self._readout(hs, step.rows.readout_nonces())
            return None
        sh.readouts_queued += 1
        sh.jobs.put(("readout", hs, step.rows.readout_nonces()))
        return None

    # ------------------------------------------------------------------ LM head
    def _on_lm_head_in(self, module, args):
        step = self._current()
        try:
            x = args[0]
            n = x.shape[-2]
            if step is None:
                return None
            if step.lm_keep is None:
                self.shared.counters["lm_head_rows"] += n
                return None
            if n == step.lm_rows_in:
                keep = step.lm_keep
            elif step.rows is not None and n == step.rows.num_rows:  # model without logits_to_keep
                keep = step.rows.chat_rows()
            else:
                raise PoCFailure(f"lm_head got {n} rows; expected {step.lm_rows_in} logits rows")
            step.lm_full, step.lm_index = n, torch.tensor(keep, dtype=torch.int64, device=x.device)
            self.shared.counters["lm_head_rows"] += len(keep)
            return (x.index_select(-2, step.lm_index),) + tuple(args[1:])
        except Exception as exc:  # noqa: BLE001
            self.shared.fail(exc, "lm_head")
            return None

    def _on_lm_head_out(self, module, args, output):
        step = self._current()
        if step is None or step.lm_index is None:
            return None
        full = output.new_zeros(output.shape[:-2] + (step.lm_full, output.shape[-1]))
        full.index_copy_(-2, step.lm_index, output)
        step.lm_index = None
        return full
