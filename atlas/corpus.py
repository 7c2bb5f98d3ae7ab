"""Corpus: documents from a `datasets` hub id or a local file, cut into fixed-length contexts.

Documents are tokenised without special tokens and joined into one stream with the separator
token between them (GPT-2: `<|endoftext|>`, as TinyStories is distributed). The stream is cut
into pieces of ctx_len - 1 tokens and each context gets BOS first, the convention of GPT-2 SAEs.
The order is deterministic, so an interrupted collection can skip what it already stored.
Documents of whitespace only are skipped; a long document (a 50 MB line) is tokenised a piece at a
time, so memory stays bounded whatever the corpus holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from atlas.config import CorpusConfig
from atlas.errors import AtlasError
from atlas.hub import hub_reachable

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"
BOM = "\ufeff"
PIECE_CHARS = 1 << 16
"""A longer document is tokenised in pieces of at most this many characters (cut at whitespace)."""
BATCH_CHARS = 1 << 20
"""Characters tokenised in one call: what bounds the tokenizer's memory."""


def iter_texts(cfg: CorpusConfig) -> Iterator[str]:
    """Yield the corpus' documents as strings."""
    path = Path(cfg.dataset)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        yield from _local_texts(path, cfg.text_field)
    else:
        yield from _hub_texts(cfg)


def _local_texts(path: Path, field: str) -> Iterator[str]:
    if not path.is_file():
        raise AtlasError(f"{path}: no such corpus file")
    if path.suffix == ".txt":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise AtlasError(f"{path}:{line}: not UTF-8 text") from None
        text = text.removeprefix(BOM)
        docs = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else text.split("\n\n")
        yield from (d.strip() for d in docs if d.strip())
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise AtlasError(f"{path}:{n}: not UTF-8 text") from None
                if n == 1:
                    line = line.removeprefix(BOM)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                except RecursionError:
                    raise AtlasError(f"{path}:{n}: JSON nested too deeply") from None
                if not isinstance(text, str):
                    raise AtlasError(f"{path}:{n}: expected a JSON object with a '{field}' string")
                if not text.isspace():
                    yield text
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise AtlasError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
            kind = pf.schema_arrow.field(field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise AtlasError(f"{path}: column '{field}' holds {kind}, not text")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t and not t.isspace())
        except (OSError, pa.ArrowException) as e:
            raise AtlasError(f"{path}: unreadable parquet ({str(e).splitlines()[0]})") from None
    else:
        raise AtlasError(f"{path}: unsupported corpus file; use .txt, .jsonl or .parquet")


def _hub_texts(cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    datasets.logging.set_verbosity_error()
    if hub_reachable():
        ds = datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=True)
    else:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        try:
            ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
        except Exception:
            raise AtlasError(
                f"cannot reach the Hugging Face hub and dataset '{cfg.dataset}' is not in the local cache; "
                f"use a local .txt/.jsonl/.parquet file (--set corpus.dataset=FILE, or make site DATASET=FILE), "
                f"or run the offline demo: make demo"
            ) from None
    for row in ds:
        if cfg.text_field not in row:
            raise AtlasError(f"dataset '{cfg.dataset}' has no field '{cfg.text_field}' (fields: {', '.join(row)})")
        yield row[cfg.text_field]


def iter_contexts(texts: Iterable[str], tokenizer, ctx_len: int, bos_id: int, sep_id: int,
                  docs_per_batch: int = 256) -> Iterator[np.ndarray]:
    """Yield int32 arrays [ctx_len], each BOS followed by ctx_len - 1 tokens of the stream."""
    body = ctx_len - 1
    buf: list[int] = []
    batch: list[str] = []
    ends: list[bool] = []  # whether batch[i] ends its document (the separator follows it)

    def flush():
        nonlocal buf
        for ids, end in zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends):
            buf += ids
            if end:
                buf.append(sep_id)
        n = len(buf) // body
        out = [np.array([bos_id] + buf[i * body:(i + 1) * body], dtype=np.int32) for i in range(n)]
        buf = buf[n * body:]
        batch.clear()
        ends.clear()
        return out

    chars = 0
    for text in texts:
        if not text or text.isspace():
            continue
        for piece, end in _pieces(text):
            batch.append(piece)
            ends.append(end)
            chars += len(piece)
            if len(batch) >= docs_per_batch or chars >= BATCH_CHARS:
                yield from flush()
                chars = 0
    if batch:
        yield from flush()


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most PIECE_CHARS characters, each with whether it is the last; a short
    text is one piece. A cut falls just before a space in the piece's second half where there is
    one, where byte-level BPE tokenizers (" word" is one token) split words anyway."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        stop = start + PIECE_CHARS
        cut = text.rfind(" ", start + PIECE_CHARS // 2, stop)
        stop = cut if cut > start else stop
        yield text[start:stop], False
        start = stop
    yield text[start:], True
