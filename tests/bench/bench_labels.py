"""Benchmark: label scores of every explainer on the same features of the demo atlas.

    python tests/bench/bench_labels.py [--config configs/demo.yaml] [--out runs/bench/labels.json]

The run's store, SAE and features/ are made first when missing (`make` for the demo; `atlas
analyze` for another config). Then, as `atlas analyze` does: the choose and score splits are
encoded (atlas/labels/data.py; timed: the cost of scoring), each explainer labels every live
feature from the same evidence (top examples outside the score split, the choose split), and
every label is scored on the score split (atlas/labels/scores.py). Reported per explainer: the
median F1 and the share of features with F1 >= 0.5, over the same features (live, firing on the
score split; a feature an explainer finds no rule for counts as 0), and its labelling time. One
more row scores the two headline explainers on the part of the score split that lies in the
store's evaluation contexts, which the SAE never trained on.

Writes {"title", "columns", "rows", "notes", "raw"} to --out (default runs/bench/labels.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
EXPLAINERS = ["top-tokens", "token-set", "word-prefix", "bigram", "trigram", "after-token", "char-class", "best-rule"]
GOAL = 0.35


def ensure_features(config: Path, cfg) -> Path:
    features = cfg.run_dir / "features" / "manifest.json"
    if not features.exists():
        if config.resolve() == (ROOT / "configs" / "demo.yaml").resolve():
            subprocess.run(["make", "-s", str(features), f"CONFIG={config}"], cwd=ROOT, check=True)
        else:
            subprocess.run([sys.executable, "-m", "atlas", "analyze", "--config", str(config)], check=True)
    return features.parent


def evidence_for(features: Path, data, d_sae: int) -> list:
    """Every feature's evidence as `atlas analyze` builds it: top examples outside the score split."""
    import pandas as pd

    from atlas.labels import Evidence

    feats = pd.concat([pd.read_parquet(p, columns=["feature_id", "is_dead", "density", "max_act"])
                       for p in sorted(features.glob("features-*.parquet"))]).set_index("feature_id").sort_index()
    ex = pd.concat([pd.read_parquet(p, columns=["feature_id", "kind", "rank", "context", "offset", "window_start",
                                                "token_ids"])
                    for p in sorted(features.glob("examples-*.parquet"))])
    L = data.score.ctx_len
    ex = ex[(ex.kind == "top") & ~data.hidden((ex.context * L + ex.offset).to_numpy())].sort_values(["feature_id", "rank"])
    out = []
    groups = dict(tuple(ex.groupby("feature_id")))
    for f in range(d_sae):
        g = groups.get(f)
        toks, prevs, wins = [], [], []
        if g is not None:
            for r in g.itertuples():
                i = r.offset - r.window_start
                toks.append(int(r.token_ids[i]))
                prevs.append(int(r.token_ids[i - 1]) if i > 0 else -1)
                wins.append(list(r.token_ids))
        out.append(Evidence(f, bool(feats.is_dead[f]), float(feats.density[f]), float(feats.max_act[f]),
                            top_token_ids=toks, prev_token_ids=prevs, windows=wins, choose=data.choose))
    return out


def restrict(split, keep: np.ndarray):
    """The positions `keep` of a split, with their codes (for scoring on a part of it)."""
    from atlas.labels.data import Split

    new = np.cumsum(keep) - 1
    ok = keep[split.pos]
    feat = np.repeat(np.arange(split.d_sae), split.fired)[ok]
    return Split(split.name, split.rows[keep], split.tokens[keep], split.prev[keep], split.prev2[keep],
                 split.classes[keep], np.searchsorted(feat, np.arange(split.d_sae + 1)), new[split.pos[ok]],
                 split.act[ok], split.vocab_size, split.ctx_len, split.prefixes)


