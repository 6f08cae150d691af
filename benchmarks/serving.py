"""drope-server vs vanilla vLLM's server vs transformers, and drope-server's CPU defaults, in one run.

Part 1 (overhead): the same RoPE checkpoint served by drope-server and by vLLM's own
OpenAI server with every plugin off (VLLM_PLUGINS=""), identical engine flags and
environment, both up at once and driven alternately by vLLM's own `vllm bench serve`
(random prompts, EOS ignored, fixed concurrency 1 and 16); medians of --rounds. transformers runs `generate` on prompts of the same
length: one at a time for concurrency 1, one batch of 16 for concurrency 16.

Part 2 (CPU defaults, skipped on GPU): drope-server on SmolLM2-135M (float32, as
served by default) with vLLM-CPU's own core layout (one core for the worker, one
reserved for the API / engine processes) and with the worker bound to every core
(VLLM_CPU_OMP_THREADS_BIND=0-N, VLLM_CPU_NUM_OF_RESERVED_CPU=0): concurrency 1 and
16, then a 16K-token prompt on the SmolLM2 DroPE conversion (L_train 8192, s = 2):
TTFT, decode tokens/s after it, and the server's peak RSS.

    .venv/bin/python benchmarks/serving.py [--models tiny,smollm2] [--prompts 32] [--skip-defaults]
"""

from __future__ import annotations

import argparse
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


