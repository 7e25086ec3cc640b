"""``cpoc serve``: an ML-node PoC backend on HF transformers, one port (FastAPI + uvicorn):

* ``GET /health`` — 200 as soon as the engine runs (answered on the event loop; the engine has its own threads);
* ``POST /v1/completions`` — OpenAI-style completions for token-id prompts (greedy with ``temperature: 0``,
  otherwise sampled), served by HF continuous batching; ``choices[i].token_ids`` carries the generated ids;
* ``/api/v1/pow/*`` — the network backend's PoC routes (:mod:`cpoc_kernels.service.routes`), mining and
  validation riding the same engine beside chat (chat is never answered with 503).
"""

# (no ``from __future__ import annotations``: FastAPI must see the body model class of the nested route)
import argparse
import sys
import time
import uuid
from pathlib import Path

SERVE_EXTRA_HINT = "cpoc serve needs the 'serve' extra: pip install -e \".[hf,serve]\" (fastapi, uvicorn, httpx)"
DTYPES = ("float32", "bfloat16")


def missing_serve_deps() -> list[str]:
    import importlib.util

    return [m for m in ("fastapi", "uvicorn", "httpx", "transformers") if importlib.util.find_spec(m) is None]


def load_model(spec: str, dtype: str):
    """A built-in model name (``cpoc-tiny``, ``qwen3-0.6b-shaped``) or a local HF model folder → (model, names)."""
    import torch

    from cpoc_kernels.integrations.hf.models import MODEL_CONFIGS, build_model

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if spec in MODEL_CONFIGS:
        return build_model(spec, dtype=torch_dtype), [spec]
    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(sorted(MODEL_CONFIGS))}) nor a "
                         "local HF model folder with a config.json")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False), [spec, str(path.resolve()), path.name]


