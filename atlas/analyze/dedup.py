"""Two cleanups of the shown examples, after the windows are filled:

- duplicates: a top example whose store row (context and offset) or whose window (the same
  tokens, marked at the same place) the feature already shows among its top examples is dropped,
  so a corpus that repeats a passage does not fill a page with copies of it; the first
  (strongest) one is kept. Interval samples stay as drawn (uniform samples of their interval);
- domination: a feature whose top examples are mostly on special tokens (BOS, the document
  separator, padding) or mostly at one position of their context is marked `dominated_by`
  "special-token" or "position". Such features fire on where a token is, not on what the text
  says; the notable page leaves them out of its rankings unless asked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from atlas.analyze.windows import Windows

DOMINANCE = 0.5
"""Share of a feature's top examples on special tokens (or at one position) that marks it dominated."""
MIN_TOP_EXAMPLES = 4
"""A feature needs this many top examples before it is called dominated."""


@dataclass
class Examples:
    """The shown examples in output order (per feature: top by rank, then intervals), with their windows."""

    feat: torch.Tensor
    row: torch.Tensor
    val: torch.Tensor
    top: torch.Tensor
    interval: torch.Tensor
    rank: torch.Tensor
    windows: Windows
    win_tokens: torch.Tensor


def drop_duplicates(ex: Examples, L: int) -> Examples:
    """`ex` without the top examples that repeat an earlier top example of the same feature (same
    store row, or the same window tokens marked at the same place), ranks renumbered within each
    (feature, kind, interval)."""
    offsets = ex.windows.offsets.numpy()
    tokens = ex.win_tokens.numpy()
    start = ex.windows.start_row.numpy()
    feat, row, top = ex.feat.numpy(), ex.row.numpy(), ex.top.numpy()
    keep = np.ones(len(feat), bool)
    seen: set = set()
    for i in np.flatnonzero(top):
        f = int(feat[i])
        window = (f, tokens[offsets[i]:offsets[i + 1]].tobytes(), int(row[i] - start[i]))
        place = (f, int(row[i]))
        if place in seen or window in seen:
            keep[i] = False
            continue
        seen.add(place)
        seen.add(window)
    if keep.all():
        return ex
    k = torch.from_numpy(keep)
    widths = ex.windows.offsets.diff()
    flat = torch.repeat_interleave(k, widths)
    new_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(widths[k], 0)])
    feat_k, top_k, int_k = ex.feat[k], ex.top[k], ex.interval[k]
    # rank = position within its run of equal (feature, kind, interval), which are contiguous
    group = torch.stack([feat_k, top_k.long(), int_k.long()], 1)
    new_group = torch.ones(len(feat_k), dtype=torch.bool)
    if len(feat_k) > 1:
        new_group[1:] = (group[1:] != group[:-1]).any(1)
    idx = torch.arange(len(feat_k))
    first = torch.cummax(torch.where(new_group, idx, torch.zeros_like(idx)), 0).values
    rank = (idx - first).to(ex.rank.dtype)
    windows = Windows(start_row=ex.windows.start_row[k], offsets=new_offsets, acts=ex.windows.acts[flat])
    return Examples(feat_k, ex.row[k], ex.val[k], top_k, int_k, rank, windows, ex.win_tokens[flat])


def dominated_by(ex: Examples, flat_tokens: torch.Tensor, L: int, d_sae: int, special_ids: set[int]) -> list[str]:
    """Per feature: "special-token" when most of its top examples mark a special token, "position"
    when most sit at one offset of their context, else ""."""
    out = [""] * d_sae
    top = ex.top.numpy()
    feat, row = ex.feat.numpy()[top], ex.row.numpy()[top]
    marked = flat_tokens.numpy()[row]
    special = np.isin(marked, np.fromiter(special_ids, np.int64, len(special_ids)))
    offset = row % L
    bounds = np.flatnonzero(np.r_[True, feat[1:] != feat[:-1], True]) if len(feat) else np.array([0])
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n < MIN_TOP_EXAMPLES:
            continue
        if special[s:e].mean() >= DOMINANCE:
            out[int(feat[s])] = "special-token"
        elif Counter(offset[s:e].tolist()).most_common(1)[0][1] / n >= DOMINANCE:
            out[int(feat[s])] = "position"
    return out
