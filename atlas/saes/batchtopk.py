"""BatchTopK SAE (Bussmann et al. 2024): keep the n*k largest activations of a whole batch.

Tokens get a variable number of latents, k on average. Inference cannot look at a batch, so a
single threshold is estimated during training (an exponential moving average of the smallest
selected activation, as SAELens does) and the saved SAE is a JumpReLU SAE with that threshold
for every latent: exactly how SAELens saves BatchTopK SAEs. Loss and decoder handling as TopK.

Selection is exact but cheap: each row proposes its top `4k` candidates through the sparse
fused encoder, the batch keeps the top n*k among them; only if some row had all its candidates
kept (it might have had more) does the step fall back to more candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atlas.saes.topk import TopKSAE

THRESHOLD_LR = 0.01


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(()))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.encode_pre(x)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode_topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.encode(x).topk(k, dim=-1)

    def _select(self, x: Tensor, aux_mask: Tensor | None, aux_k: int):
        from atlas.saes.fused import topk_encode

        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        n, budget = x.shape[0], x.shape[0] * self.k
        width = min(self.d_sae, 4 * self.k)
        while True:
            values, indices, aux_values, aux_indices = topk_encode(
                x, self.W_enc, self.b_enc, b_dec, width, aux_mask, aux_k)
            cut = values.detach().flatten().kthvalue(values.numel() - budget + 1).values
            keep = values.detach() >= cut
            if width == self.d_sae or not keep.all(dim=1).any():
                break
            width = min(self.d_sae, width * 4)
        values = values * keep
        if self.training:
            with torch.no_grad():
                positive = values.detach()[keep & (values.detach() > 0)]
                if positive.numel():
                    self.threshold.mul_(1 - THRESHOLD_LR).add_(THRESHOLD_LR * positive.min())
        return values, indices, aux_values, aux_indices

    def saelens_state(self) -> dict[str, Tensor]:
        state = super().saelens_state()
        state["threshold"] = torch.full((self.d_sae,), float(self.threshold))
        return state

    def _extra_cfg(self) -> dict:
        return {}
