"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, Nabeshima 2025): nested dictionaries in one.

The latents are split into nested prefixes, widths w_1 < w_2 < ... < w_m = d_sae
(`sae.matryoshka_groups`). Selection is BatchTopK's over the whole dictionary (the batch's n*k
largest pre-activations); then each prefix reconstructs x on its own from the selected latents
it contains, and the loss is the sum of those reconstructions' errors:

    loss = sum_j FVU(x, sum_{i < w_j} f_i d_i + b_dec)  +  AuxK

so the first latents must explain as much as they can without the later ones. They learn the
broad, frequent directions; later groups add detail instead of absorbing the general feature
into many specific ones (the "feature absorption" that makes plain SAEs split a concept). As in
SAELens's `matryoshka_batchtopk`, the outermost level is the ordinary BatchTopK loss and AuxK is
BatchTopK's. Each prefix costs one more sparse decode of the selected entries (`sparse_decode`
with the later groups' values zeroed), nothing dense.

A latent's group -- the index of the smallest prefix holding it -- is its nesting level:
`latent_groups` gives it, and analysis writes it into the features table. Inference is
BatchTopK's (one threshold), and the saved SAE is a JumpReLU SAE with that threshold, as SAELens
saves its own Matryoshka SAEs; the widths travel in the recorded config (metadata), so the
groups survive `load_sae`.

Its decoder steps at 0.3 times the learning rate (BatchTopK's: 1): the prefixes pull the first
latents' rows toward their own reconstructions, and at BatchTopK's rate those rows swing. On the
planted dictionary of tests/test_sae.py, at 3e-3 (three times the default there), 1x found 79% of
the atoms and 0.3x 100%; at 3e-4 and 1e-3 both found 100%.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from atlas.saes.base import ForwardOutput
from atlas.saes.batchtopk import BatchTopKSAE
from atlas.saes.fused import Active, sparse_decode

DEFAULT_FRACTIONS = (1 / 64, 1 / 16, 1 / 4, 1.0)
"""The prefixes when `sae.matryoshka_groups` is empty: each four times the one before."""


def matryoshka_widths(groups: list[float], d_sae: int) -> list[int]:
    """The prefixes' widths in latents: `groups` as widths (all > 1) or fractions of d_sae (all
    <= 1), rounded, made strictly increasing, with d_sae last."""
    groups = list(groups) or list(DEFAULT_FRACTIONS)
    as_fractions = max(groups) <= 1
    widths: list[int] = []
    for g in groups:
        w = min(d_sae, max(1, round(g * d_sae) if as_fractions else int(g)))
        if not widths or w > widths[-1]:
            widths.append(w)
    if widths[-1] != d_sae:
        widths.append(d_sae)
    return widths


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    default_lr_scales = {**BatchTopKSAE.default_lr_scales, "W_dec": 0.3}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # explicit widths in the config, so the saved cfg.json records them and `load_sae` reads them
        self.cfg = dataclasses.replace(self.cfg, matryoshka_groups=matryoshka_widths(self.cfg.matryoshka_groups,
                                                                                     self.d_sae))

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.cfg.matryoshka_groups]

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0) -> ForwardOutput:
        out = super().forward(x, dead_mask, sparsity_scale)  # BatchTopK: the outermost prefix, AuxK
        values, ids, offsets = out.latent_acts, out.latent_indices, out.latent_offsets
        loss = out.loss
        for width in self.widths[:-1]:
            inner = sparse_decode(Active(values * (ids < width), ids, offsets), self.W_dec) + self.b_dec
            loss = loss + self._fvu_mse(x, inner)[1]
        return out._replace(loss=loss)
