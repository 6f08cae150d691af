"""Needle in a haystack, and the RULER-style variants the DroPE paper reports, against any OpenAI server.

    python -m loadtest.niah --base-url http://127.0.0.1:8000 [--model NAME] \\
        --lengths 4096,8192,16384 --depths 0,0.25,0.5,0.75,1 --variants single,multikey,multiquery,multivalue \\
        [--trials 3] [--seed 0] [--compare http://127.0.0.1:8001 --model2 NAME2] [--out-dir niah-results]

Variants (needles are "One of the special magic numbers for <key> is: <7 digits>."):
  single      one needle at the depth; asked for its number
  multikey    four needles with different keys; asked for one of them (the one at the depth)
  multiquery  four needles with different keys; asked for all four numbers
  multivalue  four needles with the same key and different numbers; asked for all four
The first needle of every variant (the one asked about) sits at the requested
depth, 1.0 included; the others of a multi variant at (d + i/4) mod 1. Haystack: the Paul Graham essays. Prompts are built in token space
to exactly the requested length and sent as token ids to /v1/completions with greedy
decoding. A trial passes when every expected number appears in the answer (exact
match on the digits). Outputs results.json, a depth x length heatmap per variant
(heatmap_<variant>.png) and a summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .endpoint import Endpoint, EndpointError, connect, load_tokenizer
from .text import TokenCorpus

VARIANTS = ("single", "multikey", "multiquery", "multivalue")
N_MULTI = 4
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ADJ = ("elite", "quiet", "amber", "rapid", "gentle", "hollow", "silver", "brave", "crimson", "lucky", "frozen", "noble")
NOUN = ("butterfly", "harbor", "lantern", "meadow", "falcon", "glacier", "orchard", "compass", "violin", "canyon", "pebble", "comet")
INSTRUCTION = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"
ANSWER_LEAD = " The special magic number{s} for {keys} mentioned in the provided text {are}:"


@dataclass
class Trial:
    variant: str
    length: int
    depth: float
    seed: int
    prompt_ids: list[int]
    expected: list[str]
    needle_token_positions: list[int]  # index of each needle's first token in prompt_ids
    needles: list[str]
    question: str


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJ)}-{rng.choice(NOUN)}"


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def build_trial(corpus: TokenCorpus, variant: str, length: int, depth: float, seed: int) -> Trial:
    """A prompt of exactly ``length`` tokens with its needles at their depths."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{variant}/{length}/{depth}/{seed}")
    tok = corpus.tokenizer
    keys: list[str] = []
    while len(keys) < (1 if variant == "single" else N_MULTI):
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = [_value(rng) for _ in keys]
    if variant == "multivalue":
        keys = [keys[0]] * N_MULTI
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    # Needle 0 (the one every variant asks about) sits exactly at the requested depth,
    # 1.0 included; the others are spread a quarter apart, wrapping round.
    depths = [depth] + [(depth + i / N_MULTI) % 1.0 for i in range(1, 1 if variant == "single" else N_MULTI)]
    if variant in ("single", "multikey"):
        asked, expected = [keys[0]], [values[0]]
    elif variant == "multiquery":
        asked, expected = keys, values
    else:
        asked, expected = [keys[0]], values
    plural = len(expected) > 1
    question = (f"\n\nWhat {'are all the special magic numbers' if plural else 'is the special magic number'} for "
                f"{', '.join(asked)} mentioned in the provided text?"
                + ANSWER_LEAD.format(s="s" if plural else "", keys=", ".join(asked), are="are" if plural else "is"))

    head = tok.encode(INSTRUCTION, add_special_tokens=True)
    tail = tok.encode(question, add_special_tokens=False)
    needle_ids = [tok.encode(" " + n + " ", add_special_tokens=False) for n in needles]
    budget = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
    if budget < 16:
        raise ValueError(f"length {length} is too short for the {variant} question and needles")
    hay = corpus.prefix(budget)
    # Insert deepest-first so earlier insertion points stay valid; snap each point back
    # to the end of a sentence so a needle never splits one.
    points = sorted(((_sentence_end(tok, hay, round(d * budget)), i) for i, d in enumerate(depths)), reverse=True)
    body = list(hay)
    for at, i in points:
        body[at:at] = needle_ids[i]
    ids = head + body
    positions = [_find(ids, n) for n in needle_ids]
    ids += tail
    assert len(ids) == length, (len(ids), length)
    return Trial(variant, length, depth, seed, ids, expected, positions, needles, question)


def _sentence_end(tok: Any, ids: list[int], at: int) -> int:
    """The closest index <= at right after a token ending with '.', or at itself if none within 64 tokens."""
    for j in range(min(at, len(ids)), max(0, at - 64), -1):
        if tok.decode(ids[j - 1 : j]).rstrip().endswith((".", "\n")):
            return j
    return min(at, len(ids))


def _find(ids: list[int], sub: list[int]) -> int:
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i
    return -1


def score(answer: str, expected: list[str]) -> bool:
    """Exact match: every expected 7-digit number appears in the answer as a whole number."""
    import re

    found = set(re.findall(r"(?<!\d)\d{7}(?!\d)", answer))
    return all(v in found for v in expected)


