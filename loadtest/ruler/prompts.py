"""Builds each RULER task's prompt in the served model's own tokens, to RULER's length L = prompt + budget.

NIAH and vt prompts are exactly L - budget tokens (haystack.py fills the haystack to the token); cwe, fwe and QA
take the most whole list items / documents that fit, found by RULER's binary search. A trial's seed fixes every
random draw, so the same seed gives the same prompt byte for byte.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from ..endpoint import ServerTokenizer
from . import haystack, qa, tasks
from .tasks import TASKS, NiahSpec


@dataclass
class Trial:
    """One prompt: token ids without the server's start tokens, ending with the answer prefix."""

    task: str
    length: int  # L: prompt (with what the server adds) + budget
    depth: float | None  # NIAH: where the first asked needle sits, 0 (first) to 1 (last); None for other tasks
    seed: int
    prompt_ids: list[int]
    answer_prefix: str
    refs: list[str]  # the answers the metric looks for

    @property
    def budget(self) -> int:
        return TASKS[self.task].budget


def split_answer_prefix(text: str, trial: Trial) -> tuple[str, str]:
    """A decoded prompt as (input, answer prefix): RULER's manifest keeps them apart, chat sends them as two turns."""
    cut = len(text) - len(trial.answer_prefix)
    return text[:cut], text[cut:]


