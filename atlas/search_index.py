"""The site's own compact indexes, loaded on demand by site_src/js/ (never MkDocs' search).

- `data/features.js`: every feature as columnar arrays (label, its score, density, max
  activation, map coordinates, flags, top token; `group`, the Matryoshka nesting level, when the
  SAE has one, else null) for the explorer, the map and label search, and the map's named regions
  (atlas/map_regions.py);
- `data/tokens/NN.js`: which features fire hardest on a token, sharded by FNV-1a of the token
  text (site_src/js/atlas-data.js computes the same hash), built from every token each feature
  fires on in its shown examples (top and sampled windows), at most MAX_FEATURES_PER_TOKEN a token;
- the header's search box (MkDocs Material's, over `search/search_index.json`) also finds features:
  `add_to_header_search` appends one title-only entry per labelled feature ("#12 label").

Each file is a script calling `Atlas.loaded(name, data)`, not JSON, so the pages can load it
with a <script> tag, which also works from file:// where fetch() of local files does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atlas import shards
from atlas.map_regions import name_regions

TOKEN_SHARD_TARGET = 4000        # tokens per shard, roughly
MAX_FEATURES_PER_TOKEN = 100
MAX_TOKENS_PER_FEATURE = 24     # distinct tokens a feature is found by, its strongest


def fnv1a(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass
class FeatureTable:
    """The small columns of every feature, read once from all shards (O(n_features) memory)."""

    ids: np.ndarray
    labels: list[str]
    density: np.ndarray
    max_act: np.ndarray
    map_x: np.ndarray
    map_y: np.ndarray
    is_dead: np.ndarray
    is_dense: np.ndarray
    label_f1: np.ndarray
    """The label's held-out F1 (atlas/labels/scores.py); NaN where not scored."""
    label_precision: np.ndarray
    label_recall: np.ndarray
    heldout_fired: np.ndarray
    """Held-out tokens (contexts, for detection) the feature fired on: how much evidence the score rests on."""
    group: np.ndarray
    """Matryoshka nesting level (0: the first prefix); -1 where the SAE has none."""
    dominated_by: list[str]
    """"" or "special-token" or "position" (atlas/analyze/dedup.py): fires on where a token is, not what it says."""

    @property
    def n(self) -> int:
        return int(self.ids.max()) + 1 if len(self.ids) else 0


COLUMNS = ["feature_id", "label", "density", "max_act", "map_x", "map_y", "is_dead", "is_dense", "label_f1",
           "label_precision", "label_recall", "heldout_fired", "dominated_by"]


def read_feature_table(features_dir: Path) -> FeatureTable:
    paths = sorted(Path(features_dir).glob("features-*.parquet"))
    if not paths:
        from atlas.errors import AtlasError

        raise AtlasError(f"{features_dir}: no features-*.parquet shards; run `atlas analyze` first")
    cols = {c: [] for c in [*COLUMNS, shards.GROUP_FIELD.name]}
    for p in paths:
        t = shards.read_table(p, shards.FEATURES_SCHEMA).select(COLUMNS)
        name = shards.GROUP_FIELD.name  # optional: only an SAE of nested prefixes has it
        group = (pq.read_table(p, columns=[name]).column(name) if name in pq.read_schema(p).names
                 else pa.nulls(len(t), shards.GROUP_FIELD.type))
        t = t.append_column(name, group)
        for c in [*COLUMNS, name]:
            col = t.column(c)
            if c in ("label", "dominated_by"):
                cols[c].append(col.to_pylist())
            elif c == "group":                      # null (no nesting) reads as -1
                cols[c].append(col.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64))
            elif col.type == pa.float32():          # nullable scores: null reads as NaN
                cols[c].append(col.to_numpy(zero_copy_only=False).astype(np.float64))
            else:
                cols[c].append(col.to_numpy(zero_copy_only=False))
    ids = np.concatenate(cols["feature_id"])
    order = np.argsort(ids, kind="stable")
    labels_all = [x or "" for chunk in cols["label"] for x in chunk]
    dominated_all = [x or "" for chunk in cols["dominated_by"] for x in chunk]
    pick = lambda c: np.concatenate(cols[c])[order]  # noqa: E731
    return FeatureTable(ids[order], [labels_all[i] for i in order], pick("density").astype(np.float64),
                        pick("max_act").astype(np.float64), pick("map_x"), pick("map_y"),
                        pick("is_dead").astype(bool), pick("is_dense").astype(bool), pick("label_f1"),
                        pick("label_precision"), pick("label_recall"), pick("heldout_fired").astype(np.int64),
                        pick("group"),
                        [dominated_all[i] for i in order])


def _round(a: np.ndarray, digits: int = 4) -> list:
    return [float(f"{x:.{digits}g}") if np.isfinite(x) else 0 for x in a.tolist()]


def _score(a: np.ndarray) -> list:
    """Scores in [0, 1] to 2 decimals; null where not scored."""
    return [round(x, 2) if np.isfinite(x) else None for x in a.tolist()]


def _write_js(path: Path, name: str, data) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"Atlas.loaded({json.dumps(name)},{json.dumps(data, ensure_ascii=False, separators=(',', ':'))});\n"
    # JSON inside a script: keep "</script" and U+2028/9 from ever meaning anything else
    text = text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    path.write_text(text, encoding="utf-8")
    return len(text)


