"""RULER's long-context tasks (Hsieh et al. 2024, github.com/NVIDIA/RULER) against any OpenAI server.

    python -m loadtest.ruler --base-url http://127.0.0.1:8000 [--model NAME] \\
        --tasks niah_single_1,niah_multikey_1,vt --lengths 1k,2k,4k --depths 0,0.5,1 --trials 20 \\
        [--endpoint completions|chat] [--squad-file squad.json] [--hotpotqa-file hotpotqa.json] \\
        [--compare http://127.0.0.1:8001 --model2 NAME2] [--out-dir ruler-results]

Each task keeps RULER's name, template, answer prefix, generation budget and metric
(scripts/synthetic.yaml, scripts/data/synthetic/constants.py, scripts/eval/synthetic/constants.py):

  task             haystack          needles (key -> value)        asked                 budget  metric
  niah_single_1    noise sentences   1 word -> 7-digit number      1 key                 128     string_match_all
  niah_single_2    essays            1 word -> number              1 key                 128     string_match_all
  niah_single_3    essays            1 word -> uuid                1 key                 128     string_match_all
  niah_multikey_1  essays            4 words -> numbers            1 of the 4 keys       128     string_match_all
  niah_multikey_2  distractor needles 1 word -> number             1 key                 128     string_match_all
  niah_multikey_3  distractor needles 1 uuid -> uuid               1 key                 128     string_match_all
  niah_multivalue  essays            1 word -> 4 numbers           the key, all 4 values 128     string_match_all
  niah_multiquery  essays            4 words -> numbers            all 4 keys            128     string_match_all
  vt               noise sentences   1 chain of 4 hops             all 5 variable names  30      string_match_all
  cwe              numbered word list 10 common words (30x / 6x)   the 10 common words   120     string_match_all
  fwe              coded words, Zipf(alpha=2) counts               the 3 most frequent   50      string_match_all
  qa_1 / qa_2      SQuAD / HotpotQA documents (local file only)    the question          32      string_match_part

Length L follows RULER: prompt + generation budget = L, and the prompt is built in the
server's own tokens (asked of its /tokenize and /detokenize), so NIAH and vt prompts are
exactly L - budget tokens long (with --endpoint chat the chat template's tokens count too,
as RULER's model_template_token does); cwe, fwe and qa take the most whole list items / documents
that fit, as RULER does (the actual length is recorded per trial).
The essay haystack is RULER's: the essays from the beginning of their text, needles between
sentences, every piece joined by one space. Depth (NIAH only) is the position of the first
asked needle: 0 puts it right after the instruction, 1 right before the question (checked token by token when the trial is built);
RULER draws depths at random, here they are an axis of the heatmap (--trials per task and
length go round the depths) and the other needles sit at random sentence boundaries. vt and
cwe start with one solved example, as RULER's do. Trial seeds make prompts identical byte
for byte. Differences from RULER, on purpose or forced: no SQuAD / HotpotQA download (pass a
local file in RULER's json format), NIAH keys and cwe words come from built-in lists and the
essays' vocabulary (RULER: the wonderwords lists), sentences end at . ! ? before a capital
(RULER: nltk's punkt), the haystack's last piece is cut at a token to make L exact (RULER's at a word).

Scores are per trial in [0, 1] (RULER reports their mean x 100). Outputs results.json
(command, server /v1/models card, tool versions, every trial), a depth x length heatmap
per NIAH task, and for --compare a length x accuracy line plot per task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import string
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .endpoint import Endpoint, EndpointError, ServerTokenizer, connect, run_info

# --- RULER's templates (scripts/data/synthetic/constants.py) -------------------------------
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
                "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
               "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
               "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_PREFIX = " Answer:"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class NiahSpec:
    haystack: str  # noise | essay | needle
    key: str       # words | uuids
    value: str     # numbers | uuids
    k: int = 1
    v: int = 1
    q: int = 1


NIAH_TASKS = {  # scripts/synthetic.yaml (RULER raises k to q)
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", k=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", v=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", k=4, q=4),
}
BUDGET = {**dict.fromkeys(NIAH_TASKS, 128), "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
METRIC = {**dict.fromkeys([*NIAH_TASKS, "vt", "cwe", "fwe"], "string_match_all"), "qa_1": "string_match_part",
          "qa_2": "string_match_part"}
TASKS = tuple(BUDGET)
QA_FLAGS = {"qa_1": "--squad-file", "qa_2": "--hotpotqa-file"}  # RULER: qa_1 is SQuAD v2, qa_2 HotpotQA
ADJ = ("elite", "quiet", "amber", "rapid", "gentle", "hollow", "silver", "brave", "crimson", "lucky", "frozen", "noble",
       "tender", "bitter", "cheerful", "ancient", "curious", "fragile", "glossy", "humble", "jolly", "mellow", "placid")
# punkt (RULER's nltk sent_tokenize) is a trained model whose data is not installed here; this is its main rule
# without its abbreviation list: a sentence ends at . ! or ? (a closing quote or bracket may follow) before a
# space and a word that starts like a sentence.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]])) (?=[\"'(\[]?[A-Z0-9])")
NOUN = ("butterfly", "harbor", "lantern", "meadow", "falcon", "glacier", "orchard", "compass", "violin", "canyon",
        "pebble", "comet", "thimble", "walrus", "saddle", "pendant", "kettle", "quarry", "sparrow", "tundra", "marble")


# --- scoring: RULER's scripts/eval (postprocess_pred, string_match_all / _part), per trial ---
def postprocess(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def score(metric: str, pred: str, refs: list[str]) -> float:
    """One trial's score in [0, 1]: the fraction of refs found (all) or whether any is (part), case-insensitive."""
    pred = postprocess(pred).lower()
    hits = [r.lower() in pred for r in refs]
    if metric == "string_match_all":
        return sum(hits) / len(hits)
    if metric == "string_match_part":
        return float(any(hits))
    raise ValueError(f"unknown metric {metric!r}")


