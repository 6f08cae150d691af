"""RULER's haystacks, built in token pieces to an exact token budget, and the insertion of needles between pieces.

RULER (scripts/data/synthetic/niah.py) has three haystacks:
- essay: the Paul Graham essays from the beginning of their text, whitespace collapsed to single spaces, split
  into sentences; needles go between sentences and every piece is joined to the next by one space;
- noise: one fixed paragraph, repeated, one per line;
- needle: distractor needles (other keys, other values), one per line.
RULER sizes a haystack in whole words or lines, the most that keep the prompt under the length; here the prompt
is exactly L - budget tokens, so the haystack is whole pieces from its beginning and the last piece is cut at a
token (RULER's essay ends cut at a word: both end mid-sentence). Each piece is tokenised with its separator in
front, so concatenating pieces never glues two of them together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# punkt (RULER's nltk sent_tokenize) is a trained model whose data is not installed here; this is its main rule
# without its abbreviation list: a sentence ends at . ! or ? (a closing quote or bracket may follow) before a
# space and a word that starts like a sentence.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]])) (?=[\"'(\[]?[A-Z0-9])")


def essay_sentences(text: str) -> list[str]:
    """The essays as RULER reads them (runs of whitespace made one space), in sentences: joined with one
    space they give that text back exactly."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_BREAK.split(flat) if s]


def fill(pieces: Iterable[list[int]], budget: int) -> list[list[int]]:
    """Pieces in order, as many as reach exactly ``budget`` tokens: the last one is cut at its end."""
    out: list[list[int]] = []
    total = 0
    for piece in pieces:
        if total >= budget:
            break
        out.append(piece[: budget - total])
        total += len(out[-1])
    if total != budget:
        raise ValueError(f"the haystack holds {total} tokens, fewer than the {budget} asked")
    return out


def insert(units: list[list[int]], items: list[list[int]], at: list[int]) -> list[int]:
    """``units`` with each ``items[j]`` placed before ``units[at[j]]`` (``at[j] == len(units)``: after the last);
    items at the same boundary keep their order in ``items``."""
    if len(at) != len(items) or not all(0 <= a <= len(units) for a in at):
        raise ValueError(f"insertion points {at} for {len(items)} items between {len(units)} units")
    out: list[int] = []
    u = 0
    for j in sorted(range(len(items)), key=lambda j: at[j]):  # sorted() is stable: ties keep list order
        while u < at[j]:
            out += units[u]
            u += 1
        out += items[j]
    for unit in units[u:]:
        out += unit
    return out