def write_features(data_dir: Path, table: FeatureTable, top_token: np.ndarray, vocab: list[str]) -> None:
    """data/features.js: columnar arrays indexed by feature id."""
    n = table.n
    labels = [""] * n
    for i, lab in zip(table.ids.tolist(), table.labels):
        labels[i] = lab

    def dense(values, fill=0):
        out = np.full(n, fill, dtype=np.asarray(values).dtype)
        out[table.ids] = values
        return out

    # flags: 1 dead, 2 dense, 4 dominated by special tokens, 8 dominated by position
    dominated = np.array([{"special-token": 4, "position": 8}.get(d, 0) for d in table.dominated_by], np.int8)
    flags = dense(table.is_dead.astype(np.int8) | (table.is_dense.astype(np.int8) << 1) | dominated)
    tokens = [vocab[t] if 0 <= t < len(vocab) else "" for t in top_token.tolist()]
    _write_js(data_dir / "features.js", "features", {
        "n": n, "present": dense(np.ones(len(table.ids), np.int8)).tolist() if len(table.ids) < n else None,
        "label": labels, "density": _round(dense(table.density), 3), "max_act": _round(dense(table.max_act), 4),
        "x": _round(dense(table.map_x), 4), "y": _round(dense(table.map_y), 4), "flags": flags.tolist(),
        "f1": _score(dense(table.label_f1, np.nan)),
        "top_token": tokens,
        "group": dense(table.group, -1).tolist() if (table.group >= 0).any() else None,
        "regions": [[r.name, *_round(np.array([r.x, r.y]), 4), r.n]
                    for r in name_regions(table.map_x, table.map_y, table.labels, ~table.is_dead)],
    })


def strongest_tokens(tok_token: np.ndarray, tok_feature: np.ndarray, tok_act: np.ndarray,
                     per_feature: int = MAX_TOKENS_PER_FEATURE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (token, feature) pair once, with its highest activation, keeping each feature's `per_feature`
    strongest distinct tokens (a bound on the index's bytes per feature, which the lean-page budget counts).
    A feature's rows never straddle shards, so each shard's renderer reduces its own (in parallel) and
    write_tokens sorts tens of rows a feature instead of every firing (13M at 32,768 synthetic features)."""
    key = tok_token.astype(np.int64) * (1 << 32) + tok_feature.astype(np.int64)
    order = np.lexsort((-tok_act, key))
    key, tok_act = key[order], tok_act[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, act = key[first], tok_act[first]
    token, feature = (key >> 32).astype(np.int64), (key & 0xFFFFFFFF).astype(np.int64)
    order = np.lexsort((-act, feature))
    token, feature, act = token[order], feature[order], act[order]
    starts = np.flatnonzero(np.r_[True, feature[1:] != feature[:-1]])
    rank = np.arange(len(feature)) - np.repeat(starts, np.diff(np.r_[starts, len(feature)]))
    keep = rank < per_feature
    return token[keep].astype(np.int32), feature[keep].astype(np.int32), act[keep]


def write_tokens(data_dir: Path, tok_token: np.ndarray, tok_feature: np.ndarray, tok_act: np.ndarray,
                 vocab: list[str]) -> int:
    """data/tokens/NN.js: token text -> [[feature ids], [max activation]] (best first), from the rows
    `strongest_tokens` kept (each page worker reduces its shard's). Returns the shard count."""
    token, feature, act = tok_token.astype(np.int64), tok_feature.astype(np.int64), tok_act
    # per token: features by activation, best first
    order = np.lexsort((-act, token))
    token, feature, act = token[order], feature[order], act[order]
    bounds = np.flatnonzero(np.r_[True, token[1:] != token[:-1], True])
    n_tokens = len(bounds) - 1
    n_shards = max(1, min(256, -(-n_tokens // TOKEN_SHARD_TARGET)))
    buckets: list[dict] = [{} for _ in range(n_shards)]
    for s, e in zip(bounds[:-1], bounds[1:]):
        t = int(token[s])
        text = vocab[t] if 0 <= t < len(vocab) else ""
        e = min(e, s + MAX_FEATURES_PER_TOKEN)
        bucket = buckets[fnv1a(text) % n_shards]
        if text not in bucket:
            bucket[text] = [feature[s:e].tolist(), _round(act[s:e], 2)]
            continue
        # two token ids with the same text (GPT-2's partial UTF-8 bytes all decode to "\ufffd"): merge them,
        # best first, one entry per feature
        best: dict[int, float] = {}
        for f, a in zip(bucket[text][0] + feature[s:e].tolist(), bucket[text][1] + _round(act[s:e], 2)):
            best[f] = max(a, best.get(f, a))
        merged = sorted(best.items(), key=lambda fa: -fa[1])[:MAX_FEATURES_PER_TOKEN]
        bucket[text] = [[f for f, _ in merged], [a for _, a in merged]]
    for i, b in enumerate(buckets):
        _write_js(data_dir / "tokens" / f"{i}.js", f"tokens/{i}", b)
    _write_js(data_dir / "tokens" / "meta.js", "tokens/meta", {"shards": n_shards})
    return n_shards



def add_to_header_search(site: Path, table: FeatureTable) -> int:
    """Append "#id label" entries (title only, no page text: the index stays small) for every labelled
    feature to MkDocs' search/search_index.json, so the header's search box finds features by the
    words of their labels. Returns the number of entries added (0 without a search index)."""
    path = Path(site) / "search" / "search_index.json"
    if not path.exists():
        return 0
    index = json.loads(path.read_text(encoding="utf-8"))
    added = [{"location": f"features/{int(i)}/index.html", "title": f"#{int(i)} {lab}", "text": ""}
             for i, lab in zip(table.ids.tolist(), table.labels) if lab]
    index["docs"] = [d for d in index["docs"] if not d["location"].startswith("features/")] + added
    path.write_text(json.dumps(index, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return len(added)
