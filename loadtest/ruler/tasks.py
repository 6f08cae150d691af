"""RULER's task registry: each task's name, templates, generation budget and metric, as RULER defines them.

Sources in NVIDIA/RULER: scripts/synthetic.yaml (the tasks and their knobs), scripts/data/synthetic/constants.py
(templates, answer prefixes, budgets) and scripts/eval/synthetic/constants.py (metrics). Nothing here talks to
a server or builds a prompt: prompts.py does that from these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# NIAH keys. RULER draws adjective-noun keys from the wonderwords lists (millions of pairs); these give 483, which
# is why distractor needles exclude the real keys (prompts.Builder._pieces); RULER relies on a clash being rare.
ADJ = (
    "elite",
    "quiet",
    "amber",
    "rapid",
    "gentle",
    "hollow",
    "silver",
    "brave",
    "crimson",
    "lucky",
    "frozen",
    "noble",
    "tender",
    "bitter",
    "cheerful",
    "ancient",
    "curious",
    "fragile",
    "glossy",
    "humble",
    "jolly",
    "mellow",
    "placid",
)
NOUN = (
    "butterfly",
    "harbor",
    "lantern",
    "meadow",
    "falcon",
    "glacier",
    "orchard",
    "compass",
    "violin",
    "canyon",
    "pebble",
    "comet",
    "thimble",
    "walrus",
    "saddle",
    "pendant",
    "kettle",
    "quarry",
    "sparrow",
    "tundra",
    "marble",
)


@dataclass(frozen=True)
class NiahSpec:
    """One NIAH variant in RULER's terms: type_haystack, type_needle_k / _v, num_needle_k / _v / _q."""

    haystack: str  # essay | noise | needle
    key: str  # words | uuids
    value: str  # numbers | uuids
    k: int = 1  # needles (keys) in the haystack; RULER raises it to q
    v: int = 1  # values per key
    q: int = 1  # keys asked

    def __post_init__(self) -> None:
        if self.haystack not in ("essay", "noise", "needle"):
            raise ValueError(f"haystack must be essay, noise or needle, got {self.haystack!r}")


@dataclass(frozen=True)
class Task:
    """One RULER task: its generation budget (tokens_to_generate, counted in the length L) and metric."""

    name: str
    budget: int
    metric: str  # string_match_all | string_match_part
    niah: NiahSpec | None = None  # NIAH tasks only: they alone have a depth axis
    data_flag: str | None = None  # the CLI flag that names the local file the task reads (QA)

    def __post_init__(self) -> None:
        if self.metric not in ("string_match_all", "string_match_part"):
            raise ValueError(f"{self.name}: unknown metric {self.metric!r}")


def _niah(name: str, *spec, **counts) -> Task:
    return Task(name, 128, "string_match_all", NiahSpec(*spec, **counts))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _niah("niah_single_1", "noise", "words", "numbers"),
        _niah("niah_single_2", "essay", "words", "numbers"),
        _niah("niah_single_3", "essay", "words", "uuids"),
        _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
        _niah("niah_multikey_2", "needle", "words", "numbers"),
        _niah("niah_multikey_3", "needle", "uuids", "uuids"),
        _niah("niah_multivalue", "essay", "words", "numbers", v=4),
        _niah("niah_multiquery", "essay", "words", "numbers", k=4, q=4),
        Task("vt", 30, "string_match_all"),
        Task("cwe", 120, "string_match_all"),
        Task("fwe", 50, "string_match_all"),
        Task("qa_1", 32, "string_match_part", data_flag="--squad-file"),  # RULER: SQuAD v2
        Task("qa_2", 32, "string_match_part", data_flag="--hotpotqa-file"),  # RULER: HotpotQA
    )
}
NIAH_TASKS = tuple(name for name, t in TASKS.items() if t.niah is not None)


def task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None
