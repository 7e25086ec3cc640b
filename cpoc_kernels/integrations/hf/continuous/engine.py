"""transformers' continuous-batching private API: the one module that knows it.

Owns: the supported transformers range and its check, every attribute access into ``ContinuousBatchingManager``
/ its batch processor / scheduler / cache / output router (:class:`CBInternals`), the model parts the hooks attach
to (:func:`model_parts`), the PoC-compatible ``ContinuousBatchingConfig`` (:func:`cb_config`), and the attribute
replacements made on engine objects (:class:`Patches`, undone in reverse order).

May not: hold PoC state or decide anything about PoC; the other modules of this package reach the engine only
through this one (a new transformers release is adapted here).
"""
from __future__ import annotations

import re
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from ..runner import decoder_layers

SUPPORTED_TRANSFORMERS = "5.20–5.24"
_SUPPORTED_MINORS = range(20, 25)  # 5.20 … 5.24: the releases this glue is written against (tested on 5.24.0)


class UnsupportedEngineError(RuntimeError):
    """The installed transformers' continuous batching lacks something this glue relies on."""


def transformers_supported(version: str) -> bool:
    """Whether ``version`` (e.g. ``"5.24.0"``, ``"5.21.0.dev0"``) is in :data:`SUPPORTED_TRANSFORMERS`."""
    match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    return match is not None and int(match.group(1)) == 5 and int(match.group(2)) in _SUPPORTED_MINORS


def check_transformers_version() -> str:
    """The installed transformers version; warns when it is outside :data:`SUPPORTED_TRANSFORMERS` (the
    attribute checks of :class:`CBInternals` then decide whether the glue can attach at all)."""
    import transformers

    version = str(getattr(transformers, "__version__", "unknown"))
    if not transformers_supported(version):
        warnings.warn(f"cpoc_kernels' continuous batching glue supports transformers {SUPPORTED_TRANSFORMERS}; "
                      f"found {version} (its private continuous-batching API may differ)", RuntimeWarning,
                      stacklevel=3)
    return version


def _require(obj: Any, name: str, what: str) -> Any:
    if not hasattr(obj, name):
        import transformers

        raise UnsupportedEngineError(
            f"{what} has no attribute {name!r} (transformers {transformers.__version__}); cpoc_kernels' continuous "
            f"batching glue supports transformers {SUPPORTED_TRANSFORMERS}")
    return getattr(obj, name)


class Patches:
    """Attribute replacements on engine objects; :meth:`undo` restores them in reverse order."""

    def __init__(self):
        self._done: list[tuple[Any, str, Any]] = []

    def set(self, obj, name: str, new) -> None:
        had = name in vars(obj)
        self._done.append((obj, name, vars(obj)[name] if had else None))
        setattr(obj, name, new)

    def undo(self) -> None:
        for obj, name, old in reversed(self._done):
            if old is None:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)
        self._done.clear()


