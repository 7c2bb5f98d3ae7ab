"""`atlas train`: fit a sparse autoencoder to the stored activations, then evaluate it.

Reads runs/X/activations.h5 (training split), writes runs/X/sae/ (SAELens-format cfg.json and
sae_weights.safetensors, metrics.json, metrics.jsonl, stamp.json). While training, the state
lives in runs/X/sae.ckpt/: a checkpoint every `train.checkpoint_every` steps and the metrics log,
so a killed run resumes from its last checkpoint and reproduces the same batches.

Under `torchrun` training is data-parallel (DistributedDataParallel): `train.batch_size` is the
*global* batch, split evenly across the ranks (it must be a multiple of the number of
processes). Every rank walks the same shuffled stream and keeps its own slice of each global
batch, so together the ranks train on exactly the rows a single process would, step for step;
DDP averages the gradients, and the per-step state outside the gradients (which latents fired,
for dead-latent tracking; a non-finite loss) is combined in one small all-reduce per step;
BatchTopK selects over the global batch (atlas.saes.batchtopk), so its threshold is the same on
every rank. Every rank keeps identical weights and buffers (checked at the end).
Rank 0 alone writes the checkpoint, metrics.jsonl and sae/, and runs the evaluation; a resumed
run broadcasts rank 0's checkpoint.

The loop is architecture-blind: the SAE computes its own loss (`ForwardOutput.loss`); the
trainer adds Adam with warmup and linear decay, dead-latent tracking, input scaling, metrics,
checkpoints and a clean stop on NaN/inf.

Inputs are scaled by one constant so that E||x|| = sqrt(d_in) (SAELens's
"expected_average_only_in"), which makes learning rates and sparsity coefficients portable
across models; the scale is folded into the saved weights, so the saved SAE takes raw
activations.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.config import RunConfig, SAEConfig, TrainConfig
from atlas.errors import AtlasError
from atlas.saes import SparseAutoencoder, build_sae
from atlas.stage import atomic_dir, fingerprint, input_digest, is_current, require_finite, rerun

CKPT_FILE = "checkpoint.pt"
LOG_FILE = "metrics.jsonl"
SAMPLE_ROWS = 16384
"""Rows used to estimate the input scale and initialise b_dec."""


# ---- data -------------------------------------------------------------------------------------

@dataclass
class RowStream:
    """Shuffled training batches from rows that are read chunk by chunk.

    Each epoch shuffles the order of chunks, groups them into buffers of about `buffer_rows`
    rows, and shuffles rows within a buffer. When everything fits in one buffer (the in-memory
    case) an epoch is a full shuffle. The sequence depends only on `seed`, so `batches(step)`
    can start anywhere without reading what came before: that is how a resumed run sees exactly
    the batches it would have seen.
    """

    read: Callable[[int, int], torch.Tensor]
    """read(start, stop) -> rows [start, stop) as a tensor."""
    n_rows: int
    chunk_rows: int
    buffer_rows: int
    keep: Callable[[np.ndarray], np.ndarray] | None = None
    """Row ids -> boolean mask of rows to train on (e.g. not BOS)."""
    seed: int = 0

    @property
    def d_in(self) -> int:
        return int(self.read(0, 1).shape[-1])

    def _buffers(self, epoch: int):
        """Lists of (start, stop) chunk ranges and their kept row count, for one epoch."""
        n_chunks = math.ceil(self.n_rows / self.chunk_rows)
        order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
        per = max(1, self.buffer_rows // self.chunk_rows)
        for i in range(0, n_chunks, per):
            ranges = sorted((c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)) for c in order[i:i + per])
            yield epoch * 100_000 + i, ranges, sum(self._kept(a, b).size for a, b in ranges)

    def _kept(self, start: int, stop: int) -> np.ndarray:
        ids = np.arange(start, stop)
        return ids if self.keep is None else ids[self.keep(ids)]

    def _load(self, key: int, ranges) -> torch.Tensor:
        parts = []
        for a, b in ranges:
            rows = self.read(a, b)
            if self.keep is not None:
                rows = rows[torch.from_numpy(self.keep(np.arange(a, b)))]
            parts.append(rows)
        rows = torch.cat(parts)
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 7919 + key))]

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Endless float32 batches [batch_size, d_in], beginning with batch number `start_step`.

        With `world` > 1, yields rank `rank`'s slice [batch_size // world, d_in] of each batch:
        the ranks' slices of batch i together are exactly batch i of the undivided stream.
        """
        lo, hi = rank * (batch_size // world), (rank + 1) * (batch_size // world)
        skip = start_step * batch_size  # rows of the stream to pass over
        carry = None
        epoch = 0
        while True:
            any_rows = False
            for key, ranges, n in self._buffers(epoch):
                if n == 0:
                    continue
                any_rows = True
                if skip >= n:
                    skip -= n
                    continue
                rows = self._load(key, ranges)[skip:]
                skip = 0
                if carry is not None:
                    rows = torch.cat([carry, rows])
                for i in range(0, len(rows) - batch_size + 1, batch_size):
                    yield rows[i + lo:i + hi].float()
                carry = rows[len(rows) - len(rows) % batch_size:]
            if not any_rows:
                raise AtlasError("no training rows: the store's training split is empty")
            epoch += 1


def tensor_stream(rows: torch.Tensor, seed: int = 0) -> RowStream:
    """A RowStream over an in-memory tensor [n, d_in] (tests, benchmarks)."""
    return RowStream(lambda a, b: rows[a:b], len(rows), chunk_rows=4096, buffer_rows=len(rows), seed=seed)


def store_stream(store, train_cfg: TrainConfig) -> RowStream:
    """The store's training split: held in RAM when it fits `in_memory_max_gb`, else streamed."""
    rows = store.train_rows
    ctx_len = store.ctx_len
    keep = (lambda ids: ids % ctx_len != 0) if train_cfg.exclude_bos else None
    itemsize = np.dtype(store.acts.dtype).itemsize
    size_gb = len(rows) * store.d_model * itemsize / 1e9
    if size_gb <= train_cfg.in_memory_max_gb:
        data = torch.empty(len(rows), store.d_model, dtype=torch.from_numpy(np.zeros(0, store.acts.dtype)).dtype)
        step = store.chunk_rows * 16
        for a in tqdm(range(0, len(rows), step), desc=f"load {size_gb:.2f} GB of activations", unit="chunk",
                      leave=False, disable=not distributed.is_main()):
            b = min(a + step, len(rows))
            data[a:b] = torch.from_numpy(store.read(rows.start + a, rows.start + b, store.acts.dtype))
        return RowStream(lambda a, b: data[a:b], len(rows), chunk_rows=store.chunk_rows,
                         buffer_rows=len(rows), keep=keep, seed=train_cfg.seed)
    buffer_rows = max(64 * train_cfg.batch_size, 1 << 18)
    return RowStream(lambda a, b: torch.from_numpy(store.read(rows.start + a, rows.start + b)), len(rows),
                     chunk_rows=store.chunk_rows, buffer_rows=buffer_rows, keep=keep, seed=train_cfg.seed)


# ---- initialisation -------------------------------------------------------------------------

def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    x = x.double()
    median = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            median = new
            break
        median = new
    return median.float()


@torch.no_grad()
def init_from_data(sae: SparseAutoencoder, sample: torch.Tensor, b_dec_init: str) -> float:
    """Set b_dec from the data; return the input scale (sqrt(d_in) / mean row norm)."""
    norm = sample.norm(dim=1).mean().item()
    if not math.isfinite(norm) or norm == 0:
        raise AtlasError("the activations are all zero or not finite; check the store (`atlas collect --force`)")
    scale = math.sqrt(sample.shape[1]) / norm
    scaled = sample * scale
    if b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(scaled))
    elif b_dec_init == "mean":
        sae.b_dec.copy_(scaled.mean(0))
    return scale


