"""`atlas analyze`: turn an SAE and its activation store into the atlas' per-feature data.

Three streaming passes over the store, bounded in memory by the number of features, then the
per-feature computations and the shards. In reading order:

- `passes.py`: the passes (encode, sample, windows), their checkpoint, and the exact merge of
  the ranks' results under torchrun;
- `spill.py`: the nonzero codes of the first pass on disk, read back by the other two;
- `selection.py`: the exact top-k buffers, histogram and interval bins, and reservoir samples;
- `windows.py`: the third pass, each shown example's window of activations;
- `features.py`: logit effects, decoder-cosine neighbours and labels;
- `writer.py`: the shards, `vocab.parquet` and the manifest's keys.

The SAE is only asked for its `encode_sparse`: analysis never knows which architecture it holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from atlas import distributed
from atlas.analyze.passes import StreamResult, analyze_stream
from atlas.analyze.writer import run_metadata, vocab_texts, write_features
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.labels import data as label_data
from atlas.labels import get_explainer
from atlas.resources import require_memory
from atlas.stage import input_digest, open_stage, require_finite, rerun, sae_digest, sha256_file, source_digest

PARTIAL_SUFFIX = ".partial"


def run(cfg: RunConfig, force: bool = False) -> Path:
    a = cfg.analyze
    store_path, sae_dir, out = cfg.store_path, cfg.sae_dir, cfg.features_dir
    inputs = {"store": input_digest(store_path, "collect", cfg), "sae": sae_digest(cfg),
              "sae_metrics": sha256_file(sae_dir / "metrics.json") if (sae_dir / "metrics.json").exists() else "none",
              "model": source_digest(cfg.model.name) + "@" + cfg.model.revision}  # W_U and the vocabulary
    opening = open_stage("analyze", cfg, out, ("analyze",), inputs, force)
    if opening.current:
        return out
    fp = opening.fp
    rank, world = distributed.rank_and_world()
    main = rank == 0
    get_explainer(a.explainer, a, cfg.llm_cache_dir)  # fail on a bad name or setting before hours of work

    from atlas.model import load_model, resolve_device
    from atlas.saes import load_sae
    from atlas.store import ActivationStore

    device = distributed.local_device(resolve_device(cfg.model.device))
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if force and partial.exists() and main:
        shutil.rmtree(partial)
    distributed.barrier()
    w_u, vocab, special, error = None, [], frozenset(), None
    if main:  # W_U and vocab (rank 0 writes the output); fail early, on every rank
        try:
            loaded = load_model(cfg.model.name, cfg.model.revision, "cpu", "float32", gguf_file=cfg.model.gguf_file)
            w_u = loaded.unembedding()
            vocab = vocab_texts(loaded.tokenizer)
            special = frozenset(int(i) for i in loaded.tokenizer.all_special_ids) | {loaded.separator_token_id}
            del loaded
        except AtlasError as e:
            error = e
    if world > 1:
        msg = distributed.broadcast_object(None if error is None else str(error))
        if msg is not None and error is None:
            raise AtlasError(f"rank 0 failed: {msg}")
    if error is not None:
        raise error
    with ActivationStore(store_path, rerun("collect", cfg), layer=cfg.model.layer) as store:
        sae = load_sae(sae_dir, device)
        require_finite(sae.state_dict(), sae_dir / "sae_weights.safetensors",
                       f"run `{rerun('train', cfg)} --force` to retrain it, or import a finite SAE")
        w_dec = sae.W_dec.detach().float()
        if w_dec.shape[1] != store.d_model:
            raise AtlasError(f"{sae_dir}: SAE d_in {w_dec.shape[1]} does not match the store's d_model {store.d_model}")
        d_sae = w_dec.shape[0]
        require_memory(4 * d_sae * (2 * a.batch_tokens + 4 * a.histogram_bins + 8),
                       f"analyze.batch_tokens = {a.batch_tokens:,} with d_sae = {d_sae:,}",
                       "lower analyze.batch_tokens", device)
        # With torchrun every rank streams its own rows; the merged result is complete on rank 0.
        stream = analyze_stream(store, sparse_encoder(sae), w_dec.shape[0], a, partial, fp, device)
        if main:
            _require_finite_stream(stream, sae_dir)
            labelling = label_data.prepare(store, sparse_encoder(sae), w_dec.shape[0], a, vocab, device,
                                           cfg.llm_cache_dir)
            with opening.write() as tmp:
                manifest = write_features(tmp, stream, w_dec, w_u, vocab, a, store.tokens, device, labelling,
                                          groups=sae.latent_groups(),
                                          special_ids=special | {store.info.bos_token_id})
                manifest.update(run_metadata(cfg, store, sae_dir, w_u is not None))
                if world > 1:
                    manifest["processes"] = world
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"analyze: wrote {out} ({manifest['n_features']:,} features, {manifest['n_dead']:,} dead, "
              f"{manifest['n_dense']:,} dense, {manifest['n_tokens']:,} tokens"
              + (f", {world} processes" if world > 1 else "") + ")")
    distributed.barrier()
    return out


def _require_finite_stream(s: StreamResult, sae_dir: Path) -> None:
    """Finite activations and weights can still overflow float32 in the encoder: stop, never publish inf."""
    bad = ~(torch.isfinite(s.max_act) & torch.isfinite(s.sum_act))
    if bad.any():
        f = int(bad.nonzero()[0, 0])
        raise AtlasError(f"{sae_dir}: the SAE's activations overflow on {int(bad.sum()):,} features (feature {f}: "
                         f"max {float(s.max_act[f])}); its weights are too large for float32")


def sparse_encoder(sae):
    """What analysis encodes with, in the streaming passes and the label splits alike: x [n, d_in]
    -> the SAE's active latents (`SparseAutoencoder.encode_sparse`)."""
    return sae.encode_sparse
