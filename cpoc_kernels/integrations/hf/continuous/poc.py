"""The public :class:`ContinuousPoC` facade: wires the parts of one attachment and owns start/stop/stats.

Owns: attach/detach (the parts: :class:`~.engine.CBInternals`, :class:`~.state.SharedState`,
:class:`~.hooks.ForwardHooks`, :class:`~.worker.PoCWorker`, :class:`~.scheduling.PoCScheduler`,
:class:`~.outputs.OutputFilter`), the round's lifecycle (``start`` / ``stop`` / ``wait``), artifact access and the
``stats()`` report.

May not: run on the engine thread's hot path (no hook or scheduling logic here) or touch transformers' internals
directly.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.governor import Governor, GovernorConfig, StepTimeModel
from cpoc_kernels.reference.readout import K_DIM
from cpoc_kernels.rows import NonceTracker

from . import scheduling
from .engine import CBInternals, Patches, model_parts
from .hooks import ForwardHooks
from .outputs import OutputFilter
from .scheduling import PoCScheduler
from .state import SharedState
from .worker import PoCWorker


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
    :class:`GovernorConfig` fields; ``step_time_model`` an optional prior :class:`StepTimeModel`. On a CUDA
    device (and without ``step_time_model``) the governor predicts step times from each step's bytes and FLOPs
    (:class:`~cpoc_kernels.step_model.WorkStepTimeModel` over ``ModelShape.from_hf_config(model.config)``, unless
    ``governor_options`` set ``model_shape``); on CPU, or when the config gives no shape, from its rows.
    """

    SMALL_POC_ROWS = scheduling.SMALL_POC_ROWS  # read at construction: set on the class before attaching
    PROBE_EVERY = scheduling.PROBE_EVERY

    def __init__(self, model: torch.nn.Module, manager, *, mode: str = "fill", slo_overhead: float = 0.05,
                 governor_options: dict | None = None, step_time_model: StepTimeModel | None = None,
                 on_artifact: Callable[[Artifact], None] | None = None, request_prefix: str = "cpoc",
                 latency_window: int = 10000, prefetch: int | None = None, observe_interval: float = 0.02):
        self.model = model
        cb = CBInternals(manager)
        cb.check_config()
        self.embed, self.layers, self.norm, self.lm_head = parts = model_parts(model)
        self.hidden = model.config.hidden_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mode, self.slo_overhead = mode, slo_overhead
        self.governor_options = dict(governor_options or {})
        GovernorConfig(max_batch_tokens=1, kv_tokens_capacity=1, mode=mode, slo_overhead=slo_overhead,
                       **self.governor_options)  # validate early, in the caller's thread
        self._prefetch_depth = prefetch
        self._cb = cb
        self._shared = sh = SharedState(cb, request_prefix=request_prefix, on_artifact=on_artifact,
                                        latency_window=latency_window)
        self._worker = PoCWorker(sh, self.hidden, self.dtype, self.device)
        self._hooks = ForwardHooks(sh, model, parts, self.device, self._worker.readout)
        self._patches = Patches()
        self._scheduler = PoCScheduler(sh, self._hooks, self._patches, mode=mode, slo_overhead=slo_overhead,
                                       governor_options=self.governor_options, step_time_model=step_time_model,
                                       observe_interval=observe_interval, small_poc_rows=self.SMALL_POC_ROWS,
                                       probe_every=self.PROBE_EVERY,
                                       model_shape=self._model_shape() if self.device.type == "cuda" else None)
        cb.wrap_manager(self._patches, self._scheduler.wrap, OutputFilter(sh))

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Remove all hooks and wrappers (PoC must be stopped first)."""
        with self._shared.lock:
            self._shared.running = False
        self._worker.stop()
        self._hooks.disarm()
        self._patches.undo()

    def start(self, block_hash: str, public_key: str, nonce_iterator: Iterable[int], seq_len: int,
              k: int = K_DIM, stronger_rng: bool = False) -> None:
        """Begin admitting nonces from ``nonce_iterator`` for this round (non-blocking)."""
        if seq_len <= 0 or not 0 < k <= self.hidden:
            raise ValueError(f"need seq_len > 0 and 0 < k <= {self.hidden}, got seq_len={seq_len}, k={k}")
        from cpoc_kernels.reference.householder import layer_vector

        sh = self._shared
        with sh.lock:
            if sh.running:
                raise RuntimeError("continuous PoC already running; stop() it first")
            if sh.tracker is not None and len(sh.tracker):
                raise RuntimeError("nonces of the previous round are still in flight")
            vectors = [layer_vector(block_hash, i, self.hidden, device=self.device) for i in range(len(self.layers))]
            if self.device.type == "cpu":  # the reference's v.to(dtype), done once per round
                vectors = [v.to(self.dtype) for v in vectors]
            depth = self._prefetch_depth
            if depth is None:
                mbt = getattr(self._cb.config, "max_batch_tokens", None) or 4 * seq_len
                depth = max(4, 2 * -(-int(mbt) // seq_len))
            sh.round = dict(block_hash=block_hash, public_key=public_key, seq_len=seq_len, k=k,
                            stronger_rng=stronger_rng, vectors=vectors, iterator=iter(nonce_iterator),
                            exhausted=False, prefetch=depth)
            sh.prepared.clear()
            sh.tracker = NonceTracker(seq_len=seq_len, prefix=sh.prefix)
            sh.failed, sh.error = None, None
            sh.governor = None  # rebuilt on the next step for this round's seq_len
            sh.t_start, sh.t_stop = time.perf_counter(), None
            sh.running = True
            self._worker.ensure_running()
        self._cb.wake()

    def stop(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop admitting nonces. ``drain``: wait (up to ``timeout`` s) for in-flight nonces to be read out;
        otherwise (or on timeout) cancel them."""
        sh = self._shared
        with sh.lock:
            sh.running = False
        tracker = sh.tracker
        if tracker is None:
            return
        deadline = None if timeout is None else time.perf_counter() + timeout
        if drain:
            while len(tracker) and sh.failed is None and self._cb.is_running():
                if deadline is not None and time.perf_counter() > deadline:
                    break
                time.sleep(0.005)
        sh.cancel_in_flight()
        sh.prepared.clear()
        while sh.pending_readouts() and self._worker.alive():
            if deadline is not None and time.perf_counter() > deadline:
                break
            time.sleep(0.002)
        self._worker.stop()
        with sh.lock:
            if sh.t_stop is None:
                sh.t_stop = time.perf_counter()
        sh.artifact_queue.put(None)

    def wait(self, nonces: int | None = None, timeout: float | None = None) -> bool:
        """Block until ``nonces`` nonces are done (None: the iterator is exhausted and nothing is in flight),
        PoC failed, or ``timeout`` s passed. True if the goal was reached."""
        sh = self._shared
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            if sh.failed is not None:
                return False
            if nonces is not None and sh.counters["nonces_done"] >= nonces:
                return True
            if nonces is None and sh.round is not None and sh.round["exhausted"] and not sh.prepared \
                    and not (sh.tracker is not None and len(sh.tracker)) and not sh.pending_readouts():
                return True
            if deadline is not None and time.perf_counter() > deadline:
                return False
            time.sleep(0.002)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._shared.running

    @property
    def failed(self) -> bool:
        return self._shared.failed is not None

    @property
    def error(self) -> BaseException | None:
        return self._shared.error

    @property
    def governor(self) -> Governor | None:
        """This round's governor (built on the first step with PoC), None before."""
        return self._shared.governor

    @property
    def collected(self) -> list[Artifact]:
        """Every artifact produced since attach (also delivered to ``on_artifact`` and :meth:`artifacts`)."""
        return self._shared.collected

    @collected.setter
    def collected(self, artifacts: list[Artifact]) -> None:
        self._shared.collected = artifacts

    @property
    def on_artifact(self) -> Callable[[Artifact], None] | None:
        return self._shared.on_artifact

    @on_artifact.setter
    def on_artifact(self, callback: Callable[[Artifact], None] | None) -> None:
        self._shared.on_artifact = callback

    def artifacts(self, timeout: float | None = None) -> Iterator[Artifact]:
        """Artifacts as they are produced, until :meth:`stop` (or ``timeout`` s without a new one)."""
        import queue

        while True:
            try:
                item = self._shared.artifact_queue.get(timeout=timeout)
            except queue.Empty:
                return
            if item is None:
                return
            yield item

    # ------------------------------------------------------------------ stats
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

        rnd = self._shared.round
        seq_len = rnd["seq_len"] if rnd else 1024
        return nonces_per_request(self._model_shape(), prompt_len, output_len, seq_len)

    def chat_latencies(self) -> list[float]:
        """End-to-end latencies (s) of the chat requests finished while attached (most recent window)."""
        return list(self._shared.latencies)

    def stats(self) -> dict:
        """Live counters: nonces/s, PoC share of tokens, chat latency percentiles, governor, cost, errors."""
        sh = self._shared
        c = dict(sh.counters)
        now = time.perf_counter()
        t0, t1 = sh.t_start, sh.t_stop
        elapsed = 0.0 if t0 is None else (t1 if t1 is not None else now) - t0
        lat = sorted(sh.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, max(0, math.ceil(p / 100 * len(lat)) - 1))]

        total = c["chat_tokens"] + c["poc_tokens"]
        overhead, fixed = self._scheduler.poc_step_overhead, self._scheduler.fixed_cost()
        out = dict(c)
        out.update(
            running=sh.running,
            failed=sh.failed is not None,
            error=sh.failed,
            in_flight=0 if sh.tracker is None else len(sh.tracker),
            poc_step_overhead_ms=None if overhead is None else 1e3 * overhead,
            poc_fixed_cost_ms=None if fixed is None else 1e3 * fixed,
            elapsed_s=elapsed,
            nonces_per_s=(c["nonces_done"] / elapsed) if elapsed > 0 else 0.0,
            poc_token_share=(c["poc_tokens"] / total) if total else 0.0,
            chat_latency_s={"p50": pct(50), "p90": pct(90), "p99": pct(99), "n": len(lat)},
            governor=None if sh.governor is None else sh.governor.stats(),
        )
        shape = self._model_shape()
        if shape is not None and sh.round is not None:
            from cpoc_kernels.cost import nonce_flops, nonces_per_request

            seq_len = sh.round["seq_len"]
            work = sum(n * nonces_per_request(shape, p, o, seq_len) for (p, o), n in list(sh.chat_shapes.items()))
            out["chat_work_in_nonces"] = work
            out["cost"] = {"nonce_flops": nonce_flops(shape, seq_len), "chat_work_in_nonces": work,
                           "model": shape.name}
        return out
