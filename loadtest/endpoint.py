"""What both tools need from an OpenAI-compatible server: reachability, the model card, a tokenizer, streaming calls."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


class EndpointError(RuntimeError):
    """A problem with the server or the spec, reported before any load is sent."""


@dataclass
class Endpoint:
    base_url: str
    model: str
    max_model_len: int | None
    root: str | None
    api_key: str | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def check_length(self, total_tokens: int, what: str) -> None:
        if self.max_model_len is not None and total_tokens > self.max_model_len:
            raise EndpointError(
                f"{what} needs {total_tokens} tokens but {self.base_url} advertises max_model_len "
                f"{self.max_model_len} for {self.model}"
            )


def connect(base_url: str, model: str | None, api_key: str | None = None, timeout: float = 10.0) -> Endpoint:
    """Check the server answers and serves ``model``; read its advertised context length."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {base}: {e.__class__.__name__}: {e}") from None
    if r.status_code == 401:
        raise EndpointError(f"{base} wants an API key (--api-key)")
    if r.status_code != 200:
        raise EndpointError(f"{base}/models answered {r.status_code}: {r.text[:200]}")
    cards = {c["id"]: c for c in r.json().get("data", [])}
    if model is None:
        if len(cards) != 1:
            raise EndpointError(f"{base} serves {sorted(cards)}: pick one with --model")
        model = next(iter(cards))
    if model not in cards:
        raise EndpointError(f"{base} does not serve {model!r}; it serves {sorted(cards)}")
    card = cards[model]
    return Endpoint(base, model, card.get("max_model_len"), card.get("root"), api_key, card)


def load_tokenizer(ep: Endpoint, tokenizer: str | None = None) -> Any:
    """The model's tokenizer: --tokenizer, else the served directory (vLLM and we report it as 'root'), else the name."""
    from transformers import AutoTokenizer

    import model_patches.reference  # noqa: F401  (so llama_drope / qwen2_drope configs are known)

    last: Exception | None = None
    for candidate in [tokenizer] if tokenizer else [c for c in (ep.root, ep.model) if c]:
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except Exception as e:  # noqa: BLE001 - try the next candidate
            last = e
    raise EndpointError(f"cannot load a tokenizer for {ep.model}: pass --tokenizer DIR ({last})")


@dataclass
class StreamResult:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""


async def stream_request(client: httpx.AsyncClient, ep: Endpoint, endpoint: str, prompt: Any,
                         max_tokens: int, extra: dict[str, Any] | None = None, ignore_eos: bool = False) -> StreamResult:
    """One streamed request, timed like `vllm bench serve`: TTFT at the first chunk with content,
    ITL between later content chunks, latency until [DONE]; token counts from the server's usage."""
    body: dict[str, Any] = {"model": ep.model, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        url = f"{ep.base_url}/chat/completions"
    else:
        body["prompt"] = prompt
        url = f"{ep.base_url}/completions"
    body.update(extra or {})
    res = StreamResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=ep.headers) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for c in chunk.get("choices", []):
                    piece = c.get("text") if endpoint != "chat" else (c.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.text += piece
        res.latency = time.perf_counter() - start
        res.ok = True
    except httpx.TimeoutException:
        res.error = "timeout"
    except httpx.HTTPError as e:
        res.error = e.__class__.__name__
    except json.JSONDecodeError:
        res.error = "bad stream"
    return res
