"""Training text: documents streamed from local files or the hub, tokenised, joined with EOS, packed.

Sources: a .txt / .md file, a directory of them (sorted, one document per file),
.jsonl (one document per line, field ``text_field``), .parquet (column
``text_field``, read in record batches), ``builtin:essays`` (the Paul Graham
essays that ship with the project's haystack package), or any other string,
taken as a Hugging Face datasets name and streamed. Nothing is loaded whole:
documents are read one at a time and packed on the fly.

The first ``heldout_docs`` documents are held out; training sees the rest, so
the split is the same for every source and needs no pass over the data.

Resuming is O(1) in the data already trained on: every document comes with the
position just after it (a file index and a byte offset or row number, or the
``datasets`` stream's own ``state_dict()`` for hub sources), and the packed stream's
state (position, tokens not yet emitted, shuffle buffer and its RNG) is saved with
each checkpoint, so ``--resume`` seeks instead of re-reading and re-tokenising.
"""

from __future__ import annotations

import copy
import json
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from .config import DataConfig, RecalibConfigError

TEXT_SUFFIXES = (".txt", ".md")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

Position = Any
"""Where the next document starts: [file index, byte offset (.jsonl) or row (.parquet)] for local
sources, the ``datasets`` stream state for hub sources; None is the source's beginning."""


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of the source in order."""
    for doc, _ in read_documents(cfg):
        yield doc


def read_documents(cfg: DataConfig, start: Position = None) -> Iterator[tuple[str, Position]]:
    """(document, position just after it), from ``start`` on. Documents are stripped of
    surrounding whitespace and empty ones skipped (the same rule for every format, so one
    corpus packs identically from .txt, .jsonl or .parquet)."""
    files = _local_files(cfg)
    raw = _read_hub(cfg, start) if files is None else _read_files(cfg, files, start or [0, 0])
    for doc, pos in raw:
        doc = doc.strip() if isinstance(doc, str) else ""
        if doc:
            yield doc, pos


def _local_files(cfg: DataConfig) -> list[Path] | None:
    """The source's files in reading order; None for a hub dataset."""
    src = cfg.source
    if src == "builtin:essays":
        from model_patches.assets import paul_graham_essays_dir

        return sorted(paul_graham_essays_dir().glob("*.txt"))
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES)
        if not files:
            raise RecalibConfigError(f"no .txt/.md/.jsonl/.parquet files under {path}")
        return files
    if path.is_file():
        return [path]
    if src.startswith(("/", ".", "~")) or path.suffix in DATA_SUFFIXES + (".json",):
        raise RecalibConfigError(f"data source {src} does not exist")
    return None


def _read_files(cfg: DataConfig, files: list[Path], start: list[int]) -> Iterator[tuple[str, Position]]:
    first, offset = start
    for i in range(first, len(files)):
        path, offset = files[i], (offset if i == first else 0)
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                f.seek(offset)
                for line in iter(f.readline, b""):
                    if line.strip():
                        row = json.loads(line)
                        if cfg.text_field not in row:
                            raise RecalibConfigError(f"{path} (byte {f.tell() - len(line)}) has no {cfg.text_field!r} field")
                        yield row[cfg.text_field], [i, f.tell()]
        elif path.suffix == ".parquet":
            yield from _read_parquet(cfg, path, i, offset)
        elif offset == 0:
            yield path.read_text(errors="replace"), [i + 1, 0]


