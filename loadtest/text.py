"""Real text for prompts: the Paul Graham essays of the classic haystack test (RULER's essay haystack)."""

from __future__ import annotations

import functools
from pathlib import Path


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
