"""Callbacks to DAPI: mined artifacts (``POST url + "/generated"``) and job results (``url + "/validated"`` or
``"/generated"`` with a ``request_id``), spec mlnode_api.md §7.

As the network's backend: the URL is used verbatim (it carries a double-escaped model id), the body is JSON
with ``Content-Type: application/json``, a status < 400 is a delivery, every failure (status ≥ 400, timeout,
refused or dropped connection) is retried with a doubling backoff (1 s → 30 s cap) up to ``max_retries``
attempts, mined artifacts go out about every ``interval_s`` in one POST, and the buffer is bounded (oldest
dropped). Beyond it: artifacts still buffered at ``/stop`` get one final delivery attempt; every artifact or
result that is dropped (buffer overflow, retries exhausted, final attempt failed, invalid vector) is counted
in :class:`CallbackCounters` (shown in ``/status``); a vector that is not exactly ``k_dim`` finite fp16 values
in standard base64 is never sent, and JSON is written with ``allow_nan=False``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import httpx

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.reference.codec import decode_vector

from .models import encoding

logger = logging.getLogger("cpoc_kernels.service.callbacks")

_ENV = {  # the network backend's environment knobs (GV20 callbacks.py / routes.py), same names
    "interval_s": ("POC_CALLBACK_INTERVAL_SEC", float),
    "max_retries": ("POC_CALLBACK_MAX_RETRIES", int),
    "max_buffered_artifacts": ("POC_CALLBACK_MAX_ARTIFACTS", int),
    "max_concurrent_results": ("POC_CALLBACK_MAX_CONCURRENT", int),
    "max_queued_results": ("POC_CALLBACK_QUEUE_SIZE", int),
}


@dataclass(frozen=True)
class CallbackConfig:
    interval_s: float = 5.0
    timeout_s: float = 10.0
    """Total time one POST may take (connect + send + answer)."""
    max_retries: int = 10
    """Attempts per payload (the first one included) before it is dropped."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_buffered_artifacts: int = 1_000_000
    max_artifacts_per_post: int = 100_000
    max_queued_results: int = 10_000
    max_concurrent_results: int = 10
    final_attempt_timeout_s: float = 5.0
    tick_s: float = 0.05

    def __post_init__(self):
        for name in ("interval_s", "timeout_s", "backoff_initial_s", "backoff_max_s", "final_attempt_timeout_s",
                     "tick_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CallbackConfig.{name} must be positive")
        for name in ("max_retries", "max_buffered_artifacts", "max_artifacts_per_post", "max_queued_results",
                     "max_concurrent_results"):
            if getattr(self, name) < 1:
                raise ValueError(f"CallbackConfig.{name} must be >= 1")

    def backoff(self, failures: int) -> float:
        """Sleep after the ``failures``-th consecutive failure: 1, 2, 4, …, capped."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "CallbackConfig":
        environ = os.environ if environ is None else environ
        values = {}
        for name, (var, kind) in _ENV.items():
            if var in environ:
                try:
                    values[name] = kind(environ[var])
                except ValueError:
                    raise ValueError(f"{var}={environ[var]!r} is not a valid {kind.__name__}") from None
        values.update(overrides)
        return cls(**values)


@dataclass
class CallbackCounters:
    """Lifetime counters of this backend's callbacks (artifacts for mining, results for jobs)."""

    artifacts_delivered: int = 0
    artifacts_buffered: int = 0
    artifacts_in_flight: int = 0
    artifacts_dropped_overflow: int = 0
    artifacts_dropped_retries: int = 0
    artifacts_dropped_final: int = 0
    artifacts_rejected_invalid: int = 0
    artifact_posts_ok: int = 0
    artifact_posts_failed: int = 0
    results_delivered: int = 0
    results_pending: int = 0
    results_dropped_overflow: int = 0
    results_dropped_retries: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held for every update from a producer thread (artifact senders of successive rounds share the counters)."""

    def to_json(self) -> dict:
        with self.lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}
        out["artifacts_pending"] = self.artifacts_buffered + self.artifacts_in_flight
        out["artifacts_dropped"] = (self.artifacts_dropped_overflow + self.artifacts_dropped_retries
                                    + self.artifacts_dropped_final + self.artifacts_rejected_invalid)
        out["results_dropped"] = self.results_dropped_overflow + self.results_dropped_retries
        return out


def to_json_bytes(payload: dict) -> bytes:
    """Strict JSON (no NaN/Infinity literals: ValueError)."""
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


async def post_json(client: httpx.AsyncClient, url: str, payload: dict, timeout_s: float) -> str | None:
    """One POST; None on delivery (status < 400), else a short reason."""
    body = to_json_bytes(payload)
    try:
        resp = await asyncio.wait_for(
            client.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=timeout_s),
            timeout_s + 0.5)
    except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    if resp.status_code < 400:
        return None
    return f"HTTP {resp.status_code}: {resp.text[:200]}"


def url_for(base: str, suffix: str) -> str:
    """``base + suffix``, verbatim: the base is never parsed, unquoted or re-encoded (spec §7.1)."""
    return base + suffix


class ArtifactSender:
    """One mining round's ``/generated`` callbacks. :meth:`add` is thread-safe and never blocks."""

    def __init__(self, client: httpx.AsyncClient, url: str, metadata: dict, k_dim: int, config: CallbackConfig,
                 counters: CallbackCounters):
        self.client, self.url, self.k_dim, self.config, self.counters = client, url_for(url, "/generated"), k_dim, config, counters
        self.metadata = dict(metadata)  # public_key, block_hash, block_height, node_id
        self._lock = counters.lock  # one lock for the buffer and the shared counters
        self._buffer: deque[dict] = deque()
        self._pending: list[dict] | None = None  # the payload being delivered (kept across retries)
        self._failures = 0
        self._retry_at = 0.0
        self._last_send = time.monotonic()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    # --------------------------------------------------------------------------------- producer side
    def add(self, artifacts: Sequence[Artifact]) -> None:
        """Buffer finished artifacts; invalid vectors are counted and never sent; beyond the cap the oldest go."""
        good = []
        for art in artifacts:
            try:
                decode_vector(art.vector_b64, self.k_dim)
                good.append({"nonce": int(art.nonce), "vector_b64": art.vector_b64})
            except (ValueError, TypeError):
                with self._lock:
                    self.counters.artifacts_rejected_invalid += 1
        with self._lock:
            if self._closed:  # too late for this round's final attempt: counted, never silently kept
                self.counters.artifacts_dropped_final += len(good)
                return
            self._buffer.extend(good)
            self.counters.artifacts_buffered += len(good)
            over = len(self._buffer) - self.config.max_buffered_artifacts
            for _ in range(max(0, over)):
                self._buffer.popleft()
            if over > 0:
                self.counters.artifacts_buffered -= over
                self.counters.artifacts_dropped_overflow += over

    def _take(self, limit: int) -> list[dict]:
        with self._lock:
            n = min(limit, len(self._buffer))
            items = [self._buffer.popleft() for _ in range(n)]
            self.counters.artifacts_buffered -= n
            self.counters.artifacts_in_flight += n
            return items

    def _payload(self, items: list[dict]) -> dict:
        return {**self.metadata, "artifacts": items, "encoding": encoding(self.k_dim)}

    def _settle(self, items: list[dict], error: str | None, *, final: bool = False) -> None:
        with self._lock:
            self.counters.artifacts_in_flight -= len(items)
            if error is None:
                self.counters.artifacts_delivered += len(items)
                self.counters.artifact_posts_ok += 1
            else:
                self.counters.artifact_posts_failed += 1
                self.counters.last_error = error

    # --------------------------------------------------------------------------------- delivery loop
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cpoc-callbacks")

    async def _run(self) -> None:
        cfg = self.config
        while not self._stop.is_set():
            now = time.monotonic()
            if self._pending is None and now - self._last_send >= cfg.interval_s:
                items = self._take(cfg.max_artifacts_per_post)
                if items:
                    self._pending, self._failures = items, 0
            if self._pending is not None and now >= self._retry_at:
                await self._attempt()
            try:
                await asyncio.wait_for(self._stop.wait(), cfg.tick_s)
            except asyncio.TimeoutError:
                pass

    async def _attempt(self) -> None:
        items = self._pending
        error = await post_json(self.client, self.url, self._payload(items), self.config.timeout_s)
        if error is None:
            self._settle(items, None)
            self._pending, self._failures, self._last_send = None, 0, time.monotonic()
            return
        self._failures += 1
        logger.warning("callback %s failed (attempt %d/%d): %s", self.url, self._failures, self.config.max_retries, error)
        if self._failures >= self.config.max_retries:
            self._settle(items, error)
            with self._lock:
                self.counters.artifacts_dropped_retries += len(items)
            self._pending, self._failures, self._last_send = None, 0, time.monotonic()
        else:
            with self._lock:
                self.counters.artifact_posts_failed += 1
                self.counters.last_error = error
            self._retry_at = time.monotonic() + self.config.backoff(self._failures)

    async def close(self, final_attempt: bool = True) -> None:
        """End the loop (an in-flight POST may finish), then one final attempt for everything not delivered."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.config.timeout_s + 1.0)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        with self._lock:
            self._closed = True
        leftover = list(self._pending or [])
        self._pending = None
        leftover += self._take(len(self._buffer))
        if not leftover:
            return
        if not final_attempt:
            self._settle(leftover, "discarded")
            with self._lock:
                self.counters.artifacts_dropped_final += len(leftover)
            return
        for start in range(0, len(leftover), self.config.max_artifacts_per_post):
            items = leftover[start:start + self.config.max_artifacts_per_post]
            error = await post_json(self.client, self.url, self._payload(items), self.config.final_attempt_timeout_s)
            self._settle(items, error, final=True)
            if error is not None:
                with self._lock:
                    self.counters.artifacts_dropped_final += len(items)


class ResultSender:
    """Job results (one POST each), at most ``max_concurrent_results`` at a time, the waiting ones bounded
    (oldest dropped). Runs for the service's lifetime: ``/stop`` does not discard a computed verdict."""

    def __init__(self, client: httpx.AsyncClient, config: CallbackConfig, counters: CallbackCounters):
        self.client, self.config, self.counters = client, config, counters
        self._waiting: deque[tuple[str, dict]] = deque()
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._busy = 0

    def submit(self, url: str, payload: dict) -> None:
        """Queue ``payload`` for ``url`` (already suffixed). Raises ValueError at once if it is not strict JSON."""
        to_json_bytes(payload)
        self._waiting.append((url, payload))
        self.counters.results_pending += 1
        while len(self._waiting) > self.config.max_queued_results:
            self._waiting.popleft()
            self.counters.results_pending -= 1
            self.counters.results_dropped_overflow += 1
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._worker(), name=f"cpoc-results-{i}")
                             for i in range(self.config.max_concurrent_results)]
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._waiting and self._busy == 0

    async def _worker(self) -> None:
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            url, payload = self._waiting.popleft()
            self._busy += 1
            try:
                await self._deliver(url, payload)
            finally:
                self._busy -= 1
                self.counters.results_pending -= 1

    async def _deliver(self, url: str, payload: dict) -> None:
        for attempt in range(1, self.config.max_retries + 1):
            error = await post_json(self.client, url, payload, self.config.timeout_s)
            if error is None:
                self.counters.results_delivered += 1
                return
            self.counters.last_error = error
            logger.warning("result callback %s failed (attempt %d/%d): %s", url, attempt, self.config.max_retries, error)
            if attempt < self.config.max_retries:
                await asyncio.sleep(self.config.backoff(attempt))
        self.counters.results_dropped_retries += 1

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._workers = []