@dataclass
class Trial:
    task: str
    length: int
    depth: float | None
    seed: int
    prompt_ids: list[int]
    answer_prefix: str
    refs: list[str]
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token span of asked needles
    context_span: tuple[int, int] = (0, 0)

    @property
    def budget(self) -> int:
        return BUDGET[self.task]


class Builder:
    """Builds trials in the server's tokens; the essay text is tokenised once per sentence and cached."""

    def __init__(self, tok: ServerTokenizer, essay_text: str, qa_files: dict[str, str] | None = None,
                 reserve: int = 0):
        self.tok = tok
        self.reserve = reserve  # tokens the chat template will add: taken from the haystack, so the total stays L
        # RULER's essays: whitespace collapsed; joined with one space, the sentences give that text back
        self.sentences = [s for s in _SENTENCE_BREAK.split(re.sub(r"\s+", " ", essay_text).strip()) if s]
        self.vocab = sorted({w for w in re.findall(r"[a-z]{4,}", essay_text.lower())})
        self.qa_files = qa_files or {}  # {"qa_1": SQuAD v2 json, "qa_2": HotpotQA json}
        self._qa: dict[str, tuple[list[dict], list[str]]] = {}
        self._vt_noise: int | None = None

    # token pieces
    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def build(self, task: str, length: int, depth: float | None, seed: int) -> Trial:
        if task not in BUDGET:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        rng = random.Random(f"{task}/{length}/{depth}/{seed}")
        target = length - BUDGET[task] - self.reserve
        if task in NIAH_TASKS:
            return self._niah(task, NIAH_TASKS[task], target, length, 0.0 if depth is None else depth, seed, rng)
        if task == "vt":
            return self._vt(target, length, seed, rng)
        sub = rng.random()  # one draw per trial: every size the search tries shares the words
        if task == "cwe":
            return self._fit(task, length, seed, lambda n: self._cwe(n, length, random.Random(sub)), target)
        if task == "fwe":
            return self._fit(task, length, seed, lambda n: self._fwe(n, target, random.Random(sub)), target,
                             lo=target // 16)
        return self._fit(task, length, seed, lambda n: self._qa_text(task, n, random.Random(seed)), target, lo=1)

    # --- NIAH ---------------------------------------------------------------------------
    def _rand(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return f"{rng.choice(ADJ)}-{rng.choice(NOUN)}"

    def _niah(self, task: str, s: NiahSpec, target: int, length: int, depth: float, seed: int,
              rng: random.Random) -> Trial:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        k = max(s.k, s.q)
        keys: list[str] = []
        while len(keys) < k:
            key = self._rand(s.key, rng)
            if key not in keys:
                keys.append(key)
        values = [[self._rand(s.value, rng) for _ in range(s.v)] for _ in keys]
        asked = rng.sample(range(k), s.q)
        query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if s.q > 1 else keys[asked[0]]
        type_v = s.value if s.q * s.v > 1 else s.value[:-1]
        template = NIAH_TEMPLATE
        if s.q * s.v == 1:  # RULER's singular rewrite
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = NIAH_PREFIX.replace("are", "is") if s.q * s.v == 1 else NIAH_PREFIX
        head, tail = template.format(type_needle_v=type_v, context="\0", query=query).split("\0")
        prefix = prefix.format(type_needle_v=type_v, query=query)
        sep = " " if s.haystack == "essay" else "\n"
        needles = [(i, NEEDLE.format(type_needle_v=s.value, key=keys[i], value=v)) for i in range(k) for v in values[i]]
        # the asked needles first: needle 0 is the one placed at the requested depth
        first = asked[0]
        needles.sort(key=lambda n: n[0] != first)
        # The context starts on the template's new line: its first piece carries that "\n" in place of its
        # separator (the asked needle at depth 0, the haystack's first piece otherwise).
        opens = depth == 0
        needle_ids = [self.ids(("\n" if j == 0 and opens else sep) + text) for j, (_, text) in enumerate(needles)]
        head_ids, tail_ids = self.ids(head[:-1]), self.ids(tail + prefix)
        budget = target - len(head_ids) - len(tail_ids) - sum(len(n) for n in needle_ids)
        if budget < 8:
            raise ValueError(f"length {length} is too short for {task}")
        units = self._haystack_units(s, sep, sep if opens else "\n", budget, rng, set(keys))
        # The asked needle at its depth, every depth above 0 behind at least one piece; the others at random
        # inner boundaries, so none displaces it from either end (at depth 1 it goes after any that share its place).
        n_units = len(units)
        at = [0 if opens else max(1, round(depth * n_units))] + [rng.randint(1, max(1, n_units - 1))
                                                                 for _ in needle_ids[1:]]
        body: list[list[int]] = []
        spans_by_needle: dict[int, tuple[int, int]] = {}
        order = sorted(range(len(needle_ids)), key=lambda j: (at[j], (j == 0) == (depth == 1), j))
        pos = len(head_ids)
        u = 0
        for j in order:
            while u < at[j]:
                body.append(units[u])
                pos += len(units[u])
                u += 1
            body.append(needle_ids[j])
            spans_by_needle[j] = (pos, pos + len(needle_ids[j]))
            pos += len(needle_ids[j])
        body.extend(units[u:])
        ids = head_ids + [t for piece in body for t in piece] + tail_ids
        assert len(ids) == target, (len(ids), target)
        asked_set = {keys[i] for i in asked}
        spans = [spans_by_needle[j] for j, (i, _) in enumerate(needles) if keys[i] in asked_set]
        refs = [v for i in asked for v in values[i]]
        return Trial(task, length, depth, seed, ids, prefix, refs, spans, (len(head_ids), len(ids) - len(tail_ids)))

    def _haystack_units(self, s: NiahSpec, sep: str, first_sep: str, budget: int, rng: random.Random,
                        keys: frozenset[str] | set[str] = frozenset()) -> list[list[int]]:
        """RULER's haystack from its beginning (the essays start over after the last sentence, as RULER repeats
        them), each piece tokenised with its separator in front, totalling exactly ``budget`` tokens: the last
        piece is cut at a token (RULER sizes in whole words and ends mid-sentence too).
        Needle haystacks (multikey_2/3) never repeat a real needle's key: with our small word lists a
        repeat would give the asked key a second value, which RULER's huge ones make vanishingly rare."""
        units: list[list[int]] = []
        total = 0
        i = 0
        while total < budget:
            if s.haystack == "essay":
                text = self.sentences[i % len(self.sentences)]
            elif s.haystack == "noise":
                text = NOISE
            else:
                key = self._rand(s.key, rng)
                while key in keys:
                    key = self._rand(s.key, rng)
                text = NEEDLE.format(type_needle_v=s.value, key=key, value=self._rand(s.value, rng))
            units.append(self.ids((first_sep if i == 0 else sep) + text)[: budget - total])
            total += len(units[-1])
            i += 1
        return units

    # --- vt -----------------------------------------------------------------------------
    def _vt_chain(self, rng: random.Random, letters: int) -> tuple[list[str], str, list[str]]:
        """RULER's generate_chains for one chain of 4 hops: 5 distinct names, a 5-digit value."""
        names: list[str] = []
        while len(names) < 5:
            n = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if n not in names:
                names.append(n)
        value = str(rng.randint(10000, 99998))
        return names, value, [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]

    def _vt_text(self, rng: random.Random, n_noise: int, letters: int) -> tuple[str, list[str]]:
        """A whole vt prompt, answer prefix included, over ``n_noise`` noise lines (RULER's noise haystack)."""
        names, value, chain = self._vt_chain(rng, letters)
        lines = [NOISE] * n_noise
        for j, at in enumerate(sorted(rng.sample(range(n_noise), len(chain)))):
            lines.insert(at + j, chain[j])
        return VT_TEMPLATE.format(context="\n".join(lines), query=value) + VT_PREFIX.format(num_v=5, query=value), names

    def _vt_example(self, rng: random.Random) -> str:
        """RULER's in-context example: a solved vt prompt of at most 500 tokens (3-letter names), then a newline."""
        if self._vt_noise is None:  # the most noise lines that fit, found once (RULER's binary search)
            lo, hi = 5, 64  # 5 noise lines at least: the chain is spread over distinct ones
            while lo < hi:
                mid = (lo + hi + 1) // 2
                text, names = self._vt_text(random.Random(0), mid, 3)
                lo, hi = (mid, hi) if len(self.ids(text + " " + " ".join(names) + "\n")) <= 500 else (lo, mid - 1)
            self._vt_noise = lo
        text, names = self._vt_text(rng, self._vt_noise, 3)
        return text + " " + " ".join(names) + "\n"

    def _vt(self, target: int, length: int, seed: int, rng: random.Random) -> Trial:
        example = self._vt_example(rng)
        names, value, chain = self._vt_chain(rng, 5)
        head, tail = VT_TEMPLATE.format(context="\0", query=value).split("\0")
        prefix = VT_PREFIX.format(num_v=5, query=value)
        head_ids, tail_ids = self.ids(example + head[:-1]), self.ids(tail + prefix)  # units bring their own newline
        chain_ids = [self.ids("\n" + c) for c in chain]
        budget = target - len(head_ids) - len(tail_ids) - sum(len(c) for c in chain_ids)
        if budget < 8:
            raise ValueError(f"length {length} is too short for vt")
        units = self._haystack_units(NiahSpec("noise", "words", "numbers"), "\n", "\n", budget, rng)
        at = sorted(rng.randint(0, len(units)) for _ in chain_ids)
        body, u = [], 0
        for a, c in zip(at, chain_ids, strict=True):
            body += [t for x in units[u:a] for t in x] + c
            u = max(u, a)
        body += [t for x in units[u:] for t in x]
        ids = head_ids + body + tail_ids
        assert len(ids) == target, (len(ids), target)
        return Trial("vt", length, None, seed, ids, prefix, names, [], (len(head_ids), len(ids) - len(tail_ids)))

    # --- cwe / fwe / qa: the most whole items that fit -----------------------------------
    def _fit(self, task: str, length: int, seed: int, render, target: int, lo: int = 10) -> Trial:
        """Largest n whose rendered prompt fits ``target`` server tokens (RULER's binary search)."""
        best = None
        hi = max(lo * 2, target)  # every item costs at least one token
        while lo <= hi:
            mid = (lo + hi) // 2
            text, prefix, refs = render(mid)
            ids = self.ids(text + prefix)
            if len(ids) <= target:
                best, lo = (ids, prefix, refs), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError(f"length {length} is too short for {task}")
        ids, prefix, refs = best
        return Trial(task, length, None, seed, ids, prefix, refs)

    def _cwe(self, n_words: int, length: int, rng: random.Random) -> tuple[str, str, list[str]]:
        """RULER's common_words_extraction: one solved example, then the list; below 4K the short-context counts."""
        def example(n: int, common_reps: int, uncommon_reps: int) -> tuple[str, list[str]]:
            words = rng.sample(self.vocab, min(len(self.vocab), n))
            common, uncommon = words[:10], words[10:]
            items = common * common_reps + uncommon * uncommon_reps
            rng.shuffle(items)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

        shot, shot_answer = example(20, 3, 1) if length < 4096 else example(40, 10, 3)
        context, common = example(n_words, 6, 1) if length < 4096 else example(n_words, 30, 3)
        solved = CWE_TEMPLATE.format(context=shot) + CWE_PREFIX + " " + " ".join(
            f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
        return solved + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, common

    def _fwe(self, n_words: int, target: int, rng: random.Random) -> tuple[str, str, list[str]]:
        vocab_size = max(8, target // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # RULER: the top-ranked word is noise
        zeta2 = math.pi**2 / 6
        counts = [int(n_words * k**-2.0 / zeta2) for k in range(1, len(words) + 1)]
        sampled = [w for w, c in zip(words, counts, strict=False) for _ in range(c)]
        rng.shuffle(sampled)
        return FWE_TEMPLATE.format(context=" ".join(sampled)), FWE_PREFIX, words[1:4]

    def _qa_data(self, task: str) -> tuple[list[dict], list[str]]:
        if task not in self._qa:
            flag = QA_FLAGS[task]
            if not self.qa_files.get(task):
                raise ValueError(f"{task} needs {flag}: a local copy in RULER's json format (not fetched here)")
            data = json.loads(Path(self.qa_files[task]).read_text())
            if task == "qa_1":  # RULER's read_squad: distractors from the same article come first
                docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
                idx = {c: i for i, c in enumerate(docs)}
                qas = [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                        "context": [idx[p["context"]]],
                        "more_context": [idx[o["context"]] for o in d["paragraphs"] if o["context"] != p["context"]]}
                       for d in data["data"] for p in d["paragraphs"] for q in p["qas"] if not q.get("is_impossible")]
            else:  # RULER's read_hotpotqa
                docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
                idx = {c: i for i, c in enumerate(docs)}
                qas = [{"query": d["question"], "outputs": [d["answer"]],
                        "context": [idx[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
            self._qa[task] = (qas, docs)
        return self._qa[task]

    def _qa_text(self, task: str, n_docs: int, rng: random.Random) -> tuple[str, str, list[str]]:
        """RULER's qa generate_input_output: the gold documents, then the same article's, then random others."""
        qas, docs = self._qa_data(task)
        qa = qas[rng.randrange(len(qas))]
        gold, more = qa["context"], qa.get("more_context", [])
        if n_docs < len(docs):
            if n_docs - len(gold) > len(more):
                others = [i for i in range(len(docs)) if i not in gold and i not in more]
                chosen = gold + more + rng.sample(others, max(0, n_docs - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, max(0, n_docs - len(gold)))
        else:
            chosen = (list(range(len(docs))) * (n_docs // len(docs) + 1))[:n_docs]
        rng.shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
        return QA_TEMPLATE.format(context=context, query=qa["query"]), QA_PREFIX, qa["outputs"]


# --- running ---------------------------------------------------------------------------------
async def run_trials(ep: Endpoint, tok: ServerTokenizer, trials: list[Trial], endpoint: str, concurrency: int,
                     desc: str, start: list[int] | None = None) -> list[dict[str, Any]]:
    """start: the server's start tokens (BOS), which token-id prompts carry as a text prompt would get them."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(trials), desc=desc, unit="trial", file=sys.stderr)

    async def one(client: httpx.AsyncClient, t: Trial) -> dict[str, Any]:
        body: dict[str, Any] = {"model": ep.model, "max_tokens": t.budget, "temperature": 0.0}
        if endpoint == "chat":  # the answer prefix opens the assistant turn, as RULER puts it after the model template
            text = tok.decode(t.prompt_ids)
            cut = len(text) - len(t.answer_prefix)
            body.update(messages=[{"role": "user", "content": text[:cut]}, {"role": "assistant", "content": text[cut:]}],
                        add_generation_prompt=False, continue_final_message=True)
            url = f"{ep.base_url}/chat/completions"
        else:
            body["prompt"] = (start or []) + t.prompt_ids
            url = f"{ep.base_url}/completions"
        async with sem:
            try:
                r = await client.post(url, json=body, headers=ep.headers)
                error = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                data = r.json() if r.status_code == 200 else {}
            except httpx.HTTPError as e:
                data, error = {}, e.__class__.__name__
        choice = (data.get("choices") or [{}])[0]
        answer = choice.get("text") if endpoint != "chat" else (choice.get("message") or {}).get("content")
        bar.update(1)
        return {"task": t.task, "length": t.length, "depth": t.depth, "seed": t.seed, "refs": t.refs,
                "prompt_tokens": (data.get("usage") or {}).get("prompt_tokens"),
                "answer": answer or "", "score": 0.0 if error else score(METRIC[t.task], answer or "", t.refs),
                "error": error}

    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0, connect=10.0)) as client:
            return list(await asyncio.gather(*[one(client, t) for t in trials]))
    finally:
        bar.close()


def accuracy(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[Any, float]]]:
    """{task: {length: {depth (None for depth-free tasks): mean score}}}."""
    acc: dict[str, dict[int, dict[Any, list[float]]]] = {}
    for r in rows:
        acc.setdefault(r["task"], {}).setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["score"])
    return {t: {L: {d: sum(x) / len(x) for d, x in ds.items()} for L, ds in ls.items()} for t, ls in acc.items()}


def by_length(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{task: {length: mean score over all its trials}}: RULER's per-task number (/ 100)."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        acc.setdefault(r["task"], {}).setdefault(r["length"], []).append(r["score"])
    return {t: {L: sum(x) / len(x) for L, x in ls.items()} for t, ls in acc.items()}


def plot_heatmaps(acc: dict, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, ls in acc.items():
        if task not in NIAH_TASKS:
            continue
        lengths = sorted(ls)
        depths = sorted({d for ds in ls.values() for d in ds})
        grid = [[ls[L].get(d, float("nan")) for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length L (tokens, prompt + answer budget)")
        ax.set_ylabel("depth of the asked needle")
        ax.set_title(f"{task} - {title}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label=METRIC[task])
        fig.tight_layout()
        paths.append(out_dir / f"heatmap_{task}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def plot_lines(named: list[tuple[str, dict[str, dict[int, float]]]], out_dir: Path) -> Path:
    """Length x accuracy, one panel per task, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(named[0][1])
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for name, acc in named:
            ls = sorted(acc.get(task, {}))
            ax.plot(ls, [acc[task][L] for L in ls], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "accuracy_by_length.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(named: list[tuple[str, dict[str, dict[int, float]]]]) -> str:
    lines = ["", "=" * 20 + " loadtest.ruler " + "=" * 20]
    lines += [f"server {i}: {name}" for i, (name, _) in enumerate(named, 1)]
    lines.append(f"{'task':<18}{'metric':<19}{'length':>7}" + "".join(f"{'score ' + str(i):>10}" for i in range(1, len(named) + 1)))
    for task, ls in named[0][1].items():
        for L in sorted(ls):
            vals = [acc.get(task, {}).get(L, float("nan")) for _, acc in named]
            lines.append(f"{task:<18}{METRIC[task]:<19}{L:>7}" + "".join(f"{v:>10.3f}" for v in vals))
    lines.append("(mean per-trial score over all trials of the task and length; RULER prints it x 100)")
    return "\n".join(lines)


def _lengths(text: str) -> list[int]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.ruler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the one the server lists)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,vt",
                   help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="4k,8k", help="L = prompt + answer budget, tokens; 16k allowed (default: 4k,8k)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="NIAH depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=int, default=20,
                   help="trials per (task, length); NIAH tasks spread them evenly over --depths (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="first trial seed (default: 0)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions: token ids; chat: messages, the answer prefix as a continued assistant turn")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    p.add_argument("--haystack", default=None, help="directory of .txt essays (default: the Paul Graham essays)")
    p.add_argument("--squad-file", default=None, help="qa_1's data: SQuAD v2 json (RULER's json/squad.json)")
    p.add_argument("--hotpotqa-file", default=None, help="qa_2's data: HotpotQA json (RULER's json/hotpotqa.json)")
    p.add_argument("--compare", default=None, help="second server, same trials, side by side")
    p.add_argument("--model2", default=None)
    p.add_argument("--api-key2", default=None)
    p.add_argument("--out-dir", default="ruler-results", help="results.json and plots (default: ruler-results)")
    p.add_argument("--export", default=None, metavar="FILE.jsonl",
                   help="also write the prompts as RULER's jsonl (input, outputs, length, answer_prefix) plus "
                        "lm-eval's fields (gen_prefix, max_length), to run the same prompts through other tools")
    p.add_argument("--export-only", action="store_true", help="with --export: write the prompts, send nothing")
    return p


def build_trials(builder: Builder, tasks: list[str], lengths: list[int], depths: list[float], trials: int,
                 seed: int) -> list[Trial]:
    from tqdm.auto import tqdm

    # trials per (task, length); NIAH trials go round the depths, so each heatmap cell gets trials / len(depths)
    specs = [(task, L, depths[k % len(depths)] if task in NIAH_TASKS else None, seed + k)
             for task in tasks for L in lengths for k in range(trials)]
    return [builder.build(*s) for s in tqdm(specs, desc="building prompts", unit="trial", file=sys.stderr)]


def export_jsonl(trials: list[Trial], tok: ServerTokenizer, path: Path, added: int = 0) -> int:
    """RULER's manifest rows (scripts/data/synthetic/*.py: input without the answer prefix, outputs, length,
    answer_prefix) plus what lm-eval's ruler tasks read (gen_prefix, joined to input by one space; max_length).
    Text prompts: the server adds its ``added`` start / template tokens itself."""
    with path.open("w") as f:
        for i, t in enumerate(trials):
            text = tok.decode(t.prompt_ids)
            cut = len(text) - len(t.answer_prefix)
            f.write(json.dumps({"index": i, "task": t.task, "input": text[:cut], "outputs": t.refs,
                                "length": added + len(t.prompt_ids) + t.budget, "max_length": t.length,
                                "answer_prefix": text[cut:], "gen_prefix": text[cut:].lstrip(" "),
                                "tokens_to_generate": t.budget, "metric": METRIC[t.task], "depth": t.depth,
                                "seed": t.seed}) + "\n")
    return len(trials)


def main(argv: list[str] | None = None) -> int:
    from .text import corpus_text

    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        lengths, depths = _lengths(args.lengths), [float(x) for x in args.depths.split(",") if x.strip()]
        bad = [t for t in tasks if t not in BUDGET] + [str(d) for d in depths if not 0 <= d <= 1]
        if bad:
            raise EndpointError(f"unknown tasks or depths outside [0, 1]: {', '.join(bad)}")
        targets = [connect(args.base_url, args.model, args.api_key)]
        if args.compare:
            targets.append(connect(args.compare, args.model2, args.api_key2))
        for ep in targets:
            ep.check_length(max(lengths), f"length {max(lengths)}")
        tok = ServerTokenizer(targets[0])
        if args.endpoint == "completions":
            for ep in targets[1:]:  # prompts go out as server 1's token ids
                probe = corpus_text(args.haystack)[:2000]
                other = ServerTokenizer(ep)
                if other.encode(probe) != tok.encode(probe) or other.start_tokens() != tok.start_tokens():
                    raise EndpointError(f"{ep.base_url} tokenises differently from {targets[0].base_url}: "
                                        "--compare with --endpoint completions needs one tokenizer (use --endpoint chat)")
        # What the server adds around our tokens is taken from the haystack, so prompt + budget is L:
        # the chat template (RULER's model_template_token), or the start tokens of a completion (BOS).
        start = tok.start_tokens() if args.endpoint == "completions" else []
        reserve = tok.chat_overhead() if args.endpoint == "chat" else len(start)
        builder = Builder(tok, corpus_text(args.haystack), {"qa_1": args.squad_file, "qa_2": args.hotpotqa_file},
                          reserve)
        trials = build_trials(builder, tasks, lengths, depths, args.trials, args.seed)
    except (EndpointError, ValueError, FileNotFoundError) as e:
        print(f"loadtest.ruler: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.export:
        n = export_jsonl(trials, tok, Path(args.export), added=reserve)
        print(f"wrote {n} prompts to {args.export}", file=sys.stderr)
        if args.export_only:
            return 0
    named, servers = [], {}
    for i, ep in enumerate(targets, 1):
        rows = asyncio.run(run_trials(ep, ServerTokenizer(ep), trials, args.endpoint, args.concurrency,
                                      f"server {i} {ep.model}", start))
        failed = [r for r in rows if r["error"]]
        if failed:  # scored 0 like a wrong answer, as RULER would; said, so nobody reads them as the model's
            print(f"server {i}: {len(failed)} of {len(rows)} requests failed and score 0 "
                  f"(first: {failed[0]['error']})", file=sys.stderr)
        acc = accuracy(rows)
        sub = out_dir / f"server{i}" if len(targets) > 1 else out_dir
        sub.mkdir(parents=True, exist_ok=True)
        plot_heatmaps(acc, sub, ep.model)
        named.append((f"{ep.model}@{ep.base_url}", by_length(rows)))
        servers[f"server{i}"] = {"base_url": ep.base_url, "card": ep.card, "by_length": named[-1][1],
                                 "failed_requests": len(failed),
                                 "accuracy": {t: {str(L): {str(d): a for d, a in ds.items()} for L, ds in ls.items()}
                                              for t, ls in acc.items()},
                                 "trials": rows}
    if len(named) > 1 or len(lengths) > 1:
        plot_lines(named, out_dir)
    spec = {k: v for k, v in vars(args).items() if k not in ("api_key", "api_key2")}
    record = {**run_info("loadtest.ruler", argv), "spec": spec, "budgets": BUDGET, "metrics": METRIC, **servers}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(format_table(named))
    print(f"results: {out_dir / 'results.json'}; plots: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
