"""How good an SAE is, on the store's held-out contexts.

Reconstruction (over held-out activation rows, BOS positions left out when train.exclude_bos):
  explained_variance  1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2   (mean-centred, as SAEBench)
  mse                 mean over rows and dimensions of (x - x_hat)^2
  l0                  mean number of active latents per token
  dead_fraction       share of latents that never fire on the held-out tokens
  dense_fraction      share of latents firing on more than analyze.dense_threshold of them

Downstream (models with an LM head; None otherwise): the reconstruction is spliced into the
model at the hook (`LoadedModel.splice`) on held-out contexts, next-token cross-entropy and the
KL divergence from the clean next-token distribution are measured, and compared with splicing in
zeros (zero ablation):
  ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)
  kl_score      = (KL_zero - KL_sae) / KL_zero
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atlas.saes import SparseAutoencoder

MAX_EVAL_TOKENS = 65_536
"""Held-out rows used for the reconstruction metrics."""
MAX_CE_CONTEXTS = 64
"""Held-out contexts used for the CE-loss and KL scores."""
CE_BATCH = 8


class ReconstructionStats:
    """Streaming sums for the reconstruction metrics (float64)."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.active = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += x.pow(2).sum().item()
        self.sum_sq_err += (x - x_hat).pow(2).sum().item()
        active = f > 0
        self.active += active.sum().item()
        self.fires += active.sum(0).double()

    def result(self, dense_threshold: float = 0.1) -> dict:
        n = max(self.n, 1)
        d = self.sum_x.numel() if self.sum_x is not None else 1
        total = self.sum_sq_x - (self.sum_x.pow(2).sum().item() / n if self.sum_x is not None else 0.0)
        density = self.fires / n
        return {
            "explained_variance": 1.0 - self.sum_sq_err / total if total > 0 else float("nan"),
            "mse": self.sum_sq_err / (n * d),
            "l0": self.active / n,
            "dead_fraction": (density == 0).double().mean().item(),
            "dense_fraction": (density > dense_threshold).double().mean().item(),
            "eval_tokens": self.n,
        }


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches, dense_threshold: float = 0.1) -> dict:
    """Metrics over an iterable of activation batches [n, d_in] (raw, float32)."""
    stats = ReconstructionStats(sae.d_sae)
    for x in batches:
        f = sae.encode(x)
        stats.add(x, sae.decode(f), f)
    return stats.result(dense_threshold)


@torch.no_grad()
def downstream_scores(model, layer: int, sae: SparseAutoencoder, tokens: torch.Tensor,
                      keep_first: bool = True, batch_size: int = CE_BATCH) -> dict:
    """CE-loss and KL scores of splicing the SAE's reconstruction into `model` (a LoadedModel)
    before block `layer`, on token contexts [n, ctx_len]. `keep_first` leaves position 0 (BOS)
    unchanged in every spliced run."""
    if not model.has_lm_head:
        return {"ce_loss_score": None, "kl_score": None, "ce_clean": None, "ce_sae": None, "ce_zero": None,
                "kl_sae": None, "kl_zero": None}
    device = next(model.model.parameters()).device
    sae_dev = sae.to(device)

    def replace(fn):
        def splice(resid):
            new = fn(resid.float()).to(resid.dtype)
            if keep_first:
                new = torch.cat([resid[:, :1], new[:, 1:]], dim=1)
            return new
        return splice

    recon = replace(lambda r: sae_dev.reconstruct(r.reshape(-1, r.shape[-1])).reshape(r.shape))
    zero = replace(torch.zeros_like)
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n = 0
    for i in range(0, len(tokens), batch_size):
        ids = tokens[i:i + batch_size].long().to(device)
        clean = _logits(model, ids)
        logp_clean = clean.log_softmax(-1)
        sums["ce_clean"] += _ce(clean, ids)
        for name, fn in (("sae", recon), ("zero", zero)):
            with model.splice(layer, fn):
                logits = _logits(model, ids)
            sums[f"ce_{name}"] += _ce(logits, ids)
            # KL(clean || spliced) per position, summed; positions that predict a next token
            kl = F.kl_div(logits[:, :-1].log_softmax(-1), logp_clean[:, :-1], log_target=True, reduction="none")
            sums[f"kl_{name}"] += kl.sum(-1).sum().item()
        n += ids.shape[0] * (ids.shape[1] - 1)
    m = {k: v / n for k, v in sums.items()}
    ce_gap = m["ce_zero"] - m["ce_clean"]
    m["ce_loss_score"] = (m["ce_zero"] - m["ce_sae"]) / ce_gap if ce_gap != 0 else None
    m["kl_score"] = (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] != 0 else None
    sae.cpu()
    return m


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum").item()


def evaluate(sae: SparseAutoencoder, store, cfg, model=None) -> dict:
    """All metrics of `sae` on the store's held-out contexts (`cfg` is the RunConfig)."""
    import numpy as np

    rows = store.eval_rows
    if len(rows) == 0:  # no held-out split: fall back to the end of the training split
        rows = range(max(0, store.n_tokens - MAX_EVAL_TOKENS), store.n_tokens)
    rows = range(rows.start, min(rows.stop, rows.start + MAX_EVAL_TOKENS))
    ctx_len = store.ctx_len

    def batches():
        for start, x in store.iter_batches(8192, rows):
            if cfg.train.exclude_bos:
                x = x[torch.from_numpy(np.arange(start, start + len(x)) % ctx_len != 0)]
            if len(x):
                yield x

    metrics = reconstruction_metrics(sae, batches(), cfg.analyze.dense_threshold)
    first_ctx = rows.start // ctx_len
    tokens = torch.from_numpy(np.asarray(store.tokens[first_ctx:first_ctx + MAX_CE_CONTEXTS]))
    if model is None:
        from atlas.model import load_model, resolve_device

        m = cfg.model
        model = load_model(m.name, m.revision, str(resolve_device(m.device)), m.dtype, gguf_file=m.gguf_file)
    metrics.update(downstream_scores(model, cfg.model.layer, sae, tokens, keep_first=cfg.train.exclude_bos))
    return metrics
