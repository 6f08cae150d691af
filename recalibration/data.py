"""Training text: documents streamed from local files or the hub, tokenised, joined with EOS, packed.

Sources: a .txt / .md file, a directory of them (sorted, one document per file),
.jsonl (one document per line, field ``text_field``), .parquet (column
``text_field``, read in record batches), ``builtin:essays`` (the Paul Graham
essays that ship with the project's haystack package), or any other string,
taken as a Hugging Face datasets name and streamed. Nothing is loaded whole:
documents are read one at a time and packed on the fly.

The first ``heldout_docs`` documents are held out; training sees the rest, so
the split is the same for every source and needs no pass over the data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from .config import DataConfig, RecalibConfigError

TEXT_SUFFIXES = (".txt", ".md")


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of the source in order, stripped of surrounding whitespace, empty ones skipped
    (the same rule for every format, so one corpus packs identically from .txt, .jsonl or .parquet)."""
    for doc in _iter_raw(cfg):
        doc = doc.strip() if isinstance(doc, str) else ""
        if doc:
            yield doc


def _iter_raw(cfg: DataConfig) -> Iterator[str]:
    src = cfg.source
    if src == "builtin:essays":
        from model_patches.assets import paul_graham_essays_dir

        yield from _iter_text_files(sorted(paul_graham_essays_dir().glob("*.txt")))
        return
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet"))
        if not files:
            raise RecalibConfigError(f"no .txt/.md/.jsonl/.parquet files under {path}")
        for f in files:
            yield from _iter_raw(DataConfig(**{**cfg.__dict__, "source": str(f)}))
        return
    if path.is_file():
        if path.suffix == ".jsonl":
            with path.open() as f:
                for i, line in enumerate(f):
                    if line.strip():
                        row = json.loads(line)
                        if cfg.text_field not in row:
                            raise RecalibConfigError(f"{path}:{i + 1} has no {cfg.text_field!r} field")
                        yield row[cfg.text_field]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if cfg.text_field not in pf.schema_arrow.names:
                raise RecalibConfigError(f"{path} has no column {cfg.text_field!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=256):
                yield from batch.column(0).to_pylist()
        else:
            yield from _iter_text_files([path])
        return
    if src.startswith(("/", ".", "~")) or path.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet", ".json"):
        raise RecalibConfigError(f"data source {src} does not exist")
    try:
        import datasets
    except ImportError:
        raise RecalibConfigError(
            f"{src!r} is not a local path; to stream it from the Hugging Face hub install the 'hub' extra "
            "(pip install 'drope-server[hub]')"
        ) from None
    for row in datasets.load_dataset(src, split=cfg.split, streaming=True):
        yield row[cfg.text_field]


def _iter_text_files(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield f.read_text(errors="replace")


def split_documents(cfg: DataConfig) -> tuple[list[str], Iterator[str]]:
    """(held-out documents, iterator over the training documents)."""
    docs = iter_documents(cfg)
    heldout = []
    for doc in docs:
        heldout.append(doc)
        if len(heldout) == cfg.heldout_docs:
            break
    if not heldout:
        raise RecalibConfigError(f"data source {cfg.source} holds no documents")
    return heldout, docs


def pack(token_stream: Iterator[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut fixed-length sequences (the remainder is dropped)."""
    buf: list[int] = []
    for ids in token_stream:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            del buf[:seq_len]


def tokenize_docs(tokenizer: Any, docs: Iterator[str]) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids = tokenizer.encode(doc, add_special_tokens=False)
        yield ids + ([eos] if eos is not None else [])


class PackedTrainData(IterableDataset):
    """Endless packed training sequences: the training documents in order (or through a seeded
    shuffle buffer), epoch after epoch. Same seed, same sequence of batches: resuming re-skips to
    the same place."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int):
        self.cfg, self.tokenizer, self.seq_len, self.seed = cfg, tokenizer, seq_len, seed

    def _docs(self, epoch: int) -> Iterator[str]:
        _, docs = split_documents(self.cfg)
        if self.cfg.shuffle_buffer <= 1:
            yield from docs
            return
        rng = random.Random(self.seed * 1000003 + epoch)
        buf: list[str] = []
        for d in docs:
            buf.append(d)
            if len(buf) >= self.cfg.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        while True:
            n = 0
            for seq in pack(tokenize_docs(self.tokenizer, self._docs(epoch)), self.seq_len):
                n += 1
                t = torch.tensor(seq, dtype=torch.long)
                yield {"input_ids": t, "labels": t.clone()}
            if n == 0:
                return
            epoch += 1


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
    _, docs = split_documents(cfg)
    n = 0
    for ids in tokenize_docs(tokenizer, docs):
        n += len(ids)
        if n >= seq_len:
            return {"heldout_tokens": len(held)}
    raise RecalibConfigError(
        f"{cfg.source} has only {n} training tokens after the held-out documents, fewer than one "
        f"sequence of {seq_len}"
    )
