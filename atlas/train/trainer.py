"""The training loop: `train_sae` takes a `Trainer` through its steps -- `start` (initialise or
resume), then per batch `train_step`, `log` and `checkpoint`, and `finish`.

The loop is architecture-blind: the SAE computes its own loss (`ForwardOutput.loss`); the
trainer adds Adam with warmup and linear decay, dead-latent tracking, input scaling, metrics,
checkpoints and a clean stop on NaN/inf.

Under `torchrun` training is data-parallel (DistributedDataParallel): `train.batch_size` is the
*global* batch, split evenly across the ranks (it must be a multiple of the number of
processes). Every rank walks the same shuffled stream and keeps its own slice of each global
batch, so together the ranks train on exactly the rows a single process would, step for step;
DDP averages the gradients, and the per-step state outside the gradients (which latents fired,
for dead-latent tracking; a non-finite loss) is combined in one small all-reduce per step;
BatchTopK selects over the global batch (atlas.saes.batchtopk), so its threshold is the same on
every rank. Every rank keeps identical weights and buffers (checked at the end).
Rank 0 alone writes the checkpoint and metrics.jsonl; a resumed run broadcasts rank 0's checkpoint.

Inputs are scaled by one constant so that E||x|| = sqrt(d_in) (SAELens's
"expected_average_only_in"), which makes learning rates and sparsity coefficients portable
across models; the scale is folded into the saved weights, so the saved SAE takes raw
activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from atlas import distributed
from atlas.checkpoint import load_checkpoint, save_checkpoint
from atlas.config import SAEConfig, TrainConfig
from atlas.errors import AtlasError
from atlas.saes import ForwardOutput, SparseAutoencoder, build_sae
from atlas.train.data import RowStream
from atlas.train.health import RunHealth

CKPT_FILE = "checkpoint.pt"
LOG_FILE = "metrics.jsonl"
SAMPLE_ROWS = 16384
"""Rows used to estimate the input scale and initialise b_dec."""
SAMPLE_BUFFER = 4 * SAMPLE_ROWS
"""The rows they are drawn from (whole chunks in random order, as training draws them)."""


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


REFERENCE_LR, REFERENCE_D_IN = 2e-4, 768


def default_lr(d_in: int) -> float:
    """train.lr when unset: 2e-4 for GPT-2 Small's 768 dimensions, scaled by 1/sqrt(d_in).

    Why the width of the input: inputs are scaled to E||x|| = sqrt(d_in), so each coordinate is
    about 1 whatever d_in, and Adam moves every weight by about the learning rate per step. A
    unit-norm decoder row (and an encoder column, initialised as its transpose) has entries of
    about 1/sqrt(d_in), so the same learning rate turns rows faster in fewer dimensions; scaling
    it by 1/sqrt(d_in) keeps the angle a step turns a row the same. Measured: the planted
    dictionary of tests/test_sae.py (32 dimensions) is learnt from 3e-4 to 3e-3 (this gives 9.8e-4);
    the SAE's width is left out, since over 192 and 768 latents there the good range did not move.
    The number of steps is left out too, and it matters: a short run wants more, as the weights
    must get where they go in fewer steps. On SmolLM2 (576 dimensions: 2.3e-4 here) over 300 steps,
    bench_quality.py found 1.8e-3 best of 6e-4, 1.8e-3 and 5.4e-3 (held-out explained variance
    0.889 against 0.874 at 6e-4), so the demo's config sets its own."""
    return REFERENCE_LR * math.sqrt(REFERENCE_D_IN / d_in)


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, constant, then linear decay to 0 over the last decay_fraction."""
    lr = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
    decay_start = int(total * (1 - tc.decay_fraction))
    if step >= decay_start and total > decay_start:
        lr *= max(0.0, (total - step) / (total - decay_start))
    return lr


# ---- the loop -------------------------------------------------------------------------------

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
    trainer = Trainer(sae_cfg, train_cfg, data, n_tokens, ckpt_dir, fp, metadata, device)
    trainer.start(progress)
    batches = trainer.batches()
    n_steps = trainer.total_steps - trainer.step
    try:
        for _ in range(n_steps if max_steps is None else min(n_steps, max_steps)):
            out = trainer.train_step(next(batches))
            trainer.log(out)
            trainer.checkpoint()
    finally:
        batches.close()  # stops the reader thread, also when a step raises
    return trainer.finish()


class Trainer:
    """One training run: the SAE, its optimiser and the state a checkpoint keeps (step, input
    scale, when each latent last fired)."""

    def __init__(self, sae_cfg: SAEConfig, train_cfg: TrainConfig, data: RowStream, n_tokens: int | None = None,
                 ckpt_dir: Path | None = None, fp: str = "", metadata: dict | None = None,
                 device: str | torch.device = "cpu"):
        d_in = data.d_in  # read once: with train.source model it costs a forward pass
        if train_cfg.lr is None:  # derived from the data (recorded in the summary)
            train_cfg = dataclasses.replace(train_cfg, lr=default_lr(d_in))
        tc = self.tc = train_cfg
        self.sae_cfg, self.data, self.fp = sae_cfg, data, fp
        self.rank, self.world = distributed.rank_and_world()
        self.main = self.rank == 0
        if tc.batch_size % self.world:
            raise AtlasError(f"train.batch_size = {tc.batch_size} is the global batch, split evenly across the "
                             f"{self.world} processes: make it a multiple of {self.world}")
        self.device = distributed.local_device(device)
        torch.manual_seed(tc.seed)
        self.sae = build_sae(sae_cfg, d_in, seed=tc.seed, metadata=metadata).to(self.device)
        self.model: torch.nn.Module = self.sae
        """What the forward pass runs: the SAE, or under torchrun the SAE in DDP."""
        self.total_steps = max(1, (n_tokens or tc.n_tokens or data.n_rows) // tc.batch_size)
        self.opt = torch.optim.Adam(self.sae.optimizer_groups(), lr=tc.lr, betas=(0.9, 0.999))
        self.last_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=self.device)
        """Per latent: the tokens seen when it last fired."""
        self.step, self.scale, self.lr = 0, None, tc.lr
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.log_path = self.ckpt_dir / LOG_FILE if self.ckpt_dir is not None else None
        self.last_good: int | None = None
        """The step of the last checkpoint written or resumed from."""
        self.dead_after_steps = max(1, tc.dead_after_tokens // tc.batch_size)
        self.log_every = max(1, min(50, self.total_steps // 100))
        self.acc: dict[str, float] = {}
        """Sums of the loss terms since the last metrics row, over `n_acc` steps."""
        self.n_acc = 0
        self.bar: tqdm | None = None
        self.health = RunHealth(tc.lr, tc.warmup_steps, self.total_steps)
        self.warnings: list[str] = []
        """What `health` noticed going wrong (printed when noticed, kept in the summary)."""

    # ---- start: initialise or resume --------------------------------------------------------
    def start(self, progress: bool = True) -> None:
        """Resume from the checkpoint, or initialise from the data; then set up data parallelism
        and the progress bar."""
        ckpt = self._checkpoint_to_resume()
        if ckpt is not None:
            self._resume(ckpt)
        else:
            self._init_from_data()
        if self.world > 1:
            self.scale = distributed.broadcast_object(self.scale)
            self.model = distributed.data_parallel(self.sae, self.device)
        bs = self.tc.batch_size
        self.bar = tqdm(total=self.total_steps * bs, initial=self.step * bs, unit="tok", unit_scale=True,
                        desc=f"train {self.sae.architecture} d_sae={self.sae.d_sae}"
                             + (f" x{self.world} ranks" if self.world > 1 else ""),
                        disable=not progress or not self.main, mininterval=1.0)
        self.sae.train()
        self.last_good = self.step if ckpt is not None else None

    def _checkpoint_to_resume(self) -> dict | None:
        """Rank 0's checkpoint, on every rank, if there is one this run can continue."""
        if self.ckpt_dir is None:
            return None
        ckpt = None
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt = load_checkpoint(self.ckpt_dir / CKPT_FILE, self.fp, "train")
        ckpt = distributed.broadcast_object(ckpt)  # every rank resumes from rank 0's checkpoint
        if ckpt is not None and len(ckpt["optimizer"]["param_groups"]) != len(self.opt.param_groups):
            if self.main:
                print(f"train: {self.ckpt_dir / CKPT_FILE} was written by an older trainer (other optimiser "
                      f"groups); starting over")
            ckpt = None
        return ckpt

    def _resume(self, ckpt: dict) -> None:
        self.sae.load_state_dict(ckpt["sae"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.last_fired.copy_(ckpt["last_fired"])
        self.step, self.scale = ckpt["step"], ckpt["scale"]
        if self.main:
            _truncate_log(self.log_path, self.step)
            print(f"train: resuming from step {self.step:,} of {self.total_steps:,} ({self.ckpt_dir / CKPT_FILE})")

    def _init_from_data(self) -> None:
        """A fresh start: the input scale and b_dec from a sample of rows (its own shuffle)."""
        if self.main and self.log_path is not None and self.log_path.exists():
            self.log_path.unlink()
        d = self.data  # a plain RowStream of d's rows: d may be a subclass with batches of its own
        # a buffer of SAMPLE_BUFFER rows, not the stream's: with train.source model every row read costs a forward pass
        sample = next(RowStream(d.read, d.n_rows, d.chunk_rows, min(d.buffer_rows, SAMPLE_BUFFER), d.keep, d.seed + 1,
                                d.rows, d.read_into).batches(min(SAMPLE_ROWS, d.n_rows)))
        self.scale = init_from_data(self.sae, sample.to(self.device).float(), self.sae_cfg.b_dec_init)

    def batches(self) -> Iterator[torch.Tensor]:
        """This rank's share of each training batch, from the current step on."""
        return self.data.batches(self.tc.batch_size, start_step=self.step, rank=self.rank, world=self.world,
                                 pin=self.device.type == "cuda")

    # ---- step --------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> ForwardOutput:
        """One optimiser step on the raw batch `x`; a non-finite loss stops training."""
        tc = self.tc
        batch = x
        x = x.to(self.device, non_blocking=True).float() * self.scale  # batches come in the store's dtype
        tokens = self.step * tc.batch_size
        dead_mask = (tokens - self.last_fired) >= tc.dead_after_tokens if tokens >= tc.dead_after_tokens else None
        sparsity_scale = min(1.0, (self.step + 1) / tc.l1_warmup_steps) if tc.l1_warmup_steps else 1.0
        self.lr = lr_at(self.step, self.total_steps, tc)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        out = self.model(x, dead_mask=dead_mask, sparsity_scale=sparsity_scale)
        fired, finite = out.fired, bool(torch.isfinite(out.loss))
        if self.world > 1:
            fired, finite = _sync_step(out.fired, finite)
        if not finite:
            self.bar.close()
            kept = (f"the last good checkpoint (step {self.last_good:,}) is kept in {self.ckpt_dir}"
                    if self.last_good is not None and self.ckpt_dir is not None else "no checkpoint was written yet")
            row = self.data.bad_row(batch, tc.batch_size, self.step, self.rank, self.world)  # check_row may raise
            if row is not None:
                raise AtlasError(f"train: training row {row:,} holds NaN/inf activations at step {self.step:,}; "
                                 f"stopped, {kept}; rewrite the store (`atlas collect --force`)")
            raise AtlasError(f"train: loss became {out.loss.item()} at step {self.step:,}; stopped, {kept}; "
                             f"lower train.lr or check the activations for inf/NaN")
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()  # under DDP, returns with the gradients averaged over the ranks
        self.sae.before_step()
        self.opt.step()
        self.sae.after_step()
        self.step += 1
        with torch.no_grad():
            self.last_fired[fired] = self.step * tc.batch_size
            if self.sae_cfg.resample_dead and self.step % self.dead_after_steps == 0 and dead_mask is not None:
                if self.sae.revive(x, dead_mask, self.opt) and self.world > 1:
                    for p in self.sae.parameters():  # rank 0's new latents (Adam's reset is the same everywhere)
                        distributed.broadcast_(p.data)
        return out

    def dead_fraction(self, window: int) -> float:
        """The share of latents that have not fired in the last `window` tokens."""
        seen = self.step * self.tc.batch_size
        return ((seen - self.last_fired) >= window).float().mean().item()

    # ---- log ---------------------------------------------------------------------------------
    def log(self, out: ForwardOutput) -> None:
        """Add the step's loss terms; every `log_every` steps and at the end, append their means
        (over the steps and the ranks) to metrics.jsonl."""
        tc = self.tc
        for key in ("loss", "mse", "fvu", "l0"):
            self.acc[key] = self.acc.get(key, 0.0) + getattr(out, key).item()
        self.n_acc += 1
        self.bar.update(tc.batch_size)
        if self.step % self.log_every and self.step != self.total_steps:
            return
        acc = self.acc
        if self.world > 1:  # the mean over ranks of each rank's mean
            sums = distributed.all_reduce_(torch.tensor(list(acc.values()), dtype=torch.float64,
                                                        device=self.device)).tolist()
            acc = {k: v / self.world for k, v in zip(acc, sums)}
        seen = self.step * tc.batch_size
        dead = self.dead_fraction(tc.dead_after_tokens) if seen >= tc.dead_after_tokens else 0.0
        row = {"step": self.step, "tokens": seen, **{k: v / self.n_acc for k, v in acc.items()},
               "dead_fraction": dead, "lr": self.lr}
        row["mse"] /= self.scale * self.scale  # in the store's units
        self.bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{dead:.2f}", refresh=False)
        for warning in self.health.observe(self.step, row["fvu"], dead):
            self.warnings.append(warning)
            if self.main:
                tqdm.write(warning)
        if self.log_path is not None and self.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.acc, self.n_acc = {}, 0

    # ---- checkpoint --------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Every `checkpoint_every` steps and at the end: stop if the weights went non-finite,
        else write the checkpoint (rank 0)."""
        if self.ckpt_dir is None or (self.step % self.tc.checkpoint_every and self.step != self.total_steps):
            return
        if not all(torch.isfinite(p).all() for p in self.sae.parameters()):
            self.bar.close()
            raise AtlasError(f"train: the SAE's weights became NaN/inf by step {self.step:,}; stopped, the last good "
                             f"checkpoint (step {self.last_good or 0:,}) is kept in {self.ckpt_dir}; lower train.lr")
        if self.main:
            save_checkpoint(self.ckpt_dir / CKPT_FILE, {
                "fingerprint": self.fp, "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "last_fired": self.last_fired, "step": self.step, "scale": self.scale})
        self.last_good = self.step

    # ---- finish ------------------------------------------------------------------------------
    def finish(self) -> tuple[SparseAutoencoder, dict]:
        """The trained SAE, folded to take raw inputs, and the training summary."""
        self.bar.close()
        if self.world > 1:
            _check_ranks_agree(self.sae, self.main)
        seen = self.step * self.tc.batch_size
        summary = {"steps": self.step, "total_steps": self.total_steps, "tokens": seen, "lr": self.tc.lr,
                   "input_scale": self.scale,
                   "finished": self.step >= self.total_steps,
                   "train_dead_fraction": self.dead_fraction(min(self.tc.dead_after_tokens, seen))}
        if self.world > 1:
            summary["processes"] = self.world
        if self.warnings:
            summary["warnings"] = self.warnings
        self.sae.eval()
        return inference_copy(self.sae, self.scale), summary


def _sync_step(fired: torch.Tensor, finite: bool) -> tuple[torch.Tensor, bool]:
    """One all-reduce per step for what the ranks must agree on besides the gradients: (latents
    that fired on any rank, whether the loss was finite on every rank). Buffers need nothing here:
    an SAE computes them from quantities that are already global (BatchTopK's threshold from the
    global batch's selection), and `_check_ranks_agree` would catch one that is not."""
    packed = torch.cat([fired.float(), fired.new_tensor([0.0 if finite else 1.0], dtype=torch.float32)])
    distributed.all_reduce_(packed, "sum")
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
    out = sae.copy()
    out.fold_activation_scale(scale)
    return out.eval().requires_grad_(False)


def _truncate_log(log_path: Path | None, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if log_path is None or not log_path.exists():
        return
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))