# ---- the loop -------------------------------------------------------------------------------

def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, constant, then linear decay to 0 over the last decay_fraction."""
    lr = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
    decay_start = int(total * (1 - tc.decay_fraction))
    if step >= decay_start and total > decay_start:
        lr *= max(0.0, (total - step) / (total - decay_start))
    return lr


def train_sae(sae_cfg: SAEConfig, train_cfg: TrainConfig, data: RowStream, n_tokens: int | None = None,
              ckpt_dir: Path | None = None, fp: str = "", metadata: dict | None = None,
              device: str | torch.device = "cpu", max_steps: int | None = None,
              progress: bool = True) -> tuple[SparseAutoencoder, dict]:
    """Train an SAE on `data`; return it (folded to take raw inputs) and its training summary.

    With `ckpt_dir`, resumes from a checkpoint there whose fingerprint is `fp`, writes one every
    `train_cfg.checkpoint_every` steps and appends metrics to ckpt_dir/metrics.jsonl.
    `max_steps` stops early (as if killed) after that many steps of this call.

    In a torch.distributed process group every rank calls this with the same arguments; it
    trains data-parallel (see the module docstring), rank 0 writes the files, and every rank
    returns the same SAE and summary.
    """
    tc = train_cfg
    device = torch.device(device)
    rank, world = distributed.rank_and_world()
    main = rank == 0
    if tc.batch_size % world:
        raise AtlasError(f"train.batch_size = {tc.batch_size} is the global batch, split evenly across the "
                         f"{world} processes: make it a multiple of {world}")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK), even for "cuda:0"
    torch.manual_seed(tc.seed)
    d_in = data.d_in
    sae = build_sae(sae_cfg, d_in, seed=tc.seed, metadata=metadata).to(device)
    n_tokens = n_tokens or tc.n_tokens or data.n_rows
    total_steps = max(1, n_tokens // tc.batch_size)
    opt = torch.optim.Adam(sae.optimizer_groups(), lr=tc.lr, betas=(0.9, 0.999))
    last_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    step, scale, log_path = 0, None, None

    ckpt = None
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        log_path = ckpt_dir / LOG_FILE
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt = _load_checkpoint(ckpt_dir, fp)
        ckpt = distributed.broadcast_object(ckpt)  # every rank resumes from rank 0's checkpoint
        if ckpt is not None and len(ckpt["optimizer"]["param_groups"]) != len(opt.param_groups):
            if main:
                print(f"train: {ckpt_dir / CKPT_FILE} was written by an older trainer (other optimiser groups); "
                      f"starting over")
            ckpt = None
    if ckpt is not None:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["optimizer"])
        last_fired.copy_(ckpt["last_fired"])
        step, scale = ckpt["step"], ckpt["scale"]
        if main:
            _truncate_log(log_path, step)
            print(f"train: resuming from step {step:,} of {total_steps:,} ({ckpt_dir / CKPT_FILE})")
    else:
        if main and log_path is not None and log_path.exists():
            log_path.unlink()
        sample = next(RowStream(data.read, data.n_rows, data.chunk_rows, data.buffer_rows, data.keep,
                                data.seed + 1).batches(min(SAMPLE_ROWS, data.n_rows)))
        scale = init_from_data(sae, sample.to(device), sae_cfg.b_dec_init)
    model = sae
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        scale = distributed.broadcast_object(scale)
        # DDP broadcasts rank 0's parameters and buffers now and averages gradients in backward;
        # buffers are computed identically on every rank (see _sync_step), so DDP need not copy rank 0's.
        no_buffer_sync = ({"forward_sync_buffers": False}  # the name since torch 2.13
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        model = DistributedDataParallel(sae, device_ids=[torch.cuda.current_device()] if device.type == "cuda"
                                        else None, **no_buffer_sync)
        batches = data.batches(tc.batch_size, start_step=step, rank=rank, world=world)
    else:
        batches = data.batches(tc.batch_size, start_step=step)
    dead_after_steps = max(1, tc.dead_after_tokens // tc.batch_size)
    log_every = max(1, min(50, total_steps // 100))
    acc: dict[str, float] = {}
    n_acc = 0
    steps_this_call = 0
    bar = tqdm(total=total_steps * tc.batch_size, initial=step * tc.batch_size, unit="tok", unit_scale=True,
               desc=f"train {sae.architecture} d_sae={sae.d_sae}" + (f" x{world} ranks" if world > 1 else ""),
               disable=not progress or not main, mininterval=1.0)
    sae.train()
    last_good = step if ckpt is not None else None
    while step < total_steps:
        if max_steps is not None and steps_this_call >= max_steps:
            break
        x = next(batches).to(device, non_blocking=True) * scale
        tokens = step * tc.batch_size
        dead_mask = (tokens - last_fired) >= tc.dead_after_tokens if tokens >= tc.dead_after_tokens else None
        sparsity_scale = min(1.0, (step + 1) / tc.l1_warmup_steps) if tc.l1_warmup_steps else 1.0
        lr = lr_at(step, total_steps, tc)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        out = model(x, dead_mask=dead_mask, sparsity_scale=sparsity_scale)
        fired, finite = out.fired, bool(torch.isfinite(out.loss))
        if world > 1:
            fired, finite = _sync_step(sae, out.fired, finite)
        if not finite:
            bar.close()
            kept = (f"the last good checkpoint (step {last_good:,}) is kept in {ckpt_dir}"
                    if last_good is not None and ckpt_dir is not None else "no checkpoint was written yet")
            raise AtlasError(f"train: loss became {out.loss.item()} at step {step:,}; stopped, {kept}; "
                             f"lower train.lr or check the activations for inf/NaN")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()  # under DDP, returns with the gradients averaged over the ranks
        sae.before_step()
        opt.step()
        sae.after_step()
        step += 1
        steps_this_call += 1
        with torch.no_grad():
            last_fired[fired] = step * tc.batch_size
            if sae_cfg.resample_dead and step % dead_after_steps == 0 and dead_mask is not None:
                if sae.revive(x, dead_mask, opt) and world > 1:
                    for p in sae.parameters():  # rank 0's new latents (Adam's reset is the same everywhere)
                        distributed.broadcast_(p.data)
        for key in ("loss", "mse", "fvu", "l0"):
            acc[key] = acc.get(key, 0.0) + getattr(out, key).item()
        n_acc += 1
        bar.update(tc.batch_size)
        if step % log_every == 0 or step == total_steps:
            if world > 1:  # the mean over ranks of each rank's mean
                sums = distributed.all_reduce_sum_(torch.tensor(list(acc.values()), dtype=torch.float64,
                                                                device=device)).tolist()
                acc = {k: v / world for k, v in zip(acc, sums)}
            seen = step * tc.batch_size
            dead = ((seen - last_fired) >= tc.dead_after_tokens).float().mean().item() if seen >= tc.dead_after_tokens else 0.0
            row = {"step": step, "tokens": seen, **{k: v / n_acc for k, v in acc.items()}, "dead_fraction": dead,
                   "lr": lr}
            row["mse"] /= scale * scale  # in the store's units
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{dead:.2f}", refresh=False)
            if log_path is not None and main:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            acc, n_acc = {}, 0
        if ckpt_dir is not None and (step % tc.checkpoint_every == 0 or step == total_steps):
            if not all(torch.isfinite(p).all() for p in sae.parameters()):
                bar.close()
                raise AtlasError(f"train: the SAE's weights became NaN/inf by step {step:,}; stopped, the last good "
                                 f"checkpoint (step {last_good or 0:,}) is kept in {ckpt_dir}; lower train.lr")
            if main:
                _save_checkpoint(ckpt_dir, fp, sae, opt, last_fired, step, scale)
            last_good = step
    bar.close()
    if world > 1:
        _check_ranks_agree(sae, main)
    seen = step * tc.batch_size
    summary = {"steps": step, "total_steps": total_steps, "tokens": seen, "input_scale": scale,
               "finished": step >= total_steps,
               "train_dead_fraction": ((seen - last_fired) >= min(tc.dead_after_tokens, seen)).float().mean().item()}
    if world > 1:
        summary["processes"] = world
    sae.eval()
    return inference_copy(sae, scale), summary


def _sync_step(sae: SparseAutoencoder, fired: torch.Tensor, finite: bool) -> tuple[torch.Tensor, bool]:
    """One all-reduce per step for what the ranks must agree on besides the gradients: (latents
    that fired on any rank, whether the loss was finite on every rank). Buffers need nothing here:
    an SAE computes them from quantities that are already global (BatchTopK's threshold from the
    global batch's selection), and `_check_ranks_agree` would catch one that is not."""
    packed = torch.cat([fired.float(), fired.new_tensor([0.0 if finite else 1.0], dtype=torch.float32)])
    distributed.all_reduce_sum_(packed)
    return packed[:-1] > 0, bool(packed[-1] == 0)


def _check_ranks_agree(sae: SparseAutoencoder, main: bool) -> None:
    """Every rank must end with bit-identical weights; a mismatch is a bug, not bad luck."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = distributed.all_gather_object(h.hexdigest())
    if len(set(digests)) > 1:
        raise AtlasError(f"train: the {len(digests)} ranks ended with different weights "
                         f"(sha256 {', '.join(d[:12] for d in digests)}); this is a bug, please report it")
    if main:
        print(f"train: {len(digests)} ranks finished with identical weights (sha256 {digests[0][:12]})")


def inference_copy(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of a trained SAE that takes raw (unscaled) inputs, on the CPU, without gradients."""
    out = type(sae)(sae.cfg, sae.d_in, sae.apply_b_dec_to_input, sae.metadata)
    out.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()})
    out.fold_activation_scale(scale)
    return out.eval().requires_grad_(False)


