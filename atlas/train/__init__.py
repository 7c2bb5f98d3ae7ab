"""`atlas train`: fit a sparse autoencoder to the stored activations, then evaluate it.

Reads the run's activations.h5 (training split), writes `cfg.sae_dir` (runs/X/sae/, or
runs/X/saes/<id>/sae/ for a member of a suite: SAELens-format cfg.json and
sae_weights.safetensors, metrics.json, metrics.jsonl, stamp.json). While training, the state
lives in `cfg.checkpoint_dir` (sae.ckpt/ beside sae/): a checkpoint every `train.checkpoint_every` steps and the metrics log,
so a killed run resumes from its last checkpoint and reproduces the same batches.

In reading order: `data.py` (the shuffled training rows), `model_source.py` (the rows computed by
the model instead, `train.source: model`), `trainer.py` (the loop, data-parallel under `torchrun`).
Rank 0 alone writes sae/ and runs the evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from atlas import distributed
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.resources import require_memory
from atlas.stage import input_digest, open_stage, require_finite, rerun
from atlas.train.data import store_stream
from atlas.train.trainer import CKPT_FILE, LOG_FILE, train_sae


def sae_metadata(cfg: RunConfig, store) -> dict:
    """SAELens metadata fields describing where the SAE's inputs come from."""
    info = store.info
    return {"model_name": info.model, "hook_name": info.hook_name, "hook_head_index": None,
            "context_size": info.ctx_len, "prepend_bos": True, "dataset_path": cfg.corpus.dataset,
            "model_revision": info.revision, "layer": info.layer, "exclude_bos": cfg.train.exclude_bos}


def check_room(cfg: RunConfig, d_model: int, train_tokens: int, device) -> None:
    """Sizes that cannot work are refused with their figure before any work: a batch larger than
    the training split, an SAE and batch that cannot fit the device's memory (weights, gradients and
    Adam's two moments; the batch's latents, their gradients and the batch itself)."""
    t, d_sae = cfg.train, cfg.sae.d_sae
    if t.batch_size > train_tokens:
        raise AtlasError(f"'train.batch_size' = {t.batch_size:,} exceeds the {train_tokens:,} training tokens in "
                         f"the store; lower it or collect more (corpus.n_tokens)")
    weights = 2 * d_sae * d_model * 4
    batch = t.batch_size * (3 * d_sae + 4 * d_model) * 4
    require_memory(4 * weights + batch, f"sae.d_sae = {d_sae:,} with train.batch_size = {t.batch_size:,}",
                   "lower sae.d_sae or train.batch_size", device)


def run(cfg: RunConfig, force: bool = False) -> Path:
    from atlas.evaluate import evaluate
    from atlas.model import load_model, resolve_device
    from atlas.store import ActivationStore
    from atlas.train.model_source import model_stream

    store_path, out, ckpt_dir = cfg.store_path, cfg.sae_dir, cfg.checkpoint_dir
    opening = open_stage("train", cfg, out, ("sae", "train"), {"store": input_digest(store_path, "collect", cfg)}, force)
    if opening.current:
        return out
    fp = opening.fp
    main = distributed.is_main()
    if force and main and (ckpt_dir / CKPT_FILE).exists():
        (ckpt_dir / CKPT_FILE).unlink()
    device = resolve_device(cfg.model.device)
    with ActivationStore(store_path, rerun("collect", cfg), layer=cfg.model.layer) as store:
        check_room(cfg, store.d_model, len(store.train_rows), device)
        loaded = None  # the model, when training computes the rows with it (evaluation then reuses it)
        if cfg.train.source == "model":  # rows computed on the fly; the store still serves evaluation
            loaded = load_model(cfg.model.name, cfg.model.revision, str(distributed.local_device(device)),
                                cfg.model.dtype, gguf_file=cfg.model.gguf_file)
            data = model_stream(cfg, loaded, store)
        else:
            data = store_stream(store, cfg.train)
        t0 = time.perf_counter()
        sae, summary = train_sae(cfg.sae, cfg.train, data, ckpt_dir=ckpt_dir, fp=fp,
                                 metadata=sae_metadata(cfg, store), device=device)
        summary["train_seconds"] = round(time.perf_counter() - t0, 1)
        if main:  # the other ranks hold the same SAE; they wait for rank 0's sae/ below
            require_finite(sae.state_dict(), out, "training diverged; lower train.lr")
            metrics = {**evaluate(sae, store, cfg, model=loaded), **summary}
            with opening.write() as tmp:
                sae.save(tmp)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                if (ckpt_dir / LOG_FILE).exists():
                    (tmp / LOG_FILE).write_text((ckpt_dir / LOG_FILE).read_text())
            print(json.dumps(metrics, indent=2))
    distributed.barrier()
    return out
