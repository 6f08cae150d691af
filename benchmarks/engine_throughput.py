"""Engine throughput of the DroPE path vs the same-shape RoPE model in vLLM, side by side.

For each model pair (tiny random Llama; the real SmolLM2-135M) the RoPE parent
and its DroPE twin (same weights, `nope` or --attention-type, beta on with c > 0 so the per-token
query multiply is paid) run in the same process, alternately, `--repeats` times:

  prefill tok/s: 16 prompts of --prompt-len tokens, 1 output token each
  decode  tok/s: 16 prompts of 16 tokens, --decode-len output tokens each
                 (ignore_eos), time minus the matching short-prefill time

Ratios are DroPE / RoPE of the medians (> 1: DroPE faster). Goal: >= 1.0, since
the beta multiply should cost less than the rotation it replaces.

    .venv/bin/python benchmarks/engine_throughput.py [--models tiny,smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_SEQS = 16


def build_pair(name: str, root: Path, attention_type: str = "nope") -> tuple[Path, Path]:
    from model_patches.assets import smollm2_hf_dir
    from model_patches.convert import convert
    from model_patches.tiny import build_tiny_checkpoint

    if name == "tiny":
        rope = build_tiny_checkpoint(
            root / "tiny-rope",
            "llama",
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=4096,
        )
        train_context = 256
    elif name == "smollm2":
        rope = smollm2_hf_dir()
        train_context = 256
    else:
        raise SystemExit(f"unknown model {name!r} (tiny, smollm2)")
    drope = root / f"{name}-drope"
    convert(rope, drope, attention_type=attention_type, train_context=train_context, beta_coef=0.1, overwrite=True)
    return rope, drope


def measure(model_dir: Path, args) -> tuple[float, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(model_dir),
        dtype=args.dtype,
        enforce_eager=not args.compile,
        max_model_len=args.prompt_len + args.decode_len + 16,
        kv_cache_memory_bytes=args.kv_cache_gib * 2**30,
        max_num_seqs=N_SEQS,
        max_num_batched_tokens=max(2048, args.prompt_len),
        enable_prefix_caching=False,
        seed=0,
    )
    try:

        def run(prompt_len, max_tokens, salt):
            # Distinct token ids per run so nothing could be reused between runs.
            prompts = [
                {"prompt_token_ids": [(salt * 7919 + i * 131 + j) % 250 + 1 for j in range(prompt_len)]}
                for i in range(N_SEQS)
            ]
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            return time.perf_counter() - t

        run(32, 4, 0)  # warm-up
        t_prefill = run(args.prompt_len, 1, 1)
        t_short = run(16, 1, 2)
        t_decode = run(16, args.decode_len + 1, 3) - t_short
        return N_SEQS * args.prompt_len / t_prefill, N_SEQS * args.decode_len / t_decode
    finally:
        llm.llm_engine.engine_core.shutdown()  # frees the KV cache before the next engine starts
        gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2 (default: both)")
    p.add_argument("--repeats", type=int, default=3, help="alternating RoPE/DroPE runs per model (default: 3)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length in tokens (default: 512)")
    p.add_argument("--decode-len", type=int, default=64, help="decode tokens per sequence (default: 64)")
    p.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size in GiB (default: 1)")
    p.add_argument("--compile", action="store_true", help="use torch.compile (default: eager)")
    p.add_argument(
        "--attention-type",
        default="nope",
        choices=["nope", "qk_norm_nope", "q_norm_nope", "k_norm_nope"],
        help="the DroPE twin's attention (default: nope; qk_norm_nope pays the full-width QK-norm)",
    )
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rope, drope = build_pair(name, Path(tmp), args.attention_type)
            res = {"rope": [], "drope": []}
            for _ in range(args.repeats):
                for side, d in (("rope", rope), ("drope", drope)):
                    res[side].append(measure(d, args))
                    print(
                        f"[{name}] {side}: prefill {res[side][-1][0]:.0f} tok/s, decode {res[side][-1][1]:.0f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            med = {s: [statistics.median(x[i] for x in v) for i in (0, 1)] for s, v in res.items()}
            rows.append((name, med))

    import torch
    import vllm

    print("\n=== engine throughput: DroPE vs RoPE (same weights, same process) ===")
    print(f"command : {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"machine : {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}, "
        f"{args.dtype}, {'compiled' if args.compile else 'eager'}, DroPE {args.attention_type}, {N_SEQS} concurrent sequences, "
        f"prompt {args.prompt_len}, decode {args.decode_len}, median of {args.repeats}"
    )
    print(
        f"{'model':<9} {'prefill RoPE':>13} {'prefill DroPE':>14} {'ratio':>6} {'decode RoPE':>12} {'decode DroPE':>13} {'ratio':>6}"
    )
    for name, m in rows:
        print(
            f"{name:<9} {m['rope'][0]:>13.0f} {m['drope'][0]:>14.0f} {m['drope'][0] / m['rope'][0]:>6.2f} "
            f"{m['rope'][1]:>12.0f} {m['drope'][1]:>13.0f} {m['drope'][1] / m['rope'][1]:>6.2f}"
        )
    print("(tokens/s; ratio = DroPE / RoPE, > 1 means DroPE is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