def main() -> dict:
    from atlas.labels import data as label_data
    from atlas.analyze import sparse_encoder
    from atlas.config import load_config
    from atlas.labels.scores import score_rule
    from atlas.labels import get_explainer
    from atlas.model import resolve_device
    from atlas.saes import load_sae
    from atlas.shards import read_vocab
    from atlas.store import ActivationStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "labels.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    features = ensure_features(args.config, cfg)
    manifest = json.loads((features / "manifest.json").read_text())   # only its model and layer, for the title
    vocab = read_vocab(features)
    device = resolve_device(cfg.model.device)

    with ActivationStore(cfg.run_dir / "activations.h5") as store:
        sae = load_sae(cfg.run_dir / "sae", device)
        d_sae = sae.W_dec.shape[0]
        t0 = time.perf_counter()
        data = label_data.prepare(store, sparse_encoder(sae), d_sae, cfg.analyze, vocab, device)
        t_encode = time.perf_counter() - t0
        eval_start = store.eval_rows.start
    evidence = evidence_for(features, data, d_sae)
    same = [e.feature_id for e in evidence if not e.is_dead and data.score.fired[e.feature_id] > 0]
    on_eval = restrict(data.score, data.score.rows >= eval_start)
    same_eval = [f for f in same if on_eval.fired[f] > 0]

    raw = {}
    for name in EXPLAINERS:
        t = time.perf_counter()
        answers = get_explainer(name).explain(evidence, vocab)
        seconds = time.perf_counter() - t
        f1 = {f: (score_rule(answers[f].rule, data.score, f).f1 if answers[f].rule is not None else 0.0) for f in same}
        f1_eval = {f: (score_rule(answers[f].rule, on_eval, f).f1 if answers[f].rule is not None else 0.0)
                   for f in same_eval}
        v = np.array(list(f1.values()))
        ve = np.array(list(f1_eval.values()))
        raw[name] = {"median": float(np.median(v)), "share_half": float((v >= 0.5).mean()), "seconds": seconds,
                     "eval_median": float(np.median(ve)) if len(ve) else None,
                     "eval_share_half": float((ve >= 0.5).mean()) if len(ve) else None,
                     "sources": {s: int(n) for s, n in zip(*np.unique([answers[f].source for f in same], return_counts=True))}}
        print(f"[{name}] median F1 {raw[name]['median']:.3f}, >= 0.5: {raw[name]['share_half']:.1%}, {seconds:.1f} s",
              flush=True)

    top, best = raw["top-tokens"], raw["best-rule"]
    rows = [[f"`{name}`: median F1 / share ≥ 0.5", f"{r['median']:.3f} / {r['share_half']:.1%}",
             f"{top['median']:.3f} / {top['share_half']:.1%}" if name != "top-tokens" else "",
             f"{r['median'] / top['median']:.2f}×" if name != "top-tokens" and top["median"] > 0 else "",
             (f"≥ {GOAL}: {'met' if r['median'] >= GOAL else 'NOT met'}" if name == "best-rule" else "")]
            for name, r in raw.items()]
    rows.append(["`best-rule` on the store's eval contexts only: median / share ≥ 0.5",
                 f"{best['eval_median']:.3f} / {best['eval_share_half']:.1%}" if best["eval_median"] is not None else "n/a",
                 f"{top['eval_median']:.3f} / {top['eval_share_half']:.1%}" if top["eval_median"] is not None else "n/a",
                 "", ""])
    rows.append(["encode the choose + score splits (s, tokens)", f"{t_encode:.1f} ({data.choose.n + data.score.n:,})",
                 "", "", ""])
    rows.append(["label every feature: best-rule / top-tokens (s)", f"{best['seconds']:.1f}", f"{top['seconds']:.1f}",
                 "", ""])
    mix = ", ".join(f"{s} {n}" for s, n in sorted(best["sources"].items(), key=lambda x: -x[1]))
    result = {
        "title": f"Label scores ({manifest.get('model', cfg.model.name)}, layer {manifest.get('layer', '?')}, "
                 f"{d_sae:,} features; F1 on the score split, same {len(same):,} features for every explainer)",
        "columns": ["measure", "ours", "top-tokens", "ratio", "goal"],
        "rows": rows,
        "notes": (f"Choose split {data.choose.n:,} tokens, score split {data.score.n:,} tokens (alternating blocks "
                  f"of {label_data.BLOCK} contexts, at most analyze.label_tokens = {cfg.analyze.label_tokens:,} each); "
                  f"features: live and firing on the score split ({len(same):,}; {len(same_eval):,} fire on its eval "
                  f"part). A feature an explainer gives no rule scores 0. best-rule's winners: {mix}. Timings on "
                  f"{args.threads} threads ({device.type}) of a shared machine."),
        "raw": {"explainers": raw, "encode_seconds": t_encode, "choose_tokens": data.choose.n,
                "score_tokens": data.score.n, "features": len(same), "config": str(args.config)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("title", "rows", "notes")}, indent=2))
    return result


if __name__ == "__main__":
    main()
