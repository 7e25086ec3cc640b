"""The PoC backend's logic (spec mlnode_api.md §2–§4, §7–§8), engine-independent: IDLE/GENERATING state
machine, the frozen nonce partition, mining over an :class:`EngineAdapter`, the validation job queue with the
statistical test, the callback senders and ``/status``. HTTP lives in :mod:`.routes`; errors are raised as
:class:`ServiceError` with the status code and detail the routes return.

State machine (as the reference, §3.1): ``init`` IDLE → GENERATING (200), GENERATING → 409 (state kept);
``stop`` in any state → IDLE (200, idempotent): mining stops (nonces in flight finish for a few seconds),
buffered artifacts get one final delivery attempt, queued and running jobs are cancelled and job records
cleared. Job results already computed keep being delivered. Jobs wait while mining runs (the reference's rule),
so the engine sees one PoC round at a time; chat keeps being served throughout.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from cpoc_kernels import __version__ as cpoc_version
from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.reference.nonces import NonceIterator
from cpoc_kernels.validate import validate

from .callbacks import ArtifactSender, CallbackConfig, CallbackCounters, ResultSender, url_for
from .engine import EngineAdapter, RoundSpec
from .models import GenerateRequest, InitGenerateRequest, PoCParams, StatTest, encoding

logger = logging.getLogger("cpoc_kernels.service")

IDLE, GENERATING = "IDLE", "GENERATING"


class ServiceError(Exception):
    """An HTTP error of the contract: ``status`` and the ``detail`` of FastAPI's ``{"detail": …}`` body."""

    def __init__(self, status: int, detail):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


@dataclass(frozen=True)
class ServiceConfig:
    callbacks: CallbackConfig = field(default_factory=CallbackConfig)
    max_queued_nonces: int = 100_000
    """``POC_MAX_QUEUED_NONCES``: queued ``/generate`` nonces beyond this → 429."""
    result_ttl_s: float = 300.0
    """Finished job records are kept this long for ``GET /generate/{id}``."""
    drain_seconds: float = 5.0
    """At ``/stop``, nonces in flight may finish this long (then they are cancelled)."""

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "ServiceConfig":
        import os

        environ = os.environ if environ is None else environ
        values = {}
        for name, var, kind in (("max_queued_nonces", "POC_MAX_QUEUED_NONCES", int),
                                ("result_ttl_s", "POC_GENERATE_RESULT_TTL_SEC", float)):
            if var in environ:
                try:
                    values[name] = kind(environ[var])
                except ValueError:
                    raise ValueError(f"{var}={environ[var]!r} is not a valid {kind.__name__}") from None
        values["callbacks"] = CallbackConfig.from_env(environ)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if self.max_queued_nonces < 1 or not self.result_ttl_s > 0 or self.drain_seconds < 0:
            raise ValueError("need max_queued_nonces >= 1, result_ttl_s > 0 and drain_seconds >= 0")


class Partition(Iterator[int]):
    """The frozen nonce partition (§4): ``NonceIterator`` plus a count of the nonces handed out."""

    def __init__(self, node_id: int, node_count: int, group_id: int, n_groups: int):
        self._it = NonceIterator(node_id, node_count, group_id, n_groups)
        self.taken = 0

    def __next__(self) -> int:
        value = next(self._it)
        self.taken += 1
        return value


@dataclass
class _Mining:
    request: InitGenerateRequest
    round: RoundSpec
    partition: Partition
    sender: ArtifactSender | None
    started: float
    task: asyncio.Task | None = None
    total_processed: int = 0
    artifacts: int = 0
    engine_started: bool = False


@dataclass
class _Job:
    request_id: str
    request: GenerateRequest
    status: str = "queued"  # queued | running | completed | failed | cancelled
    result: dict | None = None
    error: str | None = None
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict:
        out = {"status": self.status, "request_id": self.request_id}
        if self.status == "completed" and self.result is not None:
            out.update({k: v for k, v in self.result.items() if k not in ("status", "request_id")})
        if self.status == "failed":
            out["error"] = self.error
        return out


