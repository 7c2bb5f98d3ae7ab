"""What `atlas analyze` writes into `features/` (through atlas.stage.atomic_dir): zstd Parquet
shards of features and examples (schemas in atlas/shards.py), `vocab.parquet`, and the manifest's
keys (`manifest.json` is written last).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from atlas.analyze.dedup import Examples, dominated_by, drop_duplicates
from atlas.analyze.features import label_features, logit_effects, neighbours, split_facts
from atlas.analyze.passes import StreamResult
from atlas.analyze.windows import window_rows
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.featuremap import UMAP_MIN_FEATURES, map_coordinates
from atlas.labels import data as label_data
from atlas.shards import (EXAMPLES_SCHEMA, FEATURES_SCHEMA, GROUP_FIELD, SCHEMA_VERSION, VOCAB_SCHEMA, shard_name,
                          write_table)


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
                   labelling: "label_data.LabelData | None" = None, groups: torch.Tensor | None = None,
                   special_ids: frozenset[int] = frozenset()) -> dict:
    """Write the shards and vocab.parquet into `out`; return the manifest's shard/analysis keys.

    Logit effects and neighbours are computed on `device`; everything else on the CPU. Labels are
    chosen and scored on `labelling`'s splits (without it, rule explainers fall back to top-tokens
    and labels go unscored). `groups`: each feature's nesting level (`SparseAutoencoder.latent_groups`),
    written as the optional `group` column (shards.GROUP_FIELD), or None (no such column).
    `special_ids`: the tokenizer's special tokens (BOS, separator, padding), for `dominated_by`."""
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

    # Example rows, in the order of windows.example_list: per feature, top (rank 0..) then intervals.
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
    win_tokens = flat_tokens[window_rows(w.start_row, w.offsets)]

    labelled = label_features(a, s, ex_feat, ex_row, flat_tokens, L, w, win_tokens, vocab, is_dead, density, top_ids,
                       labelling)
    shown = drop_duplicates(Examples(ex_feat, ex_row, ex_val, ex_top, ex_int, ex_rank, w, win_tokens), L)
    ex_feat, ex_row, ex_val, ex_top, ex_int, ex_rank = shown.feat, shown.row, shown.val, shown.top, shown.interval, shown.rank
    w, win_tokens = shown.windows, shown.win_tokens
    dominated = dominated_by(shown, flat_tokens, L, d_sae, set(special_ids) | {int(flat_tokens[0])})

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
            "dominated_by": pa.array(dominated[f0:f1], pa.string()),
        })
        schema = FEATURES_SCHEMA
        if groups is not None:
            feats = feats.append_column(GROUP_FIELD, pa.array(groups[f0:f1].numpy().astype(np.int16)))
            schema = FEATURES_SCHEMA.append(GROUP_FIELD)
        write_table(out / shard_name("features", sh), feats, schema)

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
        "n_dominated": {k: dominated.count(k) for k in ("special-token", "position")},
        "n_examples": int(len(ex_feat)),
        "vocab_size": len(vocab),
        "has_logits": w_u is not None,
        "map_method": "pca" if d_sae < UMAP_MIN_FEATURES else a.map_method,
        "label_source": a.explainer,
        "label_scores": {**labelled.summary(), **split_facts(labelling)},
        "analyze": asdict(a),
        "postprocess_seconds": round(t_post, 2),
    }


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
