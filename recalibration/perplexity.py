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