async def run_trials(ep: Endpoint, trials: list[Trial], concurrency: int, max_tokens: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(client: httpx.AsyncClient, t: Trial) -> dict[str, Any]:
        nonlocal done
        async with sem:
            body = {"model": ep.model, "prompt": t.prompt_ids, "max_tokens": max_tokens, "temperature": 0.0}
            try:
                r = await client.post(f"{ep.base_url}/completions", json=body, headers=ep.headers)
                answer = r.json()["choices"][0]["text"] if r.status_code == 200 else ""
                error = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                answer, error = "", e.__class__.__name__
        done += 1
        print(f"\r  {done}/{len(trials)} trials", end="", file=sys.stderr, flush=True)
        return {"variant": t.variant, "length": t.length, "depth": t.depth, "seed": t.seed, "expected": t.expected,
                "answer": answer, "correct": error is None and score(answer, t.expected), "error": error}

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=10.0)) as client:
        out = await asyncio.gather(*[one(client, t) for t in trials])
    print(file=sys.stderr)
    return list(out)


def accuracy_table(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[float, float]]]:
    table: dict[str, dict[int, dict[float, list[bool]]]] = {}
    for r in rows:
        table.setdefault(r["variant"], {}).setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["correct"])
    return {v: {L: {d: sum(x) / len(x) for d, x in ds.items()} for L, ds in ls.items()} for v, ls in table.items()}


def plot_heatmaps(acc: dict, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for variant, by_len in acc.items():
        lengths = sorted(by_len)
        depths = sorted({d for ds in by_len.values() for d in ds})
        grid = [[by_len[L].get(d, float("nan")) for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{variant} - {title}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="exact-match accuracy")
        fig.tight_layout()
        path = out_dir / f"heatmap_{variant}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def format_table(accs: list[tuple[str, dict]]) -> str:
    lines = ["", "=" * 20 + " loadtest.niah " + "=" * 20]
    for i, (name, _) in enumerate(accs, 1):
        lines.append(f"server {i}: {name}")
    lines.append(f"{'variant':<12}{'length':>8}" + "".join(f"{'acc ' + str(i):>10}" for i in range(1, len(accs) + 1))
                 + ("     diff 2-1" if len(accs) == 2 else ""))
    first = accs[0][1]
    for variant in first:
        for L in sorted(first[variant]):
            vals = []
            for _, acc in accs:
                ds = acc.get(variant, {}).get(L, {})
                vals.append(sum(ds.values()) / len(ds) if ds else float("nan"))
            line = f"{variant:<12}{L:>8}" + "".join(f"{v:>10.2f}" for v in vals)
            if len(vals) == 2:
                line += f"     {vals[1] - vals[0]:+8.2f}"
            lines.append(line)
    lines.append("(accuracy averaged over depths and trials)")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _lengths(text: str) -> list[int]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.niah", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the one the server lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or id (default: the server's model root)")
    p.add_argument("--lengths", default="4096,8192", help="context lengths in tokens, comma list, 16k allowed (default: 4096,8192)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--variants", default="single", help=f"comma list of {', '.join(VARIANTS)} (default: single)")
    p.add_argument("--trials", type=int, default=1, help="trials per (variant, length, depth), new needles each (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="first trial seed (default: 0)")
    p.add_argument("--max-tokens", type=int, default=48, help="answer tokens (default: 48)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    p.add_argument("--haystack", default=None, help="directory of .txt files (default: the Paul Graham essays)")
    p.add_argument("--compare", default=None, help="second server, same trials, side by side")
    p.add_argument("--model2", default=None)
    p.add_argument("--api-key2", default=None)
    p.add_argument("--out-dir", default="niah-results", help="results.json and heatmaps go here (default: niah-results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        lengths, depths = _lengths(args.lengths), _floats(args.depths)
        bad = [v for v in variants if v not in VARIANTS] + [str(d) for d in depths if not 0 <= d <= 1]
        if bad:
            raise EndpointError(f"unknown variants or depths outside [0, 1]: {', '.join(bad)}")
        targets = [connect(args.base_url, args.model, args.api_key)]
        if args.compare:
            targets.append(connect(args.compare, args.model2, args.api_key2))
        for ep in targets:
            ep.check_length(max(lengths) + args.max_tokens, f"length {max(lengths)} + {args.max_tokens} answer tokens")
        corpus = TokenCorpus(load_tokenizer(targets[0], args.tokenizer), args.haystack)
        trials = [build_trial(corpus, v, L, d, args.seed + t)
                  for v in variants for L in lengths for d in depths for t in range(args.trials)]
    except (EndpointError, ValueError, FileNotFoundError) as e:
        print(f"loadtest.niah: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accs, everything = [], {}
    try:
        for i, ep in enumerate(targets, 1):
            print(f"{len(trials)} trials against {ep.model} at {ep.base_url}", file=sys.stderr)
            rows = asyncio.run(run_trials(ep, trials, args.concurrency, args.max_tokens))
            acc = accuracy_table(rows)
            sub = out_dir / f"server{i}" if len(targets) > 1 else out_dir
            sub.mkdir(parents=True, exist_ok=True)
            plot_heatmaps(acc, sub, f"{ep.model}")
            accs.append((f"{ep.model}@{ep.base_url}", acc))
            everything[f"server{i}"] = {"model": ep.model, "base_url": ep.base_url, "card": ep.card,
                                        "accuracy": {v: {str(L): {str(d): a for d, a in ds.items()} for L, ds in ls.items()}
                                                     for v, ls in acc.items()}, "trials": rows}
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    if not accs:
        return 130
    spec = {k: v for k, v in vars(args).items() if k not in ("api_key", "api_key2")}
    (out_dir / "results.json").write_text(json.dumps({"spec": spec, **everything}, indent=2))
    print(format_table(accs))
    print(f"results: {out_dir / 'results.json'}; heatmaps: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
