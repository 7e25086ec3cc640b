"""The state one continuous-PoC attachment shares between its parts (engine thread and worker thread).

Owns: the round (block hash, key, seq_len, k, layer vectors, nonce iterator), the in-flight nonces
(:class:`~cpoc_kernels.rows.NonceTracker`), the prepared inputs, the job queue to the worker, counters, the
governor instance, the failure state (:meth:`SharedState.fail`: PoC stops, chat continues), artifact delivery
(:meth:`SharedState.emit`) and the clock of the step scheduled last (:class:`StepClock`).

May not: touch the engine except through :class:`~.engine.CBInternals` (cancelling in-flight requests on
failure), or decide scheduling, hook or worker behaviour.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.governor import Governor
from cpoc_kernels.rows import NonceTracker

from .engine import CBInternals

logger = logging.getLogger("cpoc_kernels.continuous")

COUNTERS = ("steps", "poc_steps", "chat_tokens", "poc_tokens", "nonces_admitted", "nonces_done", "nonces_dropped_nan",
            "nonces_split", "nonces_preempted", "poc_tokens_discarded", "fixed_cost_vetoes", "fixed_cost_probes",
            "fresh_only_steps", "lm_head_rows", "chat_requests_done", "poc_outputs_filtered", "callback_errors")


class PoCFailure(RuntimeError):
    """Something inside PoC handling went wrong (PoC stops; chat continues)."""


@dataclass
class StepClock:
    """The step scheduled last, timed from its scheduling until the engine loop comes back (engine thread)."""

    t0: float
    chat_tokens: int
    poc_tokens: int
    sched_seconds: float  # PoC's part of scheduling it
    hook_seconds: float = 0.0  # time in PoC hooks during its forward
    work: tuple[int, int, int] | None = None  # (attention pairs, KV read, LM-head rows) of a step to observe


class SharedState:
    """What the scheduler, the hooks, the worker and the facade of one attachment share."""

    def __init__(self, cb: CBInternals, *, request_prefix: str, on_artifact: Callable[[Artifact], None] | None,
                 latency_window: int):
        self.cb = cb
        self.prefix = request_prefix
        self.on_artifact = on_artifact
        self.lock = threading.RLock()
        self.running = False
        self.failed: str | None = None  # "where: Type: message" once PoC failed
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.round: dict | None = None
        self.tracker: NonceTracker | None = None
        self.prepared: deque = deque()  # (nonce, [seq_len, H] inputs) ready to admit, filled by the worker
        self.jobs: queue.Queue = queue.Queue()  # to the worker: ("readout", hs, nonces) / ("observe", ...) / ("refill",)
        self.readouts_queued = 0  # engine thread only
        self.readouts_done = 0  # worker thread only
        self.artifact_queue: queue.Queue = queue.Queue()
        self.collected: list[Artifact] = []
        self.counters: dict = dict.fromkeys(COUNTERS, 0)
        self.counters["chat_work_in_nonces"] = 0.0
        self.count_lock = threading.Lock()  # counters both threads update
        self.governor: Governor | None = None
        self.gov_lock = threading.Lock()
        self.clock: StepClock | None = None  # the step scheduled last, until the engine loop comes back
        self.latencies: deque[float] = deque(maxlen=latency_window)
        self.chat_shapes: dict[tuple[int, int], int] = {}  # (prompt_len, output_len) -> finished chat requests
        self.last_callback_error: str | None = None
        self.t_start: float | None = None
        self.t_stop: float | None = None

    def engaged(self) -> bool:
        """PoC admits nonces or still has some in flight."""
        return (self.running and self.failed is None) or (self.tracker is not None and len(self.tracker) > 0)

    def pending_readouts(self) -> int:
        return self.readouts_queued - self.readouts_done

    def fail(self, exc: BaseException, where: str) -> None:
        """Stop PoC after an error in ``where`` (first error wins); chat continues."""
        with self.lock:
            if self.failed is not None:
                return
            self.failed = f"{where}: {type(exc).__name__}: {exc}"
            self.error = exc
            logger.error("continuous PoC stopped after an error in %s (chat continues): %s", where, exc,
                         exc_info=exc)
            self.traceback = traceback.format_exc()
            self.running = False
            if self.governor is not None:
                self.governor.stop(self.failed)
            if self.t_stop is None and self.t_start is not None:
                self.t_stop = time.perf_counter()
        self.cancel_in_flight()
        self.artifact_queue.put(None)

    def cancel_in_flight(self) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        for state in tracker.clear():
            try:
                self.cb.cancel_request(state.request_id)
            except Exception:  # noqa: BLE001 - best effort
                pass

    def emit(self, artifact: Artifact) -> None:
        self.collected.append(artifact)
        self.artifact_queue.put(artifact)
        if self.on_artifact is not None:
            try:
                self.on_artifact(artifact)
            except Exception as exc:  # noqa: BLE001 - a user callback error does not stop PoC
                self.counters["callback_errors"] += 1
                self.last_callback_error = f"{type(exc).__name__}: {exc}"
