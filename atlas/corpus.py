"""Corpus: documents from a `datasets` hub id or a local file, cut into fixed-length contexts.

Documents are tokenised without special tokens and joined into one stream with the separator
token between them (GPT-2: `<|endoftext|>`, as TinyStories is distributed). The stream is cut
into pieces of ctx_len - 1 tokens and each context gets BOS first, the convention of GPT-2 SAEs.
The order is deterministic, so an interrupted collection can skip what it already stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from atlas.config import CorpusConfig
from atlas.errors import AtlasError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"


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
        docs = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else text.split("\n\n")
        yield from (d.strip() for d in docs if d.strip())
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise AtlasError(f"{path}:{n}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise AtlasError(f"{path}:{n}: expected a JSON object with a '{field}' string")
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
                yield from (t for t in batch.column(0).to_pylist() if t)
        except (OSError, pa.ArrowException) as e:
            raise AtlasError(f"{path}: unreadable parquet ({str(e).splitlines()[0]})") from None
    else:
        raise AtlasError(f"{path}: unsupported corpus file; use .txt, .jsonl or .parquet")


def _hub_texts(cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    from atlas.model import _hub_reachable

    datasets.logging.set_verbosity_error()
    if _hub_reachable():
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

    def flush():
        nonlocal buf
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf += ids
            buf.append(sep_id)
        n = len(buf) // body
        out = [np.array([bos_id] + buf[i * body:(i + 1) * body], dtype=np.int32) for i in range(n)]
        buf = buf[n * body:]
        batch.clear()
        return out

    for text in texts:
        if text:
            batch.append(text)
        if len(batch) >= docs_per_batch:
            yield from flush()
    if batch:
        yield from flush()
