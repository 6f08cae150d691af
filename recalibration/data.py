"""Training text: documents streamed through Hugging Face ``datasets``, tokenised, joined with EOS, packed.

Sources: a .txt / .md file or a directory of them (one document per file: the ``text`` builder with
``sample_by="document"``), .jsonl (the ``json`` builder, one document per line, field ``text_field``),
.parquet (the ``parquet`` builder, column ``text_field``), ``builtin:essays`` (the Paul Graham essays
that ship with the project's haystack package), or any other string, taken as a hub dataset name.
Every source is streamed, and every document comes with ``datasets``' own ``state_dict()`` just after
it: a position that ``load_state_dict`` resumes from by skipping the files (shards) already read and
then the rows of the current one, with nothing re-tokenised.

The first ``heldout_docs`` documents are held out; training sees the rest, so the split is the same for
every source and needs no pass over the data.

Two parts of ``datasets`` are left out, each because it would lose a guarantee the tests pin:

- its shuffle buffer (``IterableDataset.shuffle``) is not part of ``state_dict()`` (``datasets`` warns
  that "the shuffle buffer will be refilled"), so a resumed run would skip the buffered documents and
  draw another order instead of continuing exactly. Here documents are shuffled within consecutive
  windows of ``shuffle_buffer`` documents, by a permutation seeded by (seed, epoch, window): resuming
  re-reads the current window (without tokenising it) and goes on at the same index, so the saved state
  holds a position and counters, never document text.
- ``split_dataset_by_node`` gives each rank its own shards (or every world-size-th document), so what a
  run trains on would depend on its number of ranks: two ranks would not train on what one process
  trains on, and a checkpoint could not continue on another rank count. Here a single stream is cut
  into global batches and accelerate hands each rank its share (rank 0 reads; ``dispatch_batches``), so
  the stream's position is the run's, whatever the number of ranks.
"""

from __future__ import annotations

import copy
import functools
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from .config import DataConfig, RecalibConfigError

BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".parquet": "parquet"}

Position = Any
"""Where the next document starts: the ``datasets`` stream's ``state_dict()`` just after the previous
document (JSON-serialisable); None is the source's beginning."""


def read_documents(cfg: DataConfig, start: Position = None) -> Iterator[tuple[str, Position]]:
    """(document, position just after it), from ``start`` on. Documents are stripped of surrounding
    whitespace and empty ones skipped (the same rule for every format, so one corpus packs
    identically from .txt, .jsonl or .parquet)."""
    stream, text_field = _stream(cfg)
    ds = copy.deepcopy(stream)  # the cached stream stays at its beginning; iterations do not share state
    if start is not None:
        ds.load_state_dict(start)
    for row in ds:
        if text_field not in row:
            raise RecalibConfigError(f"{cfg.source} has no {text_field!r} field (fields: {', '.join(sorted(row))})")
        doc = row[text_field].strip() if isinstance(row[text_field], str) else ""
        if doc:
            yield doc, ds.state_dict()


@functools.lru_cache(maxsize=16)
def _stream(cfg: DataConfig) -> tuple[Any, str]:
    """(the source as a streamed ``datasets.IterableDataset``, its text field), built once per config."""
    try:
        import datasets
    except ImportError:
        raise RecalibConfigError(
            "recalibration reads its data through Hugging Face datasets: pip install datasets"
        ) from None
    files = _local_files(cfg)
    if files is None:
        return datasets.load_dataset(cfg.source, split=cfg.split, streaming=True), cfg.text_field
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise RecalibConfigError(
            f"{cfg.source} mixes formats ({', '.join(sorted({f.suffix for f in files}))}); "
            "one source holds .txt/.md, .jsonl or .parquet files"
        )
    builder = builders.pop()
    kw = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kw)
    return ds, "text" if builder == "text" else cfg.text_field


def _local_files(cfg: DataConfig) -> list[Path] | None:
    """The source's files in reading order; None for a hub dataset."""
    src = cfg.source
    if src == "builtin:essays":
        from model_patches.assets import paul_graham_essays_dir

        return sorted(paul_graham_essays_dir().glob("*.txt"))
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS)
        if not files:
            raise RecalibConfigError(f"no .txt/.md/.jsonl/.parquet files under {path}")
        return files
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise RecalibConfigError(f"{path}: expected a .txt, .md, .jsonl or .parquet file")
        return [path]
    if src.startswith(("/", ".", "~")) or path.suffix in (*BUILDERS, ".json"):
        raise RecalibConfigError(f"data source {src} does not exist")
    return None


def split_documents(cfg: DataConfig) -> tuple[list[str], Position]:
    """(held-out documents, position of the first training document)."""
    heldout: list[str] = []
    pos = None
    for doc, after in read_documents(cfg):
        heldout.append(doc)
        pos = after
        if len(heldout) == cfg.heldout_docs:
            break
    if not heldout:
        raise RecalibConfigError(f"data source {cfg.source} holds no documents")
    return heldout, pos


