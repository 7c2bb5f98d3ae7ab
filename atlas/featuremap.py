"""The 2-D feature map: every feature (dead ones too) placed by its decoder direction.

Features whose decoder rows point the same way land close together. `umap` (umap-learn, cosine
metric on the unit decoder rows) keeps local neighbourhoods; `pca` (top two principal
components) is a fast, deterministic alternative. Coordinates are scaled to [0, 1] on both axes
so the site can draw them without knowing the method.
"""

from __future__ import annotations

import numpy as np
import torch

# UMAP needs a neighbourhood; below this many features the map is PCA whatever was asked.
UMAP_MIN_FEATURES = 32


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w.float() / w.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


def map_coordinates(w_dec: torch.Tensor, method: str = "umap", seed: int = 0) -> np.ndarray:
    """[d_sae, 2] float32 map coordinates in [0, 1] of the decoder rows `w_dec` [d_sae, d_in]."""
    x = unit_rows(w_dec.detach().cpu())
    if method == "umap" and x.shape[0] >= UMAP_MIN_FEATURES:
        xy = _umap(x.numpy(), seed)
    else:
        xy = _pca(x)
    return _rescale(np.asarray(xy, dtype=np.float64)).astype(np.float32)


def _pca(x: torch.Tensor) -> np.ndarray:
    x = x.double() - x.double().mean(0, keepdim=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    # Exact SVD of the small [d_in, d_in] covariance; never a [d_sae, d_sae] matrix.
    _, vecs = torch.linalg.eigh(x.T @ x)
    comps = vecs[:, -2:].flip(1)
    if comps.shape[1] < 2:
        comps = torch.cat([comps, torch.zeros_like(comps)], 1)
    # Fix each component's sign (largest |loading| positive) so reruns give the same picture.
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True))).clamp_min(0) * 2 - 1
    return (x @ (comps * signs)).numpy()


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba notices
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), metric="cosine",
                            min_dist=0.1, random_state=seed, low_memory=True)
        return reducer.fit_transform(x)


def _rescale(xy: np.ndarray) -> np.ndarray:
    if len(xy) == 0:
        return xy.reshape(0, 2)
    lo, hi = xy.min(0), xy.max(0)
    return (xy - lo) / np.where(hi > lo, hi - lo, 1.0)
