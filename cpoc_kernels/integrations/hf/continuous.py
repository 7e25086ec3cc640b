"""Continuous PoC inside transformers' own continuous batching (``ContinuousBatchingManager``).

A PoC nonce is a request of ``seq_len`` placeholder token ids with ``max_new_tokens=1``. Hooks make the
engine's forward compute the nonce exactly as a pure-PoC forward would (spec §4–§6), on its rows only:

* model forward pre-hook (with kwargs): builds the step's :class:`~cpoc_kernels.rows.PoCRows` from
  ``cu_seq_lens_q``, ``position_ids`` and the batch processor's ``requests_in_batch``; times the step;
* ``embed_tokens`` forward hook: a PoC request's rows get its nonce's input embeddings at their
  **absolute** positions (so chunked prefill, i.e. a nonce spread over several steps, is exact);
* decoder layer forward hooks: Householder reflection of the layer output (the residual stream) on PoC
  rows only (chat rows are not written);
* final-norm forward hook: the last-position hidden state of each nonce whose prefill completes in
  this step is copied out; the output stage → :class:`~cpoc_kernels.artifacts.Artifact` runs in a worker
  thread, or right there for a PoC-only step on CPU (where the worker would compete with chat for the GIL)
  (the worker also prepares the next nonces' input embeddings and feeds the governor's step-time fit);
* ``lm_head`` pre/post hooks: PoC rows are removed from the LM head input and get zero logits back
  (their sampled token is discarded), so the LM head never sees a PoC row;
* the scheduler's ``schedule_batch`` is wrapped: chat is scheduled first with the whole token budget as
  if PoC did not exist; then the :class:`~cpoc_kernels.governor.Governor` decides how many PoC tokens may
  join the step and how many new nonces to admit; PoC requests are scheduled only into what is left
  (the engine's own scheduler, run over the PoC requests alone). If chat is short of KV the governor asks
  for preemption: in-flight PoC nonces are dropped (and re-queued), the engine never offloads chat for PoC.
  The glue measures the fixed cost of a step carrying PoC rows (hooks, the PoC scheduling pass) and hands it
  to the governor (``StepLoad.poc_fixed_seconds``), which charges it to the SLO allowance first; while that
  vetoes PoC in chat steps, every ``PROBE_EVERY``-th such step may carry ``SMALL_POC_ROWS`` rows so the
  measurement stays current;
* the output router is wrapped: PoC requests' outputs never reach the chat output queue/handlers.

Every hook body is guarded: an exception inside PoC handling disables PoC (hooks become pass-through for
chat, in-flight PoC requests are cancelled), is recorded in :meth:`ContinuousPoC.stats`, and chat continues.

All knowledge of transformers' CB internals is in :class:`_CBInternals` and :func:`_model_parts`
(supported: transformers 5.20–5.24; tested on 5.24.0). Requirements: ``allow_block_sharing=False``,
no async batching, no CUDA graphs (checked at attach); sizes set explicitly on CPU (:func:`cb_config`).
Not supported: tensor parallelism (PoC requests bypass the TP driver's input queue), CPU KV offloading
space (``cpu_offload_space``; soft resets are fine: positions are absolute).
"""
from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cpoc_kernels import ops
from cpoc_kernels.artifacts import Artifact, check_nonce
from cpoc_kernels.governor import BudgetReason, Governor, GovernorConfig, StepLoad, StepTimeModel
from cpoc_kernels.reference.readout import K_DIM
from cpoc_kernels.rows import NonceTracker, PoCRows

from .runner import decoder_layers, readout_vectors

SUPPORTED_TRANSFORMERS = "5.20–5.24"
logger = logging.getLogger("cpoc_kernels.continuous")

# ============================================================================================ PoC math
# The fused ops, exactly as the pure-PoC runner uses them (artifacts must equal PoCRunner's).


def poc_input_embeddings(block_hash: str, public_key: str, nonces: list[int], seq_len: int, hidden: int,
                         dtype: torch.dtype, device: torch.device, stronger_rng: bool) -> torch.Tensor:
    """[B, seq_len, hidden] input embeddings in the model dtype (the same op as :class:`PoCRunner`)."""
    return ops.poc_inputs(block_hash, public_key, nonces, seq_len, hidden, dtype, device=device,
                          stronger_rng=stronger_rng)


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


# ============================================================================================ CB internals


class UnsupportedEngineError(RuntimeError):
    """The installed transformers' continuous batching lacks something this glue relies on."""


def _require(obj: Any, name: str, what: str) -> Any:
    if not hasattr(obj, name):
        import transformers

        raise UnsupportedEngineError(
            f"{what} has no attribute {name!r} (transformers {transformers.__version__}); cpoc_kernels' continuous "
            f"batching glue supports transformers {SUPPORTED_TRANSFORMERS}")
    return getattr(obj, name)


