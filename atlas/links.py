"""`atlas links`: how the features of a suite's SAEs relate, by decoder direction.

Run once every SAE of a suite is trained (`atlas all` runs it after analyze; a run of one SAE has
nothing to link and writes nothing). Similarity is the cosine of two features' decoder rows
(`W_dec[i]`, a direction in the residual stream): both SAEs read the same model, so a feature
that persists from layer to layer, or splits as the dictionary grows, keeps a similar direction.

For each member (layer l, width w), among the suite's members:

- `prev` / `next`: the `PER_LAYER` features of the SAE at the previous / next layer of the suite
  with the same width w, most similar first (no row at the first / last layer);
- `parent`: at the same layer, in the SAE of the next narrower width, the one feature most
  similar to this one (its argmax cosine; always exactly one when there is a narrower SAE);
- `child`: at the same layer, in the SAE of the next wider width, every feature whose parent is
  this one, most similar first. Children are the inverse of parents, so every feature of the
  wider SAE is the child of exactly one feature of the narrower, and a feature may have none.

Output: runs/<name>/links/ (stamped and written atomically like every stage output)

    <member id>.parquet   one per member (e.g. L8.parquet, L8-24576.parquet), rows sorted by
                          (feature_id, relation order prev, next, parent, child, rank):
        feature_id  int32    the feature of this member
        relation    string   "prev" | "next" | "parent" | "child"
        other_sae   string   the member id of the linked SAE (e.g. "L4")
        other_id    int32    the linked feature in that SAE
        cosine      float32  decoder cosine of the two features
        rank        int16    0 = most similar, within (feature_id, relation)
    manifest.json         {"version": 1, "per_layer": PER_LAYER,
                           "members": {id: {"layer", "d_sae", "hook_name", "file", "n_rows",
                                            "prev", "next", "parent", "child"}}}
                          where prev/next/parent/child name the linked member id or null.

A feature page of member M reads its rows from links/M.parquet and links each to
`other_sae`'s page of `other_id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atlas.config import RunConfig
from atlas.saes import load_sae
from atlas.stage import open_stage, read_stamp, sae_digest
from atlas.suite import Member, configs, is_suite, members

PER_LAYER = 5
"""Most similar features listed in each neighbouring layer's SAE."""
RELATIONS = ("prev", "next", "parent", "child")
SCHEMA = pa.schema([("feature_id", pa.int32()), ("relation", pa.string()), ("other_sae", pa.string()),
                    ("other_id", pa.int32()), ("cosine", pa.float32()), ("rank", pa.int16())])
BLOCK_ROWS = 2048
"""Rows of a cosine block: 2,048 x 131,072 float32 is 1 GB at most."""


@dataclass(frozen=True)
class Neighbours:
    """Relations of one member to its neighbours in the suite (member ids, or None)."""

    prev: Member | None
    next: Member | None
    parent: Member | None
    child: Member | None


def neighbours(cfg: RunConfig) -> dict[str, Neighbours]:
    """For every member: the adjacent layers' SAEs of its width, and the next narrower/wider SAE
    at its layer."""
    by_key = {(m.layer, m.d_sae): m for m in members(cfg)}
    layers, widths = cfg.layers, cfg.widths
    out = {}
    for m in members(cfg):
        li, wi = layers.index(m.layer), widths.index(m.d_sae)
        out[m.id] = Neighbours(
            prev=by_key[layers[li - 1], m.d_sae] if li > 0 else None,
            next=by_key[layers[li + 1], m.d_sae] if li + 1 < len(layers) else None,
            parent=by_key[m.layer, widths[wi - 1]] if wi > 0 else None,
            child=by_key[m.layer, widths[wi + 1]] if wi + 1 < len(widths) else None)
    return out


