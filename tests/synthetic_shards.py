"""A synthetic `features/` folder (plus `sae/metrics.jsonl`) written through `atlas.shards`.

For the build's tests and benchmark: any number of features, shaped like `atlas analyze`
output for the GPT-2 Small config (analyze defaults: 20 top examples + 10 intervals x 5, windows
of context_left 24 + the marked token + context_right 8 = 33 tokens), with hostile token texts and
labels mixed in so escaping is exercised everywhere.

Sized to be realistic but pessimistic for page weight: tokens average ~4.2 characters (GPT-2 on
TinyStories is ~4), and besides the marked token 15% of a window's tokens are active (~18% in
all; a TopK SAE's feature is zero on most tokens around its peak). The marked token is " Once" in
40% of examples (the token search test looks for it), a hostile text in 10% and a random token
otherwise.

    python tests/synthetic_shards.py runs/synth 24576     # then build with a config named synth
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlas import shards
from atlas.stage import write_stamp

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "&amp;", "{{ 7*7 }}", "</textarea>"]
WORDS = ["Once", "upon", "time", "little", "dog", "cat", "park", "happy", "ball", "Lily", "Tom", "said",
         "the", "a", "and", "to", "was", "in", "with", "play", "sun", "tree", "big", "red", "went"]


def vocab(n_vocab: int) -> list[str]:
    texts = [" Once", "\n", " ", "."] + HOSTILE
    for w in WORDS:
        texts += [w, " " + w]
    i = 0
    while len(texts) < n_vocab:
        w = WORDS[(i * 7) % len(WORDS)]
        texts.append((" " if i % 2 else "") + w[: 3 + i % 5] + ("s" if i % 3 == 0 else ""))  # GPT-2-like: ~4.3 chars
        i += 1
    return texts[:n_vocab]


def _list_array(values: np.ndarray, width: int, typ) -> pa.ListArray:
    offsets = np.arange(0, values.size + 1, max(width, 1), dtype=np.int32) if width else np.zeros(len(values) + 1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel(), typ))


def write(run_dir: Path, n_features: int, *, shard_size: int = 512, n_top: int = 20, n_intervals: int = 10,
          per_interval: int = 5, context_left: int = 24, context_right: int = 8, bins: int = 50, n_vocab: int = 5000, has_logits: bool = True,
          seed: int = 0) -> Path:
    """Write run_dir/features/ (stamped) and run_dir/sae/metrics.jsonl; returns the features dir."""
    rng = np.random.default_rng(seed)
    out = Path(run_dir) / "features"
    out.mkdir(parents=True, exist_ok=True)
    texts = vocab(n_vocab)
    shards.write_table(out / "vocab.parquet", pa.table({"token_id": np.arange(len(texts), dtype=np.int32),
                                                        "text": texts}), shards.VOCAB_SCHEMA)
    n_shards = (n_features + shard_size - 1) // shard_size
    n_ex = n_top + n_intervals * per_interval
    n_tokens = 1_000_000
    window, mark = context_left + 1 + context_right, context_left
    for s in range(n_shards):
        ids = np.arange(s * shard_size, min(n_features, (s + 1) * shard_size), dtype=np.int32)
        n = len(ids)
        density = 10 ** rng.uniform(-5, -0.5, n)
        dead = (ids % 97) == 5
        density[dead] = 0
        max_act = rng.uniform(1, 30, n) * ~dead
        # log-spaced edges and linear interval edges computed as analysis computes them (float64, then float32)
        hi = np.maximum(max_act, 1e-3).astype(np.float32).astype(np.float64)
        lo = (hi * 1e-3).astype(np.float32).astype(np.float64)
        t = np.linspace(0, 1, bins + 1)
        edges = np.exp(np.log(lo)[:, None] + t[None] * (np.log(hi) - np.log(lo))[:, None])
        edges[:, 0], edges[:, -1] = lo, hi
        counts = (rng.gamma(2, 50, (n, bins)) * ~dead[:, None]).astype(np.int64)
        labels = [HOSTILE[(i // 50) % len(HOSTILE)] if i % 50 == 3 else f"{WORDS[i % len(WORDS)]} after {WORDS[(i * 7) % len(WORDS)]}"
                  for i in ids]
        labels = [("" if d else lab) for lab, d in zip(labels, dead)]
        nl = 10 if has_logits else 0
        # label scores: F1 spread over [0, 1], unscored (null) for dead features and every 13th; some labels
        # are rules over hostile tokens, long enough that the page shows the rule in full
        prec, rec = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
        unscored = dead | (ids % 13 == 7)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0)
        rules = [json.dumps({"kind": "tokens", "atoms": [4, 5, 6, 7, 8] + list(range(10, 20))}) if i % 11 == 4 else ""
                 for i in ids]

        def nullable(x):
            return pa.array(x.astype(np.float32), pa.float32(), mask=unscored)

        feats = pa.table({
            "feature_id": ids, "label": labels, "label_source": ["best-rule"] * n, "label_rule": rules,
            "label_precision": nullable(prec), "label_recall": nullable(rec), "label_f1": nullable(f1),
            "label_matched": rng.integers(0, 500, n), "heldout_fired": np.where(dead, 0, rng.integers(0, 200, n)),
            "label_scoring": ["" if u else "rule" for u in unscored],
            "n_fired": (density * n_tokens).astype(np.int64), "density": density.astype(np.float32),
            "mean_act": (max_act / 3).astype(np.float32), "max_act": max_act.astype(np.float32),
            "hist_edges": _list_array(edges.astype(np.float32), bins + 1, pa.float32()),
            "hist_counts": _list_array(counts, bins, pa.int64()),
            "interval_edges": _list_array(np.linspace(0, 1, n_intervals + 1)[None, :]
                                          * max_act.astype(np.float32).astype(np.float64)[:, None],
                                          n_intervals + 1, pa.float32()),
            "top_logit_ids": _list_array(rng.integers(0, n_vocab, (n, nl), dtype=np.int32), nl, pa.int32()),
            "top_logit_values": _list_array(np.sort(rng.uniform(0, 1, (n, nl)))[:, ::-1].astype(np.float32), nl, pa.float32()),
            "bottom_logit_ids": _list_array(rng.integers(0, n_vocab, (n, nl), dtype=np.int32), nl, pa.int32()),
            "bottom_logit_values": _list_array(-np.sort(rng.uniform(0, 1, (n, nl)))[:, ::-1].astype(np.float32), nl, pa.float32()),
            "neighbour_ids": _list_array(rng.integers(0, n_features, (n, 10), dtype=np.int32), 10, pa.int32()),
            "neighbour_cosines": _list_array(np.sort(rng.uniform(0, 1, (n, 10)))[:, ::-1].astype(np.float32), 10, pa.float32()),
            "map_x": rng.normal(0, 3, n).astype(np.float32) + (ids % 7), "map_y": rng.normal(0, 3, n).astype(np.float32),
            "is_dead": dead, "is_dense": density > 0.1,
            # planted: every 17th feature fires on special tokens, every 17th from 9 on at one position
            "dominated_by": ["special-token" if i % 17 == 2 else "position" if i % 17 == 9 else "" for i in ids],
        })
        shards.write_table(out / shards.shard_name("features", s), feats, shards.FEATURES_SCHEMA)

        live = ids[~dead]
        m = len(live) * n_ex
        fid = np.repeat(live, n_ex)
        per = np.arange(n_ex)
        kind = np.where(per < n_top, "top", "interval")
        interval = np.where(per < n_top, -1, (per - n_top) // per_interval).astype(np.int16)
        rank = np.where(per < n_top, per, (per - n_top) % per_interval).astype(np.int16)
        tokens = rng.integers(0, n_vocab, (m, window), dtype=np.int32)
        if n_vocab > 40:                    # " Once" 40%, "<script>…" 5%, "\"><img …" 5%, else random
            u = rng.uniform(0, 1, m)
            tokens[:, mark] = np.where(u < 0.4, 0, np.where(u < 0.45, 4, np.where(u < 0.5, 5, tokens[:, mark])))
        top_peak = 1 - per / (2 * n_top)                              # top examples: from max_act down
        iv_peak = (np.clip(interval, 0, None) + 0.5) / n_intervals    # intervals: the middle of theirs
        peak = np.repeat(max_act[~dead], n_ex) * np.tile(np.where(per < n_top, top_peak, iv_peak), len(live))
        acts = np.where(rng.uniform(0, 1, (m, window)) < 0.15, rng.uniform(0, 1, (m, window)), 0) * peak[:, None]
        acts = acts.astype(np.float32)
        acts[:, mark] = peak
        ex = pa.table({
            "feature_id": fid, "kind": np.tile(kind, len(live)), "interval": np.tile(interval, len(live)),
            "rank": np.tile(rank, len(live)), "context": rng.integers(0, 10000, m, dtype=np.int32),
            "offset": np.full(m, 100, np.int32), "activation": peak.astype(np.float32),
            "window_start": np.full(m, 100 - mark, np.int32),
            "token_ids": _list_array(tokens, window, pa.int32()), "acts": _list_array(acts, window, pa.float32()),
        })
        shards.write_table(out / shards.shard_name("examples", s), ex, shards.EXAMPLES_SCHEMA)

    manifest = {
        "schema_version": shards.SCHEMA_VERSION, "n_features": n_features, "shard_size": shard_size,
        "n_shards": n_shards, "has_logits": has_logits, "n_tokens": n_tokens, "label_source": "best-rule",
        "label_scores": {"choose_tokens": 65024, "score_tokens": 65024},
        "model": {"name": "synthetic-gpt2", "layer": 8, "hook": "blocks.8.hook_resid_pre", "d_model": 768},
        "sae": {"architecture": "topk", "d_sae": n_features, "k": 32},
        "metrics": {"explained_variance": 0.81, "l0": 31.7, "ce_loss_score": 0.93, "kl_score": 0.95,
                    "dead_fraction": float(np.mean((np.arange(n_features) % 97) == 5)), "mse": 0.0123},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    write_stamp(out, f"synthetic-{n_features}-{seed}")

    sae = Path(run_dir) / "sae"
    sae.mkdir(parents=True, exist_ok=True)
    with open(sae / "metrics.jsonl", "w") as f:
        for step in range(0, 2000, 20):
            f.write(json.dumps({"step": step, "tokens": step * 4096, "loss": 1 / (1 + step / 100) + 0.05,
                                "explained_variance": 1 - 0.8 / (1 + step / 200), "l0": 32.0,
                                "dead_fraction": max(0.0, 0.3 - step / 5000)}) + "\n")
    return out


if __name__ == "__main__":
    write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2048)
