"""Serving logic: OpenAI requests -> vLLM engine calls -> OpenAI responses (whole or streamed).

No HTTP here beyond the request object used to notice disconnects: routes.py
owns the wire, this module owns admission, sampling, streaming and aborts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind

from . import metrics
from .config import ResolvedModel, ServerConfig
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields


class Serving:
    def __init__(self, engine: Any, tokenizer: Any, cfg: ServerConfig, model: ResolvedModel,
                 max_model_len: int, vocab_size: int):
        self.engine, self.tokenizer, self.cfg, self.model = engine, tokenizer, cfg, model
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # the model's embedding rows: larger token ids would crash the engine
        self.in_flight = 0  # admitted requests not yet finished
        self.created = int(time.time())

    # ---------- admission and validation ----------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.served_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model.served_name}`.",
                           param="model", code="model_not_found")

    def admit(self) -> None:
        # Up to max_num_seqs run, up to max_queue more wait; beyond that the
        # client is told to come back instead of queueing without bound.
        if self.in_flight >= self.cfg.max_num_seqs + self.cfg.max_queue:
            metrics.REJECTED.labels(reason="queue_full").inc()
            raise ApiError(429, f"Server busy: {self.in_flight} requests in flight "
                                f"({self.cfg.max_num_seqs} running + {self.cfg.max_queue} queued). Retry later.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def sampling_params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None, stream: bool) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        if room <= 0 or max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                                f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=req.seed, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                ignore_eos=req.ignore_eos,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except (ValueError, VLLMClientError) as e:  # vLLM's own checks (e.g. stop=[""]): a 400, not a 500
            raise ApiError(400, f"invalid sampling parameters: {e}", code="invalid_value") from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"token ids out of range [0, {self.vocab_size}): {bad[:5]}", param=param)

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, req: ChatCompletionRequest | Any) -> str:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            if isinstance(m.get("content"), list):  # OpenAI content parts: keep the text ones
                m["content"] = "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=getattr(req, "add_generation_prompt", True),
                chat_template=self.model.chat_template,
            )
        except Exception as e:  # no template, or a template that rejects these messages
            raise ApiError(400, f"cannot render the chat messages with the chat template: {e}", param="messages") from None

    # ---------- generation ----------

    async def _generate(self, ids: list[int], params: SamplingParams, request_id: str, raw_request: Any,
                        stream: bool) -> AsyncIterator[Any]:
        """Engine outputs for one prompt; aborts in the engine if the client goes or the task is cancelled.

        Callers take the first output with ``_start`` before answering, so a
        full queue is a 429 and not an error inside a 200 stream.
        """
        self.admit()
        self.in_flight += 1
        metrics.RUNNING.inc()
        metrics.EXTENSION.observe(len(ids) / (self.model.drope.train_context if self.model.drope else self.max_model_len))
        finished = False
        metrics.PROMPT_TOKENS.inc(len(ids))
        watcher = None if stream else asyncio.create_task(self._watch_disconnect(raw_request, request_id))
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                finished = out.finished
                # DELTA outputs carry new tokens only, FINAL_ONLY all of them once: the sum is right for both.
                metrics.GENERATION_TOKENS.inc(sum(len(c.token_ids) for c in out.outputs))
                yield out
        finally:
            if watcher:
                watcher.cancel()
            if not finished:
                await self.engine.abort(request_id)
                metrics.ABORTED.inc()
            self.in_flight -= 1
            metrics.RUNNING.dec()

    async def _start(self, ids, params, request_id, raw_request, stream) -> tuple[Any, AsyncIterator[Any]]:
        gen = self._generate(ids, params, request_id, raw_request, stream)
        try:
            first = await gen.__anext__()
        except (ValueError, TypeError, VLLMClientError) as e:  # vLLM's input processing rejected the request
            raise ApiError(400, f"the engine rejected the request: {e}", code="invalid_value") from None
        return first, gen

    async def _watch_disconnect(self, raw_request: Any, request_id: str) -> None:
        while True:
            await asyncio.sleep(0.25)
            if await raw_request.is_disconnected():
                await self.engine.abort(request_id)
                return

    # ---------- /v1/completions ----------

    async def completion(self, req: CompletionRequest, raw_request: Any) -> dict | AsyncIterator[str]:
        self.check_model(req.model)
        prompts = _prompt_list(req.prompt, self)
        if len(prompts) != 1:
            raise ApiError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
        ids = prompts[0]
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        if req.echo and req.stream:
            raise ApiError(400, "echo is not supported with stream", param="echo")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
        params = self.sampling_params(req, len(ids), max_tokens, req.logprobs,
                                      req.logprobs if (req.echo and req.logprobs is not None) else None, req.stream)
        rid = f"cmpl-{uuid.uuid4().hex}"
        first, gen = await self._start(ids, params, rid, raw_request, req.stream)
        if req.stream:
            return self._stream_completion(_chain(first, gen), rid, req, len(ids))
        final = await _last(_chain(first, gen))
        choices, completion_tokens = [], 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            text, lp = c.text, None
            if req.logprobs is not None:
                lp = _completion_logprobs(c.token_ids, c.logprobs, self.tokenizer)
            if req.echo:
                text = self.tokenizer.decode(ids) + text
                if req.logprobs is not None:
                    lp = _merge_echo_logprobs(ids, final.prompt_logprobs, lp, self.tokenizer)
            choices.append({"index": c.index, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            **({"token_ids": list(c.token_ids)} if req.return_token_ids else {})})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model.served_name,
                "choices": choices, "usage": _usage(len(ids), completion_tokens)}

    async def _stream_completion(self, gen, rid: str, req: CompletionRequest, prompt_len: int) -> AsyncIterator[str]:
        created, completion_tokens = int(time.time()), 0
        async for out in gen:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.finish_reason and not c.token_ids:
                    continue
                lp = _completion_logprobs(c.token_ids, c.logprobs, self.tokenizer) if req.logprobs is not None else None
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model.served_name,
                            "choices": [{"index": c.index, "text": c.text, "logprobs": lp,
                                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                         **({"token_ids": list(c.token_ids)} if req.return_token_ids else {})}]})
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model.served_name,
                        "choices": [], "usage": _usage(prompt_len, completion_tokens)})
        yield "data: [DONE]\n\n"

    # ---------- /v1/chat/completions ----------

    async def chat(self, req: ChatCompletionRequest, raw_request: Any) -> dict | AsyncIterator[str]:
        self.check_model(req.model)
        text = self.render_chat(req)
        # The template already wrote BOS / special tokens where it wants them.
        ids = self.tokenize_text(text, add_special_tokens=False)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self.sampling_params(req, len(ids), max_tokens, top, None, req.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        first, gen = await self._start(ids, params, rid, raw_request, req.stream)
        if req.stream:
            return self._stream_chat(_chain(first, gen), rid, req, len(ids))
        final = await _last(_chain(first, gen))
        choices, completion_tokens = [], 0
        for c in sorted(final.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            lp = {"content": _chat_logprobs(c.token_ids, c.logprobs, top, self.tokenizer)} if req.logprobs else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            **({"token_ids": list(c.token_ids)} if req.return_token_ids else {})})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model.served_name,
                "choices": choices, "usage": _usage(len(ids), completion_tokens)}

    async def _stream_chat(self, gen, rid: str, req: ChatCompletionRequest, prompt_len: int) -> AsyncIterator[str]:
        created, completion_tokens = int(time.time()), 0
        top = (req.top_logprobs or 0) if req.logprobs else None
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model.served_name}
        for i in range(req.n):  # OpenAI opens every choice with a role-only delta
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        async for out in gen:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if not c.text and not c.finish_reason and not c.token_ids:
                    continue
                lp = {"content": _chat_logprobs(c.token_ids, c.logprobs, top, self.tokenizer)} if req.logprobs else None
                delta = {"content": c.text} if c.text or not c.finish_reason else {}
                yield _sse({**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                                 "finish_reason": c.finish_reason}]})
        if req.stream_options and req.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_len, completion_tokens)})
        yield "data: [DONE]\n\n"


# ---------- helpers ----------

def _prompt_list(prompt: Any, serving: Serving) -> list[list[int]]:
    """OpenAI's four prompt shapes -> token id lists, ids range-checked."""
    if isinstance(prompt, str):
        return [serving.tokenize_text(prompt)]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    out = [serving.tokenize_text(p) if isinstance(p, str) else list(p) for p in prompt]
    for ids in out:
        serving.check_token_ids(ids, "prompt")
    return out


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        yield first
        async for x in rest:
            yield x
    finally:
        await rest.aclose()  # runs _generate's abort/cleanup now, not at garbage collection


