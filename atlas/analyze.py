"""`atlas analyze`: turn an SAE and its activation store into the atlas' per-feature data.

Three streaming passes, each vectorised in torch and bounded in memory by the number of features,
never by the number of tokens (no tokens x d_sae matrix is ever held):

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

Then, per feature: logit effects (W_dec @ W_U, top and bottom `n_logits`), decoder-cosine
neighbours (computed in blocks of rows, never d_sae x d_sae), 2-D map coordinates
(atlas/featuremap.py) and a label with its score on held-out contexts (atlas/labels.py,
atlas/label_scores.py). Output is written to `features/` through atlas.stage.atomic_dir as
zstd Parquet shards (schemas in atlas/shards.py), `vocab.parquet`, and `manifest.json` last.
The streaming state is checkpointed every `checkpoint_every` batches to `features.partial/state.pt`;
an interrupted run continues from there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from atlas import distributed, label_data, label_scores
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.featuremap import UMAP_MIN_FEATURES, map_coordinates, unit_rows
from atlas.labels import Evidence, get_explainer
from atlas.shards import (EXAMPLES_SCHEMA, FEATURES_SCHEMA, SCHEMA_VERSION, VOCAB_SCHEMA, shard_name,
                          write_table)
from atlas.stage import (atomic_dir, fingerprint, input_digest, is_current, require_finite, rerun, sae_digest,
                         sha256_file, source_digest)

PARTIAL_SUFFIX = ".partial"
_NEG = float("-inf")


# --------------------------------------------------------------------------------------------
# Entry point


def run(cfg: RunConfig, force: bool = False) -> Path:
    a = cfg.analyze
    store_path, sae_dir, out = cfg.run_dir / "activations.h5", cfg.run_dir / "sae", cfg.run_dir / "features"
    inputs = {"store": input_digest(store_path, "collect", cfg), "sae": sae_digest(cfg),
              "sae_metrics": sha256_file(sae_dir / "metrics.json") if (sae_dir / "metrics.json").exists() else "none",
              "model": source_digest(cfg.model.name) + "@" + cfg.model.revision}  # W_U and the vocabulary
    fp = fingerprint(cfg.section_hash("analyze"), *inputs.values())
    if is_current(out, fp) and not force:
        print(f"analyze: {out} is up to date")
        return out
    rank, world = distributed.rank_and_world()
    main = rank == 0
    get_explainer(a.explainer, a, cfg.run_dir / "llm-cache")  # fail on a bad name or setting before hours of work

    from atlas.model import load_model, resolve_device
    from atlas.saes import load_sae
    from atlas.store import ActivationStore

    device = resolve_device(cfg.model.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if force and partial.exists() and main:
        shutil.rmtree(partial)
    distributed.barrier()
    w_u, vocab, error = None, [], None
    if main:  # W_U and vocab (rank 0 writes the output); fail early, on every rank
        try:
            loaded = load_model(cfg.model.name, cfg.model.revision, "cpu", "float32", gguf_file=cfg.model.gguf_file)
            w_u = loaded.unembedding()
            vocab = vocab_texts(loaded.tokenizer)
            del loaded
        except AtlasError as e:
            error = e
    if world > 1:
        msg = distributed.broadcast_object(None if error is None else str(error))
        if msg is not None and error is None:
            raise AtlasError(f"rank 0 failed: {msg}")
    if error is not None:
        raise error
    with ActivationStore(store_path, rerun("collect", cfg)) as store:
        sae = load_sae(sae_dir, device)
        require_finite(sae.state_dict(), sae_dir / "sae_weights.safetensors",
                       f"run `{rerun('train', cfg)} --force` to retrain it, or import a finite SAE")
        w_dec = sae.W_dec.detach().float()
        if w_dec.shape[1] != store.d_model:
            raise AtlasError(f"{sae_dir}: SAE d_in {w_dec.shape[1]} does not match the store's d_model {store.d_model}")
        # With torchrun every rank streams its own rows; the merged result is complete on rank 0.
        stream = analyze_stream(store, sparse_encoder(sae), w_dec.shape[0], a, partial, fp, device)
        if main:
            _require_finite_stream(stream, sae_dir)
            labelling = label_data.prepare(store, sparse_encoder(sae), w_dec.shape[0], a, vocab, device,
                                           cfg.run_dir / "llm-cache")
            with atomic_dir(out, fp, stage="analyze", inputs=inputs, rerun=rerun("analyze", cfg)) as tmp:
                manifest = write_features(tmp, stream, w_dec, w_u, vocab, a, store.tokens, device, labelling)
                manifest.update(run_metadata(cfg, store, sae_dir, w_u is not None))
                if world > 1:
                    manifest["processes"] = world
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"analyze: wrote {out} ({manifest['n_features']:,} features, {manifest['n_dead']:,} dead, "
              f"{manifest['n_dense']:,} dense, {manifest['n_tokens']:,} tokens"
              + (f", {world} processes" if world > 1 else "") + ")")
    distributed.barrier()
    return out


def _require_finite_stream(s: "StreamResult", sae_dir: Path) -> None:
    """Finite activations and weights can still overflow float32 in the encoder: stop, never publish inf."""
    bad = ~(torch.isfinite(s.max_act) & torch.isfinite(s.sum_act))
    if bad.any():
        f = int(bad.nonzero()[0, 0])
        raise AtlasError(f"{sae_dir}: the SAE's activations overflow on {int(bad.sum()):,} features (feature {f}: "
                         f"max {float(s.max_act[f])}); its weights are too large for float32")


def sparse_encoder(sae):
    """x [n, d_in] -> (token, feature, activation) of the nonzero latents, in token order.

    A TopK SAE gives its k latents per token directly (no dense [n, d_sae] matrix to scan);
    any other architecture is encoded densely and its nonzero entries taken.
    """
    if getattr(sae, "architecture", "") == "topk":
        from atlas.saes.base import SparseAutoencoder
        from atlas.saes.topk import TopKSAE

        k = sae.k
        plain = type(sae).encode_pre is SparseAutoencoder.encode_pre and type(sae).encode_topk is TopKSAE.encode_topk

        def encode(x):
            if plain:  # sae.encode_topk(x, k) with the bias added in place: the same values, one [n, d_sae] buffer less
                pre = (x - sae.b_dec if sae.apply_b_dec_to_input else x) @ sae.W_enc
                pre += sae.b_enc
                v, i = pre.topk(k, dim=-1)
                del pre
                v = torch.relu(v)
            else:
                v, i = sae.encode_topk(x, k)
            keep = v > 0
            tok = torch.arange(len(x), device=x.device)[:, None].expand_as(i)
            return tok[keep], i[keep], v[keep]
    else:
        def encode(x):
            codes = sae.encode(x)
            tok, feat = (codes > 0).nonzero(as_tuple=True)
            return tok, feat, codes[tok, feat]
    return encode


# --------------------------------------------------------------------------------------------
# Streaming state


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
    windows: "Windows"
    seconds: dict
    """Wall time of each pass in this process (encode, sample, windows)."""


@dataclass
class Windows:
    """The shown window of every example: example i covers flat[offsets[i]:offsets[i+1]]."""

    start_row: torch.Tensor
    offsets: torch.Tensor
    acts: torch.Tensor


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
    cand = torch.full((len(uniq), m), _NEG, dtype=buf_score.dtype, device=buf_score.device)
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


# --------------------------------------------------------------------------------------------
# The three passes


def _rng(seed: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch)


def rank_rows(n_tok: int, batch_tokens: int, rank: int, world: int) -> range:
    """The store rows rank `rank` of `world` analyses: a contiguous run of whole batches, so every
    batch (its encoding, its random keys) is the same as in a single-process run."""
    n_batches = -(-n_tok // batch_tokens)
    b0, b1 = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(min(b0 * batch_tokens, n_tok), min(b1 * batch_tokens, n_tok))


def analyze_stream(store, encode, d_sae: int, a, partial: Path, fp: str,
                   device: torch.device = torch.device("cpu")) -> StreamResult:
    """Run (or resume) the three streaming passes over `store`; `encode` is a sparse_encoder.

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
    state = _load_state(ckpt, fp)
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
            top_val=torch.full((d_sae, a.n_top), _NEG, **f32),
            top_pos=torch.full((d_sae, a.n_top), -1, dtype=torch.int64, device=device),
        )
        spill.truncate(0, 0)
    else:
        state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}

    def save():
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}, tmp)
        os.replace(tmp, ckpt)

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
        state.update(phase="sample", sample_tokens=row0, sample_entries=0, **_sample_init(glob, d_sae, a, device))
        save()
    seconds["encode"], t0 = time.perf_counter() - t0, time.perf_counter()

    # Pass 2: histograms and interval reservoirs, with exact edges.
    if state["phase"] == "sample":
        bar = tqdm(total=row1 - row0, initial=state["sample_tokens"] - row0, unit="tok", unit_scale=True,
                   disable=rank != 0, desc=desc("sample"))
        batches = spill.batches(row1, B, state["sample_tokens"], state["sample_entries"])
        consts = _sample_consts(state, a)
        for i, (b, start, rows, feat, val, e_next) in enumerate(batches):
            rows, feat, val = rows.to(device), feat.to(device), val.to(device)
            _sample_batch(state, a, rows, feat, val, _rng(a.seed, b), d_sae, consts)
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
    ex_feat, ex_row = _example_list(cpu["top_pos"], res_pos)
    windows = _fill_windows(spill, n_tok, L, B, d_sae, ex_feat, ex_row, a.context_left, a.context_right,
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


def _load_state(ckpt: Path, fp: str) -> dict | None:
    if not ckpt.exists():
        return None
    try:
        state = torch.load(ckpt, weights_only=True)
    except Exception:
        return None  # a checkpoint of an older layout or a torn write: start afresh
    return state if state.get("fingerprint") == fp else None


def _sample_init(state: dict, d_sae: int, a, device) -> dict:
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
        res_key=torch.full((G, a.per_interval), _NEG, dtype=torch.float32, device=device),
        res_pos=torch.full((G, a.per_interval), -1, dtype=torch.int64, device=device),
        res_val=torch.zeros((G, a.per_interval), dtype=torch.float32, device=device),
    )


