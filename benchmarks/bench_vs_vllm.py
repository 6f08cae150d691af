"""loadtest.bench vs `vllm bench serve`, both at once on one drope-server, --runs times.

Each run drives the server with both tools together in one event loop (as
tests/test_loadtest.py does once): vLLM's random prompts (different seeds, so neither
hits the other's prefix cache), lengths fixed or varied (--range-ratio), EOS ignored,
greedy, --concurrency each.
Printed per run: our mean / vLLM's mean for TTFT, TPOT, ITL, E2EL and request
throughput, and each client's own time from starting a request to having it on the
wire (httpx / aiohttp request tracing), which is inside TTFT for both tools.

    .venv/bin/python benchmarks/bench_vs_vllm.py [--runs 4] [--num-prompts 192]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, start, stop  # noqa: E402

sys.path.insert(0, str(ROOT))
PRESEND: dict[str, list[float]] = {"ours": [], "vllm": []}


def trace_clients() -> None:
    """Record, per request, the time from the client call to the request body being sent."""
    stream = httpx.AsyncClient.stream

    def traced_stream(self, method, url, **kw):
        t0 = time.perf_counter()

        async def trace(name, info):
            if name == "http11.send_request_body.complete":
                PRESEND["ours"].append(time.perf_counter() - t0)

        return stream(self, method, url, extensions={"trace": trace}, **kw)

    httpx.AsyncClient.stream = traced_stream

    async def on_start(session, ctx, params):
        ctx.t0 = time.perf_counter()

    async def on_sent(session, ctx, params):  # the JSON body goes out as one chunk
        if ctx.t0 is not None:
            PRESEND["vllm"].append(time.perf_counter() - ctx.t0)
            ctx.t0 = None

    init = aiohttp.ClientSession.__init__

    def traced_init(self, *a, **kw):
        tc = aiohttp.TraceConfig()
        tc.on_request_start.append(on_start)
        tc.on_request_chunk_sent.append(on_sent)
        init(self, *a, trace_configs=[tc], **kw)

    aiohttp.ClientSession.__init__ = traced_init


async def run_both(base: str, tokenizer_dir: Path, num_prompts: int, concurrency: int, input_len: int,
                   output_len: int, range_ratio: float = 0.0, request_rate: float = math.inf,
                   seeds: tuple[int, int] = (1, 2)) -> tuple[dict, dict]:
    """-> (ours, vLLM's) results: both tools at once in this event loop, each with its own random prompts (vLLM's
    sampler, one seed each, so neither hits the other's prefix cache). vLLM's side is `benchmark()`, what
    `vllm bench serve` runs once its set-up is done, with the arguments its `main_async` passes for
    `--backend openai --ignore-eos --temperature 0 --num-warmups 2`. That set-up is done here first, for
    both tools: under `main_async`, its prompt alignment (a /tokenize call per prompt) and full garbage
    collections ran in the shared loop while our first requests were timed. The alignment is skipped: the
    server tokenises with the same tokenizer, so it changes nothing."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import TaskType, add_cli_args, benchmark
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.gc_utils import freeze_gc_heap

    from loadtest import bench
    from loadtest.endpoint import connect

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    tokenizer = get_tokenizer(str(tokenizer_dir))
    prompts = []
    for seed in seeds:
        args = parser.parse_args(["--dataset-name", "random", "--random-input-len", str(input_len),
                                  "--random-output-len", str(output_len), "--random-range-ratio", str(range_ratio),
                                  "--num-prompts", str(num_prompts), "--seed", str(seed), "--model", "m"])
        prompts.append(get_samples(args, tokenizer))
    ep = await asyncio.to_thread(connect, base, None)
    spec = bench.Spec(input_len=input_len, output_len=output_len, num_requests=num_prompts,
                      max_concurrency=concurrency, warmup=2, temperature=0.0, request_rate=request_rate)
    vllm_run = benchmark(
        task_type=TaskType.GENERATION, endpoint_type="openai", api_url=f"{base}/v1/completions", base_url=base,
        model_id=ep.model, model_name=ep.model, tokenizer=tokenizer, input_requests=prompts[0], logprobs=None,
        request_rate=request_rate, burstiness=1.0, disable_tqdm=True, num_warmups=2, profile=False,
        selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"], selected_percentiles=[99.0], ignore_eos=True,
        goodput_config_dict={}, max_concurrency=concurrency, lora_modules=None, extra_headers=None,
        extra_body={"temperature": 0.0}, ready_check_timeout_sec=0)
    ours_run = bench.run_load(ep, spec, [(r.prompt, r.prompt_len, r.expected_output_len) for r in prompts[1]],
                              progress=False)
    random.seed(seeds[0])  # as main_async seeds vLLM's arrival times
    np.random.seed(seeds[0])
    freeze_gc_heap()  # as `vllm bench serve` does before its run
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # vLLM's own report
            theirs, ours = await asyncio.gather(vllm_run, ours_run)
    finally:
        gc.unfreeze()  # leave the calling process (a test session) as it was
    return ours, theirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=192, help="per tool and run")
    p.add_argument("--concurrency", type=int, default=2, help="per tool")
    p.add_argument("--request-rate", type=float, default=math.inf, help="per tool, Poisson (default: closed loop)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="vLLM's --random-range-ratio (default: 0)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args(argv)

    from model_patches.config import DropeConfig
    from model_patches.tiny import build_tiny_checkpoint

    trace_clients()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    ckpt = build_tiny_checkpoint(tmp / "tiny", "llama", drope=DropeConfig(train_context=256, beta_coef=0.2), seed=8)
    proc, port = start("ours", ckpt, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                                      "--kv-cache-memory-bytes", str(64 << 20)], {}, tmp / "server.log")
    print("run  TTFT   TPOT   ITL    E2EL   req/s  (ours / vLLM) | pre-send ms mean (p50): ours      vllm")
    try:
        for run in range(args.runs):
            for xs in PRESEND.values():
                xs.clear()
            ours, theirs = asyncio.run(run_both(f"http://127.0.0.1:{port}", ckpt, args.num_prompts, args.concurrency,
                                                args.input_len, args.output_len, args.range_ratio,
                                                args.request_rate, seeds=(2 * run + 1, 2 * run + 2)))
            ratios = [ours[f"{m}_s"]["mean"] * 1000 / theirs[f"mean_{m}_ms"] for m in ("ttft", "tpot", "itl", "e2el")]
            ratios.append(ours["request_throughput"] / theirs["request_throughput"])
            pre = {k: (statistics.mean(v) * 1000, statistics.median(v) * 1000) for k, v in PRESEND.items()}
            print(f"{run + 1:<4} " + " ".join(f"{r:.3f}" for r in ratios)
                  + f"  | {pre['ours'][0]:.2f} ({pre['ours'][1]:.2f})   {pre['vllm'][0]:.2f} ({pre['vllm'][1]:.2f})",
                  flush=True)
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
