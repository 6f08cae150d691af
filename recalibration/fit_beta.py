"""Fit the DroPE logit-scale coefficient c by held-out perplexity past L_train, on vLLM's engine.

    python -m recalibration.fit_beta CKPT --data SOURCE [--lengths 2x,4x] [--coefs 0,0.05,...] [--no-write]
    python -m recalibration.fit_beta llama2-7b-drope --data held-out.jsonl --lengths 2x,4x \\
        --tensor-parallel-size 4 --dtype bfloat16          # any `vllm serve` engine flag, same names

For each target length (multiples of the checkpoint's L_train, or token counts)
and each c on a 1-D grid, held-out perplexity is measured over up to --windows
windows of that length, on the engine that serves the model (vLLM: paged attention,
the user's dtype, tensor parallelism, compiled or eager). The weights are loaded
once; c changes in place on every worker between measurements.

One c serves the model at every length, so the pick is the c with the lowest
*mean log-perplexity across the requested lengths* (each length weighted equally;
a log so that no length dominates by its scale). When the best c is the grid's
largest, the search steps further up (each step twice the last) until perplexity
rises; then it refines once around the best point. A checkpoint whose
drope_beta_mode is ``none`` is fitted in ``log`` mode.

Writes: CKPT/config.json gets drope_beta_coef and drope_beta_mode (the mode the c
was fitted in), atomically, unless --no-write; --out-dir (default CKPT/fit_beta)
gets fit_beta.json (the table, rewritten after every c) and fit_beta.png
(perplexity vs c per length, the chosen c marked). An interrupted sweep keeps what
it measured: the same command again measures only the c values still missing
(--fresh starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .perplexity import add_measurement_args, save_plot, write_json_atomic

DEFAULT_COEFS = "0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6"
RESULTS = "fit_beta.json"


def parse_grid(text: str) -> list[float]:
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--coefs must be comma-separated numbers, got {text!r}") from None
    bad = [c for c in grid if not (math.isfinite(c) and c >= 0)]
    if bad or not grid:
        raise ValueError(
            f"--coefs: every c must be a finite number >= 0 (beta = 1 + c ln s sharpens attention "
            f"past L_train; a negative c would flatten it), got {bad or 'nothing'}"
        )
    return sorted(set(grid))


def fit(
    ckpt: str,
    data: str,
    engine_args: Any,
    lengths: str = "2x,4x",
    coefs: list[float] | None = None,
    windows: int = 4,
    heldout_docs: int = 2,
    refine: bool = True,
    out_dir: str | Path | None = None,
    fresh: bool = False,
    log=print,
) -> dict[str, Any]:
    """Measure, search and return the result (also kept in ``out_dir``/fit_beta.json as it grows)."""
    from model_patches.config import DropeConfig, is_drope_config, with_pinned_train_context
    from server.config import read_model_config

    from .engine import drope_overrides, engine, set_beta, user_max_model_len
    from .perplexity import engine_nll, heldout_tokens_for, measure, parse_lengths

    # Everything that can be wrong is checked before an engine is built or a file written.
    file = read_model_config(ckpt)
    if not is_drope_config(file):
        raise ValueError(
            f"{ckpt} is a plain {file.get('model_type')} checkpoint with RoPE; fit_beta tunes DroPE "
            "checkpoints (make one with `python -m recalibration.run`, or convert with "
            "`python -m model_patches.convert` and recalibrate)"
        )
    user = engine_args.hf_overrides if isinstance(engine_args.hf_overrides, dict) else {}
    drope = DropeConfig.from_hf_config(with_pinned_train_context(file, user))
    mode = "log" if drope.beta_mode == "none" else drope.beta_mode
    lens = sorted(set(parse_lengths(lengths, drope.train_context)))
    if min(lens) <= drope.train_context:
        raise ValueError(
            f"length {min(lens)} is not past L_train = {drope.train_context}: beta is 1 there for "
            "every c, so it says nothing about c"
        )
    max_model_len = user_max_model_len(engine_args) or max(lens) + 1
    if max(lens) + 1 > max_model_len:
        raise ValueError(f"length {max(lens)} (+1 generated token) is beyond --max-model-len {max_model_len}")
    grid = coefs if coefs is not None else parse_grid(DEFAULT_COEFS)
    if windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    tokens = heldout_tokens_for(engine_args.tokenizer or ckpt, data, heldout_docs, max(lens))

    out = Path(out_dir) if out_dir else Path(ckpt) / "fit_beta"
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "checkpoint": str(ckpt),
        "data": data,
        "heldout_docs": heldout_docs,
        "windows": windows,
        "lengths": lens,
        "mode": mode,
        "dtype": str(engine_args.dtype),
        "quantization": engine_args.quantization,
        "drope": {k: v for k, v in drope.as_dict().items() if k not in ("beta_coef", "beta_mode")},
        "heldout_sha256": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16],
    }
    table, seconds = _previous(out / RESULTS, settings, fresh, log)
    result: dict[str, Any] = {
        "complete": False,
        "settings": settings,
        "checkpoint": str(ckpt),
        "train_context": drope.train_context,
        "lengths": lens,
        "mode": mode,
        "criterion": "min over c of mean_L log ppl(L, c)",
    }

    def save(best: float | None = None) -> None:
        cs = sorted(table)
        result.update(
            table={f"{c:g}": {str(L): table[c][L] for L in lens} for c in cs},
            score={f"{c:g}": _score(table[c], lens) for c in cs},
            seconds={f"{c:g}": round(seconds[c], 2) for c in cs},
        )
        if best is not None:
            result.update(complete=True, best_coef=best)
        write_json_atomic(out / RESULTS, result)

    with contextlib.ExitStack() as stack:
        llm = None

        def score(c: float) -> float:
            nonlocal llm
            if c not in table:
                if llm is None:  # built on first need: a finished sweep re-run measures nothing
                    log(f"loading {ckpt} on vLLM (max_model_len {max_model_len}, c changes in place) ...")
                    llm = stack.enter_context(
                        engine(engine_args, ckpt, drope_overrides(drope, mode, max_model_len), max_model_len)
                    )
                t0 = time.perf_counter()
                set_beta(llm, c, mode)
                table[c] = measure(engine_nll(llm), tokens, lens, windows, drope.train_context, f"c={c:<6g}", log)
                seconds[c] = time.perf_counter() - t0
                log(f"c={c:<6g} mean log ppl {_score(table[c], lens):.5f}  ({seconds[c]:.1f} s)")
                save()
            return _score(table[c], lens)

        best, extended = search(grid, score, refine)
    if extended:
        log(f"the best c was at the top of the grid; extended the search up to {max(table):g}")
    save(best)
    plot(result, out / "fit_beta.png")
    return result


def _score(ppl: dict[int, float], lens: list[int]) -> float:
    """Mean log-perplexity across the lengths."""
    return sum(math.log(ppl[L]) for L in lens) / len(lens)


def _previous(path: Path, settings: dict[str, Any], fresh: bool, log) -> tuple[dict[float, dict[int, float]], dict]:
    """The c values an earlier run of the same measurement already measured (an interrupted sweep)."""
    if fresh or not path.exists():
        return {}, {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}, {}
    if old.get("settings") != settings:
        log(f"{path} holds a measurement with other settings; measuring from scratch (it will be replaced)")
        return {}, {}
    table = {float(c): {int(L): p for L, p in v.items()} for c, v in old.get("table", {}).items()}
    if table:
        log(f"reusing {len(table)} value(s) of c already measured in {path} (--fresh to start over)")
    return table, {float(c): s for c, s in old.get("seconds", {}).items()}


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
        for c in sorted(
            {round((points[max(i - 1, 0)] + best) / 2, 4), round((best + points[min(i + 1, len(points) - 1)]) / 2, 4)}
        ):
            if c not in scores:
                scores[c] = evaluate(c)
        best = min(scores, key=scores.get)
    return best, extended


def write_coef(ckpt: str | Path, coef: float, mode: str) -> None:
    """c and the mode it was fitted in, into config.json, atomically (never a half-written config)."""
    path = Path(ckpt) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["drope_beta_coef"] = coef
    cfg["drope_beta_mode"] = mode  # a `none` checkpoint fitted in log mode must serve in log mode
    write_json_atomic(path, cfg)


def plot(result: dict[str, Any], path: Path) -> None:
    coefs = sorted(float(c) for c in result["table"])
    series = {
        f"{L} tokens ({L / result['train_context']:g}x)": (coefs, [result["table"][f"{c:g}"][str(L)] for c in coefs])
        for L in result["lengths"]
    }
    save_plot(
        path,
        series,
        f"c in beta = 1 + c ln(s)  ({result['mode']} mode)",
        "/".join(Path(result["checkpoint"]).parts[-2:]),
        vline=(result["best_coef"], f"chosen c = {result['best_coef']:g}"),
    )


def build_parser():
    from model_patches.config import require_vllm

    require_vllm("recalibration.fit_beta")  # it measures on vLLM's engine
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(
        prog="python -m recalibration.fit_beta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_measurement_args(p, "2x,4x", "DroPE checkpoint: a directory (or an alias / hub id with --no-write)")
    p.add_argument("--coefs", default=DEFAULT_COEFS, help=f"grid of c, each >= 0 (default: {DEFAULT_COEFS})")
    p.add_argument("--no-refine", action="store_true", help="no second pass around the best c")
    p.add_argument("--no-write", action="store_true", help="do not write the fitted c into config.json")
    p.add_argument("--out-dir", default=None, help="table and plot (default: CHECKPOINT/fit_beta)")
    p.add_argument("--fresh", action="store_true", help="ignore c values measured by an earlier, interrupted run")
    return p


def main(argv: list[str] | None = None) -> int:
    from .perplexity import checkpoint_of

    prog = "recalibration.fit_beta"
    try:
        parser = build_parser()
    except ImportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        ckpt = checkpoint_of(args, prog)
        if not args.no_write and not (Path(ckpt) / "config.json").is_file():
            raise ValueError(
                f"{ckpt} is not a local checkpoint directory, so the fitted c cannot be written into "
                "its config.json: pass --no-write (and --out-dir), or download it first"
            )
        if not args.out_dir and not Path(ckpt).is_dir():
            raise ValueError(f"{ckpt} is not a local directory: pass --out-dir for the table and plot")
        result = fit(
            ckpt,
            args.data,
            args,
            args.lengths,
            parse_grid(args.coefs),
            args.windows,
            args.heldout_docs,
            not args.no_refine,
            args.out_dir,
            args.fresh,
        )
    except KeyboardInterrupt:
        out = Path(args.out_dir) if args.out_dir else Path(args.checkpoint or ".") / "fit_beta"
        print(
            f"\n{prog}: interrupted; the c values measured so far are kept in {out / RESULTS} "
            "(run the same command again to continue); config.json is unchanged",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError) as e:  # DropeConfigError, ServerConfigError are ValueErrors
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if not args.no_write:
        write_coef(ckpt, result["best_coef"], result["mode"])
    print(
        f"best c = {result['best_coef']:g} ({result['mode']} mode; {result['criterion']}); "
        f"{'written to' if not args.no_write else 'not written to'} {Path(ckpt) / 'config.json'}; "
        f"table and plot in {Path(args.out_dir) if args.out_dir else Path(ckpt) / 'fit_beta'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