def _sample_consts(state: dict, a) -> dict:
    """Per-feature constants of the bin guesses (float32; _locate makes the bins exact)."""
    he, ie = state["hist_edges"], state["interval_edges"]
    log_lo = he[:, 0].log()
    return dict(log_lo=log_lo, hist_scale=a.histogram_bins / (he[:, -1].log() - log_lo),
                int_scale=a.n_intervals / ie[:, -1])


def _sample_batch(state: dict, a, rows, feat, val, gen: torch.Generator, d_sae: int, consts: dict | None = None) -> None:
    nb, ni = a.histogram_bins, a.n_intervals
    c = consts if consts is not None else _sample_consts(state, a)
    guess = ((val.log() - c["log_lo"][feat]) * c["hist_scale"][feat]).long()  # >= 0, so long() is floor
    hbin = _locate(state["hist_edges"], feat, val, guess, right_closed=False)
    state["hist_counts"].index_put_((feat * nb + hbin,), torch.ones_like(hbin), accumulate=True)
    guess = (val * c["int_scale"][feat]).ceil().long() - 1
    ibin = _locate(state["interval_edges"], feat, val, guess, right_closed=True)
    keys = torch.rand(len(val), generator=gen).to(val.device)
    merge_topk(state["res_key"], feat * ni + ibin, keys, [state["res_pos"], state["res_val"]], [rows, val])