def _save_checkpoint(ckpt_dir: Path, fp: str, sae, opt, last_fired, step: int, scale: float) -> None:
    path = ckpt_dir / CKPT_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"fingerprint": fp, "sae": sae.state_dict(), "optimizer": opt.state_dict(),
                    "last_fired": last_fired, "step": step, "scale": scale}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise AtlasError(f"{tmp}: cannot write the checkpoint ({str(e).splitlines()[0]}); "
                         f"the previous one is kept") from None


def _load_checkpoint(ckpt_dir: Path, fp: str) -> dict | None:
    path = ckpt_dir / CKPT_FILE
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        print(f"train: ignoring unreadable checkpoint {path} ({str(e).splitlines()[0]}); starting over")
        return None
    if ckpt.get("fingerprint") != fp:
        print(f"train: {path} was made with another config or store; starting over")
        return None
    return ckpt


def _truncate_log(log_path: Path | None, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if log_path is None or not log_path.exists():
        return
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))


# ---- the stage ------------------------------------------------------------------------------

def sae_metadata(cfg: RunConfig, store) -> dict:
    """SAELens metadata fields describing where the SAE's inputs come from."""
    info = store.info
    return {"model_name": info.model, "hook_name": info.hook_name, "hook_head_index": None,
            "context_size": info.ctx_len, "prepend_bos": True, "dataset_path": cfg.corpus.dataset,
            "model_revision": info.revision, "layer": info.layer, "exclude_bos": cfg.train.exclude_bos}


