"""ReLU SAE with an L1 penalty weighted by decoder norm (Anthropic, "April 2024 update").

    loss = sum_d (x - x_hat)^2 + lambda * sum_i f_i * ||W_dec_i||

on inputs scaled so that E||x|| = sqrt(d_in) (the trainer does that). The decoder is not
constrained; `save` folds decoder norms into the encoder, so a saved SAE has unit-norm decoder
rows and each latent's activation carries its full magnitude. Optionally, dead latents are
re-initialised on badly reconstructed inputs (`sae.resample_dead`, Bricken et al. 2023).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atlas.saes.base import ForwardOutput, SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    saelens_architecture = "standard"
    decoder_init_norm = 0.1

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.encode_pre(x))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0) -> ForwardOutput:
        acts = torch.relu(self.encode_pre(x))
        sae_out = acts @ self.W_dec + self.b_dec
        err, fvu, mse = self._fvu_mse(x, sae_out)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        aux = self.cfg.l1_coefficient * sparsity_scale * l1
        active = acts > 0
        return ForwardOutput(sae_out, acts, None, None, fvu, mse, aux, err.mean() + aux,
                             active.sum(-1).float().mean(), active.any(0))

    @torch.no_grad()
    def revive(self, x: Tensor, dead_mask: Tensor, optimizer: torch.optim.Optimizer) -> int:
        """Point dead latents at inputs sampled in proportion to their squared loss."""
        if not self.cfg.resample_dead:
            return 0
        dead = dead_mask.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        err = (self.decode(self.encode(x)) - x).pow(2).sum(-1)
        picks = torch.multinomial(err.square() + 1e-12, dead.numel(), replacement=dead.numel() > len(x))
        directions = x[picks] - self.b_dec
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~dead_mask
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        self.W_dec[dead] = directions * self.decoder_init_norm
        self.W_enc[:, dead] = directions.t() * enc_norm * 0.2
        self.b_enc[dead] = 0.0
        for p in (self.W_dec, self.W_enc, self.b_enc):  # reset Adam's moments of the new latents
            for key in ("exp_avg", "exp_avg_sq"):
                state = optimizer.state.get(p, {}).get(key)
                if state is not None:
                    if p is self.W_enc:
                        state[:, dead] = 0.0
                    else:
                        state[dead] = 0.0
        return int(dead.numel())

    def saelens_state(self) -> dict[str, Tensor]:
        folded = self.copy()
        folded.fold_decoder_norm()
        return SparseAutoencoder.saelens_state(folded)