class Builder:
    """Builds trials in the server's tokens. ``reserve``: tokens the server adds around ours (BOS, a chat template),
    taken from the haystack so the total stays L."""

    def __init__(
        self, tok: ServerTokenizer, essay_text: str, qa_files: dict[str, str | None] | None = None, reserve: int = 0
    ):
        self.tok = tok
        self.reserve = reserve
        self.sentences = haystack.essay_sentences(essay_text)
        self.vocab = sorted(set(re.findall(r"[a-z]{4,}", essay_text.lower())))  # cwe's words (RULER: wonderwords)
        self.qa_files = qa_files or {}  # {"qa_1": SQuAD v2 json, "qa_2": HotpotQA json}
        self._qa: dict[str, qa.QaData] = {}
        self._vt_noise: int | None = None

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def build(self, name: str, length: int, depth: float | None, seed: int) -> Trial:
        spec = tasks.task(name)
        rng = random.Random(f"{name}/{length}/{depth}/{seed}")
        target = length - spec.budget - self.reserve
        if spec.niah is not None:
            return self._niah(name, spec.niah, target, length, 0.0 if depth is None else depth, seed, rng)
        if name == "vt":
            return self._vt(target, length, seed, rng)
        sub = rng.random()  # one draw per trial: every size the search tries shares the words
        if name == "cwe":
            return self._fit(name, length, seed, lambda n: self._cwe(n, length, random.Random(sub)), target)
        if name == "fwe":
            return self._fit(
                name, length, seed, lambda n: self._fwe(n, target, random.Random(sub)), target, lo=target // 16
            )
        data = self._qa_data(name)
        return self._fit(name, length, seed, lambda n: qa.qa_prompt(data, n, random.Random(seed)), target, lo=1)

    # --- NIAH ---------------------------------------------------------------------------
    def _rand(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return f"{rng.choice(tasks.ADJ)}-{rng.choice(tasks.NOUN)}"

    def _niah(
        self, name: str, s: NiahSpec, target: int, length: int, depth: float, seed: int, rng: random.Random
    ) -> Trial:
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
        template, prefix = tasks.NIAH_TEMPLATE, tasks.NIAH_PREFIX
        if s.q * s.v == 1:  # RULER's singular rewrite
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prefix = prefix.replace("are", "is")
        head, tail = template.format(type_needle_v=type_v, context="\0", query=query).split("\0")
        prefix = prefix.format(type_needle_v=type_v, query=query)
        # The asked needle first: it is the one placed at the requested depth.
        needles = [
            tasks.NEEDLE.format(type_needle_v=s.value, key=keys[i], value=v)
            for i in sorted(range(k), key=lambda i: i != asked[0])
            for v in values[i]
        ]
        # The context starts on the template's new line: its first piece carries that "\n" in place of its
        # separator (the asked needle at depth 0, the haystack's first piece otherwise).
        sep = " " if s.haystack == "essay" else "\n"
        opens = depth == 0
        needle_ids = [self.ids(("\n" if j == 0 and opens else sep) + text) for j, text in enumerate(needles)]
        head_ids, tail_ids = self.ids(head[:-1]), self.ids(tail + prefix)
        budget = target - len(head_ids) - len(tail_ids) - sum(len(n) for n in needle_ids)
        if budget < 8:
            raise ValueError(f"length {length} is too short for {name}")
        units = haystack.fill(self._pieces(s, sep, sep if opens else "\n", rng, keys), budget)
        n = len(units)
        # The asked needle at its depth, every depth above 0 behind at least one piece; the others at random
        # inner boundaries, so none displaces it from either end (at depth 1 it goes after any that share its place).
        at = [0 if opens else max(1, round(depth * n))] + [rng.randint(1, max(1, n - 1)) for _ in needle_ids[1:]]
        order = list(range(1, len(at))) + [0] if depth == 1 else list(range(len(at)))
        body = haystack.insert(units, [needle_ids[j] for j in order], [at[j] for j in order])
        ids = head_ids + body + tail_ids
        assert len(ids) == target, (len(ids), target)
        return Trial(name, length, depth, seed, ids, prefix, [v for i in asked for v in values[i]])

    def _pieces(
        self, s: NiahSpec, sep: str, first_sep: str, rng: random.Random, keys: Collection[str] = ()
    ) -> Iterator[list[int]]:
        """The haystack's pieces in order, each tokenised with its separator in front, without end (the essays
        start over after the last sentence, as RULER repeats them). Distractor needles never repeat a real key:
        with our 483 keys a repeat would give the asked key a second value; RULER's millions make it rare."""
        for i in itertools.count():
            if s.haystack == "essay":
                text = self.sentences[i % len(self.sentences)]
            elif s.haystack == "noise":
                text = tasks.NOISE
            else:
                key = self._rand(s.key, rng)
                while key in keys:
                    key = self._rand(s.key, rng)
                text = tasks.NEEDLE.format(type_needle_v=s.value, key=key, value=self._rand(s.value, rng))
            yield self.ids((first_sep if i == 0 else sep) + text)

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
        lines = [tasks.NOISE] * n_noise
        for j, at in enumerate(sorted(rng.sample(range(n_noise), len(chain)))):
            lines.insert(at + j, chain[j])
        text = tasks.VT_TEMPLATE.format(context="\n".join(lines), query=value)
        return text + tasks.VT_PREFIX.format(num_v=5, query=value), names

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
        head, tail = tasks.VT_TEMPLATE.format(context="\0", query=value).split("\0")
        prefix = tasks.VT_PREFIX.format(num_v=5, query=value)
        head_ids, tail_ids = self.ids(example + head[:-1]), self.ids(tail + prefix)  # pieces bring their own "\n"
        chain_ids = [self.ids("\n" + c) for c in chain]
        budget = target - len(head_ids) - len(tail_ids) - sum(len(c) for c in chain_ids)
        if budget < 8:
            raise ValueError(f"length {length} is too short for vt")
        units = haystack.fill(self._pieces(NiahSpec("noise", "words", "numbers"), "\n", "\n", rng), budget)
        at = sorted(rng.randint(0, len(units)) for _ in chain_ids)  # in order: the chain reads top to bottom
        ids = head_ids + haystack.insert(units, chain_ids, at) + tail_ids
        assert len(ids) == target, (len(ids), target)
        return Trial("vt", length, None, seed, ids, prefix, names)

    # --- cwe / fwe / qa: the most whole items that fit -----------------------------------
    def _fit(
        self,
        name: str,
        length: int,
        seed: int,
        render: Callable[[int], tuple[str, str, list[str]]],
        target: int,
        lo: int = 10,
    ) -> Trial:
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
            raise ValueError(f"length {length} is too short for {name}")
        ids, prefix, refs = best
        return Trial(name, length, None, seed, ids, prefix, refs)

    def _cwe(self, n_words: int, length: int, rng: random.Random) -> tuple[str, str, list[str]]:
        """RULER's common_words_extraction: one solved example, then the list of 10 common words repeated 30
        times and the others 3 times (below 4K: 6 and 1, RULER's short-context counts)."""

        def example(n: int, common_reps: int, uncommon_reps: int) -> tuple[str, list[str]]:
            words = rng.sample(self.vocab, min(len(self.vocab), n))
            common, uncommon = words[:10], words[10:]
            items = common * common_reps + uncommon * uncommon_reps
            rng.shuffle(items)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

        shot, shot_answer = example(20, 3, 1) if length < 4096 else example(40, 10, 3)
        context, common = example(n_words, 6, 1) if length < 4096 else example(n_words, 30, 3)
        solved = (
            tasks.CWE_TEMPLATE.format(context=shot)
            + tasks.CWE_PREFIX
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
        )
        return solved + "\n" + tasks.CWE_TEMPLATE.format(context=context), tasks.CWE_PREFIX, common

    def _fwe(self, n_words: int, target: int, rng: random.Random) -> tuple[str, str, list[str]]:
        """RULER's freq_words_extraction: 6-letter coded words with Zipf(alpha=2) counts; the top-ranked one is
        the noise word '...', the answer the next three."""
        vocab_size = max(8, target // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."
        zeta2 = math.pi**2 / 6
        counts = [int(n_words * k**-2.0 / zeta2) for k in range(1, len(words) + 1)]
        sampled = [w for w, c in zip(words, counts, strict=False) for _ in range(c)]
        rng.shuffle(sampled)
        return tasks.FWE_TEMPLATE.format(context=" ".join(sampled)), tasks.FWE_PREFIX, words[1:4]

    def _qa_data(self, name: str) -> qa.QaData:
        if name not in self._qa:
            path = self.qa_files.get(name)
            if not path:
                raise ValueError(
                    f"{name} needs {TASKS[name].data_flag}: a local copy in RULER's json format (not fetched here)"
                )
            self._qa[name] = qa.read_squad(path) if name == "qa_1" else qa.read_hotpotqa(path)
        return self._qa[name]
