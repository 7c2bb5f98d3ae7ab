"""The nonzero codes of pass 1 on disk (`features.partial/codes.*`), read back by passes 2 and 3
(atlas/analyze/passes.py says why they are spilled rather than encoded again)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class Spill:
    """The nonzero codes of pass 1 on disk: per token its count, per entry feature id and value.

    A spill holds the store rows from `row0` on (under torchrun, each rank spills its own rows);
    rows passed to and yielded by its methods are store rows."""

    def __init__(self, folder: Path, row0: int = 0):
        self.counts, self.feats, self.vals = (folder / "codes.counts", folder / "codes.feats", folder / "codes.vals")
        self.row0 = row0

    def truncate(self, n_tokens: int, n_entries: int) -> None:
        """Keep the first `n_tokens` spilled rows and `n_entries` entries."""
        for path, n in ((self.counts, n_tokens), (self.feats, n_entries), (self.vals, n_entries)):
            with open(path, "ab") as f:
                f.truncate(4 * n)

    def append(self, counts: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor) -> None:
        for path, t, dtype in ((self.counts, counts, np.int32), (self.feats, feats, np.int32),
                               (self.vals, vals, np.float32)):
            with open(path, "ab") as f:
                f.write(t.cpu().numpy().astype(dtype, copy=False).tobytes())

    def _counts(self, stop: int) -> np.ndarray:
        n = stop - self.row0
        return np.memmap(self.counts, np.int32, "r", shape=(n,)) if n > 0 else np.zeros(0, np.int32)

    def entries_before(self, row: int) -> int:
        """Entries spilled for the rows before `row`."""
        return int(self._counts(row).sum(dtype=np.int64))

    def batches(self, n_tokens: int, batch_tokens: int, start_token: int = 0, start_entry: int = 0):
        """Yield (batch index, first row, rows [n] int64, feats [n] int64, vals [n] float32, next entry)
        for the rows start_token .. n_tokens - 1 (store rows, batch-aligned; entry indices are the spill's)."""
        counts = self._counts(n_tokens)
        n_entries = os.path.getsize(self.feats) // 4
        feats = np.memmap(self.feats, np.int32, "r", shape=(n_entries,)) if n_entries else np.zeros(0, np.int32)
        vals = np.memmap(self.vals, np.float32, "r", shape=(n_entries,)) if n_entries else np.zeros(0, np.float32)
        e = start_entry
        for s in range(start_token, n_tokens, batch_tokens):
            c = torch.from_numpy(np.array(counts[s - self.row0:s - self.row0 + batch_tokens], dtype=np.int64))
            n = int(c.sum())
            rows = torch.repeat_interleave(torch.arange(s, s + len(c)), c)
            yield (s // batch_tokens, s, rows, torch.from_numpy(np.array(feats[e:e + n], dtype=np.int64)),
                   torch.from_numpy(np.array(vals[e:e + n])), e + n)
            e += n
