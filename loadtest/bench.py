"""Load test any OpenAI-compatible server; metrics defined as in `vllm bench serve`.

    python -m loadtest.bench --base-url http://127.0.0.1:8000 [--model NAME] \\
        --input-len 1024 --output-len 128 --num-prompts 200 --max-concurrency 16 \\
        [--request-rate 4] [--goodput ttft:2000 tpot:100] [--endpoint completions|chat] \\
        [--compare http://127.0.0.1:8001 --model2 NAME2] [--out result.json]

vllm bench serve's flag names work too (--random-input-len, --random-output-len,
--random-range-ratio, --num-prompts, --num-warmups, --temperature, --goodput).

Prompts are windows of real prose (the Paul Graham essays) cut to exact token
counts in the server's own tokens (asked of its /tokenize: no local tokenizer, no
torch) and sent as token ids (completions) or text (chat). Requests arrive as a
Poisson process at --request-rate (default: all at once) with at most
--max-concurrency in flight. --warmup requests run first and are not counted.

Definitions (vllm bench serve's, vllm/benchmarks/serve.py): TTFT = send -> first
chunk with choices (even with empty text); TPOT = (E2EL - TTFT) / (output tokens - 1)
per request with > 1 token; ITL = gaps between chunks with choices; E2EL = send ->
last chunk with choices; a stream without one is a failure; output tokens from the
server's streamed usage; goodput = requests meeting every --goodput SLO per second.
Throughputs are over the wall time of the measured requests. Ctrl-C stops early and
prints what was measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from .endpoint import Endpoint, EndpointError, ServerTokenizer, StreamResult, connect, run_info, stream_request
from .text import corpus_text


@dataclass(frozen=True)
class Spec:
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.0   # 0: fixed lengths; r > 0: uniform in len * [1 - r, 1 + r], as vLLM's random dataset
    lengths_file: str | None = None
    num_requests: int = 100
    duration: float | None = None
    request_rate: float = math.inf
    max_concurrency: int | None = None
    warmup: int = 2
    endpoint: str = "completions"
    seed: int = 0
    ignore_eos: bool = True
    temperature: float | None = None  # None: the server's default, as vllm bench serve (it no longer sends 0)

    @property
    def body_extra(self) -> dict[str, Any]:
        return {} if self.temperature is None else {"temperature": self.temperature}


def make_lengths(spec: Spec, rng: random.Random) -> list[tuple[int, int]]:
    if spec.lengths_file:
        rows = [json.loads(x) for x in Path(spec.lengths_file).read_text().splitlines() if x.strip()]
        pairs = [(int(r["input_len"]), int(r["output_len"])) for r in rows]
        return [pairs[i % len(pairs)] for i in range(spec.num_requests)]
    out = []
    for _ in range(spec.num_requests):
        if spec.range_ratio > 0:
            lo = max(1, int(spec.input_len * (1 - spec.range_ratio)))
            hi = max(lo, int(spec.input_len * (1 + spec.range_ratio)))
            olo = max(1, int(spec.output_len * (1 - spec.range_ratio)))
            ohi = max(olo, int(spec.output_len * (1 + spec.range_ratio)))
            out.append((rng.randint(lo, hi), rng.randint(olo, ohi)))
        else:
            out.append((spec.input_len, spec.output_len))
    return out


def make_requests(spec: Spec, tok: ServerTokenizer, text: str) -> list[tuple[Any, int, int]]:
    """[(prompt, input tokens, max output tokens)]: windows of the essays in the server's tokens,
    identical for every endpoint given the seed."""
    rng = random.Random(spec.seed)
    lengths = make_lengths(spec, rng)
    longest = max((n for n, _ in lengths), default=1)
    ids = tok.encode(text[: 8 * longest + 20_000])  # ~4 characters a token: several windows' worth
    ids = ids * (longest // max(1, len(ids)) + 1)
    # Token-id prompts carry the start tokens (BOS) a text prompt would get from the server, within n_in
    # (as vLLM's random dataset leaves room for the special tokens).
    bos = tok.start_tokens() if spec.endpoint == "completions" else []
    reqs = []
    for n_in, n_out in lengths:
        n = max(1, n_in - len(bos))
        at = rng.randrange(0, len(ids) - n + 1)
        window = ids[at : at + n]
        reqs.append((bos + window if spec.endpoint == "completions" else tok.decode(window), n_in, n_out))
    return reqs


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    s = sorted(xs)

    def pct(q: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(s) - 1) * q / 100
        f, c = math.floor(k), math.ceil(k)
        return s[f] + (s[c] - s[f]) * (k - f)

    return {"mean": sum(s) / len(s), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[StreamResult], input_lens: list[int], wall: float,
              goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """vllm bench serve's calculate_metrics (vllm/benchmarks/serve.py), checked against it in the tests.

    A request counts once it streamed a chunk with choices; its output length is the server's usage
    count, or 1 when the server sent none (vLLM without a tokenizer). TPOT is averaged over requests
    with more than one token; for goodput a one-token request has TPOT 0, and a request is good when
    it meets every SLO given (milliseconds)."""
    ok = [r for r in results if r.ok]
    out_lens = [r.output_tokens or 1 for r in ok]
    tpots = [(r.latency - r.ttft) / (n - 1) if n > 1 else 0.0 for r, n in zip(ok, out_lens, strict=True)]
    slo = {k: v / 1000 for k, v in (goodput or {}).items()}
    good = sum(1 for r, t in zip(ok, tpots, strict=True) if r.ttft <= slo.get("ttft", math.inf)
               and t <= slo.get("tpot", math.inf) and r.latency <= slo.get("e2el", math.inf))
    tpot = [t for t, n in zip(tpots, out_lens, strict=True) if n > 1]
    out_tokens = sum(out_lens)
    in_tokens = sum(r.prompt_tokens or n for r, n in zip(results, input_lens, strict=True) if r.ok)
    wall = max(wall, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": wall,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / wall,
        "request_goodput": good / wall if goodput else None,
        "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "e2el_s": percentiles([r.latency for r in ok]),
    }


async def run_load(ep: Endpoint, spec: Spec, requests: list[tuple[Any, int, int]], progress: bool = True,
                   goodput: dict[str, float] | None = None) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=(spec.max_concurrency or len(requests)) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        for prompt, _, n_out in requests[: spec.warmup]:
            await stream_request(client, ep, spec.endpoint, prompt, min(n_out, 16), ignore_eos=spec.ignore_eos,
                                 extra=spec.body_extra)

        sem = asyncio.Semaphore(spec.max_concurrency or len(requests) or 1)
        results: list[StreamResult | None] = [None] * len(requests)
        rng = random.Random(spec.seed + 1)
        start = time.perf_counter()
        done = 0

        async def one(i: int, prompt: Any, n_out: int) -> None:
            nonlocal done
            async with sem:
                try:
                    results[i] = await stream_request(client, ep, spec.endpoint, prompt, n_out,
                                                      ignore_eos=spec.ignore_eos, extra=spec.body_extra)
                except Exception as e:  # anything unforeseen is a failed request, not a lost one
                    results[i] = StreamResult(error=f"{type(e).__name__}: {e}"[:200])
            done += 1

        tasks: list[asyncio.Task] = []
        bar = _progress(len(requests)) if progress else None
        # Ctrl-C stops sending and cancels what is in flight; what finished is summarised.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
        try:
            send_at = start  # arrivals on an absolute schedule, so event-loop delays do not add up
            for i, (prompt, _, n_out) in enumerate(requests):
                if stop.is_set() or (spec.duration is not None and time.perf_counter() - start > spec.duration):
                    break
                tasks.append(asyncio.create_task(one(i, prompt, n_out)))
                if math.isfinite(spec.request_rate):
                    send_at += rng.expovariate(spec.request_rate)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=max(0.0, send_at - time.perf_counter()))
            pending = set(tasks)
            while pending and not stop.is_set():
                _, pending = await asyncio.wait(pending, timeout=0.5)
                if bar:
                    bar(done, time.perf_counter() - start)
                if spec.duration is not None and time.perf_counter() - start > spec.duration * 2 + 60:
                    break  # bounded in time even if the server stalls
        finally:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGINT)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar:
                bar(done, time.perf_counter() - start, final=True)
        wall = time.perf_counter() - start
    for i in range(len(tasks)):  # sent, then cancelled by Ctrl-C or the time bound: failed, not lost
        if results[i] is None:
            results[i] = StreamResult(error="cancelled before it finished")
    finished = [(r, requests[i][1]) for i, r in enumerate(results) if r is not None]
    summary = summarize([r for r, _ in finished], [n for _, n in finished], wall, goodput)
    summary["samples_s"] = {"ttft": [r.ttft for r, _ in finished if r.ok], "e2el": [r.latency for r, _ in finished if r.ok],
                            "itl": [x for r, _ in finished if r.ok for x in r.itl]}
    summary["sent"] = len(tasks)
    summary["interrupted"] = stop.is_set()
    return summary


def _progress(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr)

    def show(done: int, elapsed: float, final: bool = False) -> None:
        bar.update(done - bar.n)
        if final:
            bar.close()

    return show


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """vllm bench serve's --goodput KEY:MS ... (ttft, tpot, e2el)."""
    out = {}
    for pair in pairs or []:
        key, _, val = pair.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not val:
            raise EndpointError(f"--goodput wants ttft:MS tpot:MS e2el:MS, got {pair!r}")
        out[key] = float(val)
    return out