class CBInternals:
    """Every access to transformers' continuous-batching internals goes through here."""

    def __init__(self, manager):
        check_transformers_version()
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

    def page_size(self) -> int:
        return max(1, int(getattr(self.config, "page_size", 1)))

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

    # ------------------------------------------------------------------ manager
    def batch_processor(self):
        return self.manager.batch_processor

    def is_running(self) -> bool:
        return bool(self.manager.is_running())

    def cancel_request(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)

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

    def wrap_manager(self, patches: Patches, wrap_scheduler: Callable[[Any], None], deliver_filter) -> None:
        """Install the scheduler wrapper on the current and every future batch processor, and the output filter
        (``deliver_filter.wrap_deliver`` / ``wrap_deliver_batch``) on the output router."""
        mgr = self.manager
        original = mgr._create_batch_processor

        def create_batch_processor():
            bp = original()
            wrap_scheduler(bp)
            return bp

        patches.set(mgr, "_create_batch_processor", create_batch_processor)
        router = mgr.output_router
        patches.set(router, "deliver", deliver_filter.wrap_deliver(router.deliver))
        patches.set(router, "deliver_batch", deliver_filter.wrap_deliver_batch(router.deliver_batch))
        if mgr.batch_processor is not None:
            wrap_scheduler(mgr.batch_processor)

    def wrap_scheduler(self, patches: Patches, batch_processor, make_schedule, make_has_pending) -> None:
        """Replace the scheduler's ``schedule_batch`` / ``has_pending_requests`` (once per scheduler) by
        ``make_schedule(scheduler, original)`` / ``make_has_pending(scheduler, original)``."""
        sched = self.scheduler(batch_processor)
        if getattr(sched, "_cpoc_wrapped", False):
            return
        original_schedule = _require(sched, "schedule_batch", "Scheduler")
        original_pending = _require(sched, "has_pending_requests", "Scheduler")
        patches.set(sched, "_cpoc_wrapped", True)
        patches.set(sched, "schedule_batch", make_schedule(sched, original_schedule))
        patches.set(sched, "has_pending_requests", make_has_pending(sched, original_pending))

    # ------------------------------------------------------------------ batch processor
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

    @staticmethod
    def is_decode(future_state) -> bool:
        """A chat request decoding one token in this step."""
        return future_state.query_length == 1 and future_state.state.generated_len() > 0

    @staticmethod
    def query_span(future_state) -> tuple[int, int]:
        """(context position of the first row, rows) a scheduled request computes this step: its tokens already in
        the KV cache, and its query length. Read between scheduling and the batch's preparation (which advances the
        request's ``position_offset`` by the query length)."""
        return int(future_state.state.position_offset), int(future_state.query_length)

    @staticmethod
    def remaining_prefill(request_state) -> int:
        return len(getattr(request_state, "remaining_prefill_tokens", ()))

    def new_request_state(self, request_id: str, tokens: list[int]):
        return self._request_state_cls(request_id=request_id, initial_tokens=tokens, max_new_tokens=1,
                                       eos_token_id=-1)

    # ------------------------------------------------------------------ scheduler
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
    def request_order(scheduler) -> list[str]:
        """Request ids in the order the scheduler considers them (for requests still prefilling, whether its type
        is ``fifo`` or ``prefill_first``): active ones in their dict's order — the order they first ran, which
        :meth:`hide` / :meth:`restore` keep among the requests hidden together — then the waiting queue."""
        waiting = [r for r in scheduler.waiting_requests_order if r in scheduler.waiting_requests]
        return list(scheduler.active_requests) + waiting

    @staticmethod
    def waiting(scheduler) -> tuple[int, Any]:
        """(number of waiting requests, the first waiting request's state or None)."""
        n = len(scheduler.waiting_requests)
        head = next((scheduler.waiting_requests[r] for r in scheduler.waiting_requests_order
                     if r in scheduler.waiting_requests), None) if n else None
        return n, head

    @staticmethod
    def starved(scheduler) -> list:
        return list(getattr(scheduler, "starved_requests", None) or [])

    @staticmethod
    def set_starved(scheduler, starved: list) -> None:
        scheduler.starved_requests = starved

    @staticmethod
    def preempt(scheduler, request_ids: list[str]) -> None:
        """Drop requests from the scheduler now and free their KV blocks (no output is delivered)."""
        for rid in request_ids:
            scheduler.set_request_cancellation(rid)
        scheduler.clear_cancelled_requests()

    @staticmethod
    def max_requests(scheduler) -> int:
        return scheduler.max_requests_per_batch

    @staticmethod
    def set_max_requests(scheduler, n: int) -> None:
        scheduler.max_requests_per_batch = n

    @staticmethod
    def add_waiting(scheduler, request_state) -> None:
        scheduler.add_waiting_request(request_state)

    # ------------------------------------------------------------------ cache
    @staticmethod
    def kv_tokens(cache) -> tuple[int, int]:
        """(capacity, free) in token slots."""
        capacity = int(cache.max_tokens_read)
        return capacity, int(cache.compute_free_capacity(relative=True) * capacity)

    @staticmethod
    def max_batch_tokens(cache) -> int:
        return int(cache.max_batch_tokens)


_CBInternals = CBInternals  # the name the bench and earlier code use


def model_parts(model):
    """(embed_tokens, decoder layers, final norm, lm_head) of a transformers causal LM."""
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
