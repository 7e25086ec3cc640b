"""Test support for the PoC service tests (tests/service/): a uvicorn server on a loopback port in a thread, a fake DAPI enforcing the
DAPI handler's rules (KG ``post_generated_artifacts_v2_handler.go`` as summarised in mlnode_api.md §7.4) with
fault injection, and a cheap deterministic fake engine."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cpoc_kernels.artifacts import Artifact
from cpoc_kernels.service.engine import EngineAdapter, EngineLoad, RoundSpec

LOOPBACK = "127.0.0.1"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


class LoopbackServer:
    """``app`` served by uvicorn on 127.0.0.1 (random port) in a background thread with its own event loop."""

    def __init__(self, app):
        self.app = app
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


# ================================================================================================ fake DAPI


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


class FakeDapi:
    """The DAPI ml-server's PoC v2 callback routes, ``POST /v2/poc-batches/:model_id/generated|validated``.

    Rules (DAPI handler, mlnode_api.md §7.4): a body that is not strict JSON or lacks ``Content-Type:
    application/json`` → 400; ``/generated`` outside the generate window → 503, a ``block_height`` other than
    the stage's → 400, an unknown ``node_id`` → 400, any empty or non-base64 vector → 400 for the whole batch,
    duplicate nonces skipped (stored once, as int32); ``/validated`` outside the validate window → 503.
    Faults on demand (``mode``): ``"ok"``, ``"503"``, ``"hang"`` (answers after ``hang_s``), and at the TCP
    front ``"refuse"`` (nothing listens) and ``"drop"`` (the connection is closed without an answer).
    """

    def __init__(self, stage_height: int = 100, node_ids: Sequence[int] = (0, 1, 2, 3), model_segment: str = "org%252Fmodel-b"):
        self.stage_height, self.node_ids, self.model_segment = stage_height, set(node_ids), model_segment
        self.phase = "generate"  # "generate" | "validate" | "none"
        self.mode = "ok"
        self.hang_s = 5.0
        self.stored: dict[int, str] = {}
        self.duplicates = 0
        self.posts: list[dict] = []  # every POST that reached the app: path, status, body, time
        self.validated: list[dict] = []
        self.generated_requests: list[dict] = []  # job results posted to /generated with a request_id
        self.lock = threading.Lock()
        self.app = self._build()
        self._upstream: LoopbackServer | None = None
        self._front = None

    @property
    def base_url(self) -> str:
        """The callback base DAPI hands out: the model id escaped twice, as KG's broker builds it."""
        return f"http://{LOOPBACK}:{self.front_port}/v2/poc-batches/{self.model_segment}"

    def _build(self) -> FastAPI:
        app = FastAPI()

        def record(request: Request, status: int, body) -> None:
            with self.lock:
                self.posts.append({"path": request.scope.get("raw_path", b"").decode(), "status": status,
                                   "body": body, "t": time.monotonic(),
                                   "content_type": request.headers.get("content-type")})

        async def parse(request: Request):
            raw = await request.body()
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return None, JSONResponse({"error": "unsupported media type"}, 400)
            try:
                return json.loads(raw, parse_constant=_reject_constant), None
            except ValueError as exc:
                return None, JSONResponse({"error": f"bind: {exc}"}, 400)

        async def fault():
            if self.mode == "503":
                return JSONResponse({"error": "injected 503"}, 503)
            if self.mode == "hang":
                await asyncio.sleep(self.hang_s)
            return None

        @app.post("/v2/poc-batches/{model_id}/generated")
        async def generated(model_id: str, request: Request):
            body, err = await parse(request)
            resp = err or await fault() or self._generated(request, body)
            record(request, resp.status_code, body)
            return resp

        @app.post("/v2/poc-batches/{model_id}/validated")
        async def validated(model_id: str, request: Request):
            body, err = await parse(request)
            resp = err or await fault()
            if resp is None:
                if self.phase != "validate":
                    resp = JSONResponse({"error": "not in PoC validate phase"}, 503)
                else:
                    with self.lock:
                        self.validated.append(body)
                    resp = Response(status_code=200)
            record(request, resp.status_code, body)
            return resp

        return app

    def _path_ok(self, request: Request) -> bool:
        raw = request.scope.get("raw_path", b"").decode()
        return raw.startswith(f"/v2/poc-batches/{self.model_segment}/")

    def _generated(self, request: Request, body):
        if not self._path_ok(request):
            return JSONResponse({"error": "invalid model_id"}, 400)
        if "request_id" in body:  # a /generate job's result (not a mining batch)
            with self.lock:
                self.generated_requests.append(body)
            return Response(status_code=200)
        if self.phase != "generate":
            return JSONResponse({"error": "not in PoC generate phase"}, 503)
        if body.get("block_height") != self.stage_height or isinstance(body.get("block_height"), bool):
            return JSONResponse({"error": "block_height is not the active PoC stage"}, 400)
        if body.get("node_id") not in self.node_ids:
            return JSONResponse({"error": "unknown node_num"}, 400)
        arts = body.get("artifacts")
        if not isinstance(arts, list):
            return JSONResponse({"error": "bind: artifacts"}, 400)
        decoded = []
        for a in arts:
            if not isinstance(a.get("nonce"), int) or isinstance(a.get("nonce"), bool):
                return JSONResponse({"error": "bind: nonce"}, 400)
            vec = a.get("vector_b64")
            if not isinstance(vec, str) or vec == "":
                return JSONResponse({"error": "empty artifact vector"}, 400)
            try:
                raw = base64.b64decode(vec, validate=True)
            except ValueError:
                return JSONResponse({"error": "invalid base64 in artifact vector"}, 400)
            if not raw:
                return JSONResponse({"error": "empty artifact vector"}, 400)
            decoded.append((int(np.int64(a["nonce"]).astype(np.int32)), vec))
        with self.lock:
            for nonce, vec in decoded:
                if nonce in self.stored:
                    self.duplicates += 1
                else:
                    self.stored[nonce] = vec
        return Response(status_code=200)

    # ------------------------------------------------------------------ TCP front: refuse / drop
    def __enter__(self):
        self._upstream = LoopbackServer(self.app).__enter__()
        self._front = _TcpFront(self._upstream.port, self)
        self.front_port = self._front.port
        return self

    def __exit__(self, *exc):
        self._front.close()
        self._upstream.__exit__(*exc)

    def posts_to(self, suffix: str) -> list[dict]:
        with self.lock:
            return [p for p in self.posts if p["path"].endswith(suffix)]


