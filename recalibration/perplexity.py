"""Held-out perplexity at a window length, on vLLM's engine or a running server: what fit_beta and evaluate share.

A window is a run of held-out tokens sent as one token prompt with
``prompt_logprobs=0`` and ``max_tokens=1``: the engine returns the log-probability
of every actual next token, computed chunk by chunk under chunked prefill, so a
32K-token window never holds 32K x vocab logits at once. Every window starts at
position 0, so position p in it is absolute position p: exactly what beta sees
when serving a prompt. Windows are non-overlapping and taken from the start of the
held-out tokens, so every model and every c is measured on the same tokens.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

# windows -> the summed next-token NLL of each (len(window) - 1 predictions each)
WindowNLL = Callable[[list[list[int]]], list[float]]


def windows(tokens: list[int], length: int, max_windows: int) -> list[list[int]]:
    """Up to ``max_windows`` non-overlapping ``length``-token windows from the start of ``tokens``."""
    starts = list(range(0, len(tokens) - length + 1, length))[:max_windows]
    if not starts:
        raise ValueError(f"need at least {length} held-out tokens for a {length}-token window, have {len(tokens)}")
    return [tokens[s : s + length] for s in starts]


def perplexity(window_nll: WindowNLL, wins: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows' predictions."""
    nll = window_nll(wins)
    return math.exp(sum(nll) / sum(len(w) - 1 for w in wins))


def measure(
    window_nll: WindowNLL,
    tokens: list[int],
    lengths: list[int],
    max_windows: int,
    train_context: int,
    label: str,
    log: Callable[[str], None] = print,
) -> dict[int, float]:
    """Perplexity at each length, one progress line per length."""
    out = {}
    for length in lengths:
        wins = windows(tokens, length, max_windows)
        t0 = time.perf_counter()
        out[length] = perplexity(window_nll, wins)
        log(
            f"{label}  L={length} ({length / train_context:g}x): ppl {out[length]:.4f}  "
            f"[{len(wins)} window{'s' * (len(wins) > 1)}, {time.perf_counter() - t0:.1f} s]"
        )
    return out


def engine_nll(llm: Any) -> WindowNLL:
    """Window NLLs from an offline vLLM engine (``vllm.LLM``)."""
    from vllm import SamplingParams

    # flat_logprobs: a few flat lists per window instead of one dict per token (32K of them).
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False)

    def nll(wins: list[list[int]]) -> list[float]:
        outs = llm.generate([{"prompt_token_ids": w} for w in wins], params, use_tqdm=False)
        sums = []
        for w, o in zip(wins, outs, strict=True):
            lp = o.prompt_logprobs  # position 0 has none; then exactly the actual token at each position
            if len(lp.token_ids) != len(w) - 1 or lp.token_ids != w[1:]:
                raise RuntimeError("the engine's prompt log-probabilities are not those of the window's tokens")
            sums.append(-sum(lp.logprobs))
        return sums

    return nll


def server_nll(
    base_url: str, model: str, api_key: str | None = None, concurrency: int = 4, timeout_s: float = 3600.0
) -> WindowNLL:
    """Window NLLs from a running OpenAI-compatible vLLM server (``prompt_logprobs`` on /v1/completions)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(client: Any, gate: asyncio.Semaphore, w: list[int]) -> float:
        body = {"model": model, "prompt": w, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        async with gate:
            r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {r.status_code}: {r.text[:500]}")
        plp = r.json()["choices"][0].get("prompt_logprobs")
        if not plp or len(plp) != len(w):
            raise RuntimeError(
                f"{base_url} returned no prompt_logprobs for a {len(w)}-token window (is it a vLLM server?)"
            )
        return -sum(plp[i][str(t)]["logprob"] for i, t in enumerate(w) if i > 0)

    async def run(wins: list[list[int]]) -> list[float]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as client:
            return list(await asyncio.gather(*(one(client, gate, w) for w in wins)))

    return lambda wins: asyncio.run(run(wins))


def parse_lengths(text: str, train_context: int | None) -> list[int]:
    """'1x,2x,4x' (multiples of train_context) or plain token counts '2048,4096'."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part.endswith("x"):
            if not train_context:
                raise ValueError(f"length {part!r} is a multiple of L_train, which is unknown here: give token counts")
            out.append(int(float(part[:-1]) * train_context))
        else:
            out.append(int(part))
        if out[-1] < 2:
            raise ValueError(f"length {part!r}: a window needs at least 2 tokens")
    return out


def heldout_tokens_for(tokenizer_dir: Any, source: str, heldout_docs: int, longest: int) -> list[int]:
    """Held-out tokens of ``source`` (its first documents, as recalibration holds them out), enough for ``longest``."""
    from transformers import AutoTokenizer

    from .config import DataConfig
    from .data import heldout_tokens

    tokens = heldout_tokens(
        DataConfig(source=source, heldout_docs=heldout_docs), AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    if len(tokens) < longest:
        raise ValueError(
            f"held-out text has {len(tokens)} tokens, fewer than the longest length {longest}; "
            "hold out more documents (--heldout-docs) or measure shorter lengths"
        )
    return tokens


def add_measurement_args(p: Any, default_lengths: str, checkpoint_help: str) -> None:
    """The arguments fit_beta and evaluate share (vLLM's engine arguments come with them)."""
    from .engine import add_engine_args

    p.add_argument("checkpoint", nargs="?", default=None, help=checkpoint_help)
    p.add_argument("--data", required=True, help="held-out text source (same forms as recalibration.run --data)")
    p.add_argument(
        "--lengths",
        default=default_lengths,
        help=f"multiples of L_train (2x) or token counts (default: {default_lengths})",
    )
    p.add_argument("--windows", type=int, default=4, help="windows per length (default: 4)")
    p.add_argument(
        "--heldout-docs", type=int, default=2, help="documents held out at the start of the source (default: 2)"
    )
    add_engine_args(p)  # vLLM's own groups (ModelConfig, ParallelConfig, CacheConfig, ...)


def checkpoint_of(args: Any, prog: str) -> str:
    """The positional CHECKPOINT or vLLM's --model (an alias, a directory or a hub id), resolved as drope-server does."""
    from server.config import model_path

    given = [x for x in (args.checkpoint, args.model) if x]
    if not given:
        raise ValueError(f"{prog}: give the checkpoint (positional, or --model)")
    if len(set(given)) > 1:
        raise ValueError(f"{prog}: the positional checkpoint and --model name different models")
    return model_path(given[0])


def save_plot(
    path: Any,
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    title: str = "",
    vline: tuple[float, str] | None = None,
    log_axes: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if vline:
        ax.axvline(vline[0], color="grey", linestyle="--", label=vline[1])
    if log_axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json_atomic(path: Any, data: Any) -> None:
    """Write JSON beside ``path`` and rename it into place: a reader never sees half a file."""
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    # mkstemp makes the file private (0600); keep the mode the file had (or the umask's default), so a
    # server running as another user can still read a config.json that fit_beta rewrote.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask)
    os.replace(tmp, path)