def pack(token_stream: Iterator[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut fixed-length sequences (the remainder is dropped)."""
    buf: list[int] = []
    for ids in token_stream:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            del buf[:seq_len]


def encode_doc(tokenizer: Any, doc: str) -> list[int]:
    """A document's tokens followed by EOS, the separator between packed documents."""
    eos = tokenizer.eos_token_id
    return tokenizer.encode(doc, add_special_tokens=False) + ([eos] if eos is not None else [])


@dataclass
class StreamState:
    """Everything the packed stream needs to continue exactly where it was, and no document text."""

    sequences: int = 0
    """Sequences emitted so far (over all epochs)."""
    epoch: int = 0
    position: Position = None
    """Where the current window starts; None: at the first training document."""
    window: int = 0
    """The current window's index in this epoch (it seeds the window's order)."""
    taken: int = 0
    """Documents of the current window already handed out."""
    tokens: list[int] = field(default_factory=list)
    """Tokenised but not yet emitted (carried across documents and epochs)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        return cls(**d)


class PackedTrainData(IterableDataset):
    """Endless packed training sequences: the training documents in order (or shuffled within
    seeded windows of ``shuffle_buffer`` documents), epoch after epoch.

    ``state_after(n)`` is the stream's state once n sequences have been consumed (a snapshot
    taken every ``snapshot_every`` sequences from where this iteration started: set it to the
    global sequences per optimizer step, and the loader may read ahead by a few steps);
    ``load_state_dict`` makes the next iteration start there."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int, snapshot_every: int = 1):
        self.cfg, self.tokenizer, self.seq_len, self.seed = cfg, tokenizer, seq_len, seed
        self.snapshot_every = snapshot_every
        self.start = StreamState()
        self._snapshots: deque[StreamState] = deque(maxlen=8)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = StreamState.from_dict(state)

    def state_after(self, sequences: int) -> dict[str, Any]:
        for s in reversed(self._snapshots):
            if s.sequences == sequences:
                return s.to_dict()
        if sequences == self.start.sequences:
            return self.start.to_dict()
        have = [s.sequences for s in self._snapshots]
        raise RuntimeError(
            f"no data-stream snapshot after {sequences} sequences (have {have}; snapshot_every={self.snapshot_every})"
        )

    def _documents(self, s: StreamState) -> Iterator[str]:
        """The training documents from state s on, updating s as each one is handed out."""
        size = max(self.cfg.shuffle_buffer, 1)
        while True:
            at_epoch_start = s.position is None and s.taken == 0
            source = read_documents(self.cfg, split_documents(self.cfg)[1] if s.position is None else s.position)
            while window := list(islice(source, size)):
                order = list(range(len(window)))
                if size > 1:
                    random.Random(f"{self.seed}:{s.epoch}:{s.window}").shuffle(order)
                for i in order[s.taken :]:
                    s.taken += 1
                    yield window[i][0]
                s.position, s.window, s.taken = window[-1][1], s.window + 1, 0
            if at_epoch_start and s.position is None:
                return  # an empty epoch: nothing to train on
            s.epoch, s.position, s.window, s.taken = s.epoch + 1, None, 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = copy.deepcopy(self.start)
        for doc in self._documents(s):
            s.tokens.extend(encode_doc(self.tokenizer, doc))
            while len(s.tokens) >= self.seq_len:
                t = torch.tensor(s.tokens[: self.seq_len], dtype=torch.long)
                del s.tokens[: self.seq_len]
                s.sequences += 1
                if (s.sequences - self.start.sequences) % self.snapshot_every == 0:
                    self._snapshots.append(copy.deepcopy(s))
                yield {"input_ids": t, "labels": t.clone()}


def heldout_tokens(cfg: DataConfig, tokenizer: Any) -> list[int]:
    heldout, _ = split_documents(cfg)
    return [t for doc in heldout for t in encode_doc(tokenizer, doc)]


def check_data(cfg: DataConfig, tokenizer: Any, seq_len: int) -> dict[str, int]:
    """Fail before any output is written: the source must give at least one training and one
    held-out sequence. Reads only as much as that takes."""
    held = heldout_tokens(cfg, tokenizer)
    if len(held) < seq_len:
        raise RecalibConfigError(
            f"the {cfg.heldout_docs} held-out document(s) of {cfg.source} give {len(held)} tokens, fewer than "
            f"one sequence of {seq_len}; lower --seq-len or hold out more documents (data.heldout_docs)"
        )
    _, start = split_documents(cfg)
    n = 0
    for doc, _ in read_documents(cfg, start):
        n += len(encode_doc(tokenizer, doc))
        if n >= seq_len:
            return {"heldout_tokens": len(held)}
    raise RecalibConfigError(
        f"{cfg.source} has only {n} training tokens after the held-out documents, fewer than one sequence of {seq_len}"
    )
