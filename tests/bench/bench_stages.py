"""The README's stage table: every stage of `make demo` timed on this machine, from nothing.

    python tests/bench/bench_stages.py [--gpu runs/bench/stages_gpu.json]

Runs the demo's config (configs/demo.yaml: SmolLM2-135M-Instruct from its GGUF, layer 11, the
standard library's docstrings) stage by stage into a fresh run folder (runs/stages-demo/) with a
fresh model cache, so the GGUF conversion is counted as `make demo` on a new machine counts it,
and writes runs/bench/stages.json, which `tests/bench/run_all.py` turns into the table between
the README's stages markers. `--gpu` adds a column from a JSON measured on a GPU machine by
`tests/bench/gpu_stages.py` (default: tests/bench/stages_gpu.json, the last such measurement, kept
in the repository because `make bench` machines usually have no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "runs" / "bench"
STAGES = {
    "collect": "tokenise the corpus into contexts (BOS first), run the model up to the hook (blocks after it never "
               "run), write `activations.h5` in atomically written parts",
    "train": "TopK + AuxK SAE, Adam with warmup and decay, checkpoints, evaluation on held-out contexts "
             "(explained variance, CE-loss and KL scores)",
    "analyze": "stream the store through the encoder (running top-k, histograms, interval reservoirs), logit effects, "
               "neighbours, labels chosen and scored on held-out splits, the UMAP map",
    "export": "ONNX graph of model-up-to-hook + encoder, web file chosen by the parity gate, parity report; "
              "with `export.steering` (the demo) the steering file and its gate",
    "build": "MkDocs shell, then one page per feature stamped from it, search indexes",
}


def run_stages(config: Path, cache: Path) -> dict:
    """Each stage as the CLI runs it; its wall time and its summary line."""
    env = dict(os.environ, ATLAS_CACHE=str(cache), HF_HUB_OFFLINE="1")
    res = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "atlas", stage, "--config", str(config)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"bench stages: `atlas {stage}` failed:\n{proc.stderr[-3000:]}")
        wrote = [line for line in proc.stdout.splitlines() if line.startswith(f"{stage}: wrote")]
        res[stage] = {"seconds": seconds, "summary": wrote[-1] if wrote else ""}
        print(f"{stage}: {seconds:.0f} s  {res[stage]['summary']}", flush=True)
    return res


def describe(stage: str, r: dict, facts: dict) -> str:
    """The demo cell: time and what was made, from the stage's own summary line."""
    m = re.search(r"\((.*)\)", r["summary"])
    what = {"collect": f"{facts['n_tokens']:,} tokens", "train": f"{facts['train_tokens']:,} tokens, "
            f"{facts['d_sae']:,} latents", "build": (m.group(1) if m else "")}.get(stage, "")
    return f"{r['seconds']:.0f} s" + (f" ({what})" if what else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", type=Path, default=Path(__file__).with_name("stages_gpu.json"),
                    help="a stages JSON measured on a GPU machine")
    args = ap.parse_args()

    import yaml

    # the demo's inputs again (model package, link, corpus), as on a fresh machine but for downloads
    (ROOT / "runs" / "demo-world" / "smollm2.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["make", "-s", "runs/demo-world/smollm2.json", "node_modules/.installed"], cwd=ROOT, check=True)
    prereq = time.perf_counter() - t0
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config = OUT / "configs" / "stages-demo.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(raw))
    run = ROOT / "runs" / "stages-demo"
    shutil.rmtree(run, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=OUT, prefix="stages-cache-") as cache:
        stages = run_stages(config.relative_to(ROOT), Path(cache))
    metrics = json.loads((run / "sae" / "metrics.json").read_text())
    parity = json.loads((run / "onnx" / "parity.json").read_text())
    facts = {"n_tokens": raw["corpus"]["n_tokens"], "train_tokens": metrics["tokens"], "d_sae": raw["sae"]["d_sae"],
             "explained_variance": metrics["explained_variance"], "ce_loss_score": metrics.get("ce_loss_score"),
             "kl_score": metrics.get("kl_score"), "dead_fraction": metrics["dead_fraction"],
             "web": parity["quantization"], "web_mb": parity["first_analysis_bytes"] / 1e6,
             "pages_top1": next(iter(parity["saes"].values()))["web"].get("pages_top1_agreement")}
    total = prereq + sum(r["seconds"] for r in stages.values())
    gpu = json.loads(args.gpu.read_text()) if args.gpu and args.gpu.exists() else None

    columns = ["stage", "what it does", "`make demo` (measured, 2 CPU cores)"]
    if gpu:
        columns.append(gpu["column"])
    rows = []
    for stage, what in STAGES.items():
        row = [stage, what, describe(stage, stages[stage], facts)]
        if gpu:
            row.append(gpu["cells"].get(stage, "–"))
        rows.append(row)
    load = os.getloadavg()[0]
    notes = (f"The demo column is one run of the demo's stages from nothing on this machine "
             f"({total / 60:.1f} min in all, {prereq:.0f} s of it for the demo's inputs: the model package's "
             f"install check, its link and the corpus; the first collect converts the GGUF to float32, {stages['collect']['seconds']:.0f} s "
             f"with it; 1-min load average {load:.1f} at the end). Its SAE: explained variance "
             f"{facts['explained_variance']:.3f} at L0 32, CE-loss score {facts['ce_loss_score']:.3f}, KL score "
             f"{facts['kl_score']:.3f}, {facts['dead_fraction']:.2%} dead latents; web file {facts['web']} "
             f"({facts['web_mb']:.1f} MB), whose strongest feature is the pages' on {facts['pages_top1']:.1%} of "
             f"held-out tokens.")
    if gpu:
        notes += " " + gpu["notes"]
    result = {"section": "stages", "title": "Stages and their times", "columns": columns, "rows": rows,
              "notes": notes, "raw": {"stages": stages, "prereq_seconds": prereq, "facts": facts, "gpu": gpu}}
    (OUT / "stages.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result["rows"], indent=1, ensure_ascii=False))
    print(f"wrote {OUT / 'stages.json'}")


if __name__ == "__main__":
    main()
