"""RULER's QA tasks (scripts/data/synthetic/qa.py): read SQuAD v2 / HotpotQA json, pick documents as RULER does.

The data is not fetched here: pass local copies in RULER's json format (its json/download_qa_dataset.sh).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import QA_PREFIX, QA_TEMPLATE


@dataclass(frozen=True)
class Question:
    query: str
    outputs: list[str]
    gold: list[int]  # indices into QaData.docs
    more: list[int] = field(default_factory=list)  # SQuAD: the same article's other paragraphs


@dataclass(frozen=True)
class QaData:
    questions: list[Question]
    docs: list[str]


def read_squad(path: str | Path) -> QaData:
    """RULER's read_squad: answerable questions; the distractors that come first are the article's other paragraphs."""
    data = json.loads(Path(path).read_text())
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    idx = {c: i for i, c in enumerate(docs)}
    questions = [
        Question(
            q["question"],
            [a["text"] for a in q["answers"]],
            [idx[p["context"]]],
            [idx[o["context"]] for o in d["paragraphs"] if o["context"] != p["context"]],
        )
        for d in data["data"]
        for p in d["paragraphs"]
        for q in p["qas"]
        if not q.get("is_impossible")
    ]
    return QaData(questions, docs)


def read_hotpotqa(path: str | Path) -> QaData:
    """RULER's read_hotpotqa: each question's supporting paragraphs (title, newline, sentences) are its gold ones."""
    data = json.loads(Path(path).read_text())
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    idx = {c: i for i, c in enumerate(docs)}
    questions = [
        Question(d["question"], [d["answer"]], [idx[f"{t}\n{''.join(p)}"] for t, p in d["context"]]) for d in data
    ]
    return QaData(questions, docs)


def qa_prompt(data: QaData, n_docs: int, rng: random.Random) -> tuple[str, str, list[str]]:
    """RULER's generate_input_output: the gold documents, then the same article's, then random others, shuffled.
    Returns the prompt without its answer prefix, the prefix, and the reference answers."""
    qa = data.questions[rng.randrange(len(data.questions))]
    gold, more = qa.gold, qa.more
    if n_docs < len(data.docs):
        if n_docs - len(gold) > len(more):
            others = [i for i in range(len(data.docs)) if i not in gold and i not in more]
            chosen = gold + more + rng.sample(others, max(0, n_docs - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, max(0, n_docs - len(gold)))
    else:
        chosen = (list(range(len(data.docs))) * (n_docs // len(data.docs) + 1))[:n_docs]
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {i + 1}:\n{data.docs[d]}" for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=qa.query), QA_PREFIX, qa.outputs
