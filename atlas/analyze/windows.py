"""Pass 3: the window of every shown example (`context_left` tokens before it, `context_right`
after, within its context) with the feature's activation on each of its tokens, read back from the
spill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from atlas.analyze.spill import Spill


@dataclass
class Windows:
    """The shown window of every example: example i covers flat[offsets[i]:offsets[i+1]]."""

    start_row: torch.Tensor
    offsets: torch.Tensor
    acts: torch.Tensor


def example_list(top_pos: torch.Tensor, res_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature, row) of every example, in output order: per feature, top then intervals."""
    d_sae = top_pos.shape[0]
    allpos = torch.cat([top_pos, res_pos.reshape(d_sae, -1)], 1)
    feat = torch.arange(d_sae)[:, None].expand_as(allpos)
    ok = allpos >= 0
    return feat[ok], allpos[ok]


def window_rows(start: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Store rows of all windows, concatenated: window i is start[i] .. start[i] + width - 1."""
    width = offsets.diff()
    return torch.repeat_interleave(start - offsets[:-1], width) + torch.arange(int(offsets[-1]))


def fill_windows(spill: Spill, n_tok: int, L: int, B: int, d_sae: int, ex_feat: torch.Tensor,
                  ex_row: torch.Tensor, left: int, right: int, rows: range | None = None,
                  progress: bool = True) -> Windows:
    """The windows of the examples (ex_feat, ex_row), with the activations read from `spill`.

    Batch by batch, the windows that overlap the batch's rows (found by their first row) are laid
    out and looked up among the batch's spilled (row, feature) keys, sorted. With `rows` (a
    batch-aligned range of store rows, the spill's), only window positions in those rows are
    filled; the others stay 0."""
    ctx, off = ex_row // L, ex_row % L
    lo = (off - left).clamp_min(0)
    hi = (off + right + 1).clamp_max(L)
    start = ctx * L + lo
    width = hi - lo
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(width, 0)])
    acts = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    rows = rows if rows is not None else range(0, n_tok)
    by_start = torch.argsort(start)
    first_row = start[by_start]
    max_w = int(width.max()) if len(width) else 0
    if len(width):
        end = start + width  # exclusive
        s0 = max((int(first_row[0]) // B) * B, rows.start)
        stop = min(int(end.max()), rows.stop)
    if len(width) and s0 < stop:
        bar = tqdm(total=stop - s0, unit="tok", unit_scale=True, desc="analyze: windows", disable=not progress)
        for _, s, r, f, v, _ in spill.batches(rows.stop, B, s0, spill.entries_before(s0)):
            if s >= stop:
                break
            s1 = min(s + B, rows.stop)
            # windows with a row in [s, s1): first row in (s - max_w, s1)
            e0, e1 = (int(x) for x in torch.searchsorted(first_row, torch.tensor([s - max_w + 1, s1])))
            ex = by_start[e0:e1]
            w = width[ex]
            n = int(w.sum())
            pos = torch.repeat_interleave(offsets[ex] - (torch.cumsum(w, 0) - w), w) + torch.arange(n)
            prow = torch.repeat_interleave(start[ex] - offsets[ex], w) + pos
            inside = ((prow >= s) & (prow < s1)).nonzero().squeeze(1)
            pos, prow = pos[inside], prow[inside]
            want = prow * d_sae + torch.repeat_interleave(ex_feat[ex], w)[inside]
            have, order = torch.sort(r * d_sae + f)
            if len(have):
                idx = torch.searchsorted(have, want).clamp_max(len(have) - 1)
                hit = (have[idx] == want).nonzero().squeeze(1)
                acts[pos[hit]] = v[order[idx[hit]]]
            bar.update(min(B, stop - s))
        bar.close()
    return Windows(start_row=start, offsets=offsets, acts=acts)
