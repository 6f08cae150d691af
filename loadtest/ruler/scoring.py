"""RULER's scoring (scripts/eval: postprocess_pred, string_match_all / string_match_part), per trial, and its means.

A trial scores in [0, 1]; RULER reports the mean over a task's samples x 100. The tests check these against a
transcription of RULER's functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def postprocess(pred: str) -> str:
    """RULER's postprocess_pred: control characters become newlines, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def score(metric: str, pred: str, refs: list[str]) -> float:
    """One trial's score: the fraction of refs found (all) or whether any is (part), case-insensitive."""
    pred = postprocess(pred).lower()
    hits = [r.lower() in pred for r in refs]
    if metric == "string_match_all":
        return sum(hits) / len(hits)
    if metric == "string_match_part":
        return float(any(hits))
    raise ValueError(f"unknown metric {metric!r}")


@dataclass
class Result:
    """One trial's outcome; a failed request scores 0, as in RULER, and says why in ``error``."""

    task: str
    length: int
    depth: float | None
    seed: int
    refs: list[str]
    prompt_tokens: int | None  # as the server counted them (its start tokens or chat template included)
    answer: str
    score: float
    error: str | None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def accuracy(rows: Iterable[Result]) -> dict[str, dict[int, dict[Any, float]]]:
    """{task: {length: {depth (None for depth-free tasks): mean score}}}: the heatmap's cells."""
    acc: dict[str, dict[int, dict[Any, list[float]]]] = {}
    for r in rows:
        acc.setdefault(r.task, {}).setdefault(r.length, {}).setdefault(r.depth, []).append(r.score)
    return {t: {L: {d: _mean(x) for d, x in ds.items()} for L, ds in ls.items()} for t, ls in acc.items()}


def by_length(rows: Iterable[Result]) -> dict[str, dict[int, float]]:
    """{task: {length: mean score over all its trials}}: RULER's per-task number (/ 100), not a mean of depth cells."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        acc.setdefault(r.task, {}).setdefault(r.length, []).append(r.score)
    return {t: {L: _mean(x) for L, x in ls.items()} for t, ls in acc.items()}