def plot_latency_cdf(results: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("ttft", "itl", "e2el"), strict=False):
        for name, r in results:
            xs = sorted(1000 * x for x in r["samples_s"][metric])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(results: list[tuple[str, dict[str, Any]]], spec: Spec, command: str) -> str:
    lines = ["", "=" * 20 + " loadtest.bench " + "=" * 20, f"command : {command}",
             f"machine : {platform.machine()}, {platform.node()}",
             f"spec    : {spec.endpoint}, input {spec.input_len} (range ratio {spec.range_ratio}), output {spec.output_len}, "
             f"{spec.num_requests} requests, rate {spec.request_rate}, max concurrency {spec.max_concurrency}"]
    for i, (name, _) in enumerate(results, 1):
        lines.append(f"server {i}: {name}")
    head = f"{'metric':<28}" + "".join(f"{'server ' + str(i):>24}" for i in range(1, len(results) + 1))
    lines.append(head + ("   ratio 2/1" if len(results) == 2 else ""))
    rows = [("completed", "completed", 1), ("failed", "failed", 1), ("duration (s)", "duration_s", 1),
            ("request throughput (req/s)", "request_throughput", 1),
            *([("request goodput (req/s)", "request_goodput", 1)] if results[0][1]["request_goodput"] is not None else []), ("output throughput (tok/s)", "output_throughput", 1),
            ("total throughput (tok/s)", "total_token_throughput", 1)]
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2el_s"):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{metric[:-2].upper()} {stat} (ms)", (metric, stat), 1000))
    for label, key, scale in rows:
        vals = [(r[key[0]][key[1]] if isinstance(key, tuple) else r[key]) * scale for _, r in results]
        line = f"{label:<28}" + "".join(f"{v:>24.2f}" if isinstance(v, float) else f"{v:>24}" for v in vals)
        if len(vals) == 2 and vals[0]:
            line += f"   {vals[1] / vals[0]:>8.2f}"
        lines.append(line)
    for name, r in results:
        if r["errors"]:
            lines.append(f"errors {name}: {r['errors']}")
    lines.append("=" * 56)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the one the server lists)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions", help="(default: completions)")
    p.add_argument("--input-len", "--random-input-len", type=int, default=512, help="prompt tokens (default: 512)")
    p.add_argument("--output-len", "--random-output-len", type=int, default=128, help="output tokens, EOS ignored (default: 128)")
    p.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                   help="0: fixed lengths; r > 0: uniform in [1 - r, 1 + r] x the lengths (default: 0)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature sent with every request (default: none sent, the server's default)")
    p.add_argument("--lengths-file", default=None, help="JSONL of {input_len, output_len}, cycled")
    p.add_argument("--num-requests", "--num-prompts", type=int, default=100, help="measured requests (default: 100)")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, as vllm bench serve: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--warmup", "--num-warmups", type=int, default=2, help="unmeasured warm-up requests (default: 2)")
    p.add_argument("--respect-eos", action="store_true", help="stop at EOS instead of always generating --output-len")
    p.add_argument("--seed", type=int, default=0, help="prompt and arrival seed (default: 0)")
    p.add_argument("--compare", default=None, help="second server: same spec, results side by side")
    p.add_argument("--model2", default=None, help="model name on the second server (default: its only model)")
    p.add_argument("--api-key2", default=None, help="bearer token for the second server")
    p.add_argument("--out", default=None, help="write the JSON results here, and a latency CDF plot next to it")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = Spec(input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio, lengths_file=args.lengths_file, num_requests=args.num_requests,
                duration=args.duration, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                warmup=args.warmup, endpoint=args.endpoint, seed=args.seed, ignore_eos=not args.respect_eos,
                temperature=args.temperature)
    try:
        targets = [connect(args.base_url, args.model, args.api_key)]
        if args.compare:
            targets.append(connect(args.compare, args.model2, args.api_key2))
        goodput = parse_goodput(args.goodput)
        requests = make_requests(spec, ServerTokenizer(targets[0]), corpus_text())
        longest = max(n_in + n_out for _, n_in, n_out in requests)
        for ep in targets:
            ep.check_length(longest, "the longest request")
    except (EndpointError, FileNotFoundError) as e:
        print(f"loadtest.bench: error: {e}", file=sys.stderr)
        return 2
    results = []
    for ep in targets:
        print(f"benchmarking {ep.model} at {ep.base_url}", file=sys.stderr)
        res = asyncio.run(run_load(ep, spec, requests, not args.quiet, goodput))
        results.append((f"{ep.model}@{ep.base_url}", res))
        if res["interrupted"]:
            print("interrupted: partial results", file=sys.stderr)
            break
    print(format_summary(results, spec, " ".join(["python -m loadtest.bench", *(argv if argv is not None else sys.argv[1:])])))
    if args.out:
        out = Path(args.out)
        cards = {name: ep.card for (name, _), ep in zip(results, targets, strict=False)}
        out.write_text(json.dumps({**run_info("loadtest.bench", argv), "spec": asdict(spec), "goodput_slo_ms": goodput,
                                   "cards": cards, "results": dict(results)}, indent=2, default=str))
        plot_latency_cdf(results, out.with_suffix(".cdf.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
