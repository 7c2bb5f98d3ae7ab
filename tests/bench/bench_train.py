"""Benchmark: TopK SAE training speed and quality, ours vs SAELens's TopK trainer, side by side.

    python tests/bench/bench_train.py [--steps 12] [--threads 2] [--store runs/X/activations.h5]

Same activations (synthetic, d_in 768, or a store's), batch 4096, k 32, d_sae 4,096 and 24,576,
Adam at the same learning rate, the same number of steps each. Our BatchTopK (same k on average)
is timed on the same activations too: its global selection should cost little over TopK's. Tokens/s counts the training
steps only (forward, backward, optimiser, decoder renormalisation), after one warm-up step.
EV (explained variance) and L0 are measured on 8,192 held-out rows after training.

SAELens runs in its own virtual environment (runs/bench/saelens-venv, created here with
`python -m venv` and `pip install sae-lens torch==2.13.0` when missing), in a subprocess that
runs its `TopKTrainingSAE.training_forward_pass` -- the step SAELens's own trainer takes.
Prints a Markdown table and writes runs/bench/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "runs" / "bench"
VENV = OUT / "saelens-venv"
BATCH, K, D_IN = 4096, 32, 768


def activations(path: Path, n: int, store: str | None, seed: int = 0):
    """Rows to train on, saved as a .npy both sides read: a store's, or sparse-coded synthetic ones."""
    import numpy as np
    import torch

    if store:
        from atlas.store import ActivationStore

        with ActivationStore(Path(store)) as s:
            x = torch.from_numpy(s.read(0, min(n, s.n_tokens)))
    else:
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(8192, D_IN, generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        idx = torch.randint(0, 8192, (n, 24), generator=g)
        vals = torch.rand(n, 24, generator=g) * 3
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=vals, mode="sum")
        x += 0.1 * torch.randn(n, D_IN, generator=g) + torch.randn(D_IN, generator=g)
    np.save(path, x.numpy().astype(np.float32))
    return x


def ours(x_path: Path, d_sae: int, steps: int, threads: int, architecture: str = "topk") -> dict:
    import numpy as np
    import torch

    from atlas.config import SAEConfig
    from atlas.evaluate import reconstruction_metrics
    from atlas.saes import build_sae
    from atlas.train.trainer import inference_copy, init_from_data

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(x_path))
    train, held = x[:-8192], x[-8192:]
    cfg = SAEConfig(architecture=architecture, d_sae=d_sae, k=K, aux_k=512)
    sae = build_sae(cfg, x.shape[1])
    scale = init_from_data(sae, train[:16384], "geometric_median")
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 10] = True  # exercise the AuxK path as a run with dead latents does

    def step(i):
        xb = train[(i * BATCH) % (len(train) - BATCH):][:BATCH] * scale
        out = sae(xb, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_step()
        opt.step()
        sae.after_step()

    step(0)
    t = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    seconds = time.perf_counter() - t
    m = reconstruction_metrics(inference_copy(sae, scale), [held])
    return {"tok_s": steps * BATCH / seconds, "ev": m["explained_variance"], "l0": m["l0"]}


SAELENS_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
x_path, d_sae, steps, threads, batch, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
x = torch.from_numpy(np.load(x_path)); train, held = x[:-8192], x[-8192:]
scale = (x.shape[1] ** 0.5) / train[:16384].norm(dim=1).mean().item()
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k))
with torch.no_grad():
    sae.b_dec.copy_((train[:16384] * scale).mean(0))
opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
dead = torch.zeros(d_sae, dtype=torch.bool); dead[: d_sae // 10] = True
def step(i):
    xb = train[(i * batch) % (len(train) - batch):][:batch] * scale
    out = sae.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=i, is_logging_step=False))
    opt.zero_grad(set_to_none=True); out.loss.backward(); opt.step()
step(0)
t = time.perf_counter()
for i in range(1, steps + 1):
    step(i)
seconds = time.perf_counter() - t
with torch.no_grad():
    h = held * scale
    f = sae.encode(h); r = sae.decode(f)
    ev = 1 - ((h - r) ** 2).sum().item() / ((h - h.mean(0)) ** 2).sum().item()
    l0 = (f > 0).sum(-1).float().mean().item()
