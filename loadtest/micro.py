"""The micro long-context task: associative recall in filler, as documents to train on and trials to score.

benchmarks/long_context.py trains small models on it and scores them through drope-server
(``score_trials``, any OpenAI-compatible vLLM endpoint); tests/test_micro_long_context.py
scores the shipped micro checkpoints the same way.

Symbols are whole words of a word-level tokenizer (one token each), so a document of
L tokens is L words and lengths are exact. A document holds ``pairs`` *bindings*
(key -> value, keys and values distinct) written at a fixed density (``rate``
occurrences per 100 tokens, so a longer document is the same kind of text, longer),
and random filler between them. Two ways of writing a binding:

``recall`` (MQAR-style, as in Zoology): every occurrence is the two adjacent tokens
  ``k v``. After a binding's first occurrence its value is predictable only by finding
  the key earlier: the plain next-token loss supervises recall at every repeat
  (issue 19's negative result came from a loss on one answer per sequence). Finding
  "the token after the key" needs positional binding: an induction head.
``lookup`` (content-addressed): each key owns ``values`` value tokens ``v{k}_{j}``; a
  binding's first occurrence is its value token alone (the fact), later ones are
  queries ``k v{k}_{j}``. The value is found by content (which of key k's values is in
  the context), the pure form of "retrieve a fact by its key" that NoPE attention can
  do at any distance.

A trial of length N is N - 1 prompt tokens and an answer: a document of N - 2 tokens
whose distractor bindings are written as in training, plus the asked binding written
once (recall: ``k v``; lookup: the fact) at a uniformly drawn depth, its key distinct
from the distractors', then the asked key; the answer is its value. Documents and
trials come from seeded RNGs; evaluation trials use seeds training never uses.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
TRAIN_SEED_BASE = 1_000  # + training seed: the training documents
HELDOUT_SEED = 9_999  # the long held-out documents fit_beta measures perplexity on
EVAL_SEED_BASE = 100_000  # + length: evaluation trials (no training or held-out document uses these)


@dataclass(frozen=True)
class Task:
    kind: str = "recall"
    keys: int = 32
    values: int = 32
    """recall: the value vocabulary; lookup: value tokens per key."""
    filler: int = 64
    pairs: int = 8
    """distinct bindings per document (distractors in a trial)."""
    rate: float = 20.0
    """binding occurrences per 100 tokens (recall: 2 tokens each, lookup: 1 or 2)."""

    def __post_init__(self) -> None:
        if self.kind not in ("recall", "lookup"):
            raise ValueError(f"task kind must be recall or lookup, got {self.kind!r}")
        if self.pairs >= self.keys or (self.kind == "recall" and self.pairs > self.values):
            raise ValueError("bindings are distinct: pairs must be below the number of keys (and values)")
        if not 0 < self.rate <= 40:
            raise ValueError("rate must be in (0, 40] occurrences per 100 tokens")

    def vocab(self) -> list[str]:
        words = [EOS, PAD, UNK] + [f"k{i}" for i in range(self.keys)]
        if self.kind == "recall":
            words += [f"v{i}" for i in range(self.values)]
        else:
            words += [f"v{k}_{j}" for k in range(self.keys) for j in range(self.values)]
        return words + [f"f{i}" for i in range(self.filler)]

    def value(self, key: int, j: int) -> str:
        return f"v{j}" if self.kind == "recall" else f"v{key}_{j}"

    def chance(self) -> float:
        """Accuracy of a model that knows the format but retrieves nothing (recall: any value; lookup: the key's)."""
        return 1 / self.values

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_tokenizer(task: Task, out_dir: str | Path) -> Any:
    """A word-level fast tokenizer over the task's symbols (ids in vocab() order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(task.vocab())}, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=1 << 20
    )
    fast.save_pretrained(str(out_dir))
    return fast


def _stream(task: Task, rng: random.Random, n_tokens: int, binds: list[tuple[int, int]]) -> list[str]:
    """Filler with the bindings' occurrences at the task's density, exactly ``n_tokens`` words."""
    words: list[str] = []
    seen: set[int] = set()
    p = task.rate / 100
    while len(words) < n_tokens:
        if binds and rng.random() < p:
            i = rng.randrange(len(binds))
            k, j = binds[i]
            if task.kind == "recall" or i in seen:
                words += [f"k{k}", task.value(k, j)]
            else:
                words.append(task.value(k, j))  # lookup: the fact, before any query of it
            seen.add(i)
        else:
            words.append(f"f{rng.randrange(task.filler)}")
    return words[:n_tokens]


def _bindings(task: Task, rng: random.Random, n: int, exclude: int | None = None) -> list[tuple[int, int]]:
    keys = rng.sample([k for k in range(task.keys) if k != exclude], n)
    values = rng.sample(range(task.values), n) if task.kind == "recall" else [rng.randrange(task.values) for _ in keys]
    return list(zip(keys, values, strict=True))


def document(task: Task, rng: random.Random, n_tokens: int) -> list[str]:
    """A training (or held-out) document of exactly ``n_tokens`` words."""
    return _stream(task, rng, n_tokens, _bindings(task, rng, task.pairs))


def write_documents(task: Task, path: str | Path, n_docs: int, lengths: tuple[int, int], seed: int) -> Path:
    """``n_docs`` documents of uniformly drawn lengths in ``lengths`` (words), as JSON lines ({"text": ...}).

    recalibration.run's --data. Packed with EOS into sequences, documents of varied lengths put
    the EOS at varied positions (with equal lengths, an absolute-position model learns where a
    sequence ends, and would predict EOS at the same place in a trial).
    """
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(document(task, rng, rng.randint(*lengths)))}) + "\n")
    return path


@dataclass(frozen=True)
class Trial:
    prompt: list[int]
    answer: int
    depth: float
    """Where the asked binding sits: 0 = the prompt's start, 1 = right before the question."""


def trials(task: Task, ids: dict[str, int], length: int, n: int, seed: int) -> list[Trial]:
    """``n`` trials of ``length`` tokens (prompt + answer) from RNG ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        (asked,) = _bindings(task, rng, 1)
        k, j = asked
        needle = [f"k{k}", task.value(k, j)] if task.kind == "recall" else [task.value(k, j)]
        ctx = _stream(task, rng, length - 2 - len(needle), _bindings(task, rng, task.pairs, exclude=k))
        at = rng.randrange(len(ctx) + 1)  # before context token `at`: 0 = first, len(ctx) = last
        ctx[at:at] = needle
        out.append(Trial([ids[w] for w in ctx + [f"k{k}"]], ids[task.value(k, j)], at / max(1, len(ctx) - len(needle))))
    return out


def score_trials(
    base_url: str, model: str, trials: list[Trial], concurrency: int = 32, api_key: str | None = None
) -> list[dict[str, Any]]:
    """Each trial as one /v1/completions request: greedy, one token, and the answer's log-probability
    asked for by id (vLLM's ``logprob_token_ids``), so no top-k has to contain it."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(client: Any, gate: asyncio.Semaphore, t: Trial) -> dict[str, Any]:
        body = {
            "model": model,
            "prompt": t.prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 1,
            "logprob_token_ids": [t.answer],
            "return_tokens_as_token_ids": True,
        }
        async with gate:
            for attempt in range(3):  # 429: the server's queue is full; wait and ask again
                resp = await client.post("/v1/completions", json=body)
                if resp.status_code != 429:
                    break
                await asyncio.sleep(1 + attempt)
        if resp.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {resp.status_code}: {resp.text[:300]}")
        lp = resp.json()["choices"][0]["logprobs"]
        got = int(lp["tokens"][0].removeprefix("token_id:"))
        return {
            "length": len(t.prompt) + 1,
            "depth": round(t.depth, 4),
            "answer": t.answer,
            "generated": got,
            "correct": got == t.answer,
            "loglik": lp["top_logprobs"][0][f"token_id:{t.answer}"],
        }

    async def run() -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600) as client:
            return list(await asyncio.gather(*(one(client, gate, t) for t in trials)))

    return asyncio.run(run())


def accuracy(records: list[dict[str, Any]], length: int) -> float:
    cell = [r for r in records if r["length"] == length]
    return sum(r["correct"] for r in cell) / len(cell)
