"""The three streaming passes of `atlas analyze`, each vectorised in torch and bounded in memory by
the number of features, never by the number of tokens (no tokens x d_sae matrix is ever held):

1. Encode.  The store is read once in batches of `batch_tokens`; each batch is encoded by the SAE
   and reduced to its nonzero entries (token, feature, activation). From them: firing counts,
   sums, max and smallest positive activation per feature, and the running top-`n_top` examples
   per feature (a [d_sae, n_top] buffer merged with the batch's candidates by a segmented top-k).
   The nonzero entries are also spilled to `features.partial/` (8 bytes per entry + 4 per token;
   about 2.6 GB for 10M tokens of a k=32 TopK SAE).
2. Sample.  The spill is read back. The per-feature max is now known, so histogram edges
   (log-spaced between the smallest positive and the max activation) and interval edges
   (equal-width on (0, max], as in Anthropic's browser) are exact. Each interval keeps
   `per_interval` examples by reservoir sampling: every entry gets a uniform random key from a
   generator seeded by (seed, batch index), and a (feature, interval) keeps its largest keys,
   a uniform sample without replacement that is the same however the run was interrupted.
3. Windows.  The spill is read once more to fill, for every chosen example, the feature's
   activation on each token of its window (`context_left` before, `context_right` after).

Why spill rather than stream the store twice: the encoder matmul is the cost of analysis, and a
second pass over the store would pay it twice (analysis could never reach the encoder's own
throughput); the sparse spill is read back for a small fraction of that cost. Why not one pass
with interval edges guessed from a first sample: rare features often do not fire in the sample,
and activations above the guessed max would fall outside every interval.

The streaming state is checkpointed every `checkpoint_every` batches to `features.partial/state.pt`;
an interrupted run continues from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.analyze.selection import bin_guesses, merge_topk, sample_batch, start_sampling
from atlas.analyze.spill import Spill
from atlas.analyze.windows import Windows, example_list, fill_windows
from atlas.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class StreamResult:
    """Everything the streaming passes learn; all tensors on the CPU, indexed by feature id."""

    n_tokens: int
    """Tokens analysed (BOS positions excluded when analyze.skip_bos)."""
    n_fired: torch.Tensor
    sum_act: torch.Tensor
    max_act: torch.Tensor
    hist_edges: torch.Tensor
    """[d_sae, bins + 1] log-spaced; bins are [e_j, e_j+1), the last one closed."""
    hist_counts: torch.Tensor
    interval_edges: torch.Tensor
    """[d_sae, n_intervals + 1] = max * linspace(0, 1); intervals are (e_i, e_i+1]."""
    top_val: torch.Tensor
    """[d_sae, n_top], descending; -inf where a feature has fewer firing tokens."""
    top_pos: torch.Tensor
    """Store rows (context * ctx_len + offset) of the top examples; -1 where empty."""
    res_val: torch.Tensor
    """[d_sae, n_intervals, per_interval] activations of the interval samples, descending."""
    res_pos: torch.Tensor
    """[d_sae, n_intervals, per_interval] store rows; -1 where an interval has fewer members."""
    windows: Windows
    seconds: dict
    """Wall time of each pass in this process (encode, sample, windows)."""


def rank_rows(n_tok: int, batch_tokens: int, rank: int, world: int) -> range:
    """The store rows rank `rank` of `world` analyses: a contiguous run of whole batches, so every
    batch (its encoding, its random keys) is the same as in a single-process run."""
    n_batches = -(-n_tok // batch_tokens)
    b0, b1 = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(min(b0 * batch_tokens, n_tok), min(b1 * batch_tokens, n_tok))


def analyze_stream(store, encode, d_sae: int, a, partial: Path, fp: str,
                   device: torch.device = torch.device("cpu")) -> StreamResult:
    """Run (or resume) the three streaming passes over `store`; `encode` is an SAE's `encode_sparse`.

    In a torch.distributed process group every rank calls this with the same arguments: rank r
    streams the rows rank_rows(r) into its own spill and checkpoint (`partial/rank{r}-of-{world}`),
    and the partial results are merged exactly (see _merge_ranks). The result is then the same,
    bit for bit, as a single process's on rank 0; other ranks get all of it but `sum_act`."""
    rank, world = distributed.rank_and_world()
    n_tok, L = store.n_tokens, store.ctx_len
    B = a.batch_tokens
    rows_mine = rank_rows(n_tok, B, rank, world) if world > 1 else range(0, n_tok)
    row0, row1 = rows_mine.start, rows_mine.stop
    folder = partial if world == 1 else partial / f"rank{rank}-of-{world}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "state.pt"
    state = load_checkpoint(ckpt, fp)
    spill = Spill(folder, row0)
    # Under torchrun, ranks > 0 keep their per-batch activation sums: rank 0 adds them to its own in
    # batch order, so the float64 sums are rounded exactly as in one process.
    sums = folder / "batch_sums.f64" if rank > 0 else None
    if state is None:
        f64, f32 = dict(dtype=torch.float64, device=device), dict(dtype=torch.float32, device=device)
        state = dict(
            fingerprint=fp, phase="encode", tokens_done=row0, entries_done=0,
            n_fired=torch.zeros(d_sae, dtype=torch.int64, device=device), sum_act=torch.zeros(d_sae, **f64),
            max_act=torch.zeros(d_sae, **f32), min_act=torch.full((d_sae,), float("inf"), **f32),
            top_val=torch.full((d_sae, a.n_top), -torch.inf, **f32),
            top_pos=torch.full((d_sae, a.n_top), -1, dtype=torch.int64, device=device),
        )
        spill.truncate(0, 0)
    else:
        state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}

    def save():
        save_checkpoint(ckpt, {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()})

    def desc(name: str) -> str:
        return f"analyze: {name}" + (f" (rank 0 of {world})" if world > 1 else "")

    seconds = {}
    t0 = time.perf_counter()
    # Pass 1: encode, statistics, top-k, spill.
    if state["phase"] == "encode":
        spill.truncate(state["tokens_done"] - row0, state["entries_done"])
        if sums is not None:
            with open(sums, "ab") as f:
                f.truncate(8 * d_sae * -(-(state["tokens_done"] - row0) // B))
        bar = tqdm(total=row1 - row0, initial=state["tokens_done"] - row0, unit="tok", unit_scale=True,
                   disable=rank != 0, desc=desc("encode"))
        with torch.inference_mode():
            for i, (start, x) in enumerate(store.iter_batches(B, range(state["tokens_done"], row1))):
                tok, feat, val = encode(x.to(device))
                val = val.float()
                rows = tok + start
                if a.skip_bos:
                    keep = rows % L != 0
                    tok, feat, val, rows = tok[keep], feat[keep], val[keep], rows[keep]
                state["n_fired"] += torch.bincount(feat, minlength=d_sae)
                batch_sum = torch.bincount(feat, weights=val.double(), minlength=d_sae)
                state["sum_act"] += batch_sum
                state["max_act"].scatter_reduce_(0, feat, val, "amax")
                state["min_act"].scatter_reduce_(0, feat, val, "amin")
                merge_topk(state["top_val"], feat, val, [state["top_pos"]], [rows])
                spill.append(torch.bincount(tok, minlength=len(x)), feat, val)
                if sums is not None:
                    with open(sums, "ab") as f:
                        f.write(batch_sum.cpu().numpy().tobytes())
                state["tokens_done"] = start + len(x)
                state["entries_done"] += len(val)
                bar.update(len(x))
                if (i + 1) % a.checkpoint_every == 0:
                    save()
        bar.close()
    if world > 1:  # every rank, whatever phase it resumed in: histogram and interval edges need the global range
        glob = {k: distributed.all_reduce_(state[k].clone(), op) for k, op in
                (("n_fired", "sum"), ("max_act", "max"), ("min_act", "min"))}
    else:
        glob = state
    if state["phase"] == "encode":
        state.update(phase="sample", sample_tokens=row0, sample_entries=0, **start_sampling(glob, d_sae, a, device))
        save()
    seconds["encode"], t0 = time.perf_counter() - t0, time.perf_counter()

    # Pass 2: histograms and interval reservoirs, with exact edges.
    if state["phase"] == "sample":
        bar = tqdm(total=row1 - row0, initial=state["sample_tokens"] - row0, unit="tok", unit_scale=True,
                   disable=rank != 0, desc=desc("sample"))
        batches = spill.batches(row1, B, state["sample_tokens"], state["sample_entries"])
        consts = bin_guesses(state, a)
        for i, (b, start, rows, feat, val, e_next) in enumerate(batches):
            rows, feat, val = rows.to(device), feat.to(device), val.to(device)
            sample_batch(state, a, rows, feat, val, b, consts)
            state["sample_tokens"], state["sample_entries"] = min(start + B, row1), e_next
            bar.update(min(B, row1 - start))
            if (i + 1) % a.checkpoint_every == 0:
                save()
        bar.close()
        state["phase"] = "windows"
        save()
    seconds["sample"], t0 = time.perf_counter() - t0, time.perf_counter()

    cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}
    if world > 1:
        cpu.update({k: v.cpu() for k, v in glob.items()})
        cpu.update(_merge_ranks(cpu, d_sae, a, rank, world, n_tok, B, sums))
        seconds["merge"], t0 = time.perf_counter() - t0, time.perf_counter()

    # Pass 3: per-token activations of the chosen examples' windows.
    # Show each interval's sample strongest first (empty slots, value 0, stay last).
    res_val = cpu["res_val"].view(d_sae, a.n_intervals, a.per_interval)
    order = res_val.argsort(dim=2, descending=True, stable=True)
    res_val = res_val.gather(2, order)
    res_pos = cpu["res_pos"].view(d_sae, a.n_intervals, a.per_interval).gather(2, order)
    ex_feat, ex_row = example_list(cpu["top_pos"], res_pos)
    windows = fill_windows(spill, n_tok, L, B, d_sae, ex_feat, ex_row, a.context_left, a.context_right,
                            rows_mine, progress=rank == 0)
    if world > 1:  # each window position lies in one rank's rows and is 0 on the others: the sum is exact
        distributed.all_reduce_(windows.acts, "sum")
    seconds["windows"] = time.perf_counter() - t0
    return StreamResult(
        n_tokens=n_tok - (store.n_contexts if a.skip_bos else 0),
        n_fired=cpu["n_fired"], sum_act=cpu["sum_act"], max_act=cpu["max_act"],
        hist_edges=cpu["hist_edges"], hist_counts=cpu["hist_counts"].view(d_sae, -1),
        interval_edges=cpu["interval_edges"], top_val=cpu["top_val"], top_pos=cpu["top_pos"],
        res_val=res_val, res_pos=res_pos, windows=windows,
        seconds=seconds,
    )


def _merge_ranks(cpu: dict, d_sae: int, a, rank: int, world: int, n_tok: int, B: int,
                 sums: Path | None, chunk_batches: int = 64) -> dict:
    """Merge the ranks' partial results of passes 1 and 2, exactly (on CPU tensors).

    Counts add; the top-k buffers and interval reservoirs are merged in rank order, i.e. in row
    order, with merge_topk, whose order is (score descending, row ascending) as in one process
    (the reservoir keys come from (seed, batch index), whichever rank drew them). The activation
    sums are added on rank 0 batch after batch as one process adds them (ranks > 0 send theirs).
    """
    out = {"hist_counts": distributed.all_reduce_(cpu["hist_counts"].clone(), "sum")}
    parts = distributed.all_gather_object({k: cpu[k] for k in ("top_val", "top_pos", "res_key", "res_pos", "res_val")})
    top_val, top_pos = parts[0]["top_val"].clone(), parts[0]["top_pos"].clone()
    res_key, res_pos, res_val = (parts[0][k].clone() for k in ("res_key", "res_pos", "res_val"))
    top_group = torch.arange(d_sae).repeat_interleave(a.n_top)
    res_group = torch.arange(res_key.shape[0]).repeat_interleave(a.per_interval)
    for p in parts[1:]:
        merge_topk(top_val, top_group, p["top_val"].reshape(-1), [top_pos], [p["top_pos"].reshape(-1)])
        merge_topk(res_key, res_group, p["res_key"].reshape(-1), [res_pos, res_val],
                   [p["res_pos"].reshape(-1), p["res_val"].reshape(-1)])
    out.update(top_val=top_val, top_pos=top_pos, res_key=res_key, res_pos=res_pos, res_val=res_val)

    sum_act = cpu["sum_act"].clone()
    for r in range(1, world):
        rows = rank_rows(n_tok, B, r, world)
        n_b = -(-len(rows) // B)
        if rank == r:
            mm = np.memmap(sums, np.float64, "r", shape=(n_b, d_sae)) if n_b else None
        for c0 in range(0, n_b, chunk_batches):
            c1 = min(c0 + chunk_batches, n_b)
            if rank == r:
                distributed.send(torch.from_numpy(np.array(mm[c0:c1])), dst=0)
            elif rank == 0:
                block = distributed.recv_(torch.empty(c1 - c0, d_sae, dtype=torch.float64), src=r)
                for s in block:
                    sum_act += s
    out["sum_act"] = sum_act
    return out
