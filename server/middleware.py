"""The HTTP behaviour drope-server adds around vLLM's app, as one pure ASGI middleware.

  * API key on every route but the open ones (vLLM guards only /v1: its
    /tokenize and /detokenize would be open), compared in constant time;
  * request bodies over --max-body answered 413 before vLLM reads them;
  * vLLM's queue-limit answer (503 "engine busy"; for a stream, a 200 whose
    first event is that error) turned into 429 with Retry-After, as OpenAI clients
    expect from an overloaded server and retry on;
  * every error in OpenAI's envelope {"error": {"message", "type", "param", "code"}}
    (vLLM's own 401 is {"error": "Unauthorized"}, Starlette's 404 {"detail": ...}).

Pure ASGI rather than BaseHTTPMiddleware: streamed responses pass through
untouched after their first event, and a client disconnect still reaches vLLM's
handlers (which abort the request in the engine).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vllm.exceptions import QueueOverflowError

from .config import OPEN_PATHS, DropeServerOptions
from .metrics import REJECTED

_BUSY = QueueOverflowError().message
RETRY_AFTER_S = "1"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error envelope; the HTTP status travels in the response start, not in the body."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class DropeMiddleware:
    def __init__(self, app: ASGIApp, options: DropeServerOptions):
        self.app = app
        self.options = options
        self._key_hashes = [hashlib.sha256(k.encode()).digest() for k in options.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self._key_hashes and scope["method"] != "OPTIONS" and not _is_open(path):
            if not self._authorised(scope):
                REJECTED.labels(reason="auth").inc()
                return await _respond(
                    send,
                    401,
                    error_body(
                        "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                        "authentication_error",
                        "invalid_api_key",
                    ),
                )
        limit = self.options.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(send)
        seen = 0
        reply = _Reply(send)

        async def limited_receive() -> Message:
            # A body without Content-Length (chunked) is counted as it arrives; past the
            # limit the app is told the client left, and its answer is replaced by 413.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    reply.replace_with(self._too_large)
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, limited_receive, reply.send)
        except Exception:
            if not reply.replaced:
                raise  # the app's own failure; past the body limit its complaint is moot
        await reply.finish()

    def _authorised(self, scope: Scope) -> bool:
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        ok = False
        for h in self._key_hashes:  # no early exit: constant time in which key matched
            ok |= secrets.compare_digest(given, h)
        return ok and scheme.lower() == "bearer"

    async def _too_large(self, send: Send) -> None:
        REJECTED.labels(reason="body_too_large").inc()
        limit = self.options.max_body_bytes
        await _respond(
            send,
            413,
            error_body(
                f"Request body over the {limit}-byte limit (--max-body).", "invalid_request_error", "request_too_large"
            ),
        )


class _Reply:
    """Wraps ``send``: holds back error responses and the first event of a stream to rewrite them."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False
        self._start: Message | None = None
        self._mode = "pass"  # pass | error (buffer whole body) | stream (inspect first event) | drop
        self._body = b""
        self._replacement = None

    def replace_with(self, respond) -> None:
        """Answer with ``respond(send)`` instead of whatever the app sends (if nothing was sent yet)."""
        if not self.started:
            self._replacement, self._mode = respond, "drop"

    @property
    def replaced(self) -> bool:
        return self._replacement is not None

    async def finish(self) -> None:
        if self._replacement is not None and not self.started:
            self.started = True
            await self._replacement(self._send)

    async def send(self, message: Message) -> None:
        if self._replacement is not None:
            return
        if message["type"] == "http.response.start":
            status = message["status"]
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if status >= 400:
                self._mode, self._start = "error", message
                return
            if status == 200 and ctype.startswith(b"text/event-stream"):
                self._mode, self._start = "stream", message
                return
            self.started = True
            return await self._send(message)
        if message["type"] != "http.response.body" or self._mode == "pass":
            return await self._send(message)
        if self._mode == "drop":
            return
        self._body += message.get("body", b"")
        more = message.get("more_body", False)
        if self._mode == "error":
            if not more:
                await self._flush_error()
            return
        # stream: the first non-empty event decides; vLLM reports a full queue as the first event.
        if self._body.strip() or not more:
            first = self._body
            if _is_busy(_sse_data(first)):
                self._mode = "drop"
                await _respond_busy(self._send)
                self.started = True
                return
            self._mode = "pass"
            self.started = True
            await self._send(self._start)
            await self._send({"type": "http.response.body", "body": first, "more_body": more})

    async def _flush_error(self) -> None:
        start, body = self._start, self._body
        status = start["status"]
        self.started = True
        payload = _json(body)
        if status == 503 and _is_busy(payload):
            return await _respond_busy(self._send)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            await self._send(start)
            return await self._send({"type": "http.response.body", "body": body})
        # Not OpenAI's envelope (Starlette's {"detail": ...}, vLLM's {"error": "..."}, plain text).
        detail = payload.get("detail", payload.get("error")) if isinstance(payload, dict) else None
        message = str(detail) if detail is not None else (body.decode(errors="replace").strip() or f"HTTP {status}")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        await _respond(self._send, status, error_body(message, _error_type(status)), headers)


def _is_open(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)


def _is_busy(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("error"), dict)
        and payload["error"].get("message") == _BUSY
    )


async def _respond_busy(send: Send) -> None:
    await _respond(
        send,
        429,
        error_body(
            "The server is at capacity (--max-num-seqs running + --max-queue waiting); retry after a second.",
            "rate_limit_error",
            "queue_full",
        ),
        [(b"retry-after", RETRY_AFTER_S.encode())],
    )


def _sse_data(chunk: bytes) -> Any:
    for line in chunk.decode(errors="replace").splitlines():
        if line.startswith("data: "):
            return _json(line[6:].encode())
    return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


async def _respond(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    headers = [*(headers or []), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
