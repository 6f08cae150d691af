"""HTTP routes: thin handlers that take the serving object from app.state."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

router = APIRouter()


def _serving(request: Request):
    return request.app.state.serving


def _respond(result) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    # X-Accel-Buffering: proxies must pass tokens through as they come.
    return StreamingResponse(result, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return _respond(await _serving(request).completion(body, request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return _respond(await _serving(request).chat(body, request))


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    s = _serving(request)
    card = {"id": s.model.served_name, "object": "model", "created": s.created, "owned_by": "drope-server",
            "root": s.model.path, "max_model_len": s.max_model_len, **s.model.metadata()}
    return JSONResponse({"object": "list", "data": [card]})


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await _serving(request).engine.check_health()
    except Exception as e:
        raise ApiError(503, f"engine unhealthy: {e}", type="server_error", code="engine_dead") from None
    return PlainTextResponse("ok")


@router.get("/metrics")
async def metrics_endpoint() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    s = _serving(request)
    s.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
    if body.messages is not None:
        ids = s.tokenize_text(s.render_chat(body), add_special_tokens=False)
    else:
        ids = s.tokenize_text(body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": s.max_model_len})


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    s = _serving(request)
    s.check_model(body.model)
    s.check_token_ids(body.tokens, "tokens")
    return JSONResponse({"prompt": s.tokenizer.decode(body.tokens)})


@router.get("/version")
async def version() -> JSONResponse:
    import vllm

    from . import __version__

    return JSONResponse({"drope_server": __version__, "vllm": vllm.__version__, "time": int(time.time())})