def round_of(params: PoCParams, request) -> RoundSpec:
    return RoundSpec(block_hash=request.block_hash, public_key=request.public_key, seq_len=params.seq_len,
                     k_dim=params.k_dim, stronger_rng=request.poc_stronger_rng, batch_size=request.batch_size)


class PoCService:
    """One backend's PoC state. All methods run on the event loop that serves the routes."""

    def __init__(self, engine: EngineAdapter, config: ServiceConfig | None = None,
                 client: httpx.AsyncClient | None = None):
        self.engine = engine
        self.config = config or ServiceConfig()
        self._client = client
        self.counters = CallbackCounters()
        self._results: ResultSender | None = None
        self._mining: _Mining | None = None
        self._engine_lock = asyncio.Lock()  # one PoC round in the engine at a time (mining or a job)
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._queue: deque[_Job] = deque()
        self._queue_wake = asyncio.Event()
        self._queued_nonces = 0
        self._worker: asyncio.Task | None = None
        self._running_job: asyncio.Task | None = None
        self._flushes: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()  # init/stop are serialized
        self.jobs_completed = self.jobs_failed = self.jobs_cancelled = 0
        self.last_mining_error: str | None = None

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    @property
    def results(self) -> ResultSender:
        if self._results is None:
            self._results = ResultSender(self.client, self.config.callbacks, self.counters)
        return self._results

    async def close(self) -> None:
        """Stop everything (final artifact flush included) and close the HTTP client."""
        await self.stop()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._results is not None:
            await self._results.close()
        if self._client is not None:
            await self._client.aclose()

    # ----------------------------------------------------------------------------- checks
    def check_model(self, params: PoCParams) -> None:
        names = list(self.engine.model_names)
        if params.model not in names:
            raise ServiceError(409, {"error": "params mismatch",
                                     "requested": {"model": params.model, "seq_len": params.seq_len, "k_dim": params.k_dim},
                                     "deployed": {"model": names, "seq_len": None, "k_dim": None}})

    def _check_round(self, rnd: RoundSpec) -> None:
        try:
            self.engine.check_round(rnd)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from None

    @property
    def generating(self) -> bool:
        return self._mining is not None

    # ----------------------------------------------------------------------------- mining
    async def init_generate(self, req: InitGenerateRequest) -> dict:
        self.check_model(req.params)
        rnd = round_of(req.params, req)
        self._check_round(rnd)
        async with self._lock:
            if self._mining is not None:
                raise ServiceError(409, "Already generating")
            sender = None
            if req.url:
                meta = {"public_key": req.public_key, "block_hash": req.block_hash, "block_height": req.block_height,
                        "node_id": req.node_id}
                sender = ArtifactSender(self.client, req.url, meta, req.params.k_dim, self.config.callbacks, self.counters)
                sender.start()
            mining = _Mining(request=req, round=rnd, sender=sender, started=time.monotonic(),
                             partition=Partition(req.node_id, req.node_count, req.group_id, req.n_groups))
            mining.task = asyncio.get_running_loop().create_task(self._mine(mining), name="cpoc-mining")
            self._mining = mining
        return {"status": "OK", "pow_status": {"status": GENERATING}}

    def _emit(self, mining: _Mining, artifacts: Sequence[Artifact], n_done: int) -> None:
        mining.total_processed += max(int(n_done), len(artifacts))
        mining.artifacts += len(artifacts)
        if mining.sender is not None and artifacts:
            mining.sender.add(artifacts)

    async def _mine(self, mining: _Mining) -> None:
        """Hold the engine for this round until stopped (runs as a task; waits for a running job first).
        If the engine fails, the round ends by itself: ``/status`` says IDLE (so DAPI re-inits) with the error."""
        async with self._engine_lock:
            failed = False
            try:
                mining.engine_started = True
                await self.engine.start_mining(mining.round, mining.partition,
                                               lambda arts, n: self._emit(mining, arts, n))
                while (error := self.engine.mining_error()) is None:
                    await asyncio.sleep(0.2)
                raise RuntimeError(f"engine stopped mining: {error}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported in /status, the backend goes on
                logger.error("mining failed: %s", exc)
                self.last_mining_error = f"{type(exc).__name__}: {exc}"
                failed = True
            finally:
                if mining.engine_started:  # after this, the engine emits nothing more for the round
                    await asyncio.shield(self.engine.stop_mining(self.config.drain_seconds))
            if failed and self._mining is mining:
                self._mining = None
                self._flush(mining)

    def _flush(self, mining: _Mining) -> None:
        """Final delivery attempt of the round's artifacts, off the request path."""
        if mining.sender is not None:
            task = asyncio.get_running_loop().create_task(mining.sender.close(final_attempt=True))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def stop(self) -> dict:
        async with self._lock:
            await self._clear_jobs()  # first: a job waiting for the engine must not start once mining ends
            mining, self._mining = self._mining, None
            if mining is not None:
                mining.task.cancel()
                await asyncio.gather(mining.task, return_exceptions=True)
                self._flush(mining)
        return {"status": "OK", "pow_status": {"status": "STOPPED"}}

    # ----------------------------------------------------------------------------- jobs
    def _job_checks(self, req: GenerateRequest) -> RoundSpec:
        self.check_model(req.params)
        if len(set(req.nonces)) != len(req.nonces):
            raise ServiceError(400, "nonces must be unique")
        if req.validation is not None:
            if {a.nonce for a in req.validation.artifacts} != set(req.nonces):
                raise ServiceError(400, "validation.artifacts nonces must match nonces field")
            if len(req.validation.artifacts) != len(req.nonces):
                raise ServiceError(400, "validation.artifacts holds a nonce twice")
        rnd = round_of(req.params, req)
        self._check_round(rnd)
        return rnd

    async def generate(self, req: GenerateRequest) -> dict:
        self._job_checks(req)
        job = _Job(request_id=str(uuid.uuid4()), request=req)
        if req.wait:
            await self._run_job(job)
            if job.status != "completed":
                raise ServiceError(503, job.error or "job cancelled")
            return job.result
        if self._queued_nonces + len(req.nonces) > self.config.max_queued_nonces:
            raise ServiceError(429, f"Queue full: {self._queued_nonces} nonces queued, limit is "
                                    f"{self.config.max_queued_nonces}")
        self._expire()
        self._jobs[job.request_id] = job
        self._queue.append(job)
        self._queued_nonces += len(req.nonces)
        self._ensure_worker()
        self._queue_wake.set()
        return {"status": "queued", "request_id": job.request_id, "queued_count": len(req.nonces)}

    def job(self, request_id: str) -> dict:
        self._expire()
        job = self._jobs.get(request_id)
        if job is None:
            raise ServiceError(404, f"Request {request_id} not found")
        return job.to_json()

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, j in self._jobs.items()
                    if j.finished_at is not None and now - j.finished_at > self.config.result_ttl_s]:
            del self._jobs[rid]

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="cpoc-jobs")

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._queue_wake.clear()
                await self._queue_wake.wait()
            job = self._queue.popleft()
            self._queued_nonces -= len(job.request.nonces)
            self._running_job = asyncio.get_running_loop().create_task(self._run_job(job))
            try:
                await asyncio.shield(self._running_job)
            except asyncio.CancelledError:
                if not self._running_job.done():
                    raise
            finally:
                self._running_job = None

    async def _run_job(self, job: _Job) -> None:
        req = job.request
        rnd = round_of(req.params, req)
        try:
            async with self._engine_lock:  # waits while mining runs
                job.status = "running"
                artifacts = await self.engine.compute(rnd, list(req.nonces)) if req.nonces else []
            job.result = self._result(job, artifacts)
            job.status = "completed"
            self.jobs_completed += 1
        except asyncio.CancelledError:
            job.status, job.error = "cancelled", "Job cancelled"
            self.jobs_cancelled += 1
            raise
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, the service goes on
            logger.exception("job %s failed", job.request_id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            self.jobs_failed += 1
        finally:
            job.finished_at = time.monotonic()
            job.done.set()
        if job.status == "completed" and req.url:
            self._send_result(job)

    def _result(self, job: _Job, artifacts: list[Artifact]) -> dict:
        req = job.request
        if req.validation is None:
            return {"status": "completed", "request_id": job.request_id,
                    "artifacts": [{"nonce": a.nonce, "vector_b64": a.vector_b64} for a in artifacts],
                    "encoding": encoding(req.params.k_dim)}
        stat = req.stat_test or StatTest()
        if not req.nonces:
            n_total, mismatches, p_value, fraud = 0, [], 1.0, False
        else:
            res = validate({a.nonce: a.vector_b64 for a in req.validation.artifacts},
                           {a.nonce: a.vector_b64 for a in artifacts}, dist_threshold=stat.dist_threshold,
                           p_mismatch=stat.p_mismatch, fraud_threshold=stat.effective_fraud_threshold,
                           k=req.params.k_dim)
            n_total, mismatches, p_value, fraud = res.n_total, list(res.mismatch_nonces), float(res.p_value), bool(res.fraud)
        return {"status": "completed", "request_id": job.request_id, "n_total": n_total,
                "n_mismatch": len(mismatches), "mismatch_nonces": mismatches, "p_value": p_value,
                "fraud_detected": fraud}

    def _send_result(self, job: _Job) -> None:
        req, res = job.request, job.result
        ident = {"request_id": job.request_id, "block_hash": req.block_hash, "block_height": req.block_height,
                 "public_key": req.public_key, "node_id": req.node_id}
        if req.validation is not None:
            payload = {**ident, **{k: res[k] for k in ("n_total", "n_mismatch", "mismatch_nonces", "p_value",
                                                       "fraud_detected")}}
            self.results.submit(url_for(req.url, "/validated"), payload)
        else:
            payload = {**ident, "artifacts": res["artifacts"], "encoding": res["encoding"]}
            self.results.submit(url_for(req.url, "/generated"), payload)

    async def _clear_jobs(self) -> None:
        for job in self._queue:
            job.status, job.error, job.finished_at = "cancelled", "Job cancelled", time.monotonic()
            job.done.set()
            self.jobs_cancelled += 1
        self._queue.clear()
        self._queued_nonces = 0
        running = self._running_job
        if running is not None and not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        self._jobs.clear()

    # ----------------------------------------------------------------------------- status / versions
    @staticmethod
    def _status_config(m: _Mining) -> dict:
        r = m.request
        return {"block_hash": r.block_hash, "block_height": r.block_height, "public_key": r.public_key,
                "node_id": r.node_id, "node_count": r.node_count, "group_id": r.group_id, "n_groups": r.n_groups,
                "seq_len": r.params.seq_len, "k_dim": r.params.k_dim}

    def status(self) -> dict:
        m = self._mining
        try:
            load = self.engine.load().to_json()
        except Exception as exc:  # noqa: BLE001 - /status must answer
            load = {"error": f"{type(exc).__name__}: {exc}"}
        cpoc = {
            "engine": load,
            "chat_served_during_poc": True,
            "poc_token_share": load.get("poc_token_share"),
            "governor_reason": load.get("governor_reason"),
            "mining_error": self.last_mining_error,
            "callbacks": self.counters.to_json(),
            "jobs": {"queued": len(self._queue), "queued_nonces": self._queued_nonces,
                     "running": self._running_job is not None, "completed": self.jobs_completed,
                     "failed": self.jobs_failed, "cancelled": self.jobs_cancelled},
        }
        if m is None:
            return {"status": IDLE, "config": None, "stats": None, "cpoc": cpoc}
        elapsed = time.monotonic() - m.started
        cpoc["nonces_handed_out"] = m.partition.taken
        cpoc["artifacts"] = m.artifacts
        return {"status": GENERATING, "config": self._status_config(m),
                "stats": {"total_processed": m.total_processed,
                          "nonces_per_second": m.total_processed / elapsed if elapsed > 0 else 0.0},
                "cpoc": cpoc}

    def versions(self) -> dict:
        return {"cpoc_kernels_version": cpoc_version, **self.engine.version_info(),
                "poc_validation_inference": bool(self.engine.validation_beside_inference)}
