"""Benchmark: our Matryoshka BatchTopK SAE vs SAELens's `matryoshka_batchtopk`, beside our TopK and
BatchTopK, on a real language model, each at its best learning rate.

    python tests/bench/bench_matryoshka.py [--lrs 6e-4,1.8e-3,5.4e-3] [--tokens N] [--threads 2]
                                           [--ours topk,batchtopk,matryoshka] [--saelens matryoshka_batchtopk]
                                           [--downstream best|all]

The world, the batches and the scoring are bench_quality.py's (it is imported, not copied): the
offline demo's SmolLM2-135M-Instruct, residual stream before block 11, Python docstrings, its store
in runs/bench-quality/; every trainer trains on exactly the same batches in the same order (SAELens
in its own venv, driven by its own SAETrainer), at each learning rate of the sweep, with the same
width, k, batch, warmup, linear decay and dead-latent window, and is scored by `atlas.evaluate` on
the store's held-out contexts (SAELens's saved inference SAE read with `atlas.saes.load_sae`, and
checked against SAELens's own `SAE.load_from_disk` on sample rows). Each trainer is shown at the
learning rate with the highest held-out explained variance; every point is in the table and in
"raw". The CE-loss and KL scores (the model run with the SAE spliced in: about 2 minutes a point on
one CPU thread) are measured at each trainer's best point only unless `--downstream all`; every other
metric at every point.

Matryoshka on both sides uses the same nested prefix widths: ours' `sae.matryoshka_groups` default
(fractions 1/64, 1/16, 1/4, 1 of d_sae, as atlas.saes.matryoshka.matryoshka_widths resolves them),
passed to SAELens as `matryoshka_widths`. Besides bench_quality's metrics, each SAE's held-out
explained variance when only its first w latents are kept (w = each inner prefix width) is
measured: what Matryoshka training is for (TopK and BatchTopK order their latents arbitrarily, so
theirs are shown for contrast).

Writes runs/bench/matryoshka.json (or --out: {"title", "columns", "rows", "notes", "raw"}) and prints it;
`--report` rebuilds the table from that file's "raw".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import _f, best_lr, demo_world, sweep, sweep_arguments, sweep_lrs  # noqa: E402
from bench_train import OUT, ensure_saelens  # noqa: E402

NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "Matryoshka",
         "matryoshka_batchtopk": "Matryoshka"}
OURS, THEIRS = "ours_matryoshka", "saelens_matryoshka_batchtopk"
"""The pair the diff and goal columns compare."""


def trainer_specs(ours: list[str], saelens: list[str], widths: list[int]) -> dict:
    """bench_quality.sweep's trainers: ours_<arch> for our architectures, saelens_<arch> for SAELens's."""
    specs = {f"ours_{a}": ("ours", a, {}) for a in ours}
    for a in saelens:
        specs[f"saelens_{a}"] = ("saelens", a, {"matryoshka_widths": list(widths)} if "matryoshka" in a else {})
    return specs


def prefix_metrics(widths: list[int]):
    """extra_metrics for sweep: held-out explained variance and L0 of the first w latents alone, for
    each inner prefix width w, on the rows atlas.evaluate scores (BOS left out)."""
    import numpy as np
    import torch

    from atlas.evaluate import MAX_EVAL_TOKENS, ReconstructionStats

    def metrics(sae, store) -> dict:
        rows = store.eval_rows
        if len(rows) == 0:
            rows = range(max(0, store.n_tokens - MAX_EVAL_TOKENS), store.n_tokens)
        rows = range(rows.start, min(rows.stop, rows.start + MAX_EVAL_TOKENS))
        stats = {w: ReconstructionStats(sae.d_sae) for w in widths}
        with torch.no_grad():
            for start, x in store.iter_batches(8192, rows):
                x = x[torch.from_numpy(np.arange(start, start + len(x)) % store.ctx_len != 0)].float()
                f = sae.encode(x)
                for w in widths:
                    fw = f.clone()
                    fw[:, w:] = 0
                    stats[w].add(x, sae.decode(fw), fw)
        out = {}
        for w, s in stats.items():
            r = s.result()
            out[f"prefix_{w}_explained_variance"], out[f"prefix_{w}_l0"] = r["explained_variance"], r["l0"]
        return out

    return metrics


def rows_for(r: dict, names: list[str], widths: list[int]) -> list[list[str]]:
    """One column per trainer at its best lr, then ours − SAELens for the Matryoshka pair."""
    best = {n: best_lr(r[n]) for n in names}
    m = {n: dict(r[n].get(best[n], {})) for n in names}
    for p in m.values():
        if p.get("ce_sae") is not None:
            p["ce_added"] = p["ce_sae"] - p["ce_clean"]
    pair = OURS in names and THEIRS in names
    out = []

    def row(measure, key, fmt, better=None, tol=0.0, show=None):
        show = show or (lambda v: _f(v, fmt))
        cells = [show(m[n].get(key)) for n in names]
        va, vb = (m[OURS].get(key), m[THEIRS].get(key)) if pair else (None, None)
        if va is None or vb is None or better is None:
            out.append([measure, *cells, "n/a" if better and pair else "", f"{better} SAELens: n/a" if better else ""])
            return
        diff = va - vb
        ok = diff >= -tol if better == "≥" else diff <= tol if better == "≤" else abs(diff) <= tol
        out.append([measure, *cells, f"{diff:+{fmt}}", f"{better} SAELens{f' (±{tol:g})' if tol else ''}: "
                                                      f"{'met' if ok else 'NOT met'}"])

    edge = lambda lr: " (edge)" if lr in (str(r["lrs"][0]), str(r["lrs"][-1])) else ""  # noqa: E731
    out.append(["learning rate, best of the sweep by held-out EV",
                *(f"{float(best[n]):g}{edge(best[n])}" if best[n] else "n/a" for n in names), "", ""])
    dead = lambda v: "n/a" if v is None else f"{v:.1%} ({round(v * r['d_sae'])})"  # noqa: E731
    any_m = next((p for p in m.values() if p), {})
    row("explained variance (held-out)", "explained_variance", ".4f", "≥")
    row("L0 (held-out)", "l0", ".2f", "=", tol=1.0)
    row(f"L0 on {any_m.get('train_sample_tokens') or 0:,} training tokens", "train_sample_l0", ".2f", "=", tol=1.0)
    row(f"dead: never fired on {any_m.get('eval_tokens') or 0:,} held-out tokens", "dead_fraction", ".4f", "≤",
        show=dead)
    row(f"dead: never fired on {any_m.get('train_sample_tokens') or 0:,} training tokens",
        "train_sample_dead_fraction", ".4f", "≤", show=dead)
    row("CE-loss score (held-out, 1 = clean)", "ce_loss_score", ".4f", "≥")
    row("KL score (held-out, 1 = clean)", "kl_score", ".4f", "≥")
    row("CE added by splicing the SAE in (nats/token)", "ce_added", ".4f", "≤")
    for w in widths[:-1]:
        row(f"EV of the first {w:,} latents alone (held-out)", f"prefix_{w}_explained_variance", ".4f", "≥")
    speed = {n: (p["tokens"] / p["seconds"] if p else None) for n, p in m.items()}
    ratio = f"{speed[OURS] / speed[THEIRS]:.2f}x" if pair and speed[OURS] and speed[THEIRS] else "n/a"
    out.append([f"training tokens/s ({r['threads']} thread{'s' * (r['threads'] > 1)}, on a shared machine)",
                *(_f(speed[n], ",.0f") for n in names), ratio, ""])
    for lr in r["lrs"]:
        cells = []
        for n in names:
            p = r[n].get(str(lr))
            cells.append("n/a" if not p else f"{p['explained_variance']:.4f} / {p['dead_fraction']:.1%} / "
                         f"{p['l0']:.1f} / {_f(p.get('ce_loss_score'), '.4f')}")
        out.append([f"sweep, lr {lr:g}: EV / dead / L0 / CE-loss score", *cells, "", ""])
    return out


def result_for(r: dict) -> dict:
    """The table ({"title", "columns", "rows", "notes", "raw"}) of a sweep's raw results `r`."""
    specs = r["trainers"]
    names, widths = list(specs), r["matryoshka_widths"]
    label = lambda n: ("ours " if specs[n][0] == "ours" else "SAELens ") + NAMES.get(specs[n][1], specs[n][1])  # noqa: E731
    saelens = [n for n in names if specs[n][0] == "saelens"]
    checks = [p["load_check"] for n in saelens for p in r[n].values()]
    r["saelens_thresholds_saved_vs_loaded"] = {f"{n} lr {lr}": [p.get("topk_threshold"),
                                                                p["load_check"].get("threshold_loaded")]
                                               for n in saelens for lr, p in r[n].items()}
    scales = {specs[n][1]: next(iter(r[n].values()))["lr_scales"] for n in names if specs[n][0] == "ours" and r[n]}
    tokens = r["steps"] * r["batch"]
    fewer = tokens < r["demo_n_tokens"]
    tokens_note = (f"{tokens:,} training tokens per run" +
                   (f", fewer than configs/demo.yaml's {r['demo_n_tokens']:,} to fit the time budget" if fewer else
                    " (configs/demo.yaml's train.n_tokens)"))
    notes = (
        f"SmolLM2-135M-Instruct ({r['model']}), residual stream before block {r['layer']}, Python standard library "
        f"docstrings (configs/demo.yaml; store {r['store']}). Every trainer at each of lr "
        f"{', '.join(f'{v:g}' for v in r['lrs'])} on the same batches in the same order: d_in {r['d_in']}, d_sae "
        f"{r['d_sae']:,}, k {r['k']} (BatchTopK and Matryoshka: on average over the batch), batch {r['batch']:,}, "
        f"{r['steps']} steps ({tokens_note}), warmup {r['warmup_steps']} steps, linear decay over the last "
        f"{r['decay_fraction']:.0%}; Matryoshka prefix widths {widths} on both sides. Each column at its best lr "
        "by held-out explained variance; every point in the sweep rows (EV / dead share / L0 / CE-loss score"
        + ("; the CE-loss and KL scores are measured at each column's best lr only, n/a elsewhere). " if
           r["downstream"] == "best" else "). ") +
        "Scored alike by atlas.evaluate on the store's held-out contexts, BOS left out (SAELens's saved inference "
        "SAE read with atlas.saes.load_sae); 'EV of the first w latents alone' keeps only the latents < w of each "
        "token's active set. Ours: AuxK (aux_k "
        f"{r['aux_k']}, coefficient 1/32, FVU-normalised), unit-norm decoder, b_dec at the geometric median, "
        f"per-parameter lr scales (sae.lr_scale_* defaults) {scales}; BatchTopK/Matryoshka inference threshold "
        "tracked as the value keeping k per token on the training batches; Matryoshka loss = sum of the prefixes' "
        "FVUs. " + (f"SAELens {r.get('saelens_version') or '?'}: SAETrainer and its training SAE at their defaults "
        "(MatryoshkaBatchTopKTrainingSAE: plain-MSE losses summed over the prefixes; AuxK over the whole SAE, "
        "use_matryoshka_aux_loss False, k_aux = d_in/2, coefficient 1; decoder init norm 0.1; "
        "rescale_acts_by_decoder_norm; topk_threshold_lr 0.01, an EMA from 0 of each batch's smallest kept "
        "activation; grad-norm clip 1; expected_average_only_in input scaling), with our warmup, linear decay and "
        "dead-latent window; saved by save_inference_model as a JumpReLU SAE with that threshold. Load check: "
        "atlas.saes.load_sae against SAELens's SAE.load_from_disk on "
        f"{checks[0]['rows'] if checks else 0:,} sample rows of each saved SAELens SAE: largest reconstruction "
        f"difference {max((c['max_abs_recon_diff'] for c in checks), default=float('nan')):.2g} (values up to "
        f"{max((c['recon_scale'] for c in checks), default=float('nan')):.3g}), rows whose L0 differs: "
        f"{sum(c['l0_rows_differing'] for c in checks)}; the threshold SAELens saved and the one load_sae read are "
        "in raw.saelens_thresholds_saved_vs_loaded. " if saelens else "") +
        "Tokens/s is training wall time on a machine shared with other "
        f"jobs (load average {r['load_average_end']:.1f} at the end), so it is indicative only. This run: "
        f"{r['wall_seconds']:.0f} s."
    )
    default = names == ["ours_topk", "ours_batchtopk", OURS, THEIRS]
    title = (("SAE quality on a real model: our Matryoshka BatchTopK vs SAELens's matryoshka_batchtopk (with our "
              "TopK and BatchTopK)" if default else f"SAE quality on a real model: {', '.join(map(label, names))}")
             + ", each at its best learning rate" + ("" if default else f" of {len(r['lrs'])}")
             + (f" ({tokens:,} training tokens, fewer than the demo's)" if fewer else ""))
    diff = f"diff ({label(OURS)} − {label(THEIRS)})" if OURS in names and THEIRS in names else "diff"
    return {"title": title, "columns": ["measure", *map(label, names), diff, "goal"],
            "rows": rows_for(r, names, widths), "notes": notes, "raw": r}


