"""Real text cut to exact token counts: the Paul Graham essays of the classic haystack test."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=2)
def corpus_text(path: str | None = None) -> str:
    """All essays, in a fixed order, separated by blank lines (or any .txt files under ``path``)."""
    if path is None:
        from model_patches.assets import paul_graham_essays_dir

        root = paul_graham_essays_dir()
    else:
        root = Path(path)
    files = sorted(root.glob("*.txt")) if root.is_dir() else [root]
    if not files:
        raise FileNotFoundError(f"no .txt files under {root}")
    return "\n\n".join(f.read_text(errors="replace").strip() for f in files)


class TokenCorpus:
    """The corpus tokenised once; prompts are contiguous token windows of it."""

    def __init__(self, tokenizer: Any, path: str | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = tokenizer.encode(corpus_text(path), add_special_tokens=False)

    def window(self, n_tokens: int, rng: random.Random) -> list[int]:
        """n_tokens consecutive corpus tokens from a random offset (the corpus repeats if too short)."""
        ids = self.ids
        if n_tokens > len(ids):
            ids = ids * (n_tokens // len(ids) + 1)
        start = rng.randrange(0, len(ids) - n_tokens + 1)
        return ids[start : start + n_tokens]

    def prefix(self, n_tokens: int) -> list[int]:
        reps = n_tokens // len(self.ids) + 1
        return (self.ids * reps)[:n_tokens]
