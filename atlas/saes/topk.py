"""TopK SAE (Gao et al. 2024, OpenAI): keep the k largest pre-activations per token.

    loss = FVU + aux_k_coefficient * AuxK

AuxK: the top `aux_k` dead latents reconstruct the residual error x - x_hat (without b_dec),
normalised like FVU and scaled by min(#dead / aux_k, 1) as in EleutherAI's sparsify; it gives
dead latents a gradient, and only them: not the shared b_dec, on either of its two paths (dense
products over the dead latents when few are dead, fused into the sparse encoder when many;
tests/test_sae.py checks both against one plain-autograd reference). Decoder rows are kept at unit norm (the gradient component along each
row is removed before the step, the row renormalised after it).

Learning rates: by default W_dec, b_enc and b_dec step at 10 times the trainer's lr, W_enc at the
lr itself (`default_lr_scales`; the `sae.lr_scale_*` config fields override them, and the saved
cfg.json records the values used). Adam moves every entry by about lr per step whatever its size; a unit-norm
decoder row has entries of about 1/sqrt(d_in), and the biases live on the scale of the (scaled)
inputs and pre-activations, so at the encoder's lr they barely move over a short run. SAELens
gets the same effect implicitly (decoder rows initialised at norm 0.1 and activations rescaled
by the decoder norm make its decoder steps ~10x larger relative to the weights); measured on the
demo and tiny worlds (tests/bench/bench_quality.py), this is what closed the explained-variance
and CE-loss gap to SAELens at the same lr, while dead latents stayed fewer than SAELens's. Training goes through
`atlas.saes.fused`, whose backward is sparse; inference `encode` is plain torch for ONNX.
Inference reads the k latents of each token directly (`encode_sparse`, `encode_top`), never
scanning a dense [n, d_sae] matrix for its nonzero entries.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from atlas.config import SAEConfig
from atlas.errors import AtlasError
from atlas.saes.base import ForwardOutput, SparseAutoencoder, SparseCodes, TopLatents
from atlas.saes.fused import Active, fixed_width, sparse_decode, sparse_encode

DENSE_AUX_FACTOR = 32
"""Up to this many times aux_k dead latents, AuxK runs as dense products over the dead ones:
on a CPU that beats gathering aux_k decoder rows per token (memory-bound) until most latents are dead."""


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    saelens_architecture = "topk"
    default_lr_scales = {"W_dec": 10.0, "b_enc": 10.0, "b_dec": 10.0}

    @property
    def k(self) -> int:
        return int(self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        values, indices = self.encode_pre(x).topk(self.k, dim=-1)
        return torch.zeros(*x.shape[:-1], self.d_sae, dtype=x.dtype, device=x.device).scatter(
            -1, indices, torch.relu(values))

    def encode_topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, indices = self.encode_pre(x).topk(k, dim=-1)
        values = torch.relu(values)
        if k > self.k:  # only k latents are ever active
            values = values * (torch.arange(k, device=x.device) < self.k)
        return values, indices

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        # encode_topk(x, k) with the bias added in place: the same values, one [n, d_sae] buffer less
        pre = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc
        pre += self.b_enc
        values, ids = pre.topk(self.k, dim=-1)
        del pre
        values = torch.relu(values)
        keep = values > 0
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(ids)
        return SparseCodes(rows[keep], ids[keep], values[keep])

    def encode_top(self, x: Tensor, k: int) -> TopLatents:
        # At most self.k latents are active: count them among the top max(k, self.k), with no
        # dense [n, d_sae] scatter (in the ONNX graph, none at all).
        values, ids = self.encode_topk(x, max(k, self.k))
        n_active = (values > 0).sum(-1)
        values, ids = values[..., :k], ids[..., :k]
        return TopLatents(ids, values, n_active)

    def select(self, pre: Tensor) -> Active:
        """The entries a training step keeps (atlas.saes.fused.Select): the k largest per row."""
        return fixed_width(*pre.topk(self.k, dim=1, sorted=False))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0) -> ForwardOutput:
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        aux_k = min(self.cfg.aux_k, n_dead)
        # Few dead latents: AuxK as dense products over just those (cheap); many: sparse, fused.
        fused_aux = aux_k > 0 and n_dead > DENSE_AUX_FACTOR * aux_k
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        active, aux_active = sparse_encode(x, self.W_enc, self.b_enc, b_dec, self.select,
                                           dead_mask if fused_aux else None, aux_k if fused_aux else 0)
        sae_out = sparse_decode(active, self.W_dec) + self.b_dec
        err, fvu, mse = self._fvu_mse(x, sae_out)
        if aux_k:
            residual = (x - sae_out).detach()
            if fused_aux:
                aux_out = sparse_decode(aux_active, self.W_dec)
            else:
                aux_out = self._dense_aux(x, dead_mask.nonzero().flatten(), aux_k)
            total = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
            auxk = (aux_out - residual).pow(2).sum() / total
            aux = self.cfg.aux_k_coefficient * min(n_dead / self.cfg.aux_k, 1.0) * auxk
        else:
            aux = fvu.new_zeros(())
        on = active.values > 0
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[active.ids[on]] = True
        return ForwardOutput(sae_out, *active, fvu, mse, aux, fvu + aux, on.sum() / x.shape[0], fired)

    def _dense_aux(self, x: Tensor, dead: Tensor, aux_k: int) -> Tensor:
        """W_dec-reconstruction from the top aux_k of the dead latents, computed on those alone."""
        x_in = x - self.b_dec.detach() if self.apply_b_dec_to_input else x
        pre = x_in @ self.W_enc[:, dead] + self.b_enc[dead]
        if aux_k < len(dead):
            v, i = pre.topk(aux_k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        else:
            acts = torch.relu(pre)
        return acts @ self.W_dec[dead]

    def before_step(self) -> None:
        self._remove_parallel_grad()

    def after_step(self) -> None:
        self._unit_norm_decoder()

    @classmethod
    def from_saelens_cfg(cls, raw: dict, recorded: SAEConfig, cfg_path: Path) -> TopKSAE:
        k = raw.get("k")
        if not isinstance(k, int) or not 1 <= k <= int(raw["d_sae"]):
            raise AtlasError(f"{cfg_path}: 'k' = {k!r}: a topk SAE needs an integer k in 1..d_sae")
        return super().from_saelens_cfg(raw, dataclasses.replace(recorded, k=k), cfg_path)

    def to_saelens_cfg(self) -> dict:
        return {**super().to_saelens_cfg(), "k": self.k, "rescale_acts_by_decoder_norm": False}

    def load_saelens_state(self, state: dict[str, Tensor], raw: dict, weights_path: Path) -> None:
        super().load_saelens_state(state, raw, weights_path)
        if raw.get("rescale_acts_by_decoder_norm"):
            self.fold_decoder_norm()  # exact: top-k of pre * ||W_dec|| is what the SAE meant
