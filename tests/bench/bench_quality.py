"""Benchmark: SAE quality, our default trainer vs SAELens's TopK trainer, side by side in one run.

    python tests/bench/bench_quality.py [--threads 2] [--demo-tokens N] [--only demo|tiny]

Two worlds, the same comparison in each:

* demo: the offline demo's activations (runs/demo/activations.h5: all-MiniLM-L6-v2, layer 3),
  configs/demo.yaml's SAE and training settings (TopK d_sae 3,072, k 32, AuxK, batch 2,048,
  train.n_tokens). MiniLM has no LM head, so CE-loss and KL scores do not exist there.
* tiny: the tiny GPT-2 world (tests/tiny_world.py, collected with configs/tiny.yaml into a
  temporary folder; TopK d_sae 256, k 8), where they do.

Ours is `atlas.train.train_sae` on the store's training split. SAELens runs in its own virtual
environment (bench_train.py's `ensure_saelens`), in a subprocess that drives its own
`SAETrainer` (Adam, grad-norm clipping, its LR scheduler, dead-latent tracking, AuxK,
`normalize_activations="expected_average_only_in"`) with a `TopKTrainingSAE` at SAELens's
defaults, fed an iterator of exactly the batches ours trains on, in the same order (plus, for
its input-norm estimate, the same sample rows ours estimates its input scale from). The shared
hyperparameters are ours: width, k, batch size, token budget, learning rate, warmup, linear decay
over the last train.decay_fraction, and the dead-latent window for AuxK. SAELens saves its
inference SAE (`save_inference_model`), which `atlas.saes.load_sae` reads, so both are scored by
the same code: `atlas.evaluate.evaluate` on the store's held-out contexts, and
`reconstruction_metrics` on a fixed sample of training rows for a second dead-latent count.

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
COLUMNS = ["measure", "ours", "SAELens", "ratio/diff", "goal"]

SAELENS_SCRIPT = r"""
import json, math, sys, time
import numpy as np, torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

a = json.loads(sys.argv[1])
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

sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a["d_sae"], k=a["k"],
                                            normalize_activations="expected_average_only_in"))
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
print(json.dumps({"seconds": seconds, "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
                  "train_dead_latents": int(trainer.dead_neurons.sum())}))
