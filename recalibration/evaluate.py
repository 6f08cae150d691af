"""Held-out perplexity vs length on vLLM's engine: a DroPE checkpoint against its RoPE parent, as is and with YaRN.

    python -m recalibration.evaluate CKPT --data SOURCE [--baseline BASE] [--lengths 1x,2x,4x] [vLLM engine flags]
    python -m recalibration.evaluate --base-url http://127.0.0.1:8000 --base-url http://127.0.0.1:8001 \\
        --tokenizer CKPT --data SOURCE --lengths 4096,8192,16384 --out-dir eval   # running servers

Engine mode measures, each loaded in turn on vLLM with the given engine flags
(``--tensor-parallel-size``, ``--dtype``, ...):

  DroPE (c=C)        CKPT at the c in its config.json (what fit_beta wrote)
  DroPE (c=0)        the same engine with c set to 0 in place (no reload)
  RoPE               the parent as it is (only vLLM's length check raised)
  RoPE + YaRN xF     the parent with YaRN scaled so its context covers the longest
                     length (F = longest / its max_position_embeddings), the same
                     --hf-overrides drope-server or vllm serve would be given

The parent is --baseline, by default the base of the recalibration run CKPT came
from (its recalib_config.json). Server mode measures any running vLLM server(s)
(drope-server, vanilla vLLM with YaRN, ...) the same way, through ``prompt_logprobs``
on /v1/completions; the tokens come from --tokenizer (or CKPT), so every row reads
the same windows. Lengths are multiples of L_train (CKPT's, or the first server's
/v1/models DroPE card) or token counts.

Writes --out-dir (default CKPT/evaluate): evaluate.json (rewritten after every row,
so an interrupted run keeps its rows) and evaluate.png (perplexity vs length, log axes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .perplexity import add_measurement_args, save_plot, write_json_atomic


def evaluate(args: argparse.Namespace, ckpt: str | None, log=print) -> dict[str, Any]:
    from model_patches.config import DropeConfig, is_drope_config, with_pinned_train_context
    from server.config import read_model_config

    from .engine import (
        drope_overrides,
        engine,
        rope_overrides,
        set_beta,
        user_max_model_len,
        yarn_overrides,
    )
    from .perplexity import engine_nll, heldout_tokens_for, measure, parse_lengths, server_nll

    servers = [_server_card(url, args.api_key, args.served_model) for url in args.base_url or []]
    drope = baseline = base_cfg = None
    if ckpt:
        file = read_model_config(ckpt)
        if is_drope_config(file):
            drope = DropeConfig.from_hf_config(with_pinned_train_context(file, {}))
        elif not servers:
            raise ValueError(
                f"{ckpt} is a plain {file.get('model_type')} checkpoint; evaluate measures a DroPE "
                "checkpoint against its parent (pass the parent with --baseline)"
            )
    if not servers:
        if not ckpt:
            raise ValueError("give a DroPE checkpoint, or --base-url of running servers")
        baseline = args.baseline or _run_base(ckpt)
        base_cfg = read_model_config(baseline) if baseline else None
    train_context = (
        drope.train_context if drope else next((s["train_context"] for s in servers if s["train_context"]), None)
    )
    lens = sorted(set(parse_lengths(args.lengths, train_context)))
    longest = max(lens)
    tokenizer = args.tokenizer or ckpt
    if not tokenizer:
        raise ValueError(
            "--base-url needs --tokenizer (a local directory or hub id) to cut the same windows for every server"
        )
    if servers:
        for s in servers:
            if s["max_model_len"] and longest + 1 > s["max_model_len"]:
                raise ValueError(
                    f"length {longest} (+1 generated token) is beyond {s['url']}'s max_model_len {s['max_model_len']}"
                )
    max_model_len = user_max_model_len(args) or longest + 1
    if longest + 1 > max_model_len:
        raise ValueError(f"length {longest} (+1 generated token) is beyond --max-model-len {max_model_len}")
    if args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    tokens = heldout_tokens_for(tokenizer, args.data, args.heldout_docs, longest)

    out = Path(args.out_dir) if args.out_dir else Path(ckpt) / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "complete": False,
        "checkpoint": ckpt,
        "baseline": baseline,
        "train_context": train_context,
        "lengths": lens,
        "windows": args.windows,
        "data": args.data,
        "perplexity": {},
        "rows": {},
    }
    L_ref = train_context or min(lens)

    def row(name: str, nll, how: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        result["perplexity"][name] = {
            str(L): p for L, p in measure(nll, tokens, lens, args.windows, L_ref, f"{name:<22}", log).items()
        }
        result["rows"][name] = {**how, "seconds": round(time.perf_counter() - t0, 2)}
        write_json_atomic(out / "evaluate.json", result)

    for s in servers:
        row(f"{s['model']} @ {s['url']}", server_nll(s["url"], s["model"], args.api_key), {"base_url": s["url"]})
    if not servers:
        mode = "log" if drope.beta_mode == "none" else drope.beta_mode
        fitted = drope.beta_coef if drope.beta_mode != "none" else 0.0
        if not fitted:
            log(
                f"{ckpt}: config.json has no fitted c (drope_beta_coef = 0); run recalibration.fit_beta first "
                "to measure DroPE at its fitted c"
            )
        over = drope_overrides(drope, mode, max_model_len)
        log(f"loading {ckpt} ...")
        with engine(args, ckpt, over, max_model_len) as llm:
            for c in dict.fromkeys([fitted, 0.0]):
                set_beta(llm, c, mode)
                row(f"DroPE (c={c:g})", engine_nll(llm), {"model": ckpt, "beta_coef": c, "beta_mode": mode})
        if baseline:
            original = base_cfg.get("max_position_embeddings") or drope.train_context
            variants = {
                "RoPE": rope_overrides(base_cfg, max_model_len),
                f"RoPE + YaRN x{max(1.0, longest / original):g}": yarn_overrides(
                    base_cfg, longest, original, max_model_len
                ),
            }
            for name, over in variants.items():
                log(f"loading {baseline} as {name} ...")
                with engine(args, baseline, over, max_model_len) as llm:
                    row(name, engine_nll(llm), {"model": baseline, "hf_overrides": over})
        else:
            log("no RoPE parent known (no --baseline, no recalib_config.json beside the checkpoint): DroPE rows only")
    result["complete"] = True
    write_json_atomic(out / "evaluate.json", result)
    plot(result, out / "evaluate.png")
    return result


def _run_base(ckpt: str) -> str | None:
    """The base of the recalibration run a checkpoint came from (<run>/final beside <run>/recalib_config.json)."""
    run_cfg = Path(ckpt).parent / "recalib_config.json"
    if not run_cfg.exists():
        return None
    from .run import resolve_base

    return str(resolve_base(json.loads(run_cfg.read_text())["base"]))


def _server_card(url: str, api_key: str | None, model: str | None) -> dict[str, Any]:
    """What /v1/models says: the served name, its max_model_len and (drope-server) L_train."""
    import httpx

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"{url} does not answer: {e}") from None
    if r.status_code != 200:
        raise ValueError(f"{url}/v1/models: HTTP {r.status_code}: {r.text[:300]}")
    cards = r.json()["data"]
    card = next((c for c in cards if c["id"] == model), None) if model else cards[0]
    if card is None:
        raise ValueError(f"{url} does not serve {model!r} (it serves {', '.join(c['id'] for c in cards)})")
    return {
        "url": url,
        "model": card["id"],
        "max_model_len": card.get("max_model_len"),
        "train_context": (card.get("drope") or {}).get("train_context"),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    L_ref = result["train_context"] or min(result["lengths"])
    xs = [L / L_ref for L in result["lengths"]]
    series = {name: (xs, [ppl[str(L)] for L in result["lengths"]]) for name, ppl in result["perplexity"].items()}
    save_plot(
        path,
        series,
        "length / training context" if result["train_context"] else f"length / {L_ref} tokens",
        log_axes=True,
    )


def build_parser():
    from model_patches.config import require_vllm

    require_vllm("recalibration.evaluate")  # it measures on vLLM's engine
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(
        prog="python -m recalibration.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_measurement_args(p, "1x,2x,4x", "DroPE checkpoint: a directory, alias or hub id")
    p.add_argument(
        "--baseline",
        default=None,
        help="RoPE parent (default: the base of the recalibration run CKPT came from, if known)",
    )
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="measure this running vLLM server instead of loading engines (repeat for several)",
    )
    p.add_argument("--served-model", default=None, help="with --base-url: the served model name (default: the first)")
    p.add_argument("--api-key", default=None, help="with --base-url: the servers' API key")
    p.add_argument("--out-dir", default=None, help="(default: CHECKPOINT/evaluate)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .perplexity import checkpoint_of

    prog = "recalibration.evaluate"
    try:
        parser = build_parser()
    except ImportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        ckpt = checkpoint_of(args, prog) if (args.checkpoint or args.model or not args.base_url) else None
        if not args.out_dir and not (ckpt and Path(ckpt).is_dir()):
            raise ValueError("pass --out-dir (the checkpoint is not a local directory to write evaluate/ into)")
        result = evaluate(args, ckpt)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; the rows measured so far are in evaluate.json", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir) if args.out_dir else Path(ckpt) / "evaluate"
    width = max(len("held-out perplexity"), *(len(n) for n in result["perplexity"]))
    print(f"\n{'held-out perplexity':<{width}}  " + "  ".join(f"{L:>9}" for L in result["lengths"]))
    for name, ppl in result["perplexity"].items():
        print(f"{name:<{width}}  " + "  ".join(f"{ppl[str(L)]:>9.3f}" for L in result["lengths"]))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
