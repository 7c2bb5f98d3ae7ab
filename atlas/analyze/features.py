"""The per-feature computations after the streaming passes: logit effects (W_dec @ W_U, top and
bottom `n_logits`), decoder-cosine neighbours (computed in blocks of rows, never d_sae x d_sae),
and a label with its score on held-out contexts (atlas/labels/, atlas/labels/scores.py).
"""

from __future__ import annotations

import numpy as np
import torch

from atlas.analyze.passes import StreamResult
from atlas.analyze.windows import Windows
from atlas.featuremap import unit_rows
from atlas.labels import Evidence, get_explainer
from atlas.labels import data as label_data
from atlas.labels import scores as label_scores


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
        sim[r, r + s] = -torch.inf
        v, i = sim.topk(n, dim=1)
        ids.append(i)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def label_features(a, s: StreamResult, ex_feat, ex_row, flat_tokens, L: int, w: Windows, win_tokens, vocab,
                   is_dead, density, top_ids, labelling: "label_data.LabelData | None",
                   chunk: int = 1024) -> label_scores.Labelled:
    """Labels from the explainer, asked in chunks of features so the evidence stays small, each
    scored on the score split (atlas/labels/scores.py). The explainer never sees examples from the
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


def split_facts(labelling: "label_data.LabelData | None") -> dict:
    """The manifest's description of the label splits: their sizes and encoding times."""
    if labelling is None:
        return {"choose_tokens": 0, "score_tokens": 0}
    return {"choose_tokens": labelling.choose.n, "score_tokens": labelling.score.n,
            "seconds": {k: round(v, 2) for k, v in labelling.seconds.items()}}
