"""What both tools need from an OpenAI-compatible server: reachability, the model card, its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC
from types import SimpleNamespace
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


class ServerTokenizer:
    """The served model's tokenizer, asked of the server (vLLM's /tokenize and /detokenize): no local files."""

    def __init__(self, ep: Endpoint, timeout: float = 60.0):
        self.ep = ep
        self.root = ep.base_url[: -len("/v1")]
        self.client = httpx.Client(timeout=timeout, headers=ep.headers)
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(f"{self.root}/{path}", json={"model": self.ep.model, **body})
        if r.status_code != 200:
            raise EndpointError(
                f"{self.root}/{path} answered {r.status_code}: {r.text[:200]} "
                "(the tools tokenise through the server: it must offer vLLM's /tokenize)"
            )
        return r.json()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = self._post("tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})[
                "tokens"
            ]
        return list(self._cache[key])

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        """What vLLM's calculate_metrics asks of a tokenizer (``tok(text).input_ids``) to count the tokens
        of a stream whose server sent no usage."""
        return SimpleNamespace(input_ids=self.encode(text, add_special_tokens))

    def num_special_tokens_to_add(self) -> int:
        """As a Hugging Face tokenizer's: how many tokens the server adds to a text prompt."""
        return len(self.encode("x", add_special_tokens=True)) - len(self.encode("x"))

    def decode(self, ids: list[int]) -> str:
        return self._post("detokenize", {"tokens": list(ids)})["prompt"]

    def start_tokens(self) -> list[int]:
        """Tokens the server puts before a text prompt (BOS for Llama-2; none for SmolLM2). A prompt
        sent as token ids gets nothing added, so it must carry them itself, as a text prompt would."""
        plain, full = self.encode("x"), self.encode("x", add_special_tokens=True)
        n = len(full) - len(plain)
        return full[:n] if n > 0 and full[n:] == plain else []

    def chat_overhead(self) -> int:
        """Tokens the chat template adds around a user turn and a continued assistant turn (RULER's
        model_template_token): asked of /tokenize with messages, minus the two contents' own tokens."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        n = self._post(
            "tokenize", {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
        )["count"]
        return n - len(self.encode("x")) - len(self.encode("y"))


def run_info(tool: str, argv: list[str] | None) -> dict[str, Any]:
    """What a results file needs to be reproduced: the command, the time, the tool versions."""
    import platform
    import sys
    from datetime import datetime
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python -m", tool, *args]),
        "time": datetime.now(UTC).isoformat(),
        "versions": {"drope-server": v("drope-server"), "httpx": v("httpx"), "python": platform.python_version()},
        "machine": platform.machine(),
    }
