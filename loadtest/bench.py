"""Load test any OpenAI-compatible server with vLLM's own benchmark engine, on prose prompts.

    python -m loadtest.bench --base-url http://127.0.0.1:8000 [--model NAME] \\
        --input-len 1024 --output-len 128 --num-prompts 200 --max-concurrency 16 \\
        [--request-rate 4 [--burstiness 1]] [--goodput ttft:2000 tpot:100] [--endpoint completions|chat] \\
        [--compare http://127.0.0.1:8001 --model2 NAME2] [--out result.json]

Sending, streaming, arrivals (Poisson, or gamma with --burstiness), warm-ups and every metric are
`vllm bench serve`'s: each server is driven by `vllm.benchmarks.serve.benchmark()` with the arguments
`vllm bench serve` passes for the same flags, and summarised by its `calculate_metrics`. vLLM's own
report goes to stderr. vllm bench serve's flag names work (--random-input-len, --random-output-len,
--random-range-ratio, --num-prompts, --num-warmups, --temperature, --burstiness, --goodput).

What vLLM lacks and this adds:
- prompts of real prose (the Paul Graham essays) cut to exact lengths in the server's own tokens,
  asked of its /tokenize (no local tokenizer or model files), lengths drawn as vLLM's random dataset
  draws them for the same --seed; sent as token ids (completions) or text (chat);
- --compare: the same requests and arrival times against a second server, side by side with ratios;
- the summary table, and with --out the results JSON (command, server /v1/models cards, versions,
  every request's record) and a latency-CDF plot next to it;
- Ctrl-C stops at once and summarises what finished (requests in flight count as failed);
- --duration: at most duration x rate requests (vLLM's arrivals end at exactly n / rate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import platform
import random
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .endpoint import Endpoint, EndpointError, ServerTokenizer, connect, run_info
from .text import corpus_text

if TYPE_CHECKING:
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFunc, RequestFuncInput, RequestFuncOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = [50.0, 90.0, 99.0]
BACKENDS = {"completions": ("openai", "/completions"), "chat": ("openai-chat", "/chat/completions")}
CANCELLED = "cancelled by Ctrl-C before it finished"


@dataclass(frozen=True)
class Spec:
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.0
    lengths_file: str | None = None
    num_requests: int = 100
    duration: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 2
    endpoint: str = "completions"
    seed: int = 0
    ignore_eos: bool = True
    temperature: float | None = None  # None: the server's default, as vllm bench serve (it no longer sends 0)

    def __post_init__(self) -> None:
        for ok, msg in [
            (self.input_len >= 1 and self.output_len >= 1, "--input-len and --output-len must be at least 1"),
            (0 <= self.range_ratio < 1, "--range-ratio must be in [0, 1), as vLLM's"),
            (self.num_requests >= 1, "--num-prompts must be at least 1"),
            (self.request_rate > 0 and self.burstiness > 0, "--request-rate and --burstiness must be positive"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "--max-concurrency must be at least 1"),
            (self.warmup >= 0, "--num-warmups must not be negative"),
            (self.endpoint in BACKENDS, f"--endpoint must be one of {sorted(BACKENDS)}"),
            (
                self.duration is None or (self.duration > 0 and math.isfinite(self.request_rate)),
                "--duration caps the requests sent at --request-rate: it needs a finite rate",
            ),
        ]:
            if not ok:
                raise EndpointError(msg)

    @property
    def count(self) -> int:
        if self.duration is None:
            return self.num_requests
        return min(self.num_requests, max(1, math.floor(self.duration * self.request_rate)))

    @property
    def extra_body(self) -> dict[str, Any]:
        return {} if self.temperature is None else {"temperature": self.temperature}


def make_requests(spec: Spec, tok: ServerTokenizer, text: str) -> list[SampleRequest]:
    """Windows of the essays in the server's tokens, identical for every endpoint given the seed.

    A prompt's length counts the special tokens the server adds (vLLM's convention); a token-id prompt
    carries the start tokens itself, as the server would put them before text."""
    import numpy as np
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.datasets.utils import get_sampling_params

    rng = np.random.default_rng(spec.seed)  # first draws: the lengths, as vLLM's random dataset
    n_special = tok.num_special_tokens_to_add()
    if spec.lengths_file:
        rows = [json.loads(x) for x in Path(spec.lengths_file).read_text().splitlines() if x.strip()]
        pairs = [(int(r["input_len"]) - n_special, int(r["output_len"])) for r in rows]
        lengths = [pairs[i % len(pairs)] for i in range(spec.count)]
    else:
        # It reads only these two of a tokenizer; vocab_size bounds the offsets it draws last for vLLM's
        # random tokens, which prose does not use.
        lengths_only = SimpleNamespace(num_special_tokens_to_add=lambda: n_special, vocab_size=1)
        ins, outs, _ = get_sampling_params(
            rng, spec.count, spec.range_ratio, spec.input_len, spec.output_len, lengths_only
        )
        lengths = list(zip(ins.tolist(), outs.tolist(), strict=True))
    if min(n for n, _ in lengths) < 1 or min(n for _, n in lengths) < 1:
        raise EndpointError(
            f"every request needs at least one output token and one prompt token besides "
            f"the {n_special} special tokens the server adds"
        )
    longest = max(n for n, _ in lengths)
    ids = tok.encode(text[: 8 * longest + 20_000])  # ~4 characters a token: several windows' worth
    ids = ids * (longest // max(1, len(ids)) + 1)
    start = tok.start_tokens() if spec.endpoint == "completions" else []
    prefix = f"loadtest-{uuid.uuid4().hex[:8]}-"  # as vLLM's --request-id-prefix: unique on a shared server
    reqs = []
    for i, (n, n_out) in enumerate(lengths):
        at = int(rng.integers(0, len(ids) - n + 1))
        window = ids[at : at + n]
        reqs.append(
            SampleRequest(
                prompt=start + window if spec.endpoint == "completions" else tok.decode(window),
                prompt_len=n + n_special,
                expected_output_len=n_out,
                request_id=prefix + str(i),
            )
        )
    return reqs


class Recorder:
    """vLLM's request function, keeping each measured request's output as it finishes: Ctrl-C cancels
    benchmark() and with it the outputs it gathers. Warm-ups pass unrecorded: vLLM sends them without
    the sample's request_id."""

    def __init__(self, func: RequestFunc, order: list[str]):
        self.func, self.order = func, order
        self.sent: dict[str, RequestFuncInput] = {}
        self.done: dict[str, RequestFuncOutput] = {}
        self.first_sent: float | None = None

    async def __call__(self, request_func_input: RequestFuncInput, session, pbar=None) -> RequestFuncOutput:
        rid = request_func_input.request_id
        if rid is not None:
            self.first_sent = self.first_sent or time.perf_counter()
            self.sent[rid] = request_func_input
        out = await self.func(request_func_input=request_func_input, session=session, pbar=pbar)
        if rid is not None:
            self.done[rid] = out
        return out

    def outputs(self) -> list[RequestFuncOutput]:
        """The sent requests in benchmark()'s order, so that means sum in its order, to the last bit."""
        from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

        return [
            self.done.get(rid) or RequestFuncOutput(prompt_len=self.sent[rid].prompt_len, error=CANCELLED)
            for rid in self.order
            if rid in self.sent
        ]


