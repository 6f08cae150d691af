"""Held-out perplexity at a given window length: the measurement fit_beta and evaluate share."""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def perplexity(model: Any, tokens: list[int], length: int, max_windows: int = 4, stride: int | None = None) -> float:
    """exp(mean next-token NLL) over up to ``max_windows`` non-overlapping windows of ``length`` tokens.

    Every window starts at position 0 (its own BOS-less start), so position p in the
    window is absolute position p: exactly what beta sees when serving a prompt.
    """
    stride = stride or length
    starts = list(range(0, len(tokens) - length + 1, stride))[:max_windows]
    if not starts:
        raise ValueError(f"need at least {length} held-out tokens for a {length}-token window, have {len(tokens)}")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in starts:
        x = torch.tensor([tokens[s : s + length]], device=device)
        logits = model(x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(nll / count)


def parse_lengths(text: str, train_context: int) -> list[int]:
    """'1x,2x,4x' (multiples of train_context) or plain token counts '2048,4096'."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * train_context) if part.endswith("x") else int(part))
    return out


def heldout_for(ckpt: Any, source: str, heldout_docs: int, lengths: str) -> tuple[Any, list[int], list[int]]:
    """(DropeConfig of ckpt, target lengths in tokens, held-out tokens long enough for the longest)."""
    from transformers import AutoTokenizer

    from model_patches.config import DropeConfig

    from .config import DataConfig
    from .data import heldout_tokens

    drope = DropeConfig.from_pretrained(ckpt)
    lens = parse_lengths(lengths, drope.train_context)
    tokens = heldout_tokens(DataConfig(source=source, heldout_docs=heldout_docs), AutoTokenizer.from_pretrained(ckpt))
    if len(tokens) < max(lens):
        raise ValueError(f"held-out text has {len(tokens)} tokens, fewer than the longest length {max(lens)}; "
                         "hold out more documents (--heldout-docs)")
    return drope, lens, tokens


def add_measurement_args(p: Any, default_lengths: str) -> None:
    """The arguments fit_beta and evaluate share."""
    p.add_argument("checkpoint", help="DroPE checkpoint directory")
    p.add_argument("--data", required=True, help="held-out text source (same forms as recalibration.run --data)")
    p.add_argument("--lengths", default=default_lengths,
                   help=f"multiples of L_train (2x) or token counts (default: {default_lengths})")
    p.add_argument("--windows", type=int, default=4, help="windows per length (default: 4)")
    p.add_argument("--heldout-docs", type=int, default=2, help="documents held out at the start of the source (default: 2)")


def save_plot(path: Any, series: dict[str, tuple[list[float], list[float]]], xlabel: str, title: str = "",
              vline: tuple[float, str] | None = None, log_axes: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if vline:
        ax.axvline(vline[0], color="grey", linestyle="--", label=vline[1])
    if log_axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(out_dir: Any, name: str, result: dict[str, Any], plot: Any) -> Any:
    """<out_dir>/<name>.json and <name>.png; returns the directory."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    return out
