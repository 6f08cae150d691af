"""Fit the DroPE logit-scale coefficient c by held-out perplexity at longer-than-training lengths.

    python -m recalibration.fit_beta CKPT --data SOURCE [--lengths 2x,4x] [--coefs 0,0.05,...] [--no-write]

For each target length (multiples of the checkpoint's L_train, or token counts)
and each c on a 1-D grid, held-out perplexity is measured over up to --windows
windows of that length. One c serves the model at every length, so the pick is
the c with the lowest *mean log-perplexity across the requested lengths* (each
length weighted equally; a log so that no length dominates by its scale). When
the best c is the grid's largest, the search steps further up (each step twice
the last) until perplexity rises; then it refines once around the best point.
The c is written into CKPT's config.json (drope_beta_coef) unless --no-write;
the table (JSON) and a plot of perplexity vs c per length (PNG) are saved in
--out-dir (default: CKPT/fit_beta).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .perplexity import add_measurement_args, save_plot, write_results

DEFAULT_COEFS = "0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6"


def fit(ckpt: str | Path, source: str, lengths: str = "2x,4x", coefs: list[float] | None = None,
        windows: int = 4, heldout_docs: int = 2, refine: bool = True, log=print) -> dict[str, Any]:
    import torch

    from model_patches.reference import load_reference, set_beta

    from .perplexity import heldout_for, perplexity

    drope, lens, tokens = heldout_for(ckpt, source, heldout_docs, lengths)
    model = load_reference(ckpt, dtype=torch.float32)
    grid = sorted(set(coefs if coefs is not None else [float(x) for x in DEFAULT_COEFS.split(",")]))
    table: dict[float, dict[int, float]] = {}

    def score(c: float) -> float:
        """Mean log-perplexity across the lengths (each measured once per c)."""
        if c not in table:
            set_beta(model, coef=c, mode="log" if drope.beta_mode == "none" else drope.beta_mode)
            table[c] = {L: perplexity(model, tokens, L, windows) for L in lens}
            log(f"c={c:.3f}  " + "  ".join(f"ppl@{L}={p:.3f}" for L, p in table[c].items()))
        return sum(math.log(table[c][L]) for L in lens) / len(lens)

    best, extended = search(grid, score, refine)
    if extended:
        log(f"the best c was at the top of the grid; extended the search up to {max(table):g}")
    return {"checkpoint": str(ckpt), "train_context": drope.train_context, "lengths": lens, "best_coef": best,
            "criterion": "min over c of mean_L log ppl(L, c)",
            "table": {f"{c:g}": {str(L): p for L, p in v.items()} for c, v in sorted(table.items())},
            "score": {f"{c:g}": score(c) for c in sorted(table)}}


def search(grid: list[float], evaluate, refine: bool = True, max_extensions: int = 4) -> tuple[float, bool]:
    """1-D minimisation of ``evaluate`` over c: the grid, then (if the best is its largest value)
    steps upward, each twice the last, until the score rises, then one refinement around the best.
    Returns (best c, whether the grid was extended)."""
    scores = {c: evaluate(c) for c in grid}
    best = min(scores, key=scores.get)
    extended = False
    step = grid[-1] - grid[-2] if len(grid) > 1 else max(grid[-1], 0.1)
    for _ in range(max_extensions):
        if best != max(scores):
            break
        c = round(best + step, 4)
        scores[c] = evaluate(c)
        extended, step = True, step * 2
        best = min(scores, key=scores.get)
    if refine and len(scores) > 1:
        points = sorted(scores)
        i = points.index(best)
        for c in sorted({round((points[max(i - 1, 0)] + best) / 2, 4),
                         round((best + points[min(i + 1, len(points) - 1)]) / 2, 4)}):
            if c not in scores:
                scores[c] = evaluate(c)
        best = min(scores, key=scores.get)
    return best, extended


def write_coef(ckpt: str | Path, coef: float) -> None:
    path = Path(ckpt) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["drope_beta_coef"] = coef
    cfg.setdefault("drope_beta_mode", "log")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)  # never a half-written config.json


def plot(result: dict[str, Any], path: Path) -> None:
    coefs = sorted(float(c) for c in result["table"])
    series = {f"{L} tokens ({L / result['train_context']:g}x)": (coefs, [result["table"][f"{c:g}"][str(L)] for c in coefs])
              for L in result["lengths"]}
    save_plot(path, series, "c in beta = 1 + c ln(s)", Path(result["checkpoint"]).name,
              vline=(result["best_coef"], f"chosen c = {result['best_coef']:g}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recalibration.fit_beta", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_args(p, "2x,4x")
    p.add_argument("--coefs", default=DEFAULT_COEFS, help=f"grid of c (default: {DEFAULT_COEFS})")
    p.add_argument("--no-refine", action="store_true", help="no second pass around the best c")
    p.add_argument("--no-write", action="store_true", help="do not write the fitted c into config.json")
    p.add_argument("--out-dir", default=None, help="table and plot (default: CHECKPOINT/fit_beta)")
    args = p.parse_args(argv)
    try:
        result = fit(args.checkpoint, args.data, args.lengths, [float(x) for x in args.coefs.split(",")],
                     args.windows, args.heldout_docs, not args.no_refine)
    except (ValueError, FileNotFoundError) as e:
        print(f"recalibration.fit_beta: error: {e}", file=sys.stderr)
        return 2
    out = write_results(args.out_dir or Path(args.checkpoint) / "fit_beta", "fit_beta", result, plot)
    if not args.no_write:
        write_coef(args.checkpoint, result["best_coef"])
    print(f"best c = {result['best_coef']:g} ({result['criterion']}); "
          f"{'written to' if not args.no_write else 'not written to'} {Path(args.checkpoint) / 'config.json'}; "
          f"table and plot in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