async def run_load(
    ep: Endpoint,
    spec: Spec,
    requests: list[SampleRequest],
    progress: bool = True,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One server under vLLM's benchmark(), called as `vllm bench serve` calls it for these flags."""
    import numpy as np
    from vllm.benchmarks import serve
    from vllm.benchmarks.lib.endpoint_request_func import ASYNC_REQUEST_FUNCS
    from vllm.utils.gc_utils import freeze_gc_heap

    backend, path = BACKENDS[spec.endpoint]
    recorder = Recorder(ASYNC_REQUEST_FUNCS[backend], [r.request_id for r in requests])
    key = f"loadtest-{backend}-{id(recorder)}"
    tokenizer = ServerTokenizer(ep)  # counts a stream's tokens when a server sends no usage
    loop = asyncio.get_running_loop()
    # benchmark() takes its request function by backend name from vLLM's registry: the recorder is
    # registered there for this run only.
    ASYNC_REQUEST_FUNCS[key] = recorder
    try:
        random.seed(spec.seed)  # as `vllm bench serve --seed`: numpy's global RNG draws the arrival times
        np.random.seed(spec.seed)
        freeze_gc_heap()
        run = asyncio.ensure_future(
            serve.benchmark(
                task_type=serve.TaskType.GENERATION,
                endpoint_type=key,
                api_url=ep.base_url + path,
                base_url=ep.base_url.removesuffix("/v1"),
                model_id=ep.model,
                model_name=None,
                tokenizer=tokenizer,
                input_requests=requests,
                logprobs=None,
                request_rate=spec.request_rate,
                burstiness=spec.burstiness,
                disable_tqdm=not progress,
                num_warmups=spec.warmup,
                profile=False,
                selected_percentile_metrics=list(METRICS),
                selected_percentiles=PERCENTILES,
                ignore_eos=spec.ignore_eos,
                goodput_config_dict=goodput or {},
                max_concurrency=spec.max_concurrency,
                lora_modules=None,
                extra_headers=ep.headers or None,
                extra_body=spec.extra_body,
                ready_check_timeout_sec=0,
            )
        )
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            loop.add_signal_handler(signal.SIGINT, run.cancel)
        with contextlib.redirect_stdout(sys.stderr):  # vLLM's report; stdout keeps our table
            await asyncio.wait({run})
            interrupted = run.cancelled()
            if interrupted:  # benchmark() closes its aiohttp session at its end only: leave it to the GC quietly
                loop.set_exception_handler(
                    lambda lp, ctx: (
                        None if ctx.get("message", "").startswith("Unclosed") else lp.default_exception_handler(ctx)
                    )
                )
            duration = (
                max(time.perf_counter() - (recorder.first_sent or time.perf_counter()), 1e-9)
                if interrupted
                else run.result()["duration"]
            )
            outputs = recorder.outputs()
            metrics, _ = serve.calculate_metrics([], outputs, duration, tokenizer, PERCENTILES, goodput or {})
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
        ASYNC_REQUEST_FUNCS.pop(key)
        gc.unfreeze()
    return {
        "duration": duration,
        **asdict(metrics),
        "interrupted": interrupted,
        "samples": [asdict(o) for o in outputs],
    }


def stat(r: dict[str, Any], metric: str, name: str) -> float:
    if name == "mean":
        return r[f"mean_{metric}_ms"]
    return dict(r[f"percentiles_{metric}_ms"])[float(name[1:])]


def plot_latency_cdf(results: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("ttft", "itl", "latency"), strict=True):
        for name, r in results:
            ok = [s for s in r["samples"] if s["success"]]
            xs = sorted(1000 * x for s in ok for x in (s[metric] if metric == "itl" else [s[metric]]))
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        ax.set_xlabel(f"{'E2EL' if metric == 'latency' else metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(results: list[tuple[str, dict[str, Any]]], spec: Spec, command: str) -> str:
    lines = [
        "",
        "=" * 20 + " loadtest.bench " + "=" * 20,
        f"command : {command}",
        f"machine : {platform.machine()}, {platform.node()}",
        f"spec    : {spec.endpoint}, input {spec.input_len} (range ratio {spec.range_ratio}), output {spec.output_len}, "
        f"{spec.count} requests, rate {spec.request_rate} (burstiness {spec.burstiness}), "
        f"max concurrency {spec.max_concurrency}",
    ]
    for i, (name, _) in enumerate(results, 1):
        lines.append(f"server {i}: {name}")
    head = f"{'metric':<30}" + "".join(f"{'server ' + str(i):>24}" for i in range(1, len(results) + 1))
    lines.append(head + ("   ratio 2/1" if len(results) == 2 else ""))
    rows = [
        ("completed", "completed"),
        ("failed", "failed"),
        ("duration (s)", "duration"),
        ("request throughput (req/s)", "request_throughput"),
        *([("request goodput (req/s)", "request_goodput")] if results[0][1]["goodput_slo_ms"] else []),
        ("output throughput (tok/s)", "output_throughput"),
        ("peak output throughput (tok/s)", "max_output_tokens_per_s"),
        ("total throughput (tok/s)", "total_token_throughput"),
    ]
    rows += [(f"{m.upper()} {s} (ms)", (m, s)) for m in METRICS for s in ("mean", "p50", "p90", "p99")]
    for label, key in rows:
        vals = [stat(r, *key) if isinstance(key, tuple) else r[key] for _, r in results]
        line = f"{label:<30}" + "".join(f"{v:>24}" if isinstance(v, int) else f"{v:>24.2f}" for v in vals)
        if len(vals) == 2 and vals[0]:
            line += f"   {vals[1] / vals[0]:>8.2f}"
        lines.append(line)
    for name, r in results:
        errors: dict[str, int] = {}
        for s in r["samples"]:
            if not s["success"]:
                last = (s["error"].strip().splitlines() or ["no reason given"])[-1][:200]
                errors[last] = errors.get(last, 0) + 1
        if errors:
            lines.append(f"errors {name}: {errors}")
    lines.append("=" * 56)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the one the server lists)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    p.add_argument(
        "--endpoint",
        choices=sorted(BACKENDS),
        default="completions",
        help="completions (vLLM's backend openai) or chat (openai-chat) (default: completions)",
    )
    p.add_argument(
        "--input-len",
        "--random-input-len",
        type=int,
        default=512,
        help="prompt tokens, the server's special tokens included (default: 512)",
    )
    p.add_argument(
        "--output-len", "--random-output-len", type=int, default=128, help="output tokens, EOS ignored (default: 128)"
    )
    p.add_argument(
        "--range-ratio",
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="0: fixed lengths; r in (0, 1): uniform in [1 - r, 1 + r] x the lengths, as vLLM's (default: 0)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature sent with every request (default: none sent, the server's default)",
    )
    p.add_argument("--lengths-file", default=None, help="JSONL of {input_len, output_len}, cycled")
    p.add_argument("--num-requests", "--num-prompts", type=int, default=100, help="measured requests (default: 100)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="send at most duration x --request-rate requests (needs a finite rate)",
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="arrivals per second (default: inf, all at once)"
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="1: Poisson arrivals; else gamma, as vLLM's (default: 1)"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, as vllm bench serve: ttft:MS tpot:MS e2el:MS",
    )
    p.add_argument(
        "--warmup",
        "--num-warmups",
        type=int,
        default=2,
        help="unmeasured warm-up requests, vLLM's: the first prompt, sent this many times (default: 2)",
    )
    p.add_argument("--respect-eos", action="store_true", help="stop at EOS instead of always generating --output-len")
    p.add_argument("--seed", type=int, default=0, help="prompt and arrival seed (default: 0)")
    p.add_argument("--compare", default=None, help="second server: same requests and arrivals, results side by side")
    p.add_argument("--model2", default=None, help="model name on the second server (default: its only model)")
    p.add_argument("--api-key2", default=None, help="bearer token for the second server")
    p.add_argument("--out", default=None, help="write the JSON results here, and a latency CDF plot next to it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            from vllm import __version__ as vllm_version
            from vllm.benchmarks.serve import check_goodput_args
        except ImportError as e:
            from model_patches.config import VLLM_EXTRAS

            raise EndpointError(
                f"this is vLLM's benchmark engine, and vllm does not import ({e}): {VLLM_EXTRAS}"
            ) from None
        spec = Spec(
            input_len=args.input_len,
            output_len=args.output_len,
            range_ratio=args.range_ratio,
            lengths_file=args.lengths_file,
            num_requests=args.num_requests,
            duration=args.duration,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            warmup=args.warmup,
            endpoint=args.endpoint,
            seed=args.seed,
            ignore_eos=not args.respect_eos,
            temperature=args.temperature,
        )
        goodput = check_goodput_args(args)
        targets = [connect(args.base_url, args.model, args.api_key)]
        if args.compare:
            targets.append(connect(args.compare, args.model2, args.api_key2))
        requests = make_requests(spec, ServerTokenizer(targets[0]), corpus_text())
        longest = max(r.prompt_len + r.expected_output_len for r in requests)
        for ep in targets:
            ep.check_length(longest, "the longest request")
    except (EndpointError, FileNotFoundError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"loadtest.bench: error: {e}", file=sys.stderr)
        return 2
    results = []
    for ep in targets:
        print(f"benchmarking {ep.model} at {ep.base_url}", file=sys.stderr)
        res = asyncio.run(run_load(ep, spec, requests, not args.quiet, goodput))
        results.append((f"{ep.model}@{ep.base_url}", {**res, "goodput_slo_ms": goodput}))
        if res["interrupted"]:
            print("interrupted: partial results", file=sys.stderr)
            break
    print(
        format_summary(
            results, spec, " ".join(["python -m loadtest.bench", *(argv if argv is not None else sys.argv[1:])])
        )
    )
    if args.out:
        out = Path(args.out)
        info = run_info("loadtest.bench", argv)
        info["versions"]["vllm"] = vllm_version
        servers = {
            f"server{i}": {"name": name, "card": ep.card, **r}
            for i, ((name, r), ep) in enumerate(zip(results, targets, strict=False), 1)
        }
        out.write_text(
            json.dumps(
                {**info, "spec": asdict(spec), "goodput_slo_ms": goodput, "results": servers}, indent=2, default=str
            )
        )
        plot_latency_cdf(results, out.with_suffix(".cdf.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
