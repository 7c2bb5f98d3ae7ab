"""Architecture name -> SAE class, for our configs and for SAELens's cfg.json names."""

from __future__ import annotations

from atlas.saes.base import SparseAutoencoder
from atlas.saes.batchtopk import BatchTopKSAE
from atlas.saes.jumprelu import JumpReLUSAE
from atlas.saes.matryoshka import MatryoshkaSAE
from atlas.saes.relu import ReLUSAE
from atlas.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka": MatryoshkaSAE,
}
"""Our architecture names (`sae.architecture` in a run config)."""

SAELENS_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,  # also what SAELens saves trained BatchTopK and Matryoshka SAEs as
}
"""What an SAE folder's cfg.json `architecture` is read as."""