class _TcpFront:
    """A loopback TCP forwarder in front of the fake DAPI: ``refuse`` closes the listener (connections are
    refused) until the mode changes; ``drop`` reads the request and closes the connection without answering."""

    def __init__(self, upstream_port: int, dapi: FakeDapi):
        self.upstream_port, self.dapi = upstream_port, dapi
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.loop = asyncio.new_event_loop()
        self._server = None
        self._closing = False
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._watch(), self.loop)
        deadline = time.monotonic() + 10
        while self._server is None and time.monotonic() < deadline:
            time.sleep(0.01)

    async def _listen(self):
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True)

    async def _watch(self):
        await self._listen()
        while not self._closing:
            if self.dapi.mode == "refuse" and self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            elif self.dapi.mode != "refuse" and self._server is None:
                await self._listen()
            await asyncio.sleep(0.01)

    async def _handle(self, reader, writer):
        if self.dapi.mode == "drop":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(65536), 2)
            writer.transport.abort()
            with self.dapi.lock:
                self.dapi.posts.append({"path": "<dropped>", "status": None, "body": None, "t": time.monotonic()})
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except Exception:  # noqa: BLE001
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self):
        self._closing = True

        async def shut():
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# ================================================================================================ fake engine


def fake_vector(block_hash: str, public_key: str, nonce: int, k: int = 12) -> str:
    """A deterministic unit fp16 vector per (round, nonce) as base64 (stands in for the real artifact)."""
    digest = hashlib.sha256(f"{block_hash}|{public_key}|{nonce}".encode()).digest()
    v = np.frombuffer(digest[: 2 * k] if 2 * k <= 32 else (digest * 4)[: 2 * k], dtype=np.uint16).astype(np.float64) - 32768.0
    v = v / (np.linalg.norm(v) + 1e-8)
    return base64.b64encode(v.astype("<f2").tobytes()).decode()


