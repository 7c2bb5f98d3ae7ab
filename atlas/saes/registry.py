"""Architecture name -> SAE class, for our configs and for SAELens's cfg.json names.

The names are atlas.config.ARCHITECTURES (the one list, which config validation reads without
importing torch); each is the `architecture` of one class here.
"""

from __future__ import annotations

from atlas import config
from atlas.saes.base import SparseAutoencoder
from atlas.saes.batchtopk import BatchTopKSAE
from atlas.saes.jumprelu import JumpReLUSAE
from atlas.saes.matryoshka import MatryoshkaSAE
from atlas.saes.relu import ReLUSAE
from atlas.saes.topk import TopKSAE

_CLASSES = {cls.architecture: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)}
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {name: _CLASSES[name] for name in config.ARCHITECTURES}
"""Our architecture names (`sae.architecture` in a run config), in config.ARCHITECTURES' order."""

SAELENS_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,  # also what SAELens saves trained BatchTopK and Matryoshka SAEs as
}
"""What an SAE folder's cfg.json `architecture` is read as."""