def unit_rows(w_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit length (a zero row stays zero)."""
    w = w_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_similar(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each unit row of `a`, the k rows of `b` with the largest cosine: (ids, cosines) [n_a, k],
    most similar first. Computed in blocks of rows, never the whole matrix at once."""
    k = min(k, b.shape[0])
    ids, cos = [], []
    for start in range(0, a.shape[0], BLOCK_ROWS):
        values, index = torch.topk(a[start:start + BLOCK_ROWS] @ b.T, k, dim=1)
        ids.append(index.numpy().astype(np.int32))
        cos.append(values.numpy().astype(np.float32))
    return np.concatenate(ids), np.concatenate(cos)


def _rows(relation: str, other: Member, feature_ids: np.ndarray, other_ids: np.ndarray, cosines: np.ndarray,
          ranks: np.ndarray) -> dict:
    return {"feature_id": feature_ids.astype(np.int32), "relation": [relation] * len(feature_ids),
            "other_sae": [other.id] * len(feature_ids), "other_id": other_ids.astype(np.int32),
            "cosine": cosines.astype(np.float32), "rank": ranks.astype(np.int16)}


def member_links(unit: dict[str, torch.Tensor], m: Member, near: Neighbours) -> pa.Table:
    """Every link of member `m`'s features (the module doc's rows), from all members' unit decoder rows."""
    parts = []
    d = unit[m.id].shape[0]
    for relation, other in (("prev", near.prev), ("next", near.next)):
        if other is not None:
            ids, cos = top_similar(unit[m.id], unit[other.id], PER_LAYER)
            k = ids.shape[1]
            parts.append(_rows(relation, other, np.repeat(np.arange(d), k), ids.ravel(), cos.ravel(),
                               np.tile(np.arange(k), d)))
    if near.parent is not None:
        ids, cos = top_similar(unit[m.id], unit[near.parent.id], 1)
        parts.append(_rows("parent", near.parent, np.arange(d), ids[:, 0], cos[:, 0], np.zeros(d)))
    if near.child is not None:  # the wider SAE's features whose parent is one of ours
        parent_of, cos = top_similar(unit[near.child.id], unit[m.id], 1)
        parent_of, cos = parent_of[:, 0], cos[:, 0]
        order = np.lexsort((-cos, parent_of))  # by parent, then most similar first
        parent_sorted = parent_of[order]
        starts = np.searchsorted(parent_sorted, parent_sorted, side="left")
        parts.append(_rows("child", near.child, parent_sorted, order, cos[order], np.arange(len(order)) - starts))
    if not parts:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pa.table(p, schema=SCHEMA) for p in parts])
    relation_order = np.array([RELATIONS.index(r) for r in table.column("relation").to_pylist()])
    order = np.lexsort((table.column("rank").to_numpy(), relation_order, table.column("feature_id").to_numpy()))
    return table.take(pa.array(order))


def run(cfg: RunConfig, force: bool = False) -> Path | None:
    """Write runs/<name>/links/ for a suite whose SAEs are all trained; None when there is nothing
    to link (one SAE) or some SAE is not trained yet."""
    if not is_suite(cfg):
        return None
    views = configs(cfg)
    missing = [v.member for v in views if read_stamp(v.sae_dir) is None]
    if missing:
        print(f"links: waiting for {', '.join(missing)} to be trained; run `atlas train` for them")
        return None
    out = cfg.links_dir
    inputs = {"per_layer": str(PER_LAYER), **{v.member: sae_digest(v) for v in views}}
    opening = open_stage("links", cfg, out, (), inputs, force)
    if opening.current:
        return out
    unit = {v.member: unit_rows(load_sae(v.sae_dir).W_dec) for v in views}
    near = neighbours(cfg)
    manifest = {"version": 1, "per_layer": PER_LAYER, "members": {}}
    with opening.write() as tmp:
        for m in members(cfg):
            table = member_links(unit, m, near[m.id])
            pq.write_table(table, tmp / f"{m.id}.parquet", compression="zstd")
            n = near[m.id]
            manifest["members"][m.id] = {"layer": m.layer, "d_sae": m.d_sae, "hook_name": m.hook_name,
                                         "file": f"{m.id}.parquet", "n_rows": table.num_rows,
                                         **{r: getattr(n, r).id if getattr(n, r) else None for r in RELATIONS}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"links: wrote {out} ({len(views)} SAEs)")
    return out


def read_links(links_dir: Path, member_id: str) -> dict[int, dict[str, list[tuple[str, int, float]]]]:
    """links/<member>.parquet as {feature_id: {relation: [(other_sae, other_id, cosine), ...]}}."""
    table = pq.read_table(Path(links_dir) / f"{member_id}.parquet").to_pylist()
    out: dict[int, dict[str, list]] = {}
    for r in table:
        out.setdefault(r["feature_id"], {}).setdefault(r["relation"], []).append(
            (r["other_sae"], r["other_id"], r["cosine"]))
    return out