class FakeEngine(EngineAdapter):
    """Mines ``batch_size`` nonces every ``step_s`` seconds on the event loop; ``compute`` is immediate.
    ``bad_nonces``: nonces whose "artifact" is NaN (emitted anyway, to test that the service never sends them)."""

    validation_beside_inference = True

    def __init__(self, names=("org/model-b", "model-b"), step_s: float = 0.02, max_hidden: int = 64):
        self._names = list(names)
        self.step_s, self.max_hidden = step_s, max_hidden
        self.bad_nonces: set[int] = set()
        self.taken: list[int] = []
        self.computed: list[list[int]] = []
        self._task: asyncio.Task | None = None
        self.compute_delay = 0.0
        self.fail_mining: str | None = None
        self.mining_rounds = 0

    @property
    def model_names(self):
        return self._names

    def check_round(self, round: RoundSpec) -> None:
        if round.k_dim > self.max_hidden:
            raise ValueError(f"k_dim {round.k_dim} exceeds hidden size {self.max_hidden}")

    def _artifact(self, rnd: RoundSpec, nonce: int) -> Artifact:
        if nonce in self.bad_nonces:
            return Artifact(nonce, base64.b64encode(np.full(rnd.k_dim, np.nan, "<f2").tobytes()).decode())
        return Artifact(nonce, fake_vector(rnd.block_hash, rnd.public_key, nonce, rnd.k_dim))

    async def start_mining(self, round: RoundSpec, nonces: Iterator[int], emit) -> None:
        self.mining_rounds += 1

        self._stopping = False

        async def run():
            while not self._stopping:
                batch = [n for _, n in zip(range(round.batch_size), nonces)]
                if not batch:
                    return
                self.taken.extend(batch)
                await asyncio.sleep(self.step_s)
                emit([self._artifact(round, n) for n in batch], len(batch))

        self._task = asyncio.get_running_loop().create_task(run())

    async def stop_mining(self, drain_seconds: float = 5.0) -> None:
        if self._task is not None:  # the batch in flight is finished and emitted (drain), then the loop ends
            self._stopping = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_seconds)
            except asyncio.TimeoutError:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def mining_error(self):
        return self.fail_mining

    async def compute(self, round: RoundSpec, nonces: Sequence[int]) -> list[Artifact]:
        self.computed.append(list(nonces))
        if self.compute_delay:
            await asyncio.sleep(self.compute_delay)
        return [self._artifact(round, n) for n in nonces]

    def load(self) -> EngineLoad:
        return EngineLoad(chat_requests_running=0, poc_token_share=1.0 if self._task else 0.0,
                          governor_reason="idle", details={"fake": True})

    def version_info(self) -> dict:
        return {"engine": "fake"}


def service_app(engine: EngineAdapter, config) -> FastAPI:
    """A FastAPI app with the PoC routes over a fresh :class:`PoCService` (created in the server's loop)."""
    from contextlib import asynccontextmanager

    from cpoc_kernels.service.routes import build_router
    from cpoc_kernels.service.service import PoCService

    holder: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        holder["service"] = PoCService(engine, config)
        app.state.service = holder["service"]
        yield
        await holder["service"].close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(build_router(lambda: holder.get("service")))

    @app.get("/health")
    async def health():
        return {}

    return app