def build_app(engine, service_config=None, served_name: str | None = None):
    """The FastAPI app: health, completions and the PoC routes over ``engine`` (an :class:`HFEngine`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    from cpoc_kernels.integrations.hf.service_engine import CompletionError
    from cpoc_kernels.service.routes import build_router
    from cpoc_kernels.service.service import PoCService, ServiceConfig

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["service"] = PoCService(engine, service_config or ServiceConfig.from_env())
        yield
        await state["service"].close()

    app = FastAPI(title="cpoc ML-node backend", lifespan=lifespan)
    app.include_router(build_router(lambda: state.get("service")))
    names = list(engine.model_names)
    public_name = served_name or names[0]

    def openai_error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # OpenAI clients send more fields than we use
        model: str | None = None
        prompt: list[int] | list[list[int]] | str
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=-1)
        n: int = Field(1, ge=1, le=16)
        ignore_eos: bool = False

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "cpoc"} for n in names]}

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        if request.url.path.startswith("/v1/"):
            return openai_error(400, str(exc.errors()[:3]))
        return JSONResponse({"detail": exc.errors()}, status_code=422)  # the PoC routes: FastAPI's default

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        import asyncio

        if body.model is not None and body.model not in names:
            return openai_error(404, f"The model `{body.model}` does not exist.", "NotFoundError")
        if isinstance(body.prompt, str):
            return openai_error(400, "this server takes token-id prompts only (a list of ints or a list of lists)")
        prompts = body.prompt if body.prompt and isinstance(body.prompt[0], list) else [body.prompt]
        top_k = 0 if body.top_k in (-1, 0) else body.top_k
        try:
            for p in prompts:
                engine.check_completion(p, body.max_tokens)
            outs = await asyncio.gather(*[engine.complete(p, body.max_tokens, body.temperature, body.top_p, top_k,
                                                          stop_at_eos=not body.ignore_eos)
                                          for p in prompts for _ in range(body.n)])
        except CompletionError as exc:
            return openai_error(400, str(exc))
        except RuntimeError as exc:
            return openai_error(500, str(exc), "internal_error")
        choices = [{"index": i, "text": "", "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                    "logprobs": None} for i, o in enumerate(outs)]
        n_prompt = sum(len(p) for p in prompts) * body.n
        n_out = sum(len(o.token_ids) for o in outs)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or public_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    return app


# ============================================================================================ CLI


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {value}")
    return value


def register(subparsers) -> "callable":
    """Add ``serve`` to ``cpoc``'s subcommands; returns its handler ``cmd_serve(args) -> exit code``."""
    p = subparsers.add_parser(
        "serve", help="run an ML-node PoC backend (the network's /api/v1/pow/* routes + /v1/completions + /health) "
                      "on HF continuous batching; needs the 'serve' extra",
        description="An ML-node PoC backend on one port: GET /health, POST /v1/completions (token-id prompts), "
                    "and the network backend's /api/v1/pow/* routes. PoC nonces and validation recomputes ride the "
                    "chat engine (HF continuous batching + continuous PoC); chat is served throughout. "
                    "Callback knobs come from the network's environment variables (POC_CALLBACK_INTERVAL_SEC, "
                    "POC_CALLBACK_MAX_RETRIES, POC_CALLBACK_MAX_ARTIFACTS, POC_MAX_QUEUED_NONCES, ...).")
    p.add_argument("--model", default="cpoc-tiny",
                   help="built-in model (cpoc-tiny, qwen3-0.6b-shaped) or a local HF model folder (default %(default)s)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="extra name params.model / the completions 'model' may carry (repeatable; as vLLM's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=_port, default=5001, help="port (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default %(default)s)")
    p.add_argument("--max-batch-tokens", type=_positive(int), default=256,
                   help="tokens per engine step, chat + PoC (default %(default)s)")
    p.add_argument("--num-blocks", type=_positive(int), default=512, help="KV cache blocks (default %(default)s)")
    p.add_argument("--page-size", type=_positive(int), default=16, help="tokens per KV block (default %(default)s)")
    p.add_argument("--max-requests", type=_positive(int), default=32,
                   help="requests per engine step (default %(default)s)")
    p.add_argument("--governor", choices=("fill", "fixed-share", "off"), default="fill",
                   help="PoC admission: fill the capacity chat leaves (default), a fixed share, or off")
    p.add_argument("--slo-overhead", type=_positive(float), default=0.05,
                   help="fill: allowed growth of chat step time (default %(default)s)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn log level (default %(default)s)")
    return cmd_serve


def cmd_serve(args) -> int:
    missing = missing_serve_deps()
    if missing:
        print(f"cpoc: error: {SERVE_EXTRA_HINT}; missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch
    import uvicorn

    from cpoc_kernels.integrations.hf.service_engine import EngineSettings, HFEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = EngineSettings(max_batch_tokens=args.max_batch_tokens, num_blocks=args.num_blocks,
                                  page_size=args.page_size, max_requests_per_batch=args.max_requests,
                                  governor=args.governor, slo_overhead=args.slo_overhead)
        model, names = load_model(args.model, args.dtype)
        from cpoc_kernels.service.service import ServiceConfig

        service_config = ServiceConfig.from_env()
    except ValueError as exc:
        print(f"cpoc: error: {exc}", file=sys.stderr)
        return 2
    names += [n for n in (args.served_model_name or []) if n not in names]
    engine = HFEngine(model, names, settings)
    engine.start()
    print(f"cpoc serve: {args.model} ({args.dtype}) on http://{args.host}:{args.port} — /health, /v1/completions, "
          f"/api/v1/pow/*; governor {args.governor}", flush=True)
    try:
        app = build_app(engine, service_config, served_name=(args.served_model_name or [None])[0])
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def main(argv=None) -> int:
    """``python -m cpoc_kernels.integrations.hf.serve`` = ``cpoc serve``."""
    from cpoc_kernels.cli import main as cpoc_main

    return cpoc_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
