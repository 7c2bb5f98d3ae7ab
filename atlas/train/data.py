"""The training rows: shuffled batches from the store's training split, or from a tensor.

A `RowStream` reads rows chunk by chunk and shuffles them reproducibly from its seed alone, so a
resumed run, or each rank under torchrun, can start at any batch and see exactly the batches a
single uninterrupted process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.config import TrainConfig
from atlas.errors import AtlasError


@dataclass
class RowStream:
    """Shuffled training batches from rows that are read chunk by chunk.

    Each epoch shuffles the order of chunks, groups them into buffers of about `buffer_rows`
    rows, and shuffles rows within a buffer. When everything fits in one buffer (the in-memory
    case) an epoch is a full shuffle. The sequence depends only on `seed`, so `batches(step)`
    can start anywhere without reading what came before: that is how a resumed run sees exactly
    the batches it would have seen.
    """

    read: Callable[[int, int], torch.Tensor]
    """read(start, stop) -> rows [start, stop) as a tensor."""
    n_rows: int
    chunk_rows: int
    buffer_rows: int
    keep: Callable[[np.ndarray], np.ndarray] | None = None
    """Row ids -> boolean mask of rows to train on (e.g. not BOS)."""
    seed: int = 0

    @property
    def d_in(self) -> int:
        return int(self.read(0, 1).shape[-1])

    def _buffers(self, epoch: int):
        """Lists of (start, stop) chunk ranges and their kept row count, for one epoch."""
        n_chunks = math.ceil(self.n_rows / self.chunk_rows)
        order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
        per = max(1, self.buffer_rows // self.chunk_rows)
        for i in range(0, n_chunks, per):
            ranges = sorted((c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)) for c in order[i:i + per])
            yield epoch * 100_000 + i, ranges, sum(self._kept(a, b).size for a, b in ranges)

    def _kept(self, start: int, stop: int) -> np.ndarray:
        ids = np.arange(start, stop)
        return ids if self.keep is None else ids[self.keep(ids)]

    def _load(self, key: int, ranges) -> torch.Tensor:
        parts = []
        for a, b in ranges:
            rows = self.read(a, b)
            if self.keep is not None:
                rows = rows[torch.from_numpy(self.keep(np.arange(a, b)))]
            parts.append(rows)
        rows = torch.cat(parts)
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 7919 + key))]

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Endless float32 batches [batch_size, d_in], beginning with batch number `start_step`.

        With `world` > 1, yields rank `rank`'s slice [batch_size // world, d_in] of each batch:
        the ranks' slices of batch i together are exactly batch i of the undivided stream.
        """
        lo, hi = rank * (batch_size // world), (rank + 1) * (batch_size // world)
        skip = start_step * batch_size  # rows of the stream to pass over
        carry = None
        epoch = 0
        while True:
            any_rows = False
            for key, ranges, n in self._buffers(epoch):
                if n == 0:
                    continue
                any_rows = True
                if skip >= n:
                    skip -= n
                    continue
                rows = self._load(key, ranges)[skip:]
                skip = 0
                if carry is not None:
                    rows = torch.cat([carry, rows])
                for i in range(0, len(rows) - batch_size + 1, batch_size):
                    yield rows[i + lo:i + hi].float()
                carry = rows[len(rows) - len(rows) % batch_size:]
            if not any_rows:
                raise AtlasError("no training rows: the store's training split is empty")
            epoch += 1


def tensor_stream(rows: torch.Tensor, seed: int = 0) -> RowStream:
    """A RowStream over an in-memory tensor [n, d_in] (tests, benchmarks)."""
    return RowStream(lambda a, b: rows[a:b], len(rows), chunk_rows=4096, buffer_rows=len(rows), seed=seed)


def store_stream(store, train_cfg: TrainConfig) -> RowStream:
    """The store's training split: held in RAM when it fits `in_memory_max_gb`, else streamed."""
    rows = store.train_rows
    ctx_len = store.ctx_len
    keep = (lambda ids: ids % ctx_len != 0) if train_cfg.exclude_bos else None
    itemsize = np.dtype(store.acts.dtype).itemsize
    size_gb = len(rows) * store.d_model * itemsize / 1e9
    if size_gb <= train_cfg.in_memory_max_gb:
        data = torch.empty(len(rows), store.d_model, dtype=torch.from_numpy(np.zeros(0, store.acts.dtype)).dtype)
        step = store.chunk_rows * 16
        for a in tqdm(range(0, len(rows), step), desc=f"load {size_gb:.2f} GB of activations", unit="chunk",
                      leave=False, disable=not distributed.is_main()):
            b = min(a + step, len(rows))
            data[a:b] = torch.from_numpy(store.read(rows.start + a, rows.start + b, store.acts.dtype))
        return RowStream(lambda a, b: data[a:b], len(rows), chunk_rows=store.chunk_rows,
                         buffer_rows=len(rows), keep=keep, seed=train_cfg.seed)
    buffer_rows = max(64 * train_cfg.batch_size, 1 << 18)
    return RowStream(lambda a, b: torch.from_numpy(store.read(rows.start + a, rows.start + b)), len(rows),
                     chunk_rows=store.chunk_rows, buffer_rows=buffer_rows, keep=keep, seed=train_cfg.seed)
