"""Held-out perplexity vs length: the DroPE checkpoint against its RoPE parent, as is and with YaRN.

    python -m recalibration.evaluate CKPT --data SOURCE [--baseline BASE_CKPT] [--lengths 1x,2x,4x] [--out-dir DIR]

Lengths are multiples of the DroPE checkpoint's L_train (or token counts). The
baseline (default: the base recorded in the run's recalib_config.json next to
CKPT, when there is one) is measured twice: unchanged, and with YaRN scaled so
its original context covers the longest length (factor = longest / original,
transformers' rope_parameters). Writes evaluate.json and evaluate.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .perplexity import add_measurement_args, save_plot, write_results


def evaluate(ckpt: str | Path, source: str, baseline: str | None = None, lengths: str = "1x,2x,4x",
             windows: int = 4, heldout_docs: int = 2, log=print) -> dict[str, Any]:
    import torch

    from model_patches.config import read_config_json
    from model_patches.reference import load_reference

    from .perplexity import heldout_for, perplexity

    drope, lens, tokens = heldout_for(ckpt, source, heldout_docs, lengths)
    models: dict[str, Any] = {f"DroPE (c={drope.beta_coef:g})": lambda: load_reference(ckpt)}
    if baseline:
        base_cfg = read_config_json(baseline)
        original = base_cfg.get("max_position_embeddings") or drope.train_context
        factor = max(1.0, max(lens) / original)
        theta = (base_cfg.get("rope_parameters") or {}).get("rope_theta", base_cfg.get("rope_theta", 10000.0))
        yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, "rope_theta": theta}
        models["RoPE (base)"] = lambda: load_reference(baseline)
        models[f"RoPE + YaRN x{factor:g}"] = lambda: load_reference(
            baseline, rope_parameters=yarn, max_position_embeddings=int(original * factor))
    results: dict[str, dict[str, float]] = {}
    for name, make in models.items():
        model = make()
        assert model.training is False
        results[name] = {str(L): perplexity(model, tokens, L, windows) for L in lens}
        log(f"{name:<24}" + "  ".join(f"ppl@{L}={p:.3f}" for L, p in results[name].items()))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"checkpoint": str(ckpt), "baseline": baseline, "train_context": drope.train_context, "lengths": lens,
            "windows": windows, "perplexity": results}


def plot(result: dict[str, Any], path: Path) -> None:
    xs = [L / result["train_context"] for L in result["lengths"]]
    series = {name: (xs, [ppl[str(L)] for L in result["lengths"]]) for name, ppl in result["perplexity"].items()}
    save_plot(path, series, "length / training context", log_axes=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recalibration.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_args(p, "1x,2x,4x")
    p.add_argument("--baseline", default=None, help="RoPE parent (default: the base of the run CKPT came from, if local)")
    p.add_argument("--out-dir", default=None, help="(default: CHECKPOINT/evaluate)")
    args = p.parse_args(argv)
    baseline = args.baseline
    run_cfg = Path(args.checkpoint).parent / "recalib_config.json"
    if baseline is None and run_cfg.exists():
        from .run import resolve_base

        baseline = str(resolve_base(json.loads(run_cfg.read_text())["base"]))
    try:
        result = evaluate(args.checkpoint, args.data, baseline, args.lengths, args.windows, args.heldout_docs)
    except (ValueError, FileNotFoundError) as e:
        print(f"recalibration.evaluate: error: {e}", file=sys.stderr)
        return 2
    out = write_results(args.out_dir or Path(args.checkpoint) / "evaluate", "evaluate", result, plot)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
