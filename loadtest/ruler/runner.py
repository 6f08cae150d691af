"""Runs RULER trials against OpenAI servers: ``prepare`` builds them once, ``send`` asks one server and scores.

``run`` does both for one server; a benchmark that wants RULER numbers calls it:

    from loadtest import ruler
    results = ruler.run("http://127.0.0.1:8000", ruler.Spec(tasks=("niah_single_1", "vt"), lengths=(4096,), trials=10))
    ruler.by_length(results)  # {task: {length: mean score}}
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

import httpx

from ..endpoint import Endpoint, EndpointError, ServerTokenizer, connect
from .prompts import Builder, Trial, split_answer_prefix
from .scoring import Result, score
from .tasks import TASKS

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class Spec:
    """What to run: ``trials`` trials of every task at every length L (tokens, prompt + budget); NIAH trials
    go round ``depths``, so each depth gets trials / len(depths). Trial k has seed ``seed + k``.
    endpoint: completions sends token ids, chat sends messages with the answer prefix as a continued assistant turn."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...] = DEPTHS
    trials: int = 20
    seed: int = 0
    endpoint: str = "completions"

    def __post_init__(self) -> None:
        for name in ("tasks", "lengths", "depths"):  # lists are welcome; stored frozen
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [t for t in self.tasks if t not in TASKS] + [str(d) for d in self.depths if not 0 <= d <= 1]
        if bad:
            raise ValueError(f"unknown tasks or depths outside [0, 1]: {', '.join(bad)}")
        if not (self.tasks and self.lengths and self.depths):
            raise ValueError("a RULER run needs at least one task, one length and one depth")
        if any(L <= 0 for L in self.lengths) or self.trials < 1:
            raise ValueError(f"lengths and trials must be positive, got {list(self.lengths)} and {self.trials}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")


@dataclass
class Plan:
    """Trials built once, in the tokens of the first server, for every server that runs them."""

    trials: list[Trial]
    tok: ServerTokenizer  # the tokens the trials are in
    endpoint: str
    start: list[int]  # the server's start tokens (BOS): token-id prompts carry them as a text prompt gets them
    reserve: int  # tokens the server adds around ours (start tokens or chat template), counted in L


def build_trials(builder: Builder, spec: Spec) -> list[Trial]:
    from tqdm.auto import tqdm

    specs = [
        (name, L, spec.depths[k % len(spec.depths)] if TASKS[name].niah else None, spec.seed + k)
        for name in spec.tasks
        for L in spec.lengths
        for k in range(spec.trials)
    ]
    return [builder.build(*s) for s in tqdm(specs, desc="building prompts", unit="trial", file=sys.stderr)]


def prepare(
    targets: list[Endpoint], spec: Spec, haystack: str | None = None, qa_files: dict[str, str | None] | None = None
) -> Plan:
    """Check every server fits the longest L, build the trials in the first one's tokens. haystack: a directory
    of .txt essays (default: the Paul Graham essays); qa_files: {"qa_1": SQuAD json, "qa_2": HotpotQA json}."""
    from ..text import corpus_text

    for ep in targets:
        ep.check_length(max(spec.lengths), f"length {max(spec.lengths)}")
    tok = ServerTokenizer(targets[0])
    essays = corpus_text(haystack)
    if spec.endpoint == "completions":
        probe = essays[:2000]
        for ep in targets[1:]:  # prompts go out as the first server's token ids
            other = ServerTokenizer(ep)
            if other.encode(probe) != tok.encode(probe) or other.start_tokens() != tok.start_tokens():
                raise EndpointError(
                    f"{ep.base_url} tokenises differently from {targets[0].base_url}: "
                    "--compare with --endpoint completions needs one tokenizer (use --endpoint chat)"
                )
    # What the server adds around our tokens is taken from the haystack, so prompt + budget is L:
    # the chat template (RULER's model_template_token), or the start tokens of a completion (BOS).
    start = tok.start_tokens() if spec.endpoint == "completions" else []
    reserve = tok.chat_overhead() if spec.endpoint == "chat" else len(start)
    builder = Builder(tok, essays, qa_files, reserve)
    return Plan(build_trials(builder, spec), tok, spec.endpoint, start, reserve)


async def _send(ep: Endpoint, plan: Plan, concurrency: int, desc: str) -> list[Result]:
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(plan.trials), desc=desc, unit="trial", file=sys.stderr)

    async def one(client: httpx.AsyncClient, t: Trial) -> Result:
        body: dict[str, Any] = {"model": ep.model, "max_tokens": t.budget, "temperature": 0.0}
        if plan.endpoint == "chat":
            # The answer prefix opens the assistant turn, where RULER puts it after the model template. The ids
            # are decoded by the plan's tokenizer: they are in its tokens, whichever server this is.
            user, prefix = split_answer_prefix(plan.tok.decode(t.prompt_ids), t)
            body.update(
                messages=[{"role": "user", "content": user}, {"role": "assistant", "content": prefix}],
                add_generation_prompt=False,
                continue_final_message=True,
            )
            url = f"{ep.base_url}/chat/completions"
        else:
            body["prompt"] = plan.start + t.prompt_ids
            url = f"{ep.base_url}/completions"
        async with sem:
            try:
                r = await client.post(url, json=body, headers=ep.headers)
                error = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                data = r.json() if r.status_code == 200 else {}
            except httpx.HTTPError as e:
                data, error = {}, e.__class__.__name__
        choice = (data.get("choices") or [{}])[0]
        answer = (choice.get("text") if plan.endpoint != "chat" else (choice.get("message") or {}).get("content")) or ""
        bar.update(1)
        return Result(
            t.task,
            t.length,
            t.depth,
            t.seed,
            t.refs,
            (data.get("usage") or {}).get("prompt_tokens"),
            answer,
            0.0 if error else score(TASKS[t.task].metric, answer, t.refs),
            error,
        )

    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=10.0)) as client:
            return list(await asyncio.gather(*[one(client, t) for t in plan.trials]))
    finally:
        bar.close()


def send(ep: Endpoint, plan: Plan, concurrency: int = 4, desc: str | None = None) -> list[Result]:
    """Send every trial (greedy, the task's budget), ``concurrency`` at a time, and score the answers."""
    return asyncio.run(_send(ep, plan, concurrency, desc or ep.model))


def run(
    base_url: str,
    spec: Spec,
    model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    haystack: str | None = None,
    qa_files: dict[str, str | None] | None = None,
) -> list[Result]:
    """The whole RULER run against one server: one Result per trial, in build order."""
    ep = connect(base_url, model, api_key)
    return send(ep, prepare([ep], spec, haystack, qa_files), concurrency)
