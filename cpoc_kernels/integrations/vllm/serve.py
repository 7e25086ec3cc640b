"""The network's PoC backend routes (``/api/v1/pow/*``) on ``vllm serve``'s own API server, through vLLM's
public ``vllm.endpoint_plugins`` entry point (``pyproject.toml``: ``cpoc = ...serve:CpocEndpointPlugin``).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them; the general plugin and this one are both
called ``cpoc``, so ``VLLM_PLUGINS=cpoc`` turns on both. The backend is then started exactly as the MLNode
starts it, plus the worker extension::

    VLLM_PLUGINS=cpoc python -m vllm.entrypoints.openai.api_server --model M --port P \\
        --worker-extension-cls cpoc_kernels.integrations.vllm.worker.CpocWorkerExtension

Wiring (vLLM's two phases): :meth:`CpocEndpointPlugin.attach_router` mounts the routes while the app is built
(as a sub-application with FastAPI's own error handling; no engine yet: they answer 503 ``Engine not available``); :meth:`CpocEndpointPlugin.init_state` runs once the
engine is up, checks that PoC can run in its workers (else the server does not start, with the reason) and
creates the :class:`~cpoc_kernels.service.service.PoCService` over a
:class:`~cpoc_kernels.integrations.vllm.service_engine.VllmEngine`. At shutdown the service is closed (mining
stopped, buffered artifacts get their final delivery attempt). Chat routes are vLLM's, untouched.
"""
from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger("cpoc_kernels.vllm.serve")

STATE_ATTR = "cpoc_service"


def served_model_names(args) -> list[str]:
    """What ``params.model`` may name: ``--served-model-name`` aliases and the ``--model`` path (the network's
    backend accepts both)."""
    names = list(getattr(args, "served_model_name", None) or [])
    model = getattr(args, "model", None)
    return list(dict.fromkeys([*names, *([model] if model else [])]))


class CpocEndpointPlugin:
    """``vllm.endpoint_plugins`` entry: the PoC routes plus their service (see the module docstring)."""

    name = "cpoc"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        """Mount the routes as a FastAPI sub-application at ``/api/v1/pow``: its errors keep FastAPI's default
        shapes and codes (``{"detail": …}``, 422 for a body that does not validate), as the contract says;
        vLLM's app-wide handlers would turn them into OpenAI error bodies and validation errors into 400."""
        from fastapi import FastAPI

        from cpoc_kernels.service.routes import PREFIX, build_router

        pow_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        pow_app.include_router(build_router(lambda: getattr(app.state, STATE_ATTR, None), prefix=""))
        app.mount(PREFIX, pow_app, name="cpoc-pow")
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app_):
            async with inner(app_) as state:
                try:
                    yield state
                finally:
                    service = getattr(app.state, STATE_ATTR, None)
                    if service is not None:
                        setattr(app.state, STATE_ATTR, None)
                        await service.close()

        app.router.lifespan_context = lifespan

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's CPU-only render server: no engine, the routes keep answering 503
            logger.warning("cpoc: no engine in this server; the PoC routes answer 503")
            return
        from cpoc_kernels.service.service import PoCService, ServiceConfig

        from .service_engine import VllmEngine

        engine = VllmEngine.from_engine_client(engine_client, served_model_names(args))
        workers = await engine.check_ready()  # CpocNotReadyError: the server does not start, and says why
        setattr(state, STATE_ATTR, PoCService(engine, ServiceConfig.from_env()))
        logger.info("cpoc: PoC routes ready on %d worker(s); models %s; %d batch tokens, %d KV tokens",
                    len(workers), engine.model_names, engine.max_batch_tokens, engine.kv_tokens)