def run(cfg: RunConfig, force: bool = False) -> Path:
    from atlas.evaluate import evaluate
    from atlas.model import resolve_device
    from atlas.store import ActivationStore

    store_path = cfg.run_dir / "activations.h5"
    out = cfg.run_dir / "sae"
    store_digest = input_digest(store_path, "collect", cfg)
    fp = fingerprint(cfg.section_hash("sae", "train"), store_digest)
    if is_current(out, fp) and not force:
        print(f"train: {out} is up to date")
        return out
    ckpt_dir = cfg.run_dir / "sae.ckpt"
    main = distributed.is_main()
    if force and main and (ckpt_dir / CKPT_FILE).exists():
        (ckpt_dir / CKPT_FILE).unlink()
    device = resolve_device(cfg.model.device)
    with ActivationStore(store_path, rerun("collect", cfg)) as store:
        data = store_stream(store, cfg.train)
        t0 = time.perf_counter()
        sae, summary = train_sae(cfg.sae, cfg.train, data, ckpt_dir=ckpt_dir, fp=fp,
                                 metadata=sae_metadata(cfg, store), device=device)
        summary["train_seconds"] = round(time.perf_counter() - t0, 1)
        if main:  # the other ranks hold the same SAE; they wait for rank 0's sae/ below
            require_finite(sae.state_dict(), out, "training diverged; lower train.lr")
            metrics = {**evaluate(sae, store, cfg), **summary}
            with atomic_dir(out, fp, stage="train", inputs={"store": store_digest}, rerun=rerun("train", cfg)) as tmp:
                sae.save(tmp)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                if (ckpt_dir / LOG_FILE).exists():
                    (tmp / LOG_FILE).write_text((ckpt_dir / LOG_FILE).read_text())
            print(json.dumps(metrics, indent=2))
    distributed.barrier()
    return out
