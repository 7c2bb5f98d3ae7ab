"""A suite: the SAEs of one run, one per (layer, width), sharing every other setting.

`model.layer` and `sae.d_sae` may each be a list; the run's SAEs are every layer x every width.
Each is a `Member` with a short id: `L8` when the run has one width, `L8-24576` when it has
several. A run of one layer and one width is the suite of one: its member's folder is the run
folder itself (runs/<name>/sae/, runs/<name>/features/ as always). In a suite of more, each
member has runs/<name>/saes/<id>/ holding its sae/ (SAELens' format, hook_name = its hook),
sae.ckpt/ and features/; the activation store (every hook), onnx/ and site/ stay one per run.

Stages that work on one SAE (train, analyze, export, import-sae) take the member's view of the
config, `member_config(cfg, m)`: a plain one-layer, one-width `RunConfig` whose paths
(`sae_dir`, `features_dir`, ...) point into the member's folder. So a stage is written once, for
one SAE, and a suite runs it per member.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from atlas.config import RunConfig, hook_name
from atlas.errors import ConfigError


@dataclass(frozen=True)
class Member:
    """One SAE of a run."""

    id: str
    """`L8`, or `L8-24576` when the run has several widths."""
    layer: int
    d_sae: int
    hook_name: str
    dir: Path
    """The folder holding its sae/ and features/ (the run folder for a run of one SAE)."""


def member_id(layer: int, d_sae: int, several_widths: bool) -> str:
    return f"L{layer}-{d_sae}" if several_widths else f"L{layer}"


def is_suite(cfg: RunConfig) -> bool:
    """More than one SAE in the run."""
    return len(cfg.layers) * len(cfg.widths) > 1


def member_config(cfg: RunConfig, layer: int, d_sae: int) -> RunConfig:
    """The config of the run's SAE at (layer, d_sae): one layer, one width, its own folders."""
    if not is_suite(cfg):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer=layer),
                               sae=dataclasses.replace(cfg.sae, d_sae=d_sae),
                               member=member_id(layer, d_sae, len(cfg.widths) > 1))


def members(cfg: RunConfig) -> list[Member]:
    """The run's SAEs, ordered by layer, then width."""
    out = []
    for layer in cfg.layers:
        for d_sae in cfg.widths:
            view = member_config(cfg, layer, d_sae)
            out.append(Member(member_id(layer, d_sae, len(cfg.widths) > 1), layer, d_sae, hook_name(layer),
                              view.member_dir))
    return out


def configs(cfg: RunConfig, only: str | None = None) -> list[RunConfig]:
    """The member views of the run (`member_config`), or of the one member with id `only`."""
    chosen = members(cfg)
    if only:
        chosen = [m for m in chosen if m.id == only]
        if not chosen:
            raise ConfigError(f"--sae {only}: {cfg.path} has no such SAE (its SAEs: "
                              f"{', '.join(m.id for m in members(cfg))})")
    return [member_config(cfg, m.layer, m.d_sae) for m in chosen]

