"""The mission config's stages on one GPU, at full size, with a GPT-2-Small-shaped model: the GPU
column of the README's stage table (`bench_stages.py --gpu`).

    python tests/bench/gpu_stages.py OUT_DIR [--tokens 20000000] [--train-tokens 40000000]

Machines that run this reach no model hub, so the model is GPT-2 Small's shape (GPT2Config()
defaults, random weights) with the tiny test world's tokenizer, and the corpus is the tiny world's
generated stories: what a stage costs depends on shapes and token counts, not on weights or text.
Runs configs/gpt2-small.yaml's collect, train, analyze and export (`atlas <stage>`, as `make site`
runs them; `analyze.map_method: pca`, since umap-learn may be missing there; the export's parity
gate off, as it means nothing on random weights) and writes
OUT_DIR/stages_gpu.json after every stage, so a run cut short still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def world(work: Path, n_tokens: int) -> tuple[Path, Path]:
    """A GPT-2-shaped model folder and a corpus of at least `n_tokens` tokens under `work`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tiny_world import build, story

    tiny = build(work / "tiny-world")
    model = work / "gpt2-shaped"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(model)
    tok = PreTrainedTokenizerFast.from_pretrained(tiny / "model")
    tok.save_pretrained(model)
    per_story = sum(len(tok(story(random.Random(i)))["input_ids"]) for i in range(100)) / 100
    rng = random.Random(0)
    corpus = work / "stories.jsonl"
    with corpus.open("w") as f:
        for _ in range(int(n_tokens * 1.1 / per_story) + 1000):
            f.write(json.dumps({"text": story(rng)}) + "\n")
    return model, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--train-tokens", type=int, default=40_000_000)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import torch

    work = Path("/tmp/gpu-stages")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, corpus = world(work, args.tokens)
    print(f"world: {time.perf_counter() - t0:.0f} s", flush=True)
    sets = [f"model.name={model}", f"corpus.dataset={corpus}", f"corpus.n_tokens={args.tokens}",
            f"train.n_tokens={args.train_tokens}", "analyze.map_method=pca", f"model.device={args.device}",
            # random weights: an SAE on noise has near-ties everywhere, so the parity gate means nothing here
            "export.min_top1_agreement=0", "export.min_topk_overlap=0"]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    result = {"column": f"`gpt2-small.yaml` shape, one {gpu.replace('NVIDIA ', '')} (measured)", "cells": {},
              "raw": {"gpu": gpu, "tokens": args.tokens, "train_tokens": args.train_tokens, "stages": {}}}
    config = ROOT / "configs" / "gpt2-small.yaml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for stage in ("collect", "train", "analyze", "export"):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "atlas", stage, "--config", str(config),
                               *(w for s in sets for w in ("--set", s))], cwd=work, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
        tail = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "%|" not in line][-12:]
        print(f"== {stage}: exit {proc.returncode}, {seconds:.0f} s\n" + "\n".join(tail), flush=True)
        result["raw"]["stages"][stage] = {"seconds": seconds, "exit": proc.returncode, "tail": tail}
        if proc.returncode:
            break
        size = {"collect": f"{args.tokens / 1e6:.0f}M tokens", "train": f"{args.train_tokens / 1e6:.0f}M tokens, "
                "24,576 latents"}.get(stage, "")
        result["cells"][stage] = f"{seconds / 60:.1f} min" + (f" ({size})" if size else "")
        result["notes"] = (f"The GPU column: configs/gpt2-small.yaml's sizes on one {gpu} (CUDA, torch "
                           f"{torch.__version__}) with a GPT-2-Small-shaped model of random weights and generated "
                           "stories (the machine reaches no hub; cost depends on shapes and token counts), by "
                           "tests/bench/gpu_stages.py; each stage as `atlas <stage>` runs it, process start and "
                           "model load included; build is CPU work (see the benchmarks).")
        (args.out / "stages_gpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
