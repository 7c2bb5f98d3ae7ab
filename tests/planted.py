"""Planted dictionaries: activations made of known atoms, to check that a trainer finds them.
Used by tests/test_sae.py and tests/bench/bench_lr.py."""

from __future__ import annotations

import torch


def _zipf_atoms(g: torch.Generator, n_atoms: int, d_in: int, mean_active: float, cap: float):
    """Unit-norm random atoms [n_atoms, d_in], and atom i's probability of being active, proportional
    to 1/(i+1), `mean_active` per row on average, at most `cap`."""
    D = torch.randn(n_atoms, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    p = 1.0 / torch.arange(1, n_atoms + 1).float()
    return D, (p * mean_active / p.sum()).clamp(max=cap)


def planted_heavy(n=16384, d_in=32, n_atoms=96, mean_active=3.0, tail=2.0, noise=0.02, seed=0):
    """The harder world: three times more unit-norm atoms than dimensions, atom i active with
    probability proportional to 1/(i+1) (Zipf; the rarest in about 1 token of 160), each with a
    Pareto(`tail`) magnitude from 0.5 (heavy-tailed: at tail 2 its variance is infinite).
    Returns (x, D, p) with p the atoms' firing probabilities."""
    g = torch.Generator().manual_seed(seed)
    D, p = _zipf_atoms(g, n_atoms, d_in, mean_active, 0.5)
    active = torch.rand(n, n_atoms, generator=g) < p
    magnitude = 0.5 * (1 - torch.rand(n, n_atoms, generator=g)) ** (-1 / tail)
    x = (active * magnitude) @ D + noise * torch.randn(n, d_in, generator=g) + 0.3
    return x, D, p


def planted_lognormal(n=8192, d_in=32, n_atoms=48, mean_active=2.0, seed=7):
    """The milder world: 1.5 times more atoms than dimensions, Zipf frequencies, log-normal
    magnitudes (sigma 0.6) and a fixed offset. Returns (x, D, p) as `planted_heavy`."""
    g = torch.Generator().manual_seed(seed)
    D, p = _zipf_atoms(g, n_atoms, d_in, mean_active, 0.4)
    active = torch.rand(n, n_atoms, generator=g) < p
    magnitude = torch.exp(0.6 * torch.randn(n, n_atoms, generator=g))
    offset = 2.0 * torch.randn(d_in, generator=g) / d_in ** 0.5
    return (active * magnitude) @ D + 0.02 * torch.randn(n, d_in, generator=g) + offset, D, p
