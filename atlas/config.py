"""Run configuration: YAML files loaded into typed dataclasses.

A run is one YAML file in `configs/`; its outputs go to `runs/<file stem>/`. Every key is
declared here once. `load_config` rejects unknown keys, wrong types and impossible values with
a `ConfigError` that names the file and the key; `--set section.key=value` overrides apply
before validation, so a bad override is reported the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from atlas.errors import ConfigError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class ModelConfig:
    name: str = "gpt2"
    """Hugging Face hub id or a local directory saved with `save_pretrained`."""
    revision: str = "main"
    layer: int = 8
    """Residual stream before block `layer` (`hidden_states[layer]`, `blocks.L.hook_resid_pre`)."""
    device: str = "auto"
    """"auto" picks cuda when available, else cpu."""
    dtype: str = "float32"


@dataclass
class CorpusConfig:
    dataset: str = "roneneldan/TinyStories"
    """A `datasets` hub id, or a local .txt / .jsonl / .parquet file."""
    split: str = "train"
    text_field: str = "text"
    ctx_len: int = 128
    n_tokens: int = 1_000_000
    """Tokens to collect (rounded down to whole contexts)."""
    batch_size: int = 32
    """Contexts per forward pass during collection."""
    store_dtype: str = "float16"
    chunk_contexts: int = 64
    """Contexts per HDF5 chunk; the resume unit of `atlas collect`."""
    eval_fraction: float = 0.02
    """Share of contexts held out from training for evaluation and export parity."""


@dataclass
class SAEConfig:
    architecture: str = "topk"
    d_sae: int = 24576
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    aux_k: int = 512
    """Latents in the AuxK loss for dead latents (topk, batchtopk)."""
    aux_k_coefficient: float = 1 / 32
    l1_coefficient: float = 5.0
    """Sparsity penalty (relu): lambda * sum_i f_i * ||W_dec_i||."""
    resample_dead: bool = False
    """relu only: re-initialise dead latents on high-loss inputs, as the original work did."""
    b_dec_init: str = "geometric_median"
    """"geometric_median", "mean" or "zeros"."""


@dataclass
class TrainConfig:
    batch_size: int = 4096
    n_tokens: int = 0
    """Training tokens; 0 means one pass over the store's training split."""
    lr: float = 2e-4
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """Final share of steps with linear decay of the learning rate to zero."""
    l1_warmup_steps: int = 0
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    checkpoint_every: int = 500
    seed: int = 0
    in_memory_max_gb: float = 8.0
    """Hold the training split in RAM when it is at most this big, else stream shuffled chunks."""
    exclude_bos: bool = True
    """Leave each context's first position (BOS, an outlier of huge norm in GPT-2) out of training
    and evaluation, and out of the reconstruction spliced in for the CE-loss score."""


@dataclass
class AnalyzeConfig:
    batch_tokens: int = 8192
    n_top: int = 20
    n_intervals: int = 10
    per_interval: int = 5
    context_left: int = 24
    context_right: int = 8
    histogram_bins: int = 50
    n_logits: int = 10
    n_neighbours: int = 10
    dense_threshold: float = 0.1
    """A feature firing on more than this share of tokens is marked dense."""
    shard_size: int = 512
    map_method: str = "umap"
    """"umap" or "pca" for the 2-D feature map."""
    seed: int = 0
    explainer: str = "top-tokens"
    """Which labeller writes feature labels (atlas/labels.py registry)."""
    skip_bos: bool = True
    """Leave out the BOS position of every context (its residual is an outlier that many features fire on)."""
    checkpoint_every: int = 50
    """Batches between checkpoints of the streaming state, from which an interrupted run resumes."""


@dataclass
class ExportConfig:
    top_k: int = 32
    quantization: str = "int8-emb4"
    """Web file weights (atlas.export.QUANTIZATIONS): "int8-emb4" (int8 MatMuls, 4-bit token
    embedding; the default: fast and GPT-2 Small fits 100 MB), "int8" (dynamic int8 everywhere)
    or "int4" (4-bit blockwise MatMul weights: smallest, ~2x slower in the browser)."""
    opset: int = 17
    parity_texts: int = 16
    min_top1_agreement: float = 0.9


