"""CPU serving speed: drope-server with and without tcmalloc / Intel OpenMP preloaded, vs vanilla vLLM,
against the machine's own compute and memory-bandwidth bounds, in one run.

vLLM-CPU warns at every start that neither libtcmalloc nor libiomp is in LD_PRELOAD
(its CPU installation docs recommend both). This measures what they give, one server
per variant, each started with the same flags (bf16, eager, prefix caching off so a
repeated prompt is recomputed) on SmolLM2-135M converted to DroPE (nope, L_train 8192,
c = 0.1, so a 16K prompt is at s = 2 and beta is paid):

  TTFT      one 16,384-token prompt of the Paul Graham essays, --repeats times (distinct texts)
  decode 1  `vllm bench serve` at concurrency 1: 256 + 128 tokens, 1000 / median TPOT
  decode 16 `vllm bench serve` at concurrency 16: 16 x (256 + 64) tokens, 16 x 1000 / median TPOT

Vanilla vLLM (every plugin off) serves the RoPE parent with YaRN x2 on the same weights,
with the core binding drope-server sets by default and with the fastest preload found.

Bounds, measured in this process before any server starts: the bf16 matmul rate
(4096^3 torch.matmul on every core) for prefill: the 16K prompt's FLOPs (projections,
MLP, causal attention) / rate; the copy bandwidth (1 GiB tensor copy, bytes read +
written) for batch-1 decode: the bf16 weights read per token / bandwidth.

    .venv/bin/python benchmarks/cpu_speed.py [--repeats 2] [--variants none,tcmalloc,iomp,both]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving import all_cores_env, start, stop, vllm_bench

LONG, KV_BYTES = 16384, 2 << 30

# The files vLLM's CPU worker looks for in LD_PRELOAD (by the names "libtcmalloc" / "libiomp").
# intel-openmp (a vllm-cpu dependency) puts libiomp5.so in the environment's lib/; tcmalloc is
# Debian's libtcmalloc-minimal4 (`apt-get install libtcmalloc-minimal4`, or `apt-get download` +
# `dpkg-deb -x` and copy the .so into .venv/lib without root).
LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "iomp": ("libiomp5.so",)}


def preload_libraries() -> dict[str, str]:
    """{'tcmalloc': path, 'iomp': path} for those found on this machine."""
    dirs = [
        Path(sys.prefix) / "lib",
        *map(Path, ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64")),
    ]
    found = {}
    for key, names in LIBRARIES.items():
        hit = next((d / n for d in dirs for n in names if (d / n).is_file()), None)
        if hit:
            found[key] = str(hit)
    return found


def machine_bounds() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s) of this machine, every core busy."""
    import torch

    torch.set_num_threads(os.cpu_count())
    a = torch.randn(4096, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    flops = 5 * 2 * 4096**3 / (time.perf_counter() - t)
    src, dst = torch.ones(2**28), torch.empty(2**28)  # 1 GiB each
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 5 * 2 * src.nbytes / (time.perf_counter() - t)
    return flops, bandwidth


def model_costs(cfg: dict, tokens: int) -> tuple[float, float]:
    """(FLOPs of a `tokens` prefill with logits for the last token only, bf16 bytes read per decoded token)."""
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    lm_head = cfg["vocab_size"] * h
    # Causal attention: QK^T and PV over about tokens^2 / 2 pairs each, 2 FLOPs a multiply-add.
    flops = 2 * layers * per_layer * tokens + 2 * layers * h * tokens**2 + 2 * lm_head
    return flops, 2.0 * (layers * per_layer + lm_head)


def essay_ids(port: int, n: int, repeats: int) -> list[list[int]]:
    from model_patches.assets import paul_graham_essays_dir

    text = " ".join(p.read_text() for p in sorted(paul_graham_essays_dir().glob("*.txt")))
    ids = httpx.post(
        f"http://127.0.0.1:{port}/tokenize",
        json={"model": "m", "prompt": text, "add_special_tokens": False},
        timeout=600,
    ).json()["tokens"]
    step = max(1, (len(ids) - n) // max(1, repeats - 1))
    return [ids[i * step : i * step + n] for i in range(repeats)]


def ttft(port: int, ids: list[int]) -> float:
    body = {"model": "m", "prompt": ids, "max_tokens": 2, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def measure(kind: str, model: Path, flags: list[str], env: dict, log: Path, repeats: int) -> dict:
    proc, port = start(kind, model, flags, env, log)
    try:
        vllm_bench(port, model, 2, 1, 64, 8)  # warm-up
        ttfts = [ttft(port, ids) for ids in essay_ids(port, LONG, repeats)]
        d1 = vllm_bench(port, model, 4, 1, 256, 128)
        d16 = vllm_bench(port, model, 16, 16, 256, 64)
    finally:
        stop(proc)
    return {
        "ttft_s": ttfts,
        "decode1_tok_s": 1e3 / d1["median_tpot_ms"],
        "decode16_tok_s": 16e3 / d16["median_tpot_ms"],
        "warned": "is not found in LD_PRELOAD" in log.read_text(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="16K prompts per variant (default: 2)")
    p.add_argument(
        "--variants",
        default="none,tcmalloc,iomp,both",
        help="comma list of drope-server variants: none (no preload, as shipped), tcmalloc, iomp, "
        "both (default: all four)",
    )
    p.add_argument("--no-vanilla", action="store_true", help="skip vanilla vLLM")
    p.add_argument("--out", default="runs/cpu-speed.json", help="results as JSON (default: runs/cpu-speed.json)")
    args = p.parse_args(argv)

    from model_patches.assets import smollm2_hf_dir
    from model_patches.convert import convert
    from recalibration.engine import yarn_overrides

    libs = preload_libraries()
    print(f"libraries found: {libs}", file=sys.stderr)
    flops_s, bytes_s = machine_bounds()
    parent = smollm2_hf_dir()
    cfg = json.loads((parent / "config.json").read_text())
    prefill_flops, bytes_per_token = model_costs(cfg, LONG)
    bound_ttft, bound_decode = prefill_flops / flops_s, bytes_s / bytes_per_token
    flags = [
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        "--max-model-len",
        str(LONG + 128),
        "--max-num-seqs",
        "16",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--no-enable-prefix-caching",
    ]
    # Each variant's LD_PRELOAD set explicitly (None: unset); drope-server itself preloads nothing
    # (measured here: no gain outside the noise, BENCHMARKS.md), so "none" is drope-server as shipped.
    explicit = {"none": [], "tcmalloc": ["tcmalloc"], "iomp": ["iomp"], "both": ["tcmalloc", "iomp"]}

    def preload_env(keys: list[str]) -> dict[str, str | None]:
        return {"LD_PRELOAD": ":".join(libs[k] for k in keys) or None}

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        drope = tmp / "smollm2-drope"
        convert(parent, drope, attention_type="nope", train_context=8192, beta_coef=0.1, overwrite=True)
        for name in args.variants.split(","):
            if not set(explicit[name]) <= set(libs):
                print(f"[{name}] skipped: library not found", file=sys.stderr)
                continue
            rows[f"drope-server, {name}"] = measure(
                "ours", drope, flags, preload_env(explicit[name]), tmp / f"{name}.log", args.repeats
            )
            print(f"[{name}] {rows[f'drope-server, {name}']}", file=sys.stderr, flush=True)
        if not args.no_vanilla:
            yarn = json.dumps(yarn_overrides(cfg, LONG + 128))
            measured = [n for n in explicit if f"drope-server, {n}" in rows and n != "none"]  # fastest 16K TTFT
            fastest = min(measured, key=lambda n: statistics.median(rows[f"drope-server, {n}"]["ttft_s"]), default=None)
            for name in ["none", *([fastest] if fastest else [])]:
                rows[f"vanilla vLLM (RoPE + YaRN x2), {name}"] = measure(
                    "vllm",
                    parent,
                    [*flags, "--hf-overrides", yarn],
                    {**all_cores_env(), **preload_env(explicit[name])},
                    tmp / f"vllm-{name}.log",
                    args.repeats,
                )

    import torch
    import vllm

    print("\n=== CPU serving speed: preloaded libraries, vanilla vLLM, and the machine's bounds ===")
    print(f"command : python benchmarks/cpu_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"machine : {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"vllm {vllm.__version__}; SmolLM2-135M bf16, eager, prefix caching off"
    )
    print(
        f"bounds  : bf16 matmul {flops_s / 1e12:.2f} TFLOP/s -> 16K prefill {prefill_flops / 1e12:.1f} TFLOP, "
        f">= {bound_ttft:.1f} s; copy bandwidth {bytes_s / 1e9:.1f} GB/s -> {bytes_per_token / 1e6:.0f} MB per "
        f"token, <= {bound_decode:.0f} tok/s at batch 1"
    )
    print(
        f"{'server, LD_PRELOAD':<52}{'16K TTFT s':>16}{'/ bound':>8}{'decode b1 tok/s':>16}{'/ bound':>8}"
        f"{'decode b16 tok/s':>17}{'warns':>6}"
    )
    for label, r in rows.items():
        t = statistics.median(r["ttft_s"])
        print(
            f"{label:<52}{' / '.join(f'{x:.1f}' for x in r['ttft_s']):>16}{t / bound_ttft:>8.2f}"
            f"{r['decode1_tok_s']:>16.1f}{r['decode1_tok_s'] / bound_decode:>8.2f}{r['decode16_tok_s']:>17.1f}"
            f"{'yes' if r['warned'] else 'no':>6}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bounds": {
                    "bf16_flops": flops_s,
                    "copy_bytes_s": bytes_s,
                    "ttft_s": bound_ttft,
                    "decode1_tok_s": bound_decode,
                },
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