def main() -> None:
    ap = sweep_arguments(__doc__)
    ap.add_argument("--ours", default="topk,batchtopk,matryoshka", help="our architectures")
    ap.add_argument("--saelens", default="matryoshka_batchtopk", help="SAELens training SAEs (bench_quality."
                    "SAELENS_SAES: topk, batchtopk, matryoshka_batchtopk)")
    ap.add_argument("--downstream", choices=("best", "all"), default="best", help="where to measure the CE-loss "
                    "and KL scores: at each trainer's best lr (default) or at every point")
    ap.add_argument("--out", default=str(OUT / "matryoshka.json"), help="the JSON written (default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="only rebuild the table from --out's raw results")
    args = ap.parse_args()
    path = Path(args.out).resolve()
    if args.report:
        result = result_for(json.loads(path.read_text())["raw"])
    else:
        lrs = sweep_lrs(ap, args.lrs)
        t0 = time.time()
        saelens = [a for a in args.saelens.split(",") if a]
        py = ensure_saelens() if saelens else None
        if saelens and py is None:
            print("sae-lens could not be installed; only our side is measured", flush=True)
        cfg, store = demo_world(args.model)

        from atlas.saes.matryoshka import matryoshka_widths

        widths = matryoshka_widths(cfg.sae.matryoshka_groups, cfg.sae.d_sae)
        specs = trainer_specs([a for a in args.ours.split(",") if a], saelens, widths)
        r = sweep(cfg, store, py, args.threads, lrs, args.tokens or cfg.train.n_tokens, trainers=specs,
                  extra_metrics=prefix_metrics(widths), downstream=args.downstream)
        r.update(matryoshka_widths=widths, demo_n_tokens=cfg.train.n_tokens, warmup_steps=cfg.train.warmup_steps,
                 decay_fraction=cfg.train.decay_fraction, wall_seconds=time.time() - t0,
                 load_average_end=os.getloadavg()[0], argv=sys.argv[1:])
        path.write_text(json.dumps({"raw": r}, indent=2, default=str) + "\n")  # kept should the table fail
        result = result_for(r)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    from run_all import table

    print()
    print(table(result))


if __name__ == "__main__":
    main()