print(json.dumps({"tok_s": steps * batch / seconds, "ev": ev, "l0": l0}))
"""


def ensure_saelens() -> Path | None:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import sae_lens"], capture_output=True).returncode == 0:
        return py
    print(f"installing sae-lens into {VENV} (once; takes a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "sae-lens", "torch==2.13.0"])
    return py if r.returncode == 0 else None


def saelens(py: Path, x_path: Path, d_sae: int, steps: int, threads: int) -> dict | None:
    r = subprocess.run([str(py), "-c", SAELENS_SCRIPT, str(x_path), str(d_sae), str(steps), str(threads),
                        str(BATCH), str(K)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"sae-lens run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="4096,24576")
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(parents=True, exist_ok=True)
    x_path = OUT / "train-acts.npy"
    activations(x_path, (args.steps + 2) * BATCH + 8192, args.store)
    py = ensure_saelens()
    results = []
    for d_sae in (int(s) for s in args.sizes.split(",")):
        a = ours(x_path, d_sae, args.steps, args.threads)
        b = saelens(py, x_path, d_sae, args.steps, args.threads) if py else None
        batch = ours(x_path, d_sae, args.steps, args.threads, "batchtopk")
        results.append({"d_sae": d_sae, "ours": a, "saelens": b, "batchtopk": batch,
                        "speedup": a["tok_s"] / b["tok_s"] if b else None})
        print(f"d_sae {d_sae}: ours {a['tok_s']:,.0f} tok/s, sae-lens {b['tok_s']:,.0f} tok/s" if b else
              f"d_sae {d_sae}: ours {a['tok_s']:,.0f} tok/s", flush=True)
    info = {"batch": BATCH, "k": K, "d_in": D_IN, "steps": args.steps, "threads": args.threads,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "data": args.store or "synthetic",
            "results": results}
    fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
    info.update({
        "title": f"SAE training throughput (TopK k = {K}, d_in {D_IN}, batch {BATCH}, {args.threads} threads, "
                 f"{args.steps} steps, {info['data']} activations)",
        "columns": ["measure", "ours", "SAELens", "ratio", "goal"],
        "rows": [row for r in results for row in (
            [f"d_sae {r['d_sae']:,}: training tokens/s", f"{r['ours']['tok_s']:,.0f}",
             fmt((r["saelens"] or {}).get("tok_s"), ",.0f"), fmt(r["speedup"], ".1f") + "×",
             "≥ 3× at 24,576" if r["d_sae"] == 24576 else ""],
            [f"d_sae {r['d_sae']:,}: L0", f"{r['ours']['l0']:.1f}", fmt((r["saelens"] or {}).get("l0"), ".1f"), "",
             "equal"],
            [f"d_sae {r['d_sae']:,}: our BatchTopK vs our TopK, training tokens/s", f"{r['batchtopk']['tok_s']:,.0f}",
             f"{r['ours']['tok_s']:,.0f} (TopK)", f"{r['batchtopk']['tok_s'] / r['ours']['tok_s']:.2f}×", ""],
        )],
        "notes": f"Tokens/s counts training steps only, after a warm-up step; load average during the run "
                 f"{os.getloadavg()[0]:.1f}. After {args.steps} steps neither SAE is trained, so explained "
                 f"variance is compared in the quality benchmark below, which trains both to the end.",
    })
    (OUT / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nTopK SAE training, batch {BATCH}, k {K}, d_in {D_IN}, {args.threads} threads, {args.steps} steps\n")
    print("| d_sae | ours tok/s | SAELens tok/s | speed-up | ours EV | SAELens EV | ours L0 | SAELens L0 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        a, b = r["ours"], r["saelens"] or {}
        f = lambda v, fmt: format(v, fmt) if v is not None else "n/a"  # noqa: E731
        print(f"| {r['d_sae']:,} | {a['tok_s']:,.0f} | {f(b.get('tok_s'), ',.0f')} | {f(r['speedup'], '.1f')}x | "
              f"{a['ev']:.3f} | {f(b.get('ev'), '.3f')} | {a['l0']:.1f} | {f(b.get('l0'), '.1f')} |")


if __name__ == "__main__":
    main()