async def _last(gen: AsyncIterator[Any]) -> Any:
    last = None
    async for out in gen:
        last = out
    return last


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _tok(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _completion_logprobs(token_ids, logprobs, tokenizer) -> dict[str, list]:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for tid, d in zip(token_ids, logprobs or []):
        s = _tok(tokenizer, tid)
        out["tokens"].append(s)
        out["token_logprobs"].append(d[tid].logprob)
        out["top_logprobs"].append({_tok(tokenizer, k): v.logprob for k, v in d.items()})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _merge_echo_logprobs(prompt_ids, prompt_logprobs, lp, tokenizer) -> dict[str, list]:
    head = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i, tid in enumerate(prompt_ids):
        s = _tok(tokenizer, tid)
        d = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
        head["tokens"].append(s)
        head["token_logprobs"].append(d[tid].logprob if d else None)  # the first token has no logprob
        head["top_logprobs"].append({_tok(tokenizer, k): v.logprob for k, v in d.items()} if d else None)
        head["text_offset"].append(offset)
        offset += len(s)
    tail_offsets = [o + offset for o in lp["text_offset"]]
    return {k: head[k] + (tail_offsets if k == "text_offset" else lp[k]) for k in head}


def _chat_logprobs(token_ids, logprobs, top: int | None, tokenizer) -> list[dict]:
    out = []
    for tid, d in zip(token_ids, logprobs or []):
        s = _tok(tokenizer, tid)
        ranked = sorted(d.items(), key=lambda kv: -kv[1].logprob)[: top or 0]
        out.append({"token": s, "logprob": d[tid].logprob, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": _tok(tokenizer, k), "logprob": v.logprob,
                                      "bytes": list(_tok(tokenizer, k).encode())} for k, v in ranked]})
    return out
