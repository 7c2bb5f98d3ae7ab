"""`atlas collect`: run the model up to the hook over the corpus and store the activations.

For a suite (several `model.layer`s) the model runs once per batch up to the deepest hook and the
residual stream before each of the suite's blocks is caught on the way (`TruncatedModel.residuals`):
every hook's activations come from the same contexts, in one store (atlas/store.py).

The work is cut into parts of `corpus.chunk_contexts` contexts. Each part is written atomically,
(by one background thread, while the model runs on the next part: bench_collect.py measured 0.85x
the bare forward for nine hooks without it, 0.90x with it), so after a kill the next run skips the
finished parts (re-tokenising the text they came from,
which is cheap next to the forward pass) and continues with the first missing one; a part
deleted or damaged after the store was finished is recomputed the same way. The fingerprint
covers the model and corpus sections and the content of a local corpus file and model folder,
so an edited corpus starts the store afresh. With `torchrun`, rank r takes the parts p with
p % world_size == r; rank 0 finalises the store.
"""

from __future__ import annotations

import itertools
import math
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.config import CorpusConfig, RunConfig, hook_name
from atlas.corpus import iter_contexts, iter_texts
from atlas.errors import AtlasError
from atlas.model import LoadedModel, check_ctx_len, check_layer, load_model, resolve_device
from atlas.resources import require_disk, require_memory
from atlas.stage import open_stage, source_digest
from atlas.store import (StoreInfo, acts_key, finalize, finished_parts, parts_dir, read_store_stamp, tokenizer_hash,
                         write_part)

FINGERPRINT_FILE = "fingerprint"