def _example_list(top_pos: torch.Tensor, res_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature, row) of every example, in output order: per feature, top then intervals."""
    d_sae = top_pos.shape[0]
    allpos = torch.cat([top_pos, res_pos.reshape(d_sae, -1)], 1)
    feat = torch.arange(d_sae)[:, None].expand_as(allpos)
    ok = allpos >= 0
    return feat[ok], allpos[ok]


def _window_rows(start: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Store rows of all windows, concatenated: window i is start[i] .. start[i] + width - 1."""
    width = offsets.diff()
    return torch.repeat_interleave(start - offsets[:-1], width) + torch.arange(int(offsets[-1]))


def _fill_windows(spill: Spill, n_tok: int, L: int, B: int, d_sae: int, ex_feat: torch.Tensor,
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


# --------------------------------------------------------------------------------------------
# Per-feature results and output


def logit_effects(w_dec: torch.Tensor, w_u: torch.Tensor | None, n: int, block: int = 1024):
    """Top and bottom `n` output tokens of W_dec @ W_U, in blocks of features.

    Returns (top_ids, top_vals, bottom_ids, bottom_vals), each [d_sae, n] (n = 0 without W_U);
    bottom is in ascending order (most negative first).
    """
    d_sae = w_dec.shape[0]
    if w_u is None or n == 0:
        e = torch.zeros(d_sae, 0, device=w_dec.device)
        return e.long(), e, e.long(), e
    n = min(n, w_u.shape[1])
    out = [[], [], [], []]
    for s in range(0, d_sae, block):
        eff = w_dec[s:s + block].float() @ w_u.float()
        tv, ti = eff.topk(n, dim=1)
        bv, bi = eff.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t)
    return tuple(torch.cat(x) for x in out)


