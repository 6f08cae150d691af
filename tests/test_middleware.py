"""server.middleware at the ASGI level: how it rewrites (or leaves alone) what vLLM's app answers.

The server tests reach these paths only where vLLM happens to take them (a full queue, a 404 route);
here scripted inner apps send every kind of reply, including the exact bodies vLLM builds
(``create_error_response``), and the messages the middleware passes on are checked one by one.

    python -m pytest tests/test_middleware.py
"""

from __future__ import annotations

import asyncio
import json

import pytest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import QueueOverflowError

from server.config import DropeServerOptions
from server.middleware import DropeMiddleware

ENVELOPE = {"message", "type", "param", "code"}
BUSY = create_error_response(QueueOverflowError()).model_dump_json().encode()  # vLLM's own 503 body
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON = [(b"content-type", b"application/json")]


def replying(status: int, chunks: list[bytes], headers=JSON):
    """An inner app that answers ``status`` with ``chunks`` as successive body messages."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    return app


def call(app, body_chunks=(b"",), headers=(), path="/v1/completions", **options):
    """Drive the middleware once; -> the ASGI messages it sent, in order."""
    sent, incoming = [], list(body_chunks)

    async def receive():
        if incoming:
            chunk = incoming.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(incoming)}
        await asyncio.sleep(3600)  # a client that sent everything and waits

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers), "root_path": ""}
    asyncio.run(DropeMiddleware(app, DropeServerOptions(**options))(scope, receive, send))
    return sent


def reply(sent):
    """-> (status, headers dict, whole body) of the messages sent."""
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    names = [k for k, _ in start["headers"]]
    assert len(names) == len(set(names)), names  # e.g. the app's stale content-length beside ours
    headers = dict(start["headers"])
    if b"content-length" in headers:
        assert int(headers[b"content-length"]) == len(body)
    return start["status"], headers, body


def test_vllms_queue_full_503_becomes_429_with_retry_after():
    status, headers, body = reply(call(replying(503, [BUSY])))
    err = json.loads(body)["error"]
    assert status == 429 and headers[b"retry-after"] == b"1"
    assert set(err) == ENVELOPE and (err["type"], err["code"]) == ("rate_limit_error", "queue_full")


def test_a_stream_whose_first_event_is_queue_full_becomes_429():
    """vLLM starts a stream with 200 and then reports the full queue as its first event."""
    chunks = [b"", b"data: " + BUSY + b"\n\n", b"data: [DONE]\n\n"]  # an empty body message first
    status, headers, body = reply(call(replying(200, chunks, SSE)))
    assert status == 429 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["code"] == "queue_full" and b"[DONE]" not in body


def test_a_normal_stream_passes_through_message_by_message():
    events = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"text": "b"}]}\n\n', b"data: [DONE]\n\n"]
    headers = [*SSE, (b"x-request-id", b"r1")]
    sent = call(replying(200, events, headers))
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": headers}
    assert [m["body"] for m in sent[1:]] == events  # same chunks: the client sees each token as it comes
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]


def test_a_503_that_is_not_the_queue_limit_stays_a_503():
    other = create_error_response(RuntimeError("engine dead")).model_dump_json().encode()
    status, _, body = reply(call(replying(503, [other])))
    assert status == 503 and body == other


@pytest.mark.parametrize(
    "status,chunks,ctype,message,type_",
    [
        (404, [b'{"detail": "Not Found"}'], b"application/json", "Not Found", "not_found_error"),  # Starlette
        (401, [b'{"error": "Unauthorized"}'], b"application/json", "Unauthorized", "authentication_error"),  # vLLM
        (500, [b"Internal ", b"Server Error"], b"text/plain", "Internal Server Error", "server_error"),  # in parts
        (422, [b""], b"text/plain", "HTTP 422", "invalid_request_error"),
        (
            405,
            [b'{"detail": "Method Not Allowed"}'],
            b"application/json",
            "Method Not Allowed",
            "invalid_request_error",
        ),
    ],
)
def test_errors_outside_openais_envelope_are_put_in_it(status, chunks, ctype, message, type_):
    headers = [(b"content-type", ctype), (b"content-length", b"999"), (b"allow", b"GET")]
    got_status, got_headers, body = reply(call(replying(status, chunks, headers)))
    err = json.loads(body)["error"]
    assert got_status == status and set(err) == ENVELOPE and (err["message"], err["type"]) == (message, type_)
    assert got_headers[b"content-type"] == b"application/json" and got_headers[b"allow"] == b"GET"


def test_errors_already_in_the_envelope_and_successes_pass_unchanged():
    bad = create_error_response(ValueError("max_tokens must be at least 1")).model_dump_json().encode()
    for status, chunks in ((400, [bad[:10], bad[10:]]), (200, [b'{"id": "cmpl-1",', b' "choices": []}'])):
        sent = call(replying(status, chunks))
        got_status, _, body = reply(sent)
        assert (got_status, body) == (status, b"".join(chunks))
    # A success is not held back: its start goes out before its body arrives.
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]


def test_a_chunked_body_over_the_limit_is_answered_413_whatever_the_app_does():
    seen = []

    async def app(scope, receive, send):
        while (m := await receive())["type"] == "http.request":
            seen.append(len(m["body"]))
        raise RuntimeError("client went away")  # vLLM's complaint about the disconnect it was told of

    status, _, body = reply(call(app, [b"x" * 600, b"y" * 600], max_body_bytes=1000))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large" and seen == [600]
    # Declared too large: refused before the app runs.
    status, _, _ = reply(call(app, [b"{}"], headers=[(b"content-length", b"5000")], max_body_bytes=1000))
    assert status == 413 and seen == [600]


def test_auth_rewrites_nothing_on_open_paths_and_refuses_in_the_envelope():
    ok = replying(200, [b"{}"])
    assert reply(call(ok, path="/health", api_keys=("k",)))[0] == 200
    status, _, body = reply(call(ok, api_keys=("k",), headers=[(b"authorization", b"Bearer nope")]))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert reply(call(ok, api_keys=("k",), headers=[(b"authorization", b"Bearer k")]))[0] == 200