class _CBInternals:
    """Every access to transformers' continuous-batching internals goes through here."""

    def __init__(self, manager):
        self.manager = manager
        for name in ("batch_processor", "output_router", "_create_batch_processor", "background_thread_status",
                     "continuous_batching_config", "cancel_request"):
            _require(manager, name, "ContinuousBatchingManager")
        router = manager.output_router
        for name in ("deliver", "deliver_batch"):
            _require(router, name, "OutputRouter")
        from transformers.generation.continuous_batching.requests import RequestState

        self._request_state_cls = RequestState

    @property
    def config(self):
        return self.manager.continuous_batching_config

    def check_config(self) -> None:
        cfg = self.config
        if getattr(cfg, "allow_block_sharing", False):
            raise ValueError("continuous PoC needs ContinuousBatchingConfig(allow_block_sharing=False): prefix "
                             "caching hashes token ids, so PoC requests (identical placeholder ids) would share KV")
        if getattr(cfg, "use_async_batching", False):
            raise ValueError("continuous PoC needs use_async_batching=False (the row map is built per step)")
        graphs = getattr(cfg, "use_cuda_graph", None)
        if graphs is True or (isinstance(graphs, tuple) and any(graphs)):
            raise ValueError("continuous PoC needs use_cuda_graph=False (hooks must run every step)")

    def batch_processor(self):
        return self.manager.batch_processor

    def scheduler(self, batch_processor):
        return _require(batch_processor, "scheduler", "ContinuousBatchProcessor")

    def cache(self, batch_processor):
        return _require(batch_processor, "cache", "ContinuousBatchProcessor")

    def requests_in_batch(self) -> list:
        bp = self.manager.batch_processor
        io = _require(bp, "inputs_and_outputs", "ContinuousBatchProcessor")
        return list(_require(io, "requests_in_batch", "ContinuousBatchingIOs"))

    @staticmethod
    def request_id(future_state) -> str:
        return future_state.state.request_id

    @staticmethod
    def has_new_token(future_state) -> bool:
        return bool(future_state.has_new_token)

    def stopping(self) -> bool:
        """The manager was asked to stop (PoC must not keep the loop alive)."""
        status = self.manager.background_thread_status
        return getattr(status, "tp_status", 0) != 0 or getattr(status, "fatal_error", None) is not None

    def wake(self) -> None:
        """Wake the generation loop (it sleeps up to 0.1 s when it has nothing to do)."""
        event = getattr(self.manager, "_wake_up_loop", None)
        if event is not None:
            event.set()

    @staticmethod
    def set_wake_event(manager, event) -> None:
        """Replace the generation loop's wake-up event (the loop waits on it only when nothing is schedulable):
        the bench times the engine's idle capacity with it."""
        _require(manager, "_wake_up_loop", "ContinuousBatchingManager")
        manager._wake_up_loop = event

    def new_request_state(self, request_id: str, tokens: list[int]):
        return self._request_state_cls(request_id=request_id, initial_tokens=tokens, max_new_tokens=1,
                                       eos_token_id=-1)

    @staticmethod
    def hide(scheduler, keep_visible: Callable[[str], bool]) -> tuple[dict, dict, list]:
        """Temporarily remove from the scheduler every request for which ``keep_visible`` is False."""
        active = {rid: s for rid, s in scheduler.active_requests.items() if not keep_visible(rid)}
        waiting = {rid: s for rid, s in scheduler.waiting_requests.items() if not keep_visible(rid)}
        order = [rid for rid in scheduler.waiting_requests_order if rid in waiting]
        for rid in active:
            del scheduler.active_requests[rid]
        for rid in waiting:
            del scheduler.waiting_requests[rid]
        if order:
            scheduler.waiting_requests_order = deque(r for r in scheduler.waiting_requests_order if r not in waiting)
        return active, waiting, order

    @staticmethod
    def restore(scheduler, hidden: tuple[dict, dict, list]) -> None:
        active, waiting, order = hidden
        if not active and not waiting:
            return
        for rid, s in active.items():
            scheduler.active_requests.setdefault(rid, s)
        for rid, s in waiting.items():
            if rid not in scheduler.active_requests:
                scheduler.waiting_requests.setdefault(rid, s)
        present = set(scheduler.waiting_requests_order)
        scheduler.waiting_requests_order.extend(r for r in order if r in scheduler.waiting_requests and r not in present)

    @staticmethod
    def preempt(scheduler, request_ids: list[str]) -> None:
        """Drop requests from the scheduler now and free their KV blocks (no output is delivered)."""
        for rid in request_ids:
            scheduler.set_request_cancellation(rid)
        scheduler.clear_cancelled_requests()

    @staticmethod
    def kv_tokens(cache) -> tuple[int, int]:
        """(capacity, free) in token slots."""
        capacity = int(cache.max_tokens_read)
        return capacity, int(cache.compute_free_capacity(relative=True) * capacity)

    @staticmethod
    def max_batch_tokens(cache) -> int:
        return int(cache.max_batch_tokens)


def _model_parts(model):
    inner = _require(model, "model", type(model).__name__)
    return (_require(inner, "embed_tokens", type(inner).__name__), decoder_layers(model),
            _require(inner, "norm", type(inner).__name__), _require(model, "lm_head", type(model).__name__))