def neighbours(w_dec: torch.Tensor, n: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` nearest other features of each feature by decoder cosine: (ids, cosines) [d_sae, n].

    Computed block by block ([block, d_sae] at a time), never as a d_sae x d_sae matrix.
    """
    u = unit_rows(w_dec)
    d_sae = u.shape[0]
    n = min(n, d_sae - 1)
    ids, cos = [], []
    for s in range(0, d_sae, block):
        sim = u[s:s + block] @ u.T
        r = torch.arange(sim.shape[0], device=sim.device)
        sim[r, r + s] = _NEG
        v, i = sim.topk(n, dim=1)
        ids.append(i)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def vocab_texts(tokenizer) -> list[str]:
    """Display text of every token id, with the spacing it has inside running text.

    Each token is decoded after a fixed probe token and the probe's text is cut off, so byte-level
    BPE's 'Ġthe' shows as ' the' and WordPiece shows 'the' as ' the' but '##ing' as 'ing' (a
    token decoded alone loses that distinction).
    """
    n = len(tokenizer)
    probe = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    prefix = tokenizer.decode(probe, clean_up_tokenization_spaces=False)
    joined = tokenizer.batch_decode([probe + [i] for i in range(n)], clean_up_tokenization_spaces=False)
    alone = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    return [j[len(prefix):] if probe and j.startswith(prefix) else a for j, a in zip(joined, alone)]


def write_features(out: Path, s: StreamResult, w_dec: torch.Tensor, w_u, vocab: list[str], a,
                   tokens: np.ndarray, device: torch.device = torch.device("cpu"),
                   labelling: "label_data.LabelData | None" = None) -> dict:
    """Write the shards and vocab.parquet into `out`; return the manifest's shard/analysis keys.

    Logit effects and neighbours are computed on `device`; everything else on the CPU. Labels are
    chosen and scored on `labelling`'s splits (without it, rule explainers fall back to top-tokens
    and labels go unscored)."""
    d_sae = w_dec.shape[0]
    flat_tokens = torch.from_numpy(np.ascontiguousarray(tokens).reshape(-1).astype(np.int32))
    t0 = time.perf_counter()
    on = w_dec.to(device)
    top_ids, top_vals, bot_ids, bot_vals = (t.cpu() for t in logit_effects(
        on, w_u.to(device) if w_u is not None else None, a.n_logits))
    nb_ids, nb_cos = (t.cpu() for t in neighbours(on, a.n_neighbours))
    w_dec = w_dec.cpu()
    xy = map_coordinates(w_dec, a.map_method, a.seed)
    t_post = time.perf_counter() - t0

    n_fired = s.n_fired
    density = n_fired.double() / max(s.n_tokens, 1)
    mean_act = torch.where(n_fired > 0, s.sum_act / n_fired.clamp_min(1), torch.zeros_like(s.sum_act))
    is_dead = n_fired == 0
    is_dense = density > a.dense_threshold

    # Example rows, in the order of _example_list: per feature, top (rank 0..) then intervals.
    n_top, ni, per = a.n_top, a.n_intervals, a.per_interval
    kind_top = torch.arange(n_top + ni * per).expand(d_sae, -1) < n_top
    interval = torch.cat([torch.full((d_sae, n_top), -1), torch.arange(ni).repeat_interleave(per).expand(d_sae, -1)], 1)
    rank = torch.cat([torch.arange(n_top).expand(d_sae, -1), torch.arange(per).repeat(ni).expand(d_sae, -1)], 1)
    allpos = torch.cat([s.top_pos, s.res_pos.reshape(d_sae, -1)], 1)
    allval = torch.cat([s.top_val, s.res_val.reshape(d_sae, -1)], 1)
    ok = allpos >= 0
    ex_feat = torch.arange(d_sae)[:, None].expand_as(allpos)[ok]
    ex_row, ex_val = allpos[ok], allval[ok]
    ex_top, ex_int, ex_rank = kind_top[ok], interval[ok], rank[ok]
    L = tokens.shape[1]
    w = s.windows
    win_tokens = flat_tokens[_window_rows(w.start_row, w.offsets)]

    labelled = _labels(a, s, ex_feat, ex_row, flat_tokens, L, w, win_tokens, vocab, is_dead, density, top_ids,
                       labelling)

    ex_bounds = torch.searchsorted(ex_feat, torch.arange(0, d_sae + a.shard_size, a.shard_size).clamp_max(d_sae))
    n_shards = (d_sae + a.shard_size - 1) // a.shard_size
    for sh in range(n_shards):
        f0, f1 = sh * a.shard_size, min((sh + 1) * a.shard_size, d_sae)
        fids = range(f0, f1)

        def lists(t: torch.Tensor, empty_if=None):
            rows = t[f0:f1].tolist()
            if empty_if is not None:
                rows = [[] if e else r for r, e in zip(rows, empty_if[f0:f1].tolist())]
            return rows

        feats = pa.table({
            "feature_id": pa.array(fids, pa.int32()),
            **labelled.columns(f0, f1),
            "n_fired": n_fired[f0:f1].numpy(),
            "density": density[f0:f1].float().numpy(),
            "mean_act": mean_act[f0:f1].float().numpy(),
            "max_act": s.max_act[f0:f1].numpy(),
            "hist_edges": lists(s.hist_edges, is_dead),
            "hist_counts": lists(s.hist_counts, is_dead),
            "interval_edges": lists(s.interval_edges, is_dead),
            "top_logit_ids": lists(top_ids), "top_logit_values": lists(top_vals),
            "bottom_logit_ids": lists(bot_ids), "bottom_logit_values": lists(bot_vals),
            "neighbour_ids": lists(nb_ids), "neighbour_cosines": lists(nb_cos),
            "map_x": xy[f0:f1, 0], "map_y": xy[f0:f1, 1],
            "is_dead": is_dead[f0:f1].numpy(), "is_dense": is_dense[f0:f1].numpy(),
        })
        write_table(out / shard_name("features", sh), feats, FEATURES_SCHEMA)

        e0, e1 = int(ex_bounds[sh]), int(ex_bounds[sh + 1])
        o0, o1 = int(w.offsets[e0]), int(w.offsets[e1])
        rel = pa.array((w.offsets[e0:e1 + 1] - o0).numpy().astype(np.int32))
        rows = ex_row[e0:e1]
        examples = pa.table({
            "feature_id": ex_feat[e0:e1].numpy().astype(np.int32),
            "kind": np.where(ex_top[e0:e1].numpy(), "top", "interval"),
            "interval": ex_int[e0:e1].numpy().astype(np.int16),
            "rank": ex_rank[e0:e1].numpy().astype(np.int16),
            "context": (rows // L).numpy().astype(np.int32),
            "offset": (rows % L).numpy().astype(np.int32),
            "activation": ex_val[e0:e1].numpy(),
            "window_start": (w.start_row[e0:e1] % L).numpy().astype(np.int32),
            "token_ids": pa.ListArray.from_arrays(rel, pa.array(win_tokens[o0:o1].numpy())),
            "acts": pa.ListArray.from_arrays(rel, pa.array(w.acts[o0:o1].numpy())),
        })
        write_table(out / shard_name("examples", sh), examples, EXAMPLES_SCHEMA)

    vocab_table = pa.table({"token_id": pa.array(range(len(vocab)), pa.int32()), "text": vocab})
    write_table(out / "vocab.parquet", vocab_table, VOCAB_SCHEMA)
    return {
        "schema_version": SCHEMA_VERSION,
        "n_features": d_sae,
        "shard_size": a.shard_size,
        "n_shards": n_shards,
        "n_tokens": s.n_tokens,
        "n_dead": int(is_dead.sum()),
        "n_dense": int(is_dense.sum()),
        "n_examples": int(len(ex_feat)),
        "vocab_size": len(vocab),
        "has_logits": w_u is not None,
        "map_method": "pca" if d_sae < UMAP_MIN_FEATURES else a.map_method,
        "label_source": a.explainer,
        "label_scores": {**labelled.summary(), **_split_facts(labelling)},
        "analyze": asdict(a),
        "postprocess_seconds": round(t_post, 2),
    }


def _labels(a, s: StreamResult, ex_feat, ex_row, flat_tokens, L: int, w: Windows, win_tokens, vocab,
            is_dead, density, top_ids, labelling: "label_data.LabelData | None",
            chunk: int = 1024) -> label_scores.Labelled:
    """Labels from the explainer, asked in chunks of features so the evidence stays small, each
    scored on the score split (atlas/label_scores.py). The explainer never sees examples from the
    score split's contexts: those are the ones its labels are scored on."""
    explainer = get_explainer(a.explainer, a, labelling.cache_dir if labelling else None)
    d_sae = s.top_pos.shape[0]
    ex_start = torch.searchsorted(ex_feat, torch.arange(d_sae + 1)).numpy()
    n_top = (s.top_pos >= 0).sum(1).numpy()  # a feature's top examples come first among its rows
    rows, tokens = ex_row.numpy(), flat_tokens.numpy()
    offsets, acts, wt = w.offsets.numpy(), w.acts.numpy(), win_tokens.numpy()
    seen = ~labelling.hidden(rows) if labelling else np.ones(len(rows), bool)

    def evidence(f: int) -> Evidence:
        top = [e for e in range(ex_start[f], ex_start[f] + n_top[f]) if seen[e]]
        samples = [e for e in range(ex_start[f] + n_top[f], ex_start[f + 1]) if seen[e]]
        r = rows[top]
        return Evidence(
            f, bool(is_dead[f]), float(density[f]), float(s.max_act[f]),
            top_token_ids=tokens[r].tolist(),
            prev_token_ids=np.where(r % L > 0, tokens[np.maximum(r - 1, 0)], -1).tolist(),
            windows=[wt[offsets[e]:offsets[e + 1]].tolist() for e in top],
            window_acts=[acts[offsets[e]:offsets[e + 1]].tolist() for e in top],
            top_logit_ids=top_ids[f].tolist(),
            sample_windows=[wt[offsets[e]:offsets[e + 1]].tolist() for e in samples],
            sample_acts=[acts[offsets[e]:offsets[e + 1]].tolist() for e in samples],
            choose=labelling.choose if labelling else None,
        )

    chunks = ([evidence(f) for f in range(c0, min(c0 + chunk, d_sae))] for c0 in range(0, d_sae, chunk))
    return label_scores.label_all(explainer, chunks, vocab, labelling)


def _split_facts(labelling: "label_data.LabelData | None") -> dict:
    """The manifest's description of the label splits: their sizes and encoding times."""
    if labelling is None:
        return {"choose_tokens": 0, "score_tokens": 0}
    return {"choose_tokens": labelling.choose.n, "score_tokens": labelling.score.n,
            "seconds": {k: round(v, 2) for k, v in labelling.seconds.items()}}


def run_metadata(cfg: RunConfig, store, sae_dir: Path, has_logits: bool) -> dict:
    """Manifest keys describing the run: model, hook, store, SAE config and training metrics."""

    def read_json(p: Path) -> dict:
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise AtlasError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None

    info = store.info
    return {
        "run": cfg.name,
        "model": info.model,
        "revision": info.revision,
        "layer": info.layer,
        "hook_name": info.hook_name,
        "d_model": info.d_model,
        "ctx_len": info.ctx_len,
        "n_contexts": info.n_contexts,
        "tokenizer_hash": info.tokenizer_hash,
        "bos_token_id": info.bos_token_id,
        "skip_bos": cfg.analyze.skip_bos,
        "has_logits": has_logits,
        "sae_cfg": read_json(sae_dir / "cfg.json"),
        "metrics": read_json(sae_dir / "metrics.json"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