def run(cfg: RunConfig, force: bool = False) -> Path:
    path = cfg.store_path
    c = cfg.corpus
    opening = open_stage("collect", cfg, path, ("model", "corpus"),
                         {"model": source_digest(cfg.model.name), "corpus": source_digest(c.dataset)}, force)
    if opening.current:
        return path
    fp = opening.fp
    device = resolve_device(cfg.model.device)
    loaded = load_model(cfg.model.name, cfg.model.revision, str(device), cfg.model.dtype,
                        gguf_file=cfg.model.gguf_file)
    for layer in cfg.layers:  # every hook of a suite, before any output is touched
        check_layer(cfg.path, layer, loaded)
    check_ctx_len(cfg.path, c.ctx_len, loaded)
    _check_room(cfg, loaded.d_model, path)
    contexts = corpus_contexts(c, loaded)
    first = next(contexts, None)  # fail on a missing or empty corpus before touching any output
    if first is None:
        raise AtlasError(f"corpus '{c.dataset}' yielded no text (or less than one {c.ctx_len}-token context): nothing to collect")
    contexts = itertools.chain([first], contexts)
    rank, world = distributed.rank_and_world()
    if rank == 0:
        _prepare_parts(path, fp, force, [acts_key(cfg.layers, layer) for layer in cfg.layers])
    distributed.barrier()
    model = loaded.truncated(max(cfg.layers))  # one pass to the deepest hook serves every hook
    n_contexts = c.n_tokens // c.ctx_len
    n_parts = math.ceil(n_contexts / c.chunk_contexts)
    done = finished_parts(path)
    mine = [p for p in range(n_parts) if p % world == rank and p not in done]

    where = f"layer{'s' * (len(cfg.layers) > 1)} {', '.join(map(str, cfg.layers))}"
    bar = tqdm(total=len(mine) * c.chunk_contexts * c.ctx_len, unit="tok", unit_scale=True,
               desc=f"collect {cfg.model.name} {where}", disable=rank != 0 and world > 1,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    produced = 0
    # the part before is hashed and written by one background thread while the model runs on the next
    # (at most one write pending: two parts in memory); a part is still written atomically or not at all
    with ThreadPoolExecutor(1, thread_name_prefix="atlas-store-writer") as writer:
        pending = None

        def collect(part: int, chunk: list[np.ndarray]):
            nonlocal pending
            tokens, acts = _collect_part(model, cfg.layers, part, chunk, c.batch_size, c.store_dtype, device, bar)
            if pending is not None:
                pending.result()  # a failed write stops the run here
            pending = writer.submit(write_part, path, part, tokens, acts, c.store_dtype)

        for part in range(n_parts):
            want = min(c.chunk_contexts, n_contexts - part * c.chunk_contexts)
            chunk = list(itertools.islice(contexts, want))
            produced += len(chunk)
            if len(chunk) < want:
                n_parts = part + (1 if chunk else 0)
                if chunk and part in mine:
                    collect(part, chunk)
                break
            if part in mine:
                collect(part, chunk)
        if pending is not None:
            pending.result()
    bar.close()
    if produced < n_contexts and rank == 0:
        print(f"collect: the corpus ran out after {produced} contexts ({produced * c.ctx_len:,} tokens); "
              f"corpus.n_tokens asked for {c.n_tokens:,}")
    distributed.barrier()
    if rank == 0:
        info = StoreInfo(
            model=cfg.model.name, revision=cfg.model.revision, layer=cfg.layers[0], hook_name=hook_name(cfg.layers[0]),
            ctx_len=c.ctx_len, d_model=loaded.d_model, dtype=c.store_dtype,
            tokenizer_hash=tokenizer_hash(loaded.tokenizer), n_contexts=produced,
            n_eval_contexts=min(produced - 1, round(produced * c.eval_fraction)) if produced > 1 else 0,
            bos_token_id=loaded.bos_token_id, fingerprint=fp, layers=cfg.layers,
        )
        finalize(path, info, n_parts)
        print(f"collect: wrote {path} ({produced * c.ctx_len:,} tokens, {produced} contexts, d_model {loaded.d_model})")
    distributed.barrier()
    return path


def _check_room(cfg: RunConfig, d_model: int, path: Path) -> None:
    """The store (every hook of a suite) must fit the disk, the parts a rerun keeps counting as room,
    and one part the memory; both are checked before the finished store is touched."""
    c = cfg.corpus
    per_token = len(cfg.layers) * d_model * np.dtype(c.store_dtype).itemsize + 4
    reusable = sum(p.stat().st_size for p in parts_dir(path).glob("*.h5")) if parts_dir(path).is_dir() else 0
    reusable += path.stat().st_size if path.exists() else 0
    require_disk(c.n_tokens * per_token - reusable, cfg.run_dir, f"corpus.n_tokens = {c.n_tokens:,}",
                 "lower corpus.n_tokens or free disk space")
    require_memory(c.chunk_contexts * c.ctx_len * (per_token + 4 * d_model),
                   f"corpus.chunk_contexts = {c.chunk_contexts:,}", "lower corpus.chunk_contexts")


def _prepare_parts(path: Path, fp: str, force: bool, keys: list[str]) -> None:
    """Keep finished parts only if they were made from the same inputs and are intact; else start afresh."""
    recorded = {Path(p["file"]).name: p["bytes"] for p in (read_store_stamp(path) or {"parts": []})["parts"]}
    if path.exists():
        path.unlink()
    d = parts_dir(path)
    stamp = d / FINGERPRINT_FILE
    if d.exists() and (force or not stamp.exists() or stamp.read_text() != fp):
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    for tmp in d.glob("*.tmp*"):
        tmp.unlink()  # a part that a killed run was writing
    for part in finished_parts(path).values():
        if not _intact(part, recorded.get(part.name), keys):
            print(f"collect: {part} is damaged; computing it again")
            part.unlink()
    stamp.write_text(fp)


def _intact(part: Path, size: int | None, keys: list[str]) -> bool:
    """A part the store can use: the size the store recorded (if it did), readable, with its digest
    and every hook's dataset."""
    if size is not None and part.stat().st_size != size:
        return False
    try:
        with h5py.File(part, "r") as f:
            return "digest" in f.attrs and "tokens" in f and all(isinstance(f.get(k), h5py.Dataset) for k in keys)
    except OSError:
        return False


def corpus_contexts(c: CorpusConfig, loaded: LoadedModel) -> Iterator[np.ndarray]:
    """The corpus' contexts in corpus order, as the store holds them: BOS first, the separator
    between documents (atlas/corpus.py). `train.source: model` walks the same sequence."""
    return iter_contexts(iter_texts(c), loaded.tokenizer, c.ctx_len, loaded.bos_token_id, loaded.separator_token_id)


def _collect_part(model, layers: tuple[int, ...], part: int, chunk: list[np.ndarray], batch_size: int,
                  dtype: str, device: torch.device, bar) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One part's tokens [c, ctx_len] and each hook's activations [c * ctx_len, d_model] in the store's dtype."""
    tokens = np.stack(chunk)
    return tokens, activation_rows(model, layers, tokens, batch_size, dtype, device, f"part {part}", bar=bar)


@torch.inference_mode()
def activation_rows(model, layers: tuple[int, ...], tokens: np.ndarray, batch_size: int, dtype: str,
                    device: torch.device, where: str, bar=None,
                    out: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Each hook's activations [c * ctx_len, d_model] in `dtype` (row = context * ctx_len + offset, as
    in the store) of the contexts `tokens` [c, ctx_len], `batch_size` contexts per forward pass;
    written into `out`'s arrays where given (no copy), else into new ones. Non-finite activations
    stop with one line naming `where` (e.g. "part 3")."""
    acts: dict[int, np.ndarray] = dict(out or {})
    row = 0
    for i in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[i:i + batch_size]).long().to(device)
        t0 = time.perf_counter()
        for layer, h in model.residuals(ids, layers).items():
            if not torch.isfinite(h).all():
                raise AtlasError(f"non-finite activations at layer {layer} in {where} (its contexts "
                                 f"{i}:{i + len(ids)}); check model.dtype (float16 can overflow) and the model weights")
            h = h.reshape(-1, h.shape[-1]).to("cpu", getattr(torch, dtype)).numpy()
            if layer not in acts:  # filled in place: no per-batch list to concatenate afterwards
                acts[layer] = np.empty((tokens.size, h.shape[1]), h.dtype)
            acts[layer][row:row + len(h)] = h
        row += ids.numel()
        if bar is not None:
            bar.update(ids.numel())
            bar.set_postfix_str(f"{ids.numel() / (time.perf_counter() - t0):,.0f} tok/s fwd", refresh=False)
    return acts
