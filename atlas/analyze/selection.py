"""Which examples each feature keeps, computed exactly in a stream: top-k buffers merged batch by
batch, histogram and interval bins that agree with the stored edges, and reservoir samples.

A feature's top `n_top` examples are a [d_sae, n_top] buffer merged with each batch's candidates
by one segmented sort (`merge_topk`). Its interval samples are reservoirs: every entry gets a
uniform random key from a generator seeded by (seed, batch index), and a (feature, interval)
keeps its largest keys with the same `merge_topk` -- a uniform sample without replacement that
is the same however the run was interrupted, and however torchrun split the rows.
"""

from __future__ import annotations

import torch


def merge_topk(buf_score: torch.Tensor, group: torch.Tensor, score: torch.Tensor,
               buf_payloads: list[torch.Tensor], payloads: list[torch.Tensor]) -> None:
    """Merge candidates into per-group top-m buffers, in place.

    `buf_score` [G, m] holds each group's best scores in descending order (-inf where empty);
    candidates are (group, score, payloads...), in stream order. Only candidates above their
    group's current m-th score are considered; they are ranked within their group and merged by
    one sort over [touched groups, 2m].
    """
    m = buf_score.shape[1]
    if m == 0 or len(score) == 0:
        return
    keep = (score > buf_score[:, -1][group]).nonzero().squeeze(1)
    if len(keep) == 0:
        return
    group, score = group[keep], score[keep]
    payloads = [p[keep] for p in payloads]
    order = _group_score_order(group, score)
    group, score = group[order], score[order]
    payloads = [p[order] for p in payloads]
    uniq, counts = torch.unique_consecutive(group, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(group), device=group.device) - torch.repeat_interleave(starts, counts)
    sel = rank < m
    slot = torch.repeat_interleave(torch.arange(len(uniq), device=group.device), counts)[sel]
    rank = rank[sel]
    cand = torch.full((len(uniq), m), -torch.inf, dtype=buf_score.dtype, device=buf_score.device)
    cand[slot, rank] = score[sel].to(buf_score.dtype)
    # A stable sort, not topk: among equal scores the buffer's (earlier) entries stay first, so
    # ties resolve to the earliest token, as a stable sort over the whole store would.
    merged, idx = torch.cat([buf_score[uniq], cand], 1).sort(dim=1, descending=True, stable=True)
    merged, idx = merged[:, :m], idx[:, :m]
    buf_score[uniq] = merged
    for buf, p in zip(buf_payloads, payloads):
        c = torch.full((len(uniq), m), -1, dtype=buf.dtype, device=buf.device)
        c[slot, rank] = p[sel].to(buf.dtype)
        buf[uniq] = torch.cat([buf[uniq], c], 1).gather(1, idx)