"""


# ---- one world -----------------------------------------------------------------------------

def stream_order(data, batch: int, steps: int):
    """Row ids of the first `steps` batches `data` yields, and of the sample train_sae estimates its
    input scale from: the same RowStream walk, over row ids instead of activations."""
    import torch

    from atlas.train import SAMPLE_ROWS, RowStream

    ids = torch.arange(data.n_rows, dtype=torch.float64)[:, None]  # exact in float32 below 2**24 rows
    assert data.n_rows < 2 ** 24

    def walk(seed):
        return RowStream(lambda a, b: ids[a:b], data.n_rows, data.chunk_rows, data.buffer_rows, data.keep, seed)

    it = walk(data.seed).batches(batch)
    order = torch.stack([next(it)[:, 0].long() for _ in range(steps)])
    sample = next(walk(data.seed + 1).batches(min(SAMPLE_ROWS, data.n_rows)))[:, 0].long()
    return order, sample


def train_saelens(py: Path, rows, order, sample, cfg, threads: int, work: Path) -> dict:
    """Train with SAELens's SAETrainer on the given batches; returns its timing and the saved SAE's folder."""
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
            "dead_window_steps": max(1, tc.dead_after_tokens // tc.batch_size)}
    r = subprocess.run([str(py), "-c", SAELENS_SCRIPT, json.dumps(args)], stdout=subprocess.PIPE, text=True)
    for p in paths.values():
        p.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"SAELens training failed (exit {r.returncode}); its error is above")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["dir"] = args["out"]
    return out


def compare(name: str, cfg, store_path: Path, py: Path | None, threads: int, n_tokens: int | None) -> dict:
    """Train ours and SAELens on one store, score both with atlas.evaluate; return the raw numbers."""
    import numpy as np
    import torch

    from atlas.evaluate import evaluate, reconstruction_metrics
    from atlas.model import load_model
    from atlas.saes import load_sae
    from atlas.store import ActivationStore
    from atlas.train import store_stream, train_sae

    torch.set_num_threads(threads)
    tc = cfg.train
    n_tokens = n_tokens or tc.n_tokens
    steps = max(1, n_tokens // tc.batch_size)
    res = {"world": name, "store": str(store_path), "d_sae": cfg.sae.d_sae, "k": cfg.sae.k, "aux_k": cfg.sae.aux_k,
           "batch": tc.batch_size, "steps": steps, "lr": tc.lr, "threads": threads}
    with ActivationStore(store_path) as store:
        data = store_stream(store, tc)
        res["train_rows"], res["d_in"] = data.n_rows, data.d_in
        order, sample = stream_order(data, tc.batch_size, steps)
        rows = data.read(0, data.n_rows)
        first = next(data.batches(tc.batch_size))
        assert torch.equal(first, rows[order[0]].float()), "batch order reconstruction differs from train_sae's"

        print(f"[{name}] ours: train_sae, {steps} steps x {tc.batch_size} tokens", flush=True)
        t, load = time.perf_counter(), os.getloadavg()[0]
        ours, summary = train_sae(cfg.sae, tc, data, n_tokens=steps * tc.batch_size)
        seconds = time.perf_counter() - t
        res["ours_train"] = {"seconds": seconds, "tokens": summary["tokens"], "steps": summary["steps"],
                             "load_average": [load, os.getloadavg()[0]]}

        theirs = None
        if py is not None:
            print(f"[{name}] SAELens: SAETrainer, the same {steps} batches", flush=True)
            with tempfile.TemporaryDirectory(dir=OUT, prefix=f"quality-{name}-") as work:
                try:
                    load = os.getloadavg()[0]
                    res["saelens_train"] = train_saelens(py, rows, order, sample, cfg, threads, Path(work))
                    res["saelens_train"]["load_average"] = [load, os.getloadavg()[0]]
                    theirs = load_sae(res["saelens_train"]["dir"])
                    res["saelens_cfg"] = json.loads((Path(res["saelens_train"]["dir"]) / "cfg.json").read_text())
                except RuntimeError as e:
                    print(f"[{name}] {e}", flush=True)
                    res["saelens_error"] = str(e)

        print(f"[{name}] evaluating both with atlas.evaluate", flush=True)
        model = load_model(str(cfg.model.name), cfg.model.revision, "cpu", cfg.model.dtype)
        res["has_lm_head"] = bool(model.has_lm_head)
        ctx_len = store.ctx_len
        keep = (np.arange(TRAIN_DEAD_ROWS) % ctx_len != 0) if tc.exclude_bos else np.ones(TRAIN_DEAD_ROWS, bool)
        train_sample = rows[:TRAIN_DEAD_ROWS][torch.from_numpy(keep[:min(TRAIN_DEAD_ROWS, len(rows))])]
        for key, sae in (("ours", ours), ("saelens", theirs)):
            if sae is None:
                continue
            m = evaluate(sae, store, cfg, model=model)
            tr = reconstruction_metrics(sae, train_sample.split(8192), cfg.analyze.dense_threshold)
            m["train_sample_dead_fraction"] = tr["dead_fraction"]
            m["train_sample_tokens"] = tr["eval_tokens"]
            m["train_sample_explained_variance"] = tr["explained_variance"]
            res[key] = m
    return res


# ---- worlds --------------------------------------------------------------------------------

def demo_world() -> tuple[object, Path]:
    from atlas.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    store = ROOT / "runs" / "demo" / "activations.h5"
    if not store.exists():
        print("runs/demo/activations.h5 missing: building the demo world and collecting (about 10 minutes)",
              flush=True)
        subprocess.run([sys.executable, "-m", "atlas.demo", "runs/demo-world"], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "atlas", "collect", "--config", "configs/demo.yaml"], cwd=ROOT,
                       check=True)
    return cfg, store


def tiny_world(tmp: Path) -> tuple[object, Path]:
    """tests/tiny_world.py built and collected with configs/tiny.yaml, all inside `tmp`."""
    from atlas.config import load_config

    world = tmp / "tiny-world"
    overrides = [f"model.name={world / 'model'}", f"corpus.dataset={world / 'corpus.jsonl'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"[tiny] building the tiny GPT-2 world and collecting its activations in {tmp}", flush=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_world.py"), str(world)], cwd=tmp, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "-m", "atlas", "collect", "--config", str(ROOT / "configs" / "tiny.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    subprocess.run(cmd, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
    return load_config(ROOT / "configs" / "tiny.yaml", overrides), tmp / "runs" / "tiny" / "activations.h5"


# ---- the table -----------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def rows_for(r: dict) -> list[list[str]]:
    a, b = r.get("ours", {}), r.get("saelens", {})
    w, d_sae = r["world"], r["d_sae"]
    out = []

    def row(measure, key, fmt, better, tol=0.0, show=None):
        va, vb = a.get(key), b.get(key)
        show = show or (lambda v: _f(v, fmt))
        if va is None or vb is None:
            out.append([f"{w}: {measure}", show(va), show(vb), "n/a", f"{better} SAELens: n/a"])
            return
        diff = va - vb
        ok = diff >= -tol if better == "≥" else diff <= tol if better == "≤" else abs(diff) <= tol
        out.append([f"{w}: {measure}", show(va), show(vb), f"{diff:+{fmt[1:] if fmt.startswith(',') else fmt}}",
                    f"{better} SAELens: {'met' if ok else 'NOT met'}"])

    dead = lambda v: "n/a" if v is None else f"{v:.1%} ({round(v * d_sae)})"  # noqa: E731
    n_eval = a.get("eval_tokens") or b.get("eval_tokens")
    n_tr = a.get("train_sample_tokens") or b.get("train_sample_tokens")
    row("explained variance (held-out)", "explained_variance", ".4f", "≥")
    row("MSE (held-out, raw units)", "mse", ".4g", "≤")
    row("L0 (held-out)", "l0", ".2f", "=", tol=0.5)
    row(f"dead fraction: never fired on {n_eval:,} held-out tokens", "dead_fraction", ".4f", "≤", show=dead)
    row(f"dead fraction: never fired on {n_tr:,} training tokens", "train_sample_dead_fraction", ".4f", "≤",
        show=dead)
    if r.get("has_lm_head"):
        row("CE-loss score (held-out, 1 = clean)", "ce_loss_score", ".4f", "≥")
        row("KL score (held-out, 1 = clean)", "kl_score", ".4f", "≥")
        a["ce_added"] = a["ce_sae"] - a["ce_clean"] if a.get("ce_sae") is not None else None
        if b:
            b["ce_added"] = b["ce_sae"] - b["ce_clean"] if b.get("ce_sae") is not None else None
        row("CE added by splicing the SAE in (nats/token)", "ce_added", ".4f", "≤")
    else:
        out.append([f"{w}: CE-loss score", "n/a (no LM head)", "n/a (no LM head)", "n/a", "≥ SAELens: n/a"])
    ta, tb = r.get("ours_train"), r.get("saelens_train")
    sa = ta["tokens"] / ta["seconds"] if ta else None
    sb = tb["tokens"] / tb["seconds"] if tb else None
    loads = [t["load_average"] for t in (ta, tb) if t and "load_average" in t]
    load = f"; 1-min load average {min(v for p in loads for v in p):.1f}-{max(v for p in loads for v in p):.1f}" \
        if loads else ""
    out.append([f"{w}: training tokens/s ({r['threads']} threads{load})", _f(sa, ",.0f"), _f(sb, ",.0f"),
                f"{sa / sb:.2f}x" if sa and sb else "n/a", "≥ SAELens: " + ("n/a" if not (sa and sb) else
                                                                          "met" if sa >= sb else "NOT met")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo-tokens", type=int, default=None, help="training tokens on the demo (default: "
                    "configs/demo.yaml's train.n_tokens)")
    ap.add_argument("--only", choices=["demo", "tiny"], default=None)
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    py = ensure_saelens()
    if py is None:
        print("sae-lens could not be installed; only our side is measured", flush=True)
    results = []
    if args.only in (None, "demo"):
        cfg, store = demo_world()
        results.append(compare("demo", cfg, store, py, args.threads, args.demo_tokens))
    if args.only in (None, "tiny"):
        with tempfile.TemporaryDirectory(prefix="atlas-quality-tiny-") as tmp:
            cfg, store = tiny_world(Path(tmp))
            results.append(compare("tiny", cfg, store, py, args.threads, None))

    if args.only:  # keep the other world's last measured results
        try:
            kept = json.loads((OUT / "quality.json").read_text()).get("raw", [])
        except (OSError, ValueError):
            kept = []
        mine = {r["world"] for r in results}
        results = [r for r in kept if r.get("world") not in mine] + results
        results.sort(key=lambda r: ["demo", "tiny"].index(r["world"]))
    rows = [row for r in results for row in rows_for(r)]
    desc = "; ".join(f"{r['world']}: d_in {r['d_in']}, d_sae {r['d_sae']:,}, k {r['k']}, batch {r['batch']:,}, "
                     f"{r['steps']} steps ({r['steps'] * r['batch']:,} tokens), lr {r['lr']:g}" for r in results)
    notes = (
        f"Both trained in one run on the same batches in the same order ({desc}); both scored by atlas.evaluate "
        "(SAELens's saved inference SAE read with atlas.saes.load_sae) on the store's held-out contexts, BOS left "
        "out; 'dead' = never fired on those tokens (and, second row, on the first training tokens), the same "
        "definition for both. Ours: TopK + AuxK (aux_k from the config, coefficient 1/32, FVU-normalised), "
        "unit-norm decoder, b_dec at the geometric median, W_dec, b_enc and b_dec at 10x the configured lr. SAELens "
        f"{(results[0].get('saelens_cfg') or {}).get('metadata', {}).get('sae_lens_version', '?')}: its SAETrainer "
        "and TopKTrainingSAE at their defaults (AuxK with k_aux = d_in/2, coefficient 1; decoder init norm 0.1; "
        "rescale_acts_by_decoder_norm; grad-norm clip 1; expected_average_only_in input scaling), with our "
        "learning rate, warmup, linear decay and dead-latent window. The demo model (all-MiniLM-L6-v2) has no "
        "LM head, so its CE-loss and KL scores are undefined; they are measured on the tiny GPT-2 world "
        "(4 blocks, d_model 64, layer 2). Tokens/s is training wall time only, on a machine shared with other "
        f"jobs (load average {os.getloadavg()[0]:.1f} at the end), so it is noisy; the quality rows are what "
        f"the comparison is about. This run ({', '.join(w for w in ('demo', 'tiny') if args.only in (None, w))}): "
        f"{time.time() - t0:.0f} s."
    )
    result = {"title": "SAE quality: our TopK trainer vs SAELens's, same data, width, k and token budget",
              "columns": COLUMNS, "rows": rows, "notes": notes, "raw": results}
    (OUT / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    from run_all import table

    print()
    print(table(result))
    print()
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
