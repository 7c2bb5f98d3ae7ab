"""The training rows: shuffled batches from the store's training split, or from a tensor.

A `RowStream` shuffles reproducibly from its seed alone, so a resumed run, or each rank under
torchrun, can start at any batch and see exactly the batches a single uninterrupted process would.

What it costs is what a GPU waits for, so each row is copied as few times as possible: a buffer
of chunks is read once into one array in the store's dtype (`ActivationStore.read_into`: os.preadv
at the chunks' byte offsets, the GIL released), the shuffle is a permutation of row indices (never
of the rows), and each batch is one gather from the buffer, in the store's dtype (into pinned
memory for a non-blocking copy to CUDA; the trainer converts on its device). Two threads work
ahead of the consumer: one reads the next buffer, one gathers batches, so reading, gathering and
training overlap. An in-memory source (`rows`) is never copied at all: batches are gathered
straight from it. tests/bench/bench_data.py compares this with a bare read of the store.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.config import TrainConfig
from atlas.errors import AtlasError

PREFETCH_BATCHES = 8
"""Batches the reader thread keeps ready ahead of the consumer."""


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
    """read(start, stop) -> rows [start, stop) as a tensor (any float dtype)."""
    n_rows: int
    chunk_rows: int
    buffer_rows: int
    keep: Callable[[np.ndarray], np.ndarray] | None = None
    """Row ids -> boolean mask of rows to train on (e.g. not BOS)."""
    seed: int = 0
    rows: torch.Tensor | None = None
    """All rows, when they are in memory: batches are gathered from it, nothing is read or copied."""
    read_into: Callable[[int, int, np.ndarray], None] | None = None
    """read_into(start, stop, out): rows [start, stop) written into the array `out` (h5py's
    read_direct: no intermediate copy); without it, `read` is used and its result copied."""
    check_row: Callable[[int], None] | None = None
    """Called with a row whose values are NaN/inf (it raises, naming where the row came from)."""

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

    def _order(self, key: int, ranges) -> tuple[torch.Tensor, np.ndarray]:
        """A buffer's shuffled rows, without reading them: (indices into its source -- the buffer
        as `_read_buffer` lays it out, or `rows` -- and the rows' ids in the store)."""
        kept = np.concatenate([self._kept(a, b) for a, b in ranges])
        if self.rows is not None:
            index = torch.from_numpy(kept)
        else:
            starts = np.cumsum([0] + [b - a for a, b in ranges])
            index = torch.from_numpy(np.concatenate([self._kept(a, b) - a + p for (a, b), p in zip(ranges, starts)]))
        perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(self.seed * 7919 + key))
        return index[perm], kept[perm.numpy()]

    def _read_buffer(self, ranges, pool: list[torch.Tensor | None], slot: int) -> torch.Tensor:
        """The rows of `ranges`, one after another, read straight into `pool[slot]` (allocated on
        first use: reusing buffers spares the page faults of fresh memory, which cost as much as
        the read itself)."""
        if self.rows is not None:
            return self.rows
        n = sum(b - a for a, b in ranges)
        if pool[slot] is None or len(pool[slot]) < n:
            first = self.read(ranges[0][0], ranges[0][0] + 1)
            pool[slot] = torch.empty(max(n, self.buffer_rows // self.chunk_rows * self.chunk_rows), first.shape[1],
                                     dtype=first.dtype)
        out = pool[slot][:n]
        pos = 0
        for a, b in ranges:
            if self.read_into is not None:
                self.read_into(a, b, out[pos:pos + b - a].numpy())
            else:
                out[pos:pos + b - a] = self.read(a, b)
            pos += b - a
        return out

    def _epochs(self, skip: int, free: threading.Semaphore):
        """(source, shuffled indices into it, their row ids) of each buffer from row `skip` of the
        stream on, endlessly; buffers skipped whole are never read. Two arrays take turns (double
        buffering): one is read while the consumer gathers from the other, which it gives back
        (`free.release()`) when it moves on. A third would only add its page faults -- fresh memory
        costs as much to touch as the read itself -- and its size in RAM."""
        pool: list[torch.Tensor | None] = [None] * 2
        slot = epoch = 0
        while True:
            any_rows = False
            for key, ranges, n in self._buffers(epoch):
                if n == 0:
                    continue
                any_rows = True
                if skip >= n:
                    skip -= n
                    continue
                order, ids = self._order(key, ranges)
                if self.rows is None:
                    free.acquire()
                yield self._read_buffer(ranges, pool, slot), order[skip:], ids[skip:]
                skip, slot = 0, (slot + 1) % len(pool)
            if not any_rows:
                raise AtlasError("no training rows: the store's training split is empty")
            epoch += 1

    def _indexed_batches(self, batch_size: int, start_step: int, lo: int, hi: int):
        """(source, indices into it, store row ids) of each batch slice, in order, endlessly. The
        buffers are read one ahead by a thread of their own."""
        free = threading.Semaphore(2)
        buffers = _ahead(self._epochs(start_step * batch_size, free), 1)
        carry: tuple[torch.Tensor, np.ndarray] | None = None  # the last buffer's rows short of a batch
        try:
            for n_buffer, (source, order, ids) in enumerate(buffers):
                if n_buffer:
                    free.release()  # the previous buffer: its batches are gathered, its leftover copied
                i = 0
                if carry is not None:  # one batch from the leftover rows and this buffer's first
                    need = batch_size - len(carry[0])
                    if len(order) < need:  # still short (a tiny buffer): carry on
                        carry = (torch.cat([carry[0], source[order]]), np.concatenate([carry[1], ids]))
                        continue
                    rows = torch.cat([carry[0], source[order[:need]]])
                    yield rows, torch.arange(lo, hi), np.concatenate([carry[1], ids[:need]])[lo:hi]
                    i, carry = need, None
                n_full = (len(order) - i) // batch_size
                for j in range(i, i + n_full * batch_size, batch_size):
                    yield source, order[j + lo:j + hi], ids[j + lo:j + hi]
                i += n_full * batch_size
                if i < len(order):
                    carry = (source[order[i:]], ids[i:])
        finally:
            free.release(2)  # a reader waiting for an array goes on, sees the stop and ends
            buffers.close()

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1,
                pin: bool = False) -> Iterator[torch.Tensor]:
        """Endless batches [batch_size, d_in] in the source's dtype (float16 for a float16 store:
        the consumer converts, on the GPU when it trains there, which also halves the bytes
        copied), beginning with batch number `start_step`; gathered ahead by a background
        thread (`pin`: into pinned memory, for non-blocking copies to CUDA).

        With `world` > 1, yields rank `rank`'s slice [batch_size // world, d_in] of each batch:
        the ranks' slices of batch i together are exactly batch i of the undivided stream.
        """
        lo, hi = rank * (batch_size // world), (rank + 1) * (batch_size // world)

        def gathered():
            for source, index, _ in self._indexed_batches(batch_size, start_step, lo, hi):
                # gathered straight into pinned memory when the consumer copies to CUDA: one copy, not two
                out = torch.empty(len(index), source.shape[1], dtype=source.dtype, pin_memory=pin)
                yield torch.index_select(source, 0, index, out=out)

        return _ahead(gathered(), PREFETCH_BATCHES)

    def bad_row(self, batch: torch.Tensor, batch_size: int, step: int, rank: int = 0, world: int = 1) -> int | None:
        """The first row of `batch` (this stream's batch number `step`) holding NaN/inf, as a row
        id of the source, or None. With `check_row`, it is called with the row first (and raises,
        naming the part of the store)."""
        bad = (~torch.isfinite(batch.float())).any(1).nonzero()
        if not len(bad):
            return None
        lo, hi = rank * (batch_size // world), (rank + 1) * (batch_size // world)
        ids = next(self._indexed_batches(batch_size, step, lo, hi))[2]
        row = int(ids[int(bad[0, 0])])
        if self.check_row is not None:
            self.check_row(row)
        return row


def _ahead(items: Iterator, n: int) -> Iterator:
    """`items`, computed by a background thread up to `n` ahead; its errors re-raised here. The
    thread stops when the returned generator is closed or collected."""
    q: queue.Queue = queue.Queue(maxsize=n)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            q.put((done, e))

    thread = threading.Thread(target=work, name="atlas-rows", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()  # it stops within one item; a thread left inside torch at exit would abort the process


def tensor_stream(rows: torch.Tensor, seed: int = 0) -> RowStream:
    """A RowStream over an in-memory tensor [n, d_in] (tests, benchmarks)."""
    return RowStream(lambda a, b: rows[a:b], len(rows), chunk_rows=4096, buffer_rows=len(rows), seed=seed, rows=rows)


def store_stream(store, train_cfg: TrainConfig) -> RowStream:
    """The store's training split: held in RAM (in the store's dtype) when it fits
    `in_memory_max_gb`, else streamed a buffer at a time."""
    rows = store.train_rows
    ctx_len = store.ctx_len
    keep = (lambda ids: ids % ctx_len != 0) if train_cfg.exclude_bos else None
    itemsize = np.dtype(store.acts.dtype).itemsize
    size_gb = len(rows) * store.d_model * itemsize / 1e9
    check_row = lambda row: store.read(rows.start + row, rows.start + row + 1)  # noqa: E731  (raises, naming the part)
    if size_gb <= train_cfg.in_memory_max_gb:
        data = torch.empty(len(rows), store.d_model, dtype=torch.from_numpy(np.zeros(0, store.acts.dtype)).dtype)
        step = store.chunk_rows * 16
        for a in tqdm(range(0, len(rows), step), desc=f"load {size_gb:.2f} GB of activations", unit="chunk",
                      leave=False, disable=not distributed.is_main()):
            b = min(a + step, len(rows))
            data[a:b] = torch.from_numpy(store.read(rows.start + a, rows.start + b, store.acts.dtype))
        return RowStream(lambda a, b: data[a:b], len(rows), chunk_rows=store.chunk_rows,
                         buffer_rows=len(rows), keep=keep, seed=train_cfg.seed, rows=data, check_row=check_row)
    buffer_rows = max(64 * train_cfg.batch_size, 1 << 18)
    # Raw rows in the store's dtype: a NaN/inf row shows as a non-finite loss, and the trainer then
    # finds the row (`bad_row`); the in-memory load above checks every row once.
    return RowStream(lambda a, b: torch.from_numpy(store.acts[rows.start + a:rows.start + b]), len(rows),
                     chunk_rows=store.chunk_rows, buffer_rows=buffer_rows, keep=keep, seed=train_cfg.seed,
                     read_into=lambda a, b, out: store.read_into(rows.start + a, rows.start + b, out),
                     check_row=check_row)