def _group_score_order(group: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The permutation sorting candidates by group ascending, then score descending, ties in
    stream order: for float32 scores one stable sort of an int64 key (group in the high 32 bits,
    the score's order-preserving bit pattern in the low 32), else two stable argsorts."""
    if score.dtype == torch.float32 and len(group) and int(group.max()) < 2 ** 31:
        bits = (score + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, which compares equal
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotonic in the float's value
        key = (group.long() << 32) | (0x7FFFFFFF - bits)  # descending score in [0, 2^32)
        return torch.sort(key, stable=True).indices
    order = torch.argsort(score, descending=True, stable=True)
    return order[torch.argsort(group[order], stable=True)]


def _locate(edges: torch.Tensor, feat: torch.Tensor, val: torch.Tensor, guess: torch.Tensor,
            right_closed: bool) -> torch.Tensor:
    """Bin of each value among its feature's edges, from an arithmetic guess corrected against the
    stored float32 edges, so that a value's bin always agrees with the edges written out.

    Bins are [e_i, e_i+1) (the last one closed), or (e_i, e_i+1] with `right_closed`; a value is
    moved one bin at a time until it lies in its bin, so any guess gives the exact bin (only the
    few values a guess misses, usually by one bin at an edge, are looked at again)."""
    n = edges.shape[1] - 1
    flat = edges.reshape(-1)
    i = guess.clamp(0, n - 1)
    base = feat * (n + 1)
    sub = None  # the values still being checked (all at first)
    while True:
        b, v, j = (base, val, i) if sub is None else (base[sub], val[sub], i[sub])
        lo, hi = flat[b + j], flat[b + j + 1]
        if right_closed:  # (lo, hi]
            step = ((v > hi) & (j < n - 1)).long() - ((v <= lo) & (j > 0)).long()
        else:  # [lo, hi)
            step = ((v >= hi) & (j < n - 1)).long() - ((v < lo) & (j > 0)).long()
        moved = step.nonzero().squeeze(1)
        if len(moved) == 0:
            return i
        sub = moved if sub is None else sub[moved]
        i[sub] += step[moved]


def _rng(seed: int, batch: int) -> torch.Generator:
    """The generator of batch `batch`'s reservoir keys."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch)


def start_sampling(state: dict, d_sae: int, a, device) -> dict:
    """Exact per-feature edges from pass 1, and empty histograms and reservoirs."""
    mx, mn = state["max_act"], state["min_act"]
    fired = state["n_fired"] > 0
    lo = torch.where(fired, mn, torch.ones_like(mn))
    hi = torch.where(fired, mx, torch.ones_like(mx))
    lo = torch.where(hi > lo, lo, hi / 2)  # a feature with one distinct value gets one octave
    t = torch.linspace(0, 1, a.histogram_bins + 1, dtype=torch.float64, device=device)
    hist_edges = torch.exp(lo.double().log()[:, None] + t[None] * (hi.double().log() - lo.double().log())[:, None])
    hist_edges[:, 0], hist_edges[:, -1] = lo.double(), hi.double()
    u = torch.linspace(0, 1, a.n_intervals + 1, dtype=torch.float64, device=device)
    interval_edges = (mx.double()[:, None] * u[None]).float()
    G = d_sae * a.n_intervals
    return dict(
        hist_edges=hist_edges.float(), interval_edges=interval_edges,
        hist_counts=torch.zeros(d_sae * a.histogram_bins, dtype=torch.int64, device=device),
        res_key=torch.full((G, a.per_interval), -torch.inf, dtype=torch.float32, device=device),
        res_pos=torch.full((G, a.per_interval), -1, dtype=torch.int64, device=device),
        res_val=torch.zeros((G, a.per_interval), dtype=torch.float32, device=device),
    )


def bin_guesses(state: dict, a) -> dict:
    """Per-feature constants of the bin guesses (float32; `_locate` makes the bins exact)."""
    he, ie = state["hist_edges"], state["interval_edges"]
    log_lo = he[:, 0].log()
    return dict(log_lo=log_lo, hist_scale=a.histogram_bins / (he[:, -1].log() - log_lo),
                int_scale=a.n_intervals / ie[:, -1])


def sample_batch(state: dict, a, rows, feat, val, batch: int, c: dict) -> None:
    """Count batch number `batch`'s entries (store rows, feature, value) into `state`'s histograms
    and offer them to its interval reservoirs; `c`: `bin_guesses(state, a)`."""
    nb, ni = a.histogram_bins, a.n_intervals
    guess = ((val.log() - c["log_lo"][feat]) * c["hist_scale"][feat]).long()  # >= 0, so long() is floor
    hbin = _locate(state["hist_edges"], feat, val, guess, right_closed=False)
    state["hist_counts"].index_put_((feat * nb + hbin,), torch.ones_like(hbin), accumulate=True)
    guess = (val * c["int_scale"][feat]).ceil().long() - 1
    ibin = _locate(state["interval_edges"], feat, val, guess, right_closed=True)
    keys = torch.rand(len(val), generator=_rng(a.seed, batch)).to(val.device)
    merge_topk(state["res_key"], feat * ni + ibin, keys, [state["res_pos"], state["res_val"]], [rows, val])