def start(
    kind: str, model_dir: Path, flags: list[str], env: dict[str, str | None], log: Path
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # A value of None removes the variable (e.g. LD_PRELOAD for a variant without it).
    env = {k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1", **env}.items() if v is not None}
    common = ["--model", str(model_dir), "--port", str(port), "--served-model-name", "m", *flags]
    if kind == "ours":
        cmd = [sys.executable, "-m", "server", *common]
    else:  # vanilla vLLM; its `vllm serve` console script fails on vllm-cpu, this module does not
        env["VLLM_PLUGINS"] = ""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server died:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{kind} server did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def vllm_bench(port: int, tokenizer: Path, prompts: int, conc: int, inp: int, out: int) -> dict:
    """vLLM's own `vllm bench serve`, called in-process (its console script fails on vllm-cpu)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--model",
            "m",
            "--tokenizer",
            str(tokenizer),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(inp),
            "--random-output-len",
            str(out),
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(conc),
            "--ignore-eos",
            "--seed",
            str(conc),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--disable-tqdm",
        ]
    )
    return main(args)


def bench_transformers(model_dir: Path, prompts: int, conc: int, inp: int, out: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(conc)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ttfts, tokens, busy = [], 0, 0.0
    with torch.no_grad():
        for _ in range(prompts // conc):
            ids = torch.randint(0, vocab, (conc, inp), generator=g)
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            ttfts.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=out, min_new_tokens=out, **kw)
            busy += time.perf_counter() - t
            tokens += out * conc
    return {"output_throughput": tokens / busy, "median_ttft_ms": 1e3 * statistics.median(ttfts)}


class PeakRSS:
    """Samples the RSS of a process tree every 50 ms."""

    def __init__(self, pid: int):
        self.tree, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.idle = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        return sum(p.memory_info().rss for p in [self.tree, *self.tree.children(recursive=True)])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.now())
            except psutil.Error:
                pass
            time.sleep(0.05)

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def long_prompt(port: int, n_tokens: int, decode: int, pid: int) -> dict:
    from model_patches.assets import paul_graham_essays_dir

    text = " ".join(p.read_text() for p in sorted(paul_graham_essays_dir().glob("*.txt")))
    base = f"http://127.0.0.1:{port}"
    ids = httpx.post(
        base + "/tokenize", json={"model": "m", "prompt": text, "add_special_tokens": False}, timeout=600
    ).json()["tokens"][:n_tokens]
    rss = PeakRSS(pid)
    t0, first, n = time.perf_counter(), None, 0
    body = {"model": "m", "prompt": ids, "max_tokens": decode, "min_tokens": decode, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {
        "prompt_tokens": len(ids),
        "ttft_s": first - t0,
        "decode_tok_s": (n - 1) / (end - first),
        "idle_rss": rss.idle,
        "peak_rss": rss.close(),
    }


def all_cores_env() -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2 (default: both)")
    p.add_argument("--prompts", type=int, default=32, help="requests per measurement (default: 32)")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (default: 256)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (default: 64)")
    p.add_argument("--long-tokens", type=int, default=16384, help="long-prompt length (default: 16384)")
    p.add_argument("--skip-defaults", action="store_true", help="skip part 2 (CPU core-binding defaults)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per server and concurrency (default: 3)")
    p.add_argument("--skip-transformers", action="store_true")
    args = p.parse_args(argv)

    from model_patches.assets import smollm2_hf_dir
    from model_patches.convert import convert
    from model_patches.tiny import build_tiny_checkpoint

    # Both servers get the same flags and the same environment: only our code differs.
    flags = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(KV_BYTES)]
    same_env = all_cores_env()
    overhead, defaults = [], []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for name in args.models.split(","):
            model_dir = (
                build_tiny_checkpoint(
                    tmp / "tiny", "llama", hidden_size=256, num_layers=4, max_position_embeddings=4096
                )
                if name == "tiny"
                else smollm2_hf_dir()
            )
            # Both servers up at once, measured in alternating order, median of the rounds:
            # run-to-run drift on a shared 2-core machine is larger than the overhead sought.
            servers = {
                kind: start(kind, model_dir, flags, same_env, tmp / f"{name}-{kind}.log") for kind in ("vllm", "ours")
            }
            try:
                for conc in (1, 16):
                    runs: dict[str, list[dict]] = {"vllm": [], "ours": []}
                    for i in range(args.rounds):
                        for kind in ("vllm", "ours") if i % 2 == 0 else ("ours", "vllm"):
                            runs[kind].append(
                                vllm_bench(
                                    servers[kind][1], model_dir, args.prompts, conc, args.input_len, args.output_len
                                )
                            )
                    res = {
                        kind: {m: statistics.median(r[m] for r in rs) for m in ("output_throughput", "median_ttft_ms")}
                        for kind, rs in runs.items()
                    }
                    overhead.append((name, conc, res))
            finally:
                for proc, _ in servers.values():
                    stop(proc)
            for _, conc, res in overhead[-2:]:
                if not args.skip_transformers:
                    res["hf"] = bench_transformers(model_dir, args.prompts, conc, args.input_len, args.output_len)
                print(
                    f"[{name} c={conc}] "
                    + ", ".join(f"{k} {v['output_throughput']:.0f} tok/s" for k, v in res.items()),
                    file=sys.stderr,
                    flush=True,
                )
        import torch

        if not args.skip_defaults and not torch.cuda.is_available():
            smol = smollm2_hf_dir()
            drope = tmp / "smollm2-drope"
            convert(smol, drope, attention_type="nope", train_context=8192, beta_coef=0.1, overwrite=True)
            for label, env in (
                ("vLLM-CPU default (auto binding)", {"VLLM_CPU_OMP_THREADS_BIND": "auto"}),
                ("every core to the worker (ours)", {}),
            ):
                row = {}
                for conc in (1, 16):
                    proc, port = start("ours", smol, ["--max-num-seqs", "16"], env, tmp / f"d-{conc}.log")
                    try:
                        row[conc] = vllm_bench(port, smol, args.prompts, conc, args.input_len, args.output_len)
                    finally:
                        stop(proc)
                proc, port = start(
                    "ours",
                    drope,
                    ["--max-model-len", str(args.long_tokens + 128), "--kv-cache-memory-bytes", str(KV_BYTES)],
                    env,
                    tmp / "d-long.log",
                )
                try:
                    row["long"] = long_prompt(port, args.long_tokens, 64, proc.pid)
                finally:
                    stop(proc)
                defaults.append((label, env, row))
                print(f"[defaults] {label}: {row['long']}", file=sys.stderr, flush=True)

    import vllm

    print("\n=== serving: drope-server vs vanilla vLLM server vs transformers; CPU defaults ===")
    print(f"command : python benchmarks/serving.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"machine : {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}; "
        f"{args.prompts} requests of {args.input_len} + {args.output_len} tokens (vllm bench serve, random, ignore_eos)"
    )
    print("part 1  : float32, eager, 16 seqs, 1 GiB KV, same env for both servers: " + str(same_env))
    print(
        f"{'model':<8}{'conc':>5}{'ours tok/s':>11}{'vLLM tok/s':>11}{'HF tok/s':>9}{'ours/vLLM':>10}{'ours/HF':>8}"
        f"{'TTFT p50 ms ours/vLLM':>23}{'ratio':>7}"
    )
    for name, conc, r in overhead:
        o, v, h = r["ours"], r["vllm"], r.get("hf")
        print(
            f"{name:<8}{conc:>5}{o['output_throughput']:>11.0f}{v['output_throughput']:>11.0f}"
            f"{h['output_throughput'] if h else float('nan'):>9.0f}"
            f"{o['output_throughput'] / v['output_throughput']:>10.3f}"
            f"{o['output_throughput'] / h['output_throughput'] if h else float('nan'):>8.2f}"
            f"{o['median_ttft_ms']:>13.1f} /{v['median_ttft_ms']:>8.1f}{o['median_ttft_ms'] / v['median_ttft_ms']:>7.3f}"
        )
    if defaults:
        print(
            "part 2  : SmolLM2-135M (float32, as the embedded default is served) through drope-server; "
            "16K prompt on its DroPE conversion (L_train 8192)"
        )
        print(
            f"{'layout':<42}{'c=1 tok/s':>10}{'c=16 tok/s':>11}{'c=16 TTFT p50 ms':>17}{'16K TTFT s':>11}"
            f"{'decode tok/s':>13}{'peak RSS GiB':>13}"
        )
        for label, _, r in defaults:
            lg = r["long"]
            print(
                f"{label:<42}{r[1]['output_throughput']:>10.1f}{r[16]['output_throughput']:>11.1f}"
                f"{r[16]['median_ttft_ms']:>17.0f}{lg['ttft_s']:>11.1f}{lg['decode_tok_s']:>13.1f}{lg['peak_rss'] / 2**30:>13.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
