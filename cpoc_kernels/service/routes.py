"""The backend's ``/api/v1/pow/*`` routes as a FastAPI ``APIRouter`` (thin: parse, call :class:`PoCService`,
answer). Mount it on any FastAPI app: ``cpoc serve`` (HF) or vLLM's own API server.

Errors are FastAPI's ``{"detail": …}`` bodies with the reference's codes: 422 for a body that does not parse
or validate (malformed JSON, unknown ``params`` keys, non-int32 nonces), 400 / 404 / 409 / 429 from the
service, 503 ``Engine not available`` while no service is attached.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from fastapi import APIRouter, HTTPException

from .models import GenerateRequest, InitGenerateRequest
from .service import PoCService, ServiceError

PREFIX = "/api/v1/pow"

ServiceSource = PoCService | Callable[[], "PoCService | None"]


def build_router(service: ServiceSource, prefix: str = PREFIX) -> APIRouter:
    """Routes over ``service``: a :class:`PoCService`, or a zero-argument callable returning one (or None while
    the engine is not up yet, → 503), for servers that create the engine after the routes are mounted."""
    get = service if callable(service) and not isinstance(service, PoCService) else (lambda: service)
    # JSON without a Content-Type is parsed, as FastAPI did before ``strict_content_type`` (DAPI's Go client
    # sends none, §8.1); newer FastAPI would answer 422
    lenient = {"strict_content_type": False} if "strict_content_type" in inspect.signature(APIRouter).parameters else {}
    router = APIRouter(prefix=prefix, tags=["PoC"], **lenient)

    def current() -> PoCService:
        svc = get()
        if svc is None:
            raise HTTPException(status_code=503, detail="Engine not available")
        return svc

    async def call(coro_fn, *args):
        svc = current()
        try:
            result = coro_fn(svc, *args)
            if hasattr(result, "__await__"):
                result = await result
            return result
        except ServiceError as exc:
            raise HTTPException(status_code=exc.status, detail=exc.detail) from None

    @router.post("/init/generate")
    async def init_generate(body: InitGenerateRequest) -> dict:
        return await call(PoCService.init_generate, body)

    @router.post("/generate")
    async def generate(body: GenerateRequest) -> dict:
        return await call(PoCService.generate, body)

    @router.get("/generate/{request_id}")
    async def generate_result(request_id: str) -> dict:
        return await call(PoCService.job, request_id)

    @router.get("/status")
    async def status() -> dict:
        return await call(PoCService.status)

    @router.post("/stop")
    async def stop() -> dict:
        return await call(PoCService.stop)

    @router.get("/versions")
    async def versions() -> dict:
        return await call(PoCService.versions)

    return router
