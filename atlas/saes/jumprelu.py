"""JumpReLU SAE (Rajamanoharan et al. 2024): a latent fires when its pre-activation exceeds its
own learned threshold. Training uses straight-through estimators with a rectangle kernel for the
threshold gradient and an L0 penalty (`sae.l1_coefficient` weighs it); it is also the format of
BatchTopK SAEs once trained, and what SAELens's JumpReLU releases load into.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atlas.saes.base import ForwardOutput, SparseAutoencoder

BANDWIDTH = 0.001
INIT_THRESHOLD = 0.001


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_t = -(threshold / BANDWIDTH) * _rectangle((pre - threshold) / BANDWIDTH) * grad
        return (pre > threshold) * grad, grad_t.sum(0)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_t = -(1.0 / BANDWIDTH) * _rectangle((pre - threshold) / BANDWIDTH) * grad
        return None, grad_t.sum(0)


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    decoder_init_norm = 0.1
    saelens_tensors = (*SparseAutoencoder.saelens_tensors, "threshold")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = nn.Parameter(torch.full((self.d_sae,), INIT_THRESHOLD))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.encode_pre(x)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0) -> ForwardOutput:
        pre = torch.relu(self.encode_pre(x))
        threshold = self.threshold.clamp_min(1e-6)
        acts = _JumpReLU.apply(pre, threshold)
        sae_out = acts @ self.W_dec + self.b_dec
        err, fvu, mse = self._fvu_mse(x, sae_out)
        l0 = _Step.apply(pre, threshold).sum(-1).mean()
        aux = self.cfg.l1_coefficient * sparsity_scale * l0
        active = acts > 0
        return ForwardOutput(sae_out, acts, None, None, fvu, mse, aux, err.mean() + aux,
                             active.sum(-1).float().mean(), active.any(0))

    @torch.no_grad()
    def fold_decoder_norm(self) -> Tensor:
        norms = super().fold_decoder_norm()
        self.threshold.mul_(norms)  # a latent fires where it did: its threshold scales with it
        return norms

    def saelens_state(self) -> dict[str, Tensor]:
        folded = self.copy()
        folded.fold_decoder_norm()
        state = SparseAutoencoder.saelens_state(folded)
        state["threshold"] = folded.threshold.detach().float().contiguous().cpu()
        return state
