"""The FastAPI application: engine lifecycle (lifespan), error envelope, auth, body limit, routes."""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics
from .config import ResolvedModel, ServerConfig, engine_kwargs
from .protocol import ApiError
from .routes import router

log = logging.getLogger("drope.server")


def build_engine(cfg: ServerConfig, model: ResolvedModel) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(cfg, model)))


def create_app(cfg: ServerConfig, model: ResolvedModel, engine_factory=build_engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from .serving import Serving

        engine = engine_factory(cfg, model)
        mc = engine.vllm_config.model_config
        app.state.serving = Serving(engine, engine.get_tokenizer(), cfg, model,
                                    max_model_len=mc.max_model_len, vocab_size=mc.get_vocab_size())
        log.info("ready: %s (engine max context %d tokens)", model.describe(), mc.max_model_len)
        log.info("try it:\n%s", usage_example(cfg, model))
        try:
            yield
        finally:
            log.info("shutting down the engine")
            engine.shutdown()

    app = FastAPI(title="drope-server", lifespan=lifespan)
    app.state.cfg, app.state.model = cfg, model
    app.include_router(router, dependencies=[Depends(check_api_key)])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.HTTP.labels(route=getattr(route, "path", "unmatched"), status=str(response.status_code)).inc()
        return response

    return app


async def check_api_key(request: Request) -> None:
    key = request.app.state.cfg.api_key
    if not key or request.url.path in ("/health", "/metrics"):
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):  # constant time
        metrics.REJECTED.labels(reason="auth").inc()
        raise ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                       type="authentication_error", code="invalid_api_key")


class BodyLimit:
    """413 for bodies over the limit, whether or not the client sent Content-Length."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        metrics.REJECTED.labels(reason="body_too_large").inc()
        err = ApiError(413, f"Request body over the {self.max_bytes}-byte limit.", code="request_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, _empty_receive, send)


class _TooLarge(Exception):
    pass


async def _empty_receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        loc, msg = [], "Request body is not valid JSON."
    param = ".".join(loc) or None
    text = f"{param}: {msg}" if param else msg
    return await _api_error(request, ApiError(400, text, param=param, code="invalid_value"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return await _api_error(request, ApiError(exc.status_code, str(exc.detail), code="http_error"))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return await _api_error(request, ApiError(500, "Internal server error.", type="server_error"))


def usage_example(cfg: ServerConfig, model: ResolvedModel) -> str:
    base = f"http://{cfg.host}:{cfg.port}/v1"
    auth = ' -H "Authorization: Bearer $DROPE_API_KEY"' if cfg.api_key else ""
    key = '"$DROPE_API_KEY"' if cfg.api_key else '"none"'
    return (
        f"  curl {base}/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model.served_name}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'\n"
        f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{base}\", api_key={key}); "
        f"print(c.chat.completions.create(model=\"{model.served_name}\", "
        f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}], max_tokens=32).choices[0].message.content)'"
    )