def _read_parquet(cfg: DataConfig, path: Path, i: int, start_row: int) -> Iterator[tuple[str, Position]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if cfg.text_field not in pf.schema_arrow.names:
        raise RecalibConfigError(f"{path} has no column {cfg.text_field!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for g in range(pf.num_row_groups):  # metadata only: seek to the row group holding start_row
        n = pf.metadata.row_group(g).num_rows
        if row + n <= start_row:
            row += n
            continue
        for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=256, row_groups=[g]):
            for text in batch.column(0).to_pylist():
                row += 1
                if row > start_row:
                    yield text, [i, row]


def _read_hub(cfg: DataConfig, start: Position) -> Iterator[tuple[str, Position]]:
    try:
        import datasets
    except ImportError:
        raise RecalibConfigError(
            f"{cfg.source!r} is not a local path; to stream it from the Hugging Face hub install the 'hub' extra "
            "(pip install 'drope-server[hub]')"
        ) from None
    ds = datasets.load_dataset(cfg.source, split=cfg.split, streaming=True)
    if start is not None:
        ds.load_state_dict(start)  # datasets seeks to the shard and example: no re-reading
    for row in ds:
        yield row[cfg.text_field], ds.state_dict()


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


def tokenize_docs(tokenizer: Any, docs: Iterator[str]) -> Iterator[list[int]]:
    for doc in docs:
        yield encode_doc(tokenizer, doc)


@dataclass
class StreamState:
    """Everything the packed stream needs to continue exactly where it was."""

    sequences: int = 0
    """Sequences emitted so far (over all epochs)."""
    epoch: int = 0
    position: Position = None
    """Where the next document of this epoch starts; None: the first training document."""
    tokens: list[int] = field(default_factory=list)
    """Tokenised but not yet emitted (carried across documents and epochs)."""
    shuffle: list[str] = field(default_factory=list)
    draining: bool = False
    """The source is exhausted for this epoch; the shuffle buffer empties in order."""
    rng: Any = None
    """random.Random state of this epoch's shuffle (None: not started)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        s = cls(**d)
        if s.rng is not None:  # JSON turned getstate()'s tuples into lists
            s.rng = (s.rng[0], tuple(s.rng[1]), s.rng[2])
        return s


class PackedTrainData(IterableDataset):
    """Endless packed training sequences: the training documents in order (or through a seeded
    shuffle buffer), epoch after epoch.

    ``state_after(n)`` is the stream's state once n sequences have been consumed (a snapshot
    taken every ``snapshot_every`` sequences from where this iteration started: set it to the
    global sequences per optimizer step, and the loader may read ahead by a few steps);
    ``load_state_dict`` makes the next iteration start there."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int, snapshot_every: int = 1):
        self.cfg, self.tokenizer, self.seq_len, self.seed = cfg, tokenizer, seq_len, seed
        self.snapshot_every = snapshot_every
        self.start = StreamState()
        self._snapshots: deque[StreamState] = deque(maxlen=8)
        self._train_start: Position = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = StreamState.from_dict(state)

    def state_after(self, sequences: int) -> dict[str, Any]:
        for s in reversed(self._snapshots):
            if s.sequences == sequences:
                return s.to_dict()
        if sequences == self.start.sequences:
            return self.start.to_dict()
        have = [s.sequences for s in self._snapshots]
        raise RuntimeError(f"no data-stream snapshot after {sequences} sequences (have {have}; "
                           f"snapshot_every={self.snapshot_every})")

    def _documents(self, s: StreamState) -> Iterator[str]:
        """The training documents from state s on, updating s as each one is handed out."""
        if self._train_start is None:
            self._train_start = split_documents(self.cfg)[1]
        size = self.cfg.shuffle_buffer
        while True:
            handed_out = False
            source = read_documents(self.cfg, self._train_start if s.position is None else s.position)
            if size <= 1:
                for doc, s.position in source:
                    handed_out = True
                    yield doc
            else:
                if s.rng is None:
                    s.rng = random.Random(self.seed * 1000003 + s.epoch).getstate()
                rng = random.Random()
                rng.setstate(s.rng)
                if not s.draining:
                    for doc, s.position in source:
                        s.shuffle.append(doc)
                        if len(s.shuffle) >= size:
                            doc = s.shuffle.pop(rng.randrange(len(s.shuffle)))
                            s.rng = rng.getstate()
                            handed_out = True
                            yield doc
                    rng.shuffle(s.shuffle)
                    s.rng, s.draining = rng.getstate(), True
                while s.shuffle:
                    handed_out = True
                    yield s.shuffle.pop(0)
            if not handed_out and s.position is None:
                return  # an empty epoch: nothing to train on
            s.epoch, s.position, s.draining, s.rng = s.epoch + 1, None, False, None

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
    return [t for ids in tokenize_docs(tokenizer, iter(heldout)) for t in ids]


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
    for ids in tokenize_docs(tokenizer, (doc for doc, _ in read_documents(cfg, start))):
        n += len(ids)
        if n >= seq_len:
            return {"heldout_tokens": len(held)}
    raise RecalibConfigError(
        f"{cfg.source} has only {n} training tokens after the held-out documents, fewer than one "
        f"sequence of {seq_len}"
    )