@dataclass
class BuildConfig:
    title: str = "Feature Atlas"
    model_name: str = ""
    """How the site names the model (default: model.name)."""
    site_url: str = ""
    """Public URL of the published site, used only for canonical links; pages link relatively."""
    repo_url: str = ""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    path: str = ""
    """The YAML file this config came from (not a key in the file)."""

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else "run"

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.name

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.model.layer}.hook_resid_pre"

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections, the part of the config a stage depends on."""
        data = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.key=value` overrides and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        raw[section][name] = yaml.safe_load(value) if value else ""
    cfg = RunConfig(path=str(path))
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section '{section}' (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        setattr(cfg, section, _build(path, section, _SECTIONS[section], values))
    _validate(path, cfg)
    return cfg


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name != "path"}
_SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in _SECTIONS.items()}


def _build(path: Path, section: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{section}.{key}' (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(path, f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(path: Path, key: str, typ, value):
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ in (int, float) and isinstance(value, str):
        try:  # PyYAML reads 1e6 (no dot) as a string
            value = float(value.replace("_", ""))
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(path: Path, cfg: RunConfig) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            raise ConfigError(f"{path}: '{key}' = {value!r}: {msg}")

    need(cfg.model.layer >= 0, "model.layer", "must be >= 0")
    need(cfg.model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", "must be float32, float16 or bfloat16")
    need(cfg.corpus.ctx_len >= 2, "corpus.ctx_len", "must be >= 2")
    need(cfg.corpus.n_tokens >= cfg.corpus.ctx_len, "corpus.n_tokens", "must hold at least one context")
    need(cfg.corpus.batch_size >= 1, "corpus.batch_size", "must be >= 1")
    need(cfg.corpus.chunk_contexts >= 1, "corpus.chunk_contexts", "must be >= 1")
    need(cfg.corpus.store_dtype in ("float16", "float32"), "corpus.store_dtype", "must be float16 or float32")
    need(0 <= cfg.corpus.eval_fraction < 1, "corpus.eval_fraction", "must be in [0, 1)")
    need(cfg.sae.architecture in ARCHITECTURES, "sae.architecture", f"must be one of {', '.join(ARCHITECTURES)}")
    need(cfg.sae.d_sae >= 1, "sae.d_sae", "must be >= 1")
    need(1 <= cfg.sae.k <= cfg.sae.d_sae, "sae.k", "must be between 1 and d_sae")
    need(cfg.sae.aux_k >= 0, "sae.aux_k", "must be >= 0")
    need(cfg.sae.l1_coefficient >= 0, "sae.l1_coefficient", "must be >= 0")
    need(cfg.sae.b_dec_init in ("geometric_median", "mean", "zeros"), "sae.b_dec_init",
         "must be geometric_median, mean or zeros")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.n_tokens >= 0, "train.n_tokens", "must be >= 0")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(0 <= cfg.train.decay_fraction <= 1, "train.decay_fraction", "must be in [0, 1]")
    need(cfg.analyze.n_top >= 1, "analyze.n_top", "must be >= 1")
    need(cfg.analyze.shard_size >= 1, "analyze.shard_size", "must be >= 1")
    need(cfg.analyze.histogram_bins >= 2, "analyze.histogram_bins", "must be >= 2")
    need(cfg.analyze.map_method in ("umap", "pca"), "analyze.map_method", "must be umap or pca")
    need(cfg.analyze.batch_tokens >= 1, "analyze.batch_tokens", "must be >= 1")
    need(cfg.analyze.n_intervals >= 1, "analyze.n_intervals", "must be >= 1")
    need(cfg.analyze.per_interval >= 0, "analyze.per_interval", "must be >= 0")
    need(cfg.analyze.context_left >= 0, "analyze.context_left", "must be >= 0")
    need(cfg.analyze.context_right >= 0, "analyze.context_right", "must be >= 0")
    need(cfg.analyze.checkpoint_every >= 1, "analyze.checkpoint_every", "must be >= 1")
    need(cfg.export.top_k >= 1, "export.top_k", "must be >= 1")
    need(cfg.export.quantization in ("int8-emb4", "int8", "int4"), "export.quantization",
         "must be int8-emb4, int8 or int4")