def cb_config(max_batch_tokens: int = 256, num_blocks: int = 256, page_size: int = 16,
              max_requests_per_batch: int = 32, scheduler_type: str = "fifo", **extra):
    """A ``ContinuousBatchingConfig`` sized explicitly (needed on CPU) with the settings PoC requires:
    no block sharing, no async batching, no CUDA graphs, no switch to flash attention."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, page_size=page_size,
                                    max_requests_per_batch=max_requests_per_batch, scheduler_type=scheduler_type,
                                    allow_block_sharing=False, use_async_batching=False, use_cuda_graph=False,
                                    auto_switch_to_flash=False, **extra)


# ============================================================================================ ContinuousPoC


@dataclass
class _Step:
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


@dataclass
class _StepClock:
    """The step scheduled last, timed from its scheduling until the engine loop comes back (engine thread)."""

    t0: float
    chat_tokens: int
    poc_tokens: int
    sched_seconds: float  # PoC's part of scheduling it
    hook_seconds: float = 0.0  # time in PoC hooks during its forward


class PoCFailure(RuntimeError):
    pass


class ContinuousPoC:
    """PoC v2 nonces computed inside an HF continuous-batching manager's forward steps, beside chat.

    ``ContinuousPoC(model, manager)`` attaches (hooks + wrappers); ``start(block_hash, public_key,
    nonce_iterator, seq_len, k)`` begins admitting nonces (as the governor allows); ``stop()`` ends
    admission (draining or cancelling in-flight nonces); ``detach()`` removes everything.

    Artifacts: ``on_artifact`` callback (called in PoC's worker thread), :meth:`artifacts` iterator, and
    :attr:`collected`. They equal a pure-PoC run's artifacts of the same nonces up to the float path of
    the attention/matmuls (paged flat batch vs [B, S, H]); see the tests.

    Governor: ``mode`` ``"fill"`` (default; PoC fills the step as long as predicted chat step time grows
    by at most ``slo_overhead``), ``"fixed-share"`` or ``"off"``; ``governor_options`` are further
    :class:`GovernorConfig` fields; ``step_time_model`` an optional prior :class:`StepTimeModel`.
    """

    def __init__(self, model: torch.nn.Module, manager, *, mode: str = "fill", slo_overhead: float = 0.05,
                 governor_options: dict | None = None, step_time_model: StepTimeModel | None = None,
                 on_artifact: Callable[[Artifact], None] | None = None, request_prefix: str = "cpoc",
                 latency_window: int = 10000, prefetch: int | None = None, observe_interval: float = 0.02):
        self.model = model
        self._cb = _CBInternals(manager)
        self._cb.check_config()
        self.embed, self.layers, self.norm, self.lm_head = _model_parts(model)
        self.hidden = model.config.hidden_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mode, self.slo_overhead = mode, slo_overhead
        self.governor_options = dict(governor_options or {})
        GovernorConfig(max_batch_tokens=1, kv_tokens_capacity=1, mode=mode, slo_overhead=slo_overhead,
                       **self.governor_options)  # validate early, in the caller's thread
        self._step_time_model = step_time_model
        self.on_artifact = on_artifact
        self._prefix = request_prefix
        self.governor: Governor | None = None
        self._lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self.collected: list[Artifact] = []
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._round: dict | None = None
        self._tracker: NonceTracker | None = None
        self._running = False
        self._failed: str | None = None
        self._error: BaseException | None = None
        self._step: _Step | None = None
        self._patched: list[tuple[Any, str, Any]] = []
        self._counters = dict(steps=0, poc_steps=0, chat_tokens=0, poc_tokens=0, nonces_admitted=0, nonces_done=0,
                              nonces_dropped_nan=0, nonces_split=0, nonces_preempted=0, poc_tokens_discarded=0,
                              fixed_cost_vetoes=0, fixed_cost_probes=0, lm_head_rows=0, chat_requests_done=0, poc_outputs_filtered=0,
                              callback_errors=0, chat_work_in_nonces=0.0)
        self._t_start = self._t_stop = None
        self._prefetch_depth = prefetch
        self._prepared: deque = deque()  # (nonce, [seq_len, H] inputs) ready to admit, filled by the worker
        self._jobs: queue.Queue = queue.Queue()
        self._readouts_queued = 0  # engine thread only
        self._readouts_done = 0  # worker thread only
        self._worker: threading.Thread | None = None
        self._gov_lock = threading.Lock()
        self._count_lock = threading.Lock()  # counters both threads update
        self._clock: _StepClock | None = None  # the step scheduled last, until the engine loop comes back
        self.observe_interval = observe_interval
        self._next_observe = 0.0
        self._poc_step_overhead: float | None = None  # EWMA of PoC's cost per step on the engine thread (all)
        self._poc_small_overhead: float | None = None  # the same over chat steps with few PoC rows (fixed part)
        self._vetoes_since_probe = 0
        self._chat_step_ewma: float | None = None  # EWMA of the time of steps with chat rows and no PoC row
        self._chat_shapes: dict[tuple[int, int], int] = {}  # (prompt_len, output_len) -> finished chat requests
        self._attach()

    # -------------------------------------------------------------------------------------- attach
    def _attach(self) -> None:
        m = self.model
        # the hooks, armed by the scheduler wrapper only for steps with PoC rows (a module with hooks leaves
        # PyTorch's fast call path: on a chat-only step each hook would cost a few µs per module for nothing)
        self._hook_specs = [
            (functools.partial(m.register_forward_pre_hook, with_kwargs=True), self._guard(self._on_step_start)),
            (m.register_forward_hook, self._guard(self._on_step_end)),
            (self.embed.register_forward_hook, self._guard(self._on_embed)),
            (self.norm.register_forward_hook, self._guard(self._on_final_norm)),
            (self.lm_head.register_forward_pre_hook, self._on_lm_head_in),
            (self.lm_head.register_forward_hook, self._on_lm_head_out),
        ] + [(layer.register_forward_hook, self._guard(self._make_layer_hook(i))) for i, layer in enumerate(self.layers)]
        self._armed: list = []
        mgr = self._cb.manager
        self._patch(mgr, "_create_batch_processor", self._wrap_create_bp(mgr._create_batch_processor))
        router = mgr.output_router
        self._patch(router, "deliver", self._wrap_deliver(router.deliver))
        self._patch(router, "deliver_batch", self._wrap_deliver_batch(router.deliver_batch))
        if mgr.batch_processor is not None:
            self._wrap_scheduler(mgr.batch_processor)

    def _patch(self, obj, name: str, new) -> None:
        had = name in vars(obj)
        self._patched.append((obj, name, vars(obj)[name] if had else None))
        setattr(obj, name, new)

    def detach(self) -> None:
        """Remove all hooks and wrappers (PoC must be stopped first)."""
        with self._lock:
            self._running = False
        self._stop_worker()
        self._disarm()
        for obj, name, old in reversed(self._patched):
            if old is None:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)
        self._patched.clear()

    def _arm(self) -> None:
        """Register the PoC hooks (engine thread, between forwards)."""
        if not self._armed:
            # prepend: PoC's hooks run before any hook registered since attach, as if registered at attach
            self._armed = [register(hook, prepend=True) for register, hook in self._hook_specs]

    def _disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed = []

    def _wrap_create_bp(self, original):
        def create_batch_processor():
            bp = original()
            self._wrap_scheduler(bp)
            return bp

        return create_batch_processor

    def _wrap_scheduler(self, bp) -> None:
        sched = self._cb.scheduler(bp)
        if getattr(sched, "_cpoc_wrapped", False):
            return
        self._patch(sched, "_cpoc_wrapped", True)
        self._patch(sched, "schedule_batch", self._make_schedule(sched, bp, sched.schedule_batch))
        self._patch(sched, "has_pending_requests", self._make_has_pending(sched.has_pending_requests))

    # -------------------------------------------------------------------------------------- control
    def start(self, block_hash: str, public_key: str, nonce_iterator: Iterable[int], seq_len: int,
              k: int = K_DIM, stronger_rng: bool = False) -> None:
        """Begin admitting nonces from ``nonce_iterator`` for this round (non-blocking)."""
        if seq_len <= 0 or not 0 < k <= self.hidden:
            raise ValueError(f"need seq_len > 0 and 0 < k <= {self.hidden}, got seq_len={seq_len}, k={k}")
        from cpoc_kernels.reference.householder import layer_vector

        with self._lock:
            if self._running:
                raise RuntimeError("continuous PoC already running; stop() it first")
            if self._tracker is not None and len(self._tracker):
                raise RuntimeError("nonces of the previous round are still in flight")
            vectors = [layer_vector(block_hash, i, self.hidden, device=self.device) for i in range(len(self.layers))]
            if self.device.type == "cpu":  # the reference's v.to(dtype), done once per round
                vectors = [v.to(self.dtype) for v in vectors]
            self._round = dict(block_hash=block_hash, public_key=public_key, seq_len=seq_len, k=k,
                               stronger_rng=stronger_rng, vectors=vectors, iterator=iter(nonce_iterator),
                               exhausted=False)
            self._prepared.clear()
            depth = self._prefetch_depth
            if depth is None:
                mbt = getattr(self._cb.config, "max_batch_tokens", None) or 4 * seq_len
                depth = max(4, 2 * -(-int(mbt) // seq_len))
            self._round["prefetch"] = depth
            self._tracker = NonceTracker(seq_len=seq_len, prefix=self._prefix)
            self._failed, self._error = None, None
            if self.governor is not None:
                self.governor = None  # rebuilt on the next step for this round's seq_len
            self._t_start, self._t_stop = time.perf_counter(), None
            self._running = True
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._worker_loop, name="cpoc-worker", daemon=True)
                self._worker.start()
        self._cb.wake()

    def stop(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop admitting nonces. ``drain``: wait (up to ``timeout`` s) for in-flight nonces to be read out;
        otherwise (or on timeout) cancel them."""
        with self._lock:
            self._running = False
        tracker = self._tracker
        if tracker is None:
            return
        deadline = None if timeout is None else time.perf_counter() + timeout
        if drain:
            while len(tracker) and self._failed is None and self._cb.manager.is_running():
                if deadline is not None and time.perf_counter() > deadline:
                    break
                time.sleep(0.005)
        self._cancel_in_flight()
        self._prepared.clear()
        while self._pending_readouts() and self._worker is not None and self._worker.is_alive():
            if deadline is not None and time.perf_counter() > deadline:
                break
            time.sleep(0.002)
        self._stop_worker()
        with self._lock:
            if self._t_stop is None:
                self._t_stop = time.perf_counter()
        self._queue.put(None)

    def _pending_readouts(self) -> int:
        return self._readouts_queued - self._readouts_done

    def _stop_worker(self) -> None:
        worker = self._worker
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            self._jobs.put(None)
            worker.join(timeout=10)
        self._worker = None

    # -------------------------------------------------------------------------------------- worker thread
    def _worker_loop(self) -> None:
        """Off the engine thread: input embeddings of the next nonces, readouts, step-time model updates."""
        while True:
            try:
                job = self._jobs.get(timeout=0.05)
            except queue.Empty:
                job = ()
            if job is None:
                return
            stop, merged = False, 1
            try:
                if job and job[0] == "readout":
                    # merge the readouts already queued into one output-stage call (rows are independent; the
                    # op's per-call cost dominates for a few rows); other jobs found on the way are re-queued
                    jobs, later = [job], []
                    while True:
                        try:
                            nxt = self._jobs.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None:
                            stop = True
                            break
                        (jobs if nxt and nxt[0] == "readout" else later).append(nxt)
                    merged = len(jobs)
                    for j in later:
                        self._jobs.put(j)
                    try:
                        if self._failed is None:
                            hs = jobs[0][1] if merged == 1 else torch.cat([j[1] for j in jobs])
                            self._readout(hs, [n for j in jobs for n in j[2]])
                    finally:
                        self._readouts_done += merged
                elif job and job[0] == "observe":
                    governor = self.governor
                    if governor is not None:
                        with self._gov_lock:
                            governor.observe(*job[1:])
                self._refill()
            except Exception as exc:  # noqa: BLE001 - never let PoC break chat
                self._fail(exc, "worker")
            if stop:
                return

    def _refill(self) -> None:
        rnd = self._round
        if not self._running or self._failed is not None or rnd is None or rnd["exhausted"]:
            return
        need = rnd["prefetch"] - len(self._prepared)
        if need <= 0:
            return
        nonces = []
        while len(nonces) < min(need, 16):
            try:
                nonces.append(check_nonce(next(rnd["iterator"])))
            except StopIteration:
                rnd["exhausted"] = True
                break
        if not nonces:
            return
        embeds = poc_input_embeddings(rnd["block_hash"], rnd["public_key"], nonces, rnd["seq_len"], self.hidden,
                                      self.dtype, self.device, rnd["stronger_rng"])
        self._prepared.extend(zip(nonces, embeds))
        self._cb.wake()

    def _readout(self, hs: torch.Tensor, nonces: list[int]) -> None:
        """Output stage of ``nonces`` (engine thread for PoC-only steps, worker thread otherwise)."""
        rnd = self._round
        kept, vecs = readout_vectors(hs, rnd["block_hash"], rnd["public_key"], nonces, rnd["k"])
        for nonce, vec in zip(kept, vecs):
            self._emit(Artifact.from_vector(nonce, vec))
        with self._count_lock:
            self._counters["nonces_dropped_nan"] += len(nonces) - len(kept)
            self._counters["nonces_done"] += len(nonces)

    def _cancel_in_flight(self) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        for state in tracker.clear():
            try:
                self._cb.manager.cancel_request(state.request_id)
            except Exception:  # noqa: BLE001 - best effort
                pass

    def wait(self, nonces: int | None = None, timeout: float | None = None) -> bool:
        """Block until ``nonces`` nonces are done (None: the iterator is exhausted and nothing is in flight),
        PoC failed, or ``timeout`` s passed. True if the goal was reached."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            if self._failed is not None:
                return False
            if nonces is not None and self._counters["nonces_done"] >= nonces:
                return True
            if nonces is None and self._round is not None and self._round["exhausted"] and not self._prepared \
                    and not (self._tracker is not None and len(self._tracker)) and not self._pending_readouts():
                return True
            if deadline is not None and time.perf_counter() > deadline:
                return False
            time.sleep(0.002)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def failed(self) -> bool:
        return self._failed is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def artifacts(self, timeout: float | None = None) -> Iterator[Artifact]:
        """Artifacts as they are produced, until :meth:`stop` (or ``timeout`` s without a new one)."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            if item is None:
                return
            yield item

    # -------------------------------------------------------------------------------------- failure handling
    def _fail(self, exc: BaseException, where: str) -> None:
        with self._lock:
            if self._failed is not None:
                return
            self._failed = f"{where}: {type(exc).__name__}: {exc}"
            self._error = exc
            logger.error("continuous PoC stopped after an error in %s (chat continues): %s", where, exc,
                         exc_info=exc)
            self._traceback = traceback.format_exc()
            self._running = False
            if self.governor is not None:
                self.governor.stop(self._failed)
            if self._t_stop is None and self._t_start is not None:
                self._t_stop = time.perf_counter()
        self._cancel_in_flight()
        self._queue.put(None)

    def _guard(self, fn):
        """Run a hook body; any exception disables PoC instead of reaching the engine loop."""
        name = getattr(fn, "__name__", "hook")

        def guarded(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - never let PoC break chat
                self._fail(exc, name)
                return None
            finally:
                step = self._step
                if step is not None and step.poc_rows:
                    step.overhead += time.perf_counter() - t0

        return guarded

    # -------------------------------------------------------------------------------------- scheduling
    def _engaged(self) -> bool:
        return (self._running and self._failed is None) or (self._tracker is not None and len(self._tracker) > 0)

    def _make_has_pending(self, original):
        def has_pending_requests() -> bool:
            # the engine loop asks this first thing after a step: the step scheduled last is over
            if self._clock is not None:
                self._close_step(time.perf_counter())
            if original():
                return True
            try:
                return (self._running and self._failed is None and not self._cb.stopping()
                        and (bool(self._prepared) or not self._round["exhausted"]))
            except Exception:  # noqa: BLE001
                return False

        return has_pending_requests

    def _ensure_governor(self, cache) -> Governor:
        if self.governor is None:
            capacity, _ = self._cb.kv_tokens(cache)
            config = GovernorConfig(max_batch_tokens=self._cb.max_batch_tokens(cache), kv_tokens_capacity=capacity,
                                    mode=self.mode, slo_overhead=self.slo_overhead,
                                    poc_seq_len=self._round["seq_len"], **self.governor_options)
            self.governor = Governor(config, self._step_time_model)
            if self._failed is not None:
                self.governor.stop(self._failed)
        return self.governor

    @staticmethod
    def _merge(a, b):
        """Concatenate two (requests, decode_fast_path, q_tokens, kv_read) schedules (a first)."""
        if not b[0]:
            return a
        if not a[0]:
            return b
        return list(a[0]) + list(b[0]), a[1] and b[1], a[2] + b[2], a[3] + b[3]

    def _pass(self, sched, original, visible: Callable[[str], bool], token_budget: int, cache_budget: int,
              max_requests: int):
        """One call of the engine's own scheduler with only ``visible`` requests present.
        Returns (schedule, waiting requests left, starved requests). ``visible`` None: all requests."""
        def outcome(result):
            waiting = len(sched.waiting_requests)
            head = next((sched.waiting_requests[r] for r in sched.waiting_requests_order
                         if r in sched.waiting_requests), None) if waiting else None
            return result, waiting, head, list(getattr(sched, "starved_requests", None) or [])

        if visible is None and max_requests == sched.max_requests_per_batch:  # the engine's own call, as is
            return outcome(original(token_budget, cache_budget))
        hidden = self._cb.hide(sched, visible) if visible is not None else ({}, {}, [])
        saved = sched.max_requests_per_batch
        sched.max_requests_per_batch = max_requests
        try:
            return outcome(original(token_budget, cache_budget))
        finally:
            sched.max_requests_per_batch = saved
            self._cb.restore(sched, hidden)

    def _make_schedule(self, sched, bp, original):
        def schedule_batch(token_budget: int, cache_budget: int):
            t0 = time.perf_counter()
            if self._clock is not None:
                self._close_step(t0)
            if not self._engaged():
                self._disarm()
                return original(token_budget, cache_budget)
            is_poc = self._tracker.is_poc_request
            max_requests = sched.max_requests_per_batch
            # 1. chat first, with the whole budget, as if PoC did not exist (no PoC request in the scheduler:
            #    nothing to hide)
            poc_in_flight = len(self._tracker) > 0
            chat, waiting, head, starved = self._pass(sched, original, (lambda r: not is_poc(r)) if poc_in_flight
                                                      else None, token_budget, cache_budget, max_requests)
            t_extra = time.perf_counter()
            result = chat
            try:
                # 1b. chat short of KV while PoC holds some: preempt PoC nonces (re-queued), schedule more chat
                if poc_in_flight and (chat[0] is None or starved or waiting) and self._preempt_for_chat(
                        sched, bp, chat, waiting, head, starved):
                    if chat[0] is None:
                        chat, waiting, head, starved = self._pass(sched, original, lambda r: not is_poc(r),
                                                                  token_budget, cache_budget, max_requests)
                    else:
                        done = {fs.state.request_id for fs in chat[0]}
                        more, waiting, head, starved = self._pass(
                            sched, original, lambda r: not is_poc(r) and r not in done, token_budget - chat[2],
                            max(0, cache_budget - chat[3]), max_requests - len(chat[0]))
                        if more[0] is not None:
                            chat = self._merge(chat, more)
                if chat[0] is None:
                    return chat
                result = self._schedule_poc(sched, bp, original, chat, token_budget, cache_budget, waiting,
                                            head, starved)
                return result
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, "schedule")
                sched.starved_requests = starved
                result = chat
                return chat
            finally:
                chat_q = int(chat[2]) if chat[0] else 0
                poc_q = int(result[2]) - chat_q if result[0] else 0
                if poc_q > 0:
                    self._arm()  # before the forward: the LM-head filter must hold on every step with PoC rows
                else:
                    self._disarm()
                if result[0]:
                    self._clock = _StepClock(t0, chat_q, poc_q, time.perf_counter() - t_extra)

        return schedule_batch

    def _load(self, bp, chat, waiting, head, starved) -> StepLoad:
        tracker, page = self._tracker, max(1, int(getattr(self._cb.config, "page_size", 1)))
        chat_batch, _, chat_q, _ = chat
        chat_batch = chat_batch or []
        _, kv_free = self._cb.kv_tokens(self._cb.cache(bp))
        decode_reqs = sum(1 for fs in chat_batch if fs.query_length == 1 and fs.state.generated_len() > 0)

        def pages(n: int) -> int:
            return -(-int(n) // page) * page

        need = sum(pages(n) for _, n in starved)
        if head is not None:
            need += pages(len(getattr(head, "remaining_prefill_tokens", ())) + 1)
        held = sum(pages(st.computed) for st in tracker.states() if not st.done)
        return StepLoad(chat_tokens=int(chat_q), kv_tokens_free=max(0, kv_free), chat_decode_requests=decode_reqs,
                        chat_prefill_tokens=int(chat_q) - decode_reqs, waiting_chat_requests=waiting,
                        poc_tokens_pending=tracker.pending_tokens, poc_kv_tokens_held=held,
                        waiting_chat_kv_tokens=need, poc_fixed_seconds=self._fixed_cost() or 0.0,
                        probe_tokens=self.SMALL_POC_ROWS if self._vetoes_since_probe >= self.PROBE_EVERY else 0)

    def _preempt_for_chat(self, sched, bp, chat, waiting, head, starved) -> bool:
        """Free the KV the governor asks for by preempting in-flight PoC nonces (newest first); True if any."""
        governor = self._ensure_governor(self._cb.cache(bp))
        load = self._load(bp, chat, waiting, head, starved)
        with self._gov_lock:
            budget = governor.decide(load)
        want = int(getattr(budget, "preempt_kv_tokens", 0) or 0)
        if want <= 0:
            return False
        page = max(1, int(getattr(self._cb.config, "page_size", 1)))
        victims, freed = [], 0
        for st in reversed(self._tracker.states()):
            if freed >= want:
                break
            if st.done or st.computed == 0:
                continue
            victims.append(st)
            freed += -(-st.computed // page) * page
        if not victims:
            return False
        self._cb.preempt(sched, [st.request_id for st in victims])
        for st in victims:
            state = self._tracker.finish(st.request_id)
            if state is not None and state.inputs is not None:
                self._prepared.appendleft((state.nonce, state.inputs))  # re-admitted first, from scratch
        self._counters["nonces_preempted"] += len(victims)
        self._counters["poc_tokens_discarded"] += sum(st.computed for st in victims)
        return True

    def _schedule_poc(self, sched, bp, original, chat, token_budget, cache_budget, waiting, head, starved):
        tracker = self._tracker
        chat_batch, _, chat_q, chat_kv = chat
        fixed, chat_step = self._fixed_cost(), self._chat_step_ewma
        if (self.mode == "fill" and chat_q > 0 and fixed is not None and chat_step is not None
                and fixed >= self.slo_overhead * chat_step and len(self._prepared) > 0
                and self._vetoes_since_probe < self.PROBE_EVERY):
            # fast path of the governor's fixed-cost rule (measured chat step time instead of the fit): PoC's
            # fixed per-step cost alone exceeds the SLO allowance of a chat step, so skip building the load
            self._counters["fixed_cost_vetoes"] += 1
            self._vetoes_since_probe += 1
            sched.starved_requests = starved
            return chat
        governor = self._ensure_governor(self._cb.cache(bp))
        load = self._load(bp, chat, waiting, head, starved)
        with self._gov_lock:
            budget = governor.decide(load)
            governor.record(budget)
        if self._running and self._failed is None and budget.new_requests > 0 and not self._cb.stopping():
            self._admit(sched, budget.new_requests)
        if budget.reason == BudgetReason.FIXED_COST:
            if budget.tokens > 0:
                self._vetoes_since_probe = 0
                self._counters["fixed_cost_probes"] += 1
            else:
                self._vetoes_since_probe += 1
                self._counters["fixed_cost_vetoes"] += 1
        tokens = min(budget.tokens, token_budget - chat_q, tracker.pending_tokens)
        requests_left = sched.max_requests_per_batch - len(chat_batch)
        if tokens <= 0 or requests_left <= 0 or self._failed is not None:
            sched.starved_requests = starved
            return chat
        # 2. PoC only into what is left (in-flight nonces first: FIFO over active, then waiting)
        poc, _, _, poc_starved = self._pass(sched, original, tracker.is_poc_request, tokens,
                                            max(0, cache_budget - chat_kv), requests_left)
        # the engine may offload starved requests: report chat's only, so it never evicts chat for PoC
        sched.starved_requests = starved
        if not poc[0]:
            return chat
        return self._merge(chat, poc)

    SMALL_POC_ROWS = 8  # a probe step's PoC rows (and the chat steps the fixed-cost estimate is taken from)
    PROBE_EVERY = 50  # fixed-cost vetoes between two probes

    def _fixed_cost(self) -> float | None:
        """Measured PoC cost (s) of a step carrying a few PoC rows beside chat (its fixed part), or of all PoC
        steps until there is such a step (an overestimate); None before any PoC step."""
        small = self._poc_small_overhead
        return small if small is not None else self._poc_step_overhead

    def _admit(self, sched, n: int) -> None:
        """Admit up to ``n`` prepared nonces (inputs made by the worker) as engine requests."""
        tracker = self._tracker
        placeholder = [0] * tracker.seq_len
        admitted = 0
        while admitted < n:
            try:
                nonce, emb = self._prepared.popleft()
            except IndexError:
                break
            rid = tracker.request_id_for(nonce)
            tracker.admit(nonce, rid, emb)
            sched.add_waiting_request(self._cb.new_request_state(rid, placeholder))
            admitted += 1
        self._counters["nonces_admitted"] += admitted
        if admitted and len(self._prepared) * 2 < self._round["prefetch"]:
            self._jobs.put(("refill",))  # wake the worker to prepare more

    # -------------------------------------------------------------------------------------- forward hooks
    def _on_step_start(self, module, args, kwargs):
        self._step = None
        tracker = self._tracker
        cu = kwargs.get("cu_seq_lens_q")
        pos = kwargs.get("position_ids")
        num_rows = int(pos.shape[-1]) if torch.is_tensor(pos) else 0
        step = _Step(thread=threading.get_ident())
        self._step = step
        if tracker is None or not len(tracker) or cu is None or pos is None:
            return None
        reqs = self._cb.requests_in_batch()
        ids = [self._cb.request_id(fs) for fs in reqs]
        if not any(tracker.is_poc_request(r) for r in ids):
            return None
        step.chat_requests = sum(1 for r in ids if not tracker.is_poc_request(r))
        # LM-head row selection first (needs only ids): it must hold even if everything else fails
        # logits_indices has one entry per request: first the rows of requests that sample a token (in batch
        # order), then unused entries (row 0); only the chat entries among the first kind are kept
        logit_owner = [rid for rid, fs in zip(ids, reqs) if self._cb.has_new_token(fs)]
        step.lm_keep = [j for j, rid in enumerate(logit_owner) if not tracker.is_poc_request(rid)]
        li = kwargs.get("logits_indices")
        step.lm_rows_in = int(li.numel()) if torch.is_tensor(li) else len(logit_owner)
        rows = PoCRows.from_flat_batch(cu.tolist(), pos.reshape(-1).tolist(), ids, tracker.nonce_of,
                                       tracker.seq_len, num_rows=num_rows)
        step.rows = rows
        step.poc_rows = rows.num_poc_rows
        step.compute = bool(rows) and self._failed is None
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

    def _current(self) -> _Step | None:
        """This thread's step, if a manager step is running in it (other forwards of the model are ignored)."""
        step = self._step
        return step if step is not None and step.thread == threading.get_ident() else None

    def _on_step_end(self, module, args, output):
        step = self._current()
        if step is None:
            return None
        self._step = None
        clock = self._clock
        if clock is not None:
            clock.hook_seconds += step.overhead
        if step.rows is not None:
            self._counters["nonces_split"] += sum(1 for seg in step.rows.segments
                                                  if seg.position == 0 and not seg.completes)
            if self._tracker is not None:
                self._tracker.advance(step.rows)
        return None

    def _close_step(self, now: float) -> None:
        """Account the step scheduled last (engine thread): its time from scheduling to the engine loop's return
        (batch preparation, forward, sampling, output update), counters, the fixed-cost estimate and a
        subsample for the governor's step-time fit."""
        clock, self._clock = self._clock, None
        dt = now - clock.t0
        c = self._counters
        c["steps"] += 1
        c["poc_tokens"] += clock.poc_tokens
        c["chat_tokens"] += clock.chat_tokens
        if not clock.poc_tokens and dt > 0:
            e = self._chat_step_ewma
            self._chat_step_ewma = dt if e is None else 0.95 * e + 0.05 * dt
        if clock.poc_tokens:
            c["poc_steps"] += 1
            ovh = clock.hook_seconds + clock.sched_seconds
            self._poc_step_overhead = ovh if self._poc_step_overhead is None else (
                0.9 * self._poc_step_overhead + 0.1 * ovh)
            if clock.poc_tokens <= self.SMALL_POC_ROWS and clock.chat_tokens:
                e = self._poc_small_overhead
                self._poc_small_overhead = ovh if e is None else 0.8 * e + 0.2 * ovh
        # the step-time fit costs ~0.2 ms: feed it a subsample (at most one step per observe_interval)
        total = clock.chat_tokens + clock.poc_tokens
        if self.governor is not None and total > 0 and dt > 0 and clock.t0 >= self._next_observe:
            self._next_observe = clock.t0 + self.observe_interval
            self._jobs.put(("observe", total, clock.poc_tokens, dt))

    def _on_embed(self, module, args, output):
        step = self._current()
        if step is None or not step.compute or self._failed is not None:
            return None
        flat = output.view(-1, output.shape[-1])
        for start, stop, inputs in step.inputs:  # copy_ converts device/dtype as .to() would
            flat[start:stop].copy_(inputs)
        return output

    def _make_layer_hook(self, i: int):
        def layer_hook(module, args, output):
            step = self._current()
            if step is None or not step.compute or self._failed is not None:
                return None
            v = self._round["vectors"][i]
            hs = output if torch.is_tensor(output) else output[0]
            reflect_rows_(hs.view(-1, hs.shape[-1]), step.block if step.block is not None else step.row_index, v)
            return output

        layer_hook.__name__ = f"layer_{i}"
        return layer_hook

    def _on_final_norm(self, module, args, output):
        step = self._current()
        if step is None or not step.compute or self._failed is not None or not step.readout.numel():
            return None
        flat = output.view(-1, output.shape[-1])
        hs = flat.index_select(0, step.readout).float()  # a copy: the output stage may run in the worker thread
        if step.chat_requests == 0 and self.device.type == "cpu":
            # a PoC-only step on CPU: read out here, where it delays no chat step (in the worker it would compete with
            # the next chat steps for the GIL, which on a small model costs them more than the readout itself)
            self._readout(hs, step.rows.readout_nonces())
            return None
        self._readouts_queued += 1
        self._jobs.put(("readout", hs, step.rows.readout_nonces()))
        return None

    def _emit(self, artifact: Artifact) -> None:
        self.collected.append(artifact)
        self._queue.put(artifact)
        if self.on_artifact is not None:
            try:
                self.on_artifact(artifact)
            except Exception as exc:  # noqa: BLE001 - a user callback error does not stop PoC
                self._counters["callback_errors"] += 1
                self._last_callback_error = f"{type(exc).__name__}: {exc}"

    def _on_lm_head_in(self, module, args):
        step = self._current()
        try:
            x = args[0]
            n = x.shape[-2]
            if step is None:
                return None
            if step.lm_keep is None:
                self._counters["lm_head_rows"] += n
                return None
            if n == step.lm_rows_in:
                keep = step.lm_keep
            elif step.rows is not None and n == step.rows.num_rows:  # model without logits_to_keep
                keep = step.rows.chat_rows()
            else:
                raise PoCFailure(f"lm_head got {n} rows; expected {step.lm_rows_in} logits rows")
            step.lm_full, step.lm_index = n, torch.tensor(keep, dtype=torch.int64, device=x.device)
            self._counters["lm_head_rows"] += len(keep)
            return (x.index_select(-2, step.lm_index),) + tuple(args[1:])
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "lm_head")
            return None

    def _on_lm_head_out(self, module, args, output):
        step = self._current()
        if step is None or step.lm_index is None:
            return None
        full = output.new_zeros(output.shape[:-2] + (step.lm_full, output.shape[-1]))
        full.index_copy_(-2, step.lm_index, output)
        step.lm_index = None
        return full

    # -------------------------------------------------------------------------------------- outputs
    def _is_poc_output(self, output) -> bool:
        rid = getattr(output, "request_id", None)
        return isinstance(rid, str) and rid.startswith(self._prefix + "-")

    def _on_poc_output(self, output) -> None:
        self._counters["poc_outputs_filtered"] += 1
        tracker = self._tracker
        if tracker is not None and output.is_finished():
            state = tracker.finish(output.request_id)
            if state is not None and not state.done and self._failed is None and getattr(output, "error", None):
                self._fail(PoCFailure(f"PoC request {output.request_id} failed: {output.error}"), "engine")

    def _on_chat_output(self, output) -> None:
        try:
            if output.is_finished() and getattr(output, "error", None) is None:
                now = time.perf_counter()
                self._latencies.append(now - output.created_time)
                self._counters["chat_requests_done"] += 1
                key = (max(1, len(output.prompt_ids)), max(1, len(output.generated_tokens)))
                self._chat_shapes[key] = self._chat_shapes.get(key, 0) + 1
        except Exception:  # noqa: BLE001 - stats only
            pass

    def _wrap_deliver(self, original):
        def deliver(output):
            if self._is_poc_output(output):
                self._on_poc_output(output)
                return None
            self._on_chat_output(output)
            return original(output)

        return deliver

    def _wrap_deliver_batch(self, original):
        def deliver_batch(outputs):
            chat = []
            for out in outputs:
                if self._is_poc_output(out):
                    self._on_poc_output(out)
                else:
                    self._on_chat_output(out)
                    chat.append(out)
            if chat:
                return original(chat)
            return None

        return deliver_batch

    # -------------------------------------------------------------------------------------- stats
    def _model_shape(self):
        if not hasattr(self, "_shape"):
            try:
                from cpoc_kernels.cost import ModelShape

                self._shape = ModelShape.from_hf_config(self.model.config)
            except Exception:  # noqa: BLE001
                self._shape = None
        return self._shape

    def exchange_rate(self, prompt_len: int, output_len: int) -> float:
        """Nonces one chat request of this shape is worth (cost model, protocol §5.3) at this round's seq_len."""
        from cpoc_kernels.cost import nonces_per_request

        seq_len = self._round["seq_len"] if self._round else 1024
        return nonces_per_request(self._model_shape(), prompt_len, output_len, seq_len)

    def chat_latencies(self) -> list[float]:
        """End-to-end latencies (s) of the chat requests finished while attached (most recent window)."""
        return list(self._latencies)

    def stats(self) -> dict:
        """Live counters: nonces/s, PoC share of tokens, chat latency percentiles, governor, cost, errors."""
        c = dict(self._counters)
        now = time.perf_counter()
        t0, t1 = self._t_start, self._t_stop
        elapsed = 0.0 if t0 is None else (t1 if t1 is not None else now) - t0
        lat = sorted(self._latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, max(0, math.ceil(p / 100 * len(lat)) - 1))]

        total = c["chat_tokens"] + c["poc_tokens"]
        out = dict(c)
        out.update(
            running=self._running,
            failed=self._failed is not None,
            error=self._failed,
            in_flight=0 if self._tracker is None else len(self._tracker),
            poc_step_overhead_ms=None if self._poc_step_overhead is None else 1e3 * self._poc_step_overhead,
            poc_fixed_cost_ms=None if self._fixed_cost() is None else 1e3 * self._fixed_cost(),
            elapsed_s=elapsed,
            nonces_per_s=(c["nonces_done"] / elapsed) if elapsed > 0 else 0.0,
            poc_token_share=(c["poc_tokens"] / total) if total else 0.0,
            chat_latency_s={"p50": pct(50), "p90": pct(90), "p99": pct(99), "n": len(lat)},
            governor=None if self.governor is None else self.governor.stats(),
        )
        shape = self._model_shape()
        if shape is not None and self._round is not None:
            from cpoc_kernels.cost import nonce_flops

            from cpoc_kernels.cost import nonces_per_request

            seq_len = self._round["seq_len"]
            work = sum(n * nonces_per_request(shape, p, o, seq_len) for (p, o), n in list(self._chat_shapes.items()))
            out["chat_work_in_nonces"] = work
            out["cost"] = {"nonce_flops": nonce_flops(shape, seq_len), "chat_work_in_nonces": work,
                           "model": shape.name}
        return out
