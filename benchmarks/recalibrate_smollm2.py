"""SmolLM2-135M on CPU: perplexity with RoPE, right after dropping it, and along recalibration.

One run: held-out perplexity (512-token windows of the held-out essays) of the
packaged RoPE model; of the same weights with RoPE removed (converted, untrained);
then `recalibration.run --preset smollm2-135m` for --steps steps with held-out
loss every --eval-every steps; then fit_beta at 2x and 4x; greedy samples from
the RoPE model, the untrained conversion and the recalibrated one. Perplexity,
samples and fit_beta all run on vLLM's engine in float32 (recalibration.perplexity). Reports the
first step (and tokens) within 10% of the RoPE perplexity, if any.

    .venv/bin/python benchmarks/recalibrate_smollm2.py [--steps 200] [--eval-every 25] [--out runs/bench-smollm2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The most important thing I learned from starting a company is"


def measure(ckpt, held: list[int], n_windows: int, length: int = 512) -> tuple[float, str]:
    """(held-out perplexity at ``length``, greedy continuation of PROMPT), on vLLM in float32, as served."""
    from vllm import SamplingParams

    from recalibration.engine import engine, engine_namespace
    from recalibration.perplexity import engine_nll, perplexity, windows

    with engine(engine_namespace(["--dtype", "float32"]), str(ckpt), {}, length + 1) as llm:
        ppl = perplexity(engine_nll(llm), windows(held, length, n_windows))
        (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    return ppl, out.outputs[0].text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="recalibration steps (default: 200)")
    p.add_argument("--eval-every", type=int, default=25, help="held-out loss interval in steps (default: 25)")
    p.add_argument("--out", default="runs/bench-smollm2", help="run directory (default: runs/bench-smollm2)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from model_patches.assets import smollm2_hf_dir
    from model_patches.convert import convert
    from recalibration import fit_beta
    from recalibration.config import DataConfig
    from recalibration.data import heldout_tokens
    from recalibration.engine import engine_namespace
    from recalibration.run import main as run_main

    base = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(base)
    held = heldout_tokens(DataConfig(source="builtin:essays"), tok)
    out = Path(args.out)
    windows = 8

    ppl_rope, sample_rope = measure(base, held, windows)
    dropped_dir = out.parent / (out.name + "-dropped")
    convert(base, dropped_dir, attention_type="nope", train_context=512, overwrite=True)
    ppl_dropped, sample_dropped = measure(dropped_dir, held, windows)

    t0 = time.perf_counter()
    rc = run_main(
        [
            "--preset",
            "smollm2-135m",
            "--output-dir",
            str(out),
            "--overwrite",
            "--max-steps",
            str(args.steps),
            "--set",
            f"eval_every={args.eval_every}",
            "--set",
            f"save_every={args.eval_every}",
            "--set",
            "eval_batches=4",
        ]
    )
    train_s = time.perf_counter() - t0
    if rc != 0:
        return rc
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads(
        sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        .joinpath("trainer_state.json")
        .read_text()
    )
    curve = [(h["step"], math.exp(h["eval_loss"])) for h in state["log_history"] if "eval_loss" in h]
    final = out / "final"
    ppl_final, sample_final = measure(final, held, windows)
    fit = fit_beta.fit(
        str(final),
        "builtin:essays",
        engine_namespace(["--dtype", "float32"]),
        "2x,4x",
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.6],
        windows=2,
        fresh=True,
        log=lambda *_: None,
    )
    fit_beta.write_coef(final, fit["best_coef"], fit["mode"])
    within = next(
        ((s, s * summary["tokens_trained"] // summary["steps"]) for s, p in curve if p <= 1.1 * ppl_rope), None
    )

    print("\n=== SmolLM2-135M recalibration on CPU (RoPE removed, nope, L = 512) ===")
    print(f"command : python benchmarks/recalibrate_smollm2.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"machine : {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, fp32 (perplexity on vLLM); "
        f"held-out: first 2 "
        f"Paul Graham essays, {windows} windows of 512 tokens ({len(held)} held-out tokens)"
    )
    print(f"perplexity with RoPE (original)      : {ppl_rope:.2f}")
    print(f"perplexity right after dropping RoPE : {ppl_dropped:.2f}")
    for s, p in curve:
        print(
            f"  step {s:>4} ({s * summary['tokens_trained'] // summary['steps']:>7} tokens): held-out ppl {p:.2f} "
            "(trainer eval, up to eval_batches x micro_batch held-out windows)"
        )
    print(f"perplexity after {summary['steps']} steps ({summary['tokens_trained']:,} tokens): {ppl_final:.2f}")
    print(
        f"training speed                        : {summary['tokens_trained'] / train_s:.0f} tokens/s "
        f"(wall, incl. evals and checkpoints; {train_s / 60:.1f} min)"
    )
    best_row = fit["table"][f"{fit['best_coef']:g}"]
    edge = " (top of the grid: the optimum may lie higher)" if fit["best_coef"] == max(map(float, fit["table"])) else ""
    print(
        f"fitted c (2x, 4x)                     : {fit['best_coef']:g}{edge}  "
        + "  ".join(f"ppl@{L}={best_row[str(L)]:.1f}" for L in fit["lengths"])
    )
    print(
        f"within 10% of RoPE perplexity         : {f'step {within[0]} ({within[1]} tokens)' if within else 'not reached'}"
    )
    print(f"greedy, RoPE     : {sample_rope!r}")
    print(f"greedy, dropped  : {sample_dropped!r}")
    print(f"greedy, recalib. : {sample_final!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
