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
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from atlas.errors import ConfigError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
"""sae.architecture values, the one list: atlas/saes/registry.py maps each to its class."""
WEB_QUANTIZATIONS = ("auto", "w8-emb4", "w8", "f16")
"""export.quantization values: atlas.export.QUANTIZATIONS plus "auto" (kept equal by a test)."""
OPSETS = range(14, 22)
"""export.opset values: what torch.onnx writes and onnxruntime(-web) runs."""
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# Bounds on what a config file may be, so that no file makes the loader (or a message) run away.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
"""Nodes after expanding aliases: a "billion laughs" file is refused, not expanded."""
MAX_INT = 2**53
"""Larger integers are no size or count any machine holds; refused before numpy or torch overflow."""


@dataclass
class ModelConfig:
    name: str = "gpt2"
    """Hugging Face hub id, a local directory saved with `save_pretrained`, or a `.gguf` file."""
    gguf_file: str = ""
    """A GGUF file inside `name` (a local directory or a hub repo), e.g. "model.Q4_1.gguf"."""
    revision: str = "main"
    layer: int | list[int] = 8
    """Residual stream before block `layer` (`hidden_states[layer]`, `blocks.L.hook_resid_pre`). A list
    of layers makes the run a suite: one collection for every hook, one SAE per (layer, width)
    (atlas/suite.py)."""
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
    d_sae: int | list[int] = 24576
    """Latents; a list trains one SAE per width at every layer (a width family, atlas/suite.py)."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka: on average over the batch)."""
    aux_k: int = 512
    """Latents in the AuxK loss for dead latents (topk, batchtopk)."""
    aux_k_coefficient: float = 1 / 32
    lr_scale_w_dec: float | None = None
    """Multiplier of train.lr for W_dec (W_enc steps at train.lr itself); unset: the architecture's
    default (topk 10, batchtopk 1, relu and jumprelu 1). Recorded in the saved cfg.json."""
    lr_scale_b_enc: float | None = None
    """The same for b_enc (default: topk and batchtopk 10, relu and jumprelu 1)."""
    lr_scale_b_dec: float | None = None
    """The same for b_dec (default: topk and batchtopk 10, relu and jumprelu 1)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty (relu): lambda * sum_i f_i * ||W_dec_i||."""
    resample_dead: bool = False
    """relu only: re-initialise dead latents on high-loss inputs, as the original work did."""
    matryoshka_groups: list[float] = field(default_factory=list)
    """matryoshka only: the nested prefixes' widths, increasing, each trained to reconstruct on its
    own -- latent counts (e.g. [768, 3072, 24576]) or fractions of d_sae (e.g. [0.0625, 0.25, 1]);
    d_sae is added as the last when missing. Empty: fractions 1/64, 1/16, 1/4, 1. The saved
    cfg.json records the widths used."""
    b_dec_init: str = "geometric_median"
    """"geometric_median", "mean" or "zeros"."""


@dataclass
class TrainConfig:
    batch_size: int = 4096
    n_tokens: int = 0
    """Training tokens; 0 means one pass over the store's training split."""
    lr: float | None = None
    """Adam's learning rate (W_enc's; the other parameters step at a multiple, sae.lr_scale_*).
    Unset: derived from the data, 2e-4 * sqrt(768 / d_model) (atlas.train.trainer.default_lr):
    2e-4 for GPT-2 Small. Every architecture but relu and jumprelu is tested to learn a planted
    dictionary anywhere from a third of that to three times it (tests/test_sae.py)."""
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
    source: str = "store"
    """Where the training rows come from: "store" (the run's activations.h5) or "model" (computed
    on the fly, atlas/train/model_source.py: the model run over the corpus' contexts, the store's
    held-out ones skipped, so n_tokens may exceed the store; a forward pass per training token)."""


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
    explainer: str = "best-rule"
    """Which labeller writes feature labels (atlas/labels/ registry): "best-rule" (the best checkable
    rule per feature, atlas/labels/rules.py), "top-tokens", one rule kind ("token-set", "bigram",
    "trigram", "after-token", "char-class"), or "openai-compatible" (an LLM; the explainer_* keys)."""
    label_tokens: int = 262_144
    """Tokens in each of the two label splits (alternating blocks of contexts, atlas/labels/data.py):
    rule explainers choose their rules on one, every label is scored on the other."""
    explainer_base_url: str = ""
    """openai-compatible: the API's base URL, e.g. http://localhost:11434/v1 (Ollama),
    http://localhost:8080/v1 (llama.cpp server), http://localhost:8000/v1 (vLLM)."""
    explainer_model: str = ""
    """openai-compatible: the model name the endpoint serves."""
    explainer_api_key_env: str = ""
    """openai-compatible: the environment variable holding the API key ("" sends none)."""
    explainer_concurrency: int = 4
    """openai-compatible: requests in flight at once."""
    explainer_retries: int = 5
    """openai-compatible: retries of a failed request (exponential backoff, Retry-After honoured)."""
    explainer_timeout: float = 120.0
    """openai-compatible: seconds to wait for one answer."""
    explainer_detection_contexts: int = 20
    """openai-compatible: held-out contexts shown per feature for its detection score (half firing)."""
    skip_bos: bool = True
    """Leave out the BOS position of every context (its residual is an outlier that many features fire on)."""
    checkpoint_every: int = 50
    """Batches between checkpoints of the streaming state, from which an interrupted run resumes."""


@dataclass
class ExportConfig:
    top_k: int = 32
    quantization: str = "auto"
    """Web file weights (atlas.export.QUANTIZATIONS; activations always stay float): "auto" keeps the
    smallest mode that passes the parity gate below; "w8-emb4" (8-bit MatMul weights, 4-bit token
    embedding: GPT-2 Small to layer 8 fits 100 MB), "w8" (8 bits throughout, finer blocks) or "f16"
    (float16 weights: twice w8's bytes, for what 8 bits cannot hold, such as the demo's steering file)."""
    opset: int = 17
    parity_texts: int = 16
    """Held-out contexts the web file is checked on against PyTorch (the store's last ones)."""
    min_top1_agreement: float = 0.97
    """The gate: share of tokens whose strongest latent in the web file is PyTorch's..."""
    min_topk_overlap: float = 0.95
    """...and mean share of PyTorch's active top-k latents the web file also has in its top k."""
    steering: bool = False
    """Also export the steering web file (the whole model with a KV cache, atlas/export/steering.py)."""
    min_steer_agreement: float = 0.95
    """Its gate: share of greedy tokens (20 per held-out prompt) equal to PyTorch's."""


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
    overrides: tuple[str, ...] = ()
    """The `--set` overrides applied to it, so a message can name the exact command to rerun."""
    member: str = ""
    """The suite member (atlas/suite.py) this config stands for, e.g. "L8"; "" for the run itself."""

    # ---- where a run's outputs live: the one place that names them ----------------------------

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else "run"

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.name

    @property
    def store_path(self) -> Path:
        """The activation store, one per run (every hook of a suite)."""
        return self.run_dir / "activations.h5"

    @property
    def onnx_dir(self) -> Path:
        return self.run_dir / "onnx"

    @property
    def site_dir(self) -> Path:
        return self.run_dir / "site"

    @property
    def links_dir(self) -> Path:
        """How a suite's features relate across its SAEs (atlas/links.py)."""
        return self.run_dir / "links"

    @property
    def member_dir(self) -> Path:
        """The folder holding one SAE's outputs: the run folder itself for a run of one SAE,
        runs/<name>/saes/<member id>/ for a member of a suite."""
        return self.run_dir / "saes" / self.member if self.member else self.run_dir

    @property
    def sae_dir(self) -> Path:
        return self.member_dir / "sae"

    @property
    def checkpoint_dir(self) -> Path:
        """Training state while `atlas train` runs (atlas/train)."""
        return self.member_dir / "sae.ckpt"

    @property
    def features_dir(self) -> Path:
        return self.member_dir / "features"

    @property
    def llm_cache_dir(self) -> Path:
        return self.member_dir / "llm-cache"

    @property
    def layers(self) -> tuple[int, ...]:
        """model.layer as a sorted tuple (one entry for a run of one hook)."""
        return _as_tuple(self.model.layer)

    @property
    def widths(self) -> tuple[int, ...]:
        """sae.d_sae as a sorted tuple."""
        return _as_tuple(self.sae.d_sae)

    @property
    def hook_name(self) -> str:
        """The hook of a run of one layer (a suite's config has one per member: `hook_name(layer)`)."""
        if isinstance(self.model.layer, list):
            raise ValueError("a suite's config has several hooks; use its members (atlas/suite.py)")
        return hook_name(self.model.layer)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections, the part of the config a stage depends on."""
        data = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d.pop("overrides")
        d.pop("member")
        return d


def hook_name(layer: int) -> str:
    """The residual stream before block `layer`, in TransformerLens/SAELens terms."""
    return f"blocks.{layer}.hook_resid_pre"


def _as_tuple(value: int | list[int]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.key=value` overrides and validate it."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
        raw = _load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    _check_run_name(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {_show(item)}: expected section.key=value")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        raw[section][name] = _load_yaml(value, f"--set {_show(item)}", "not a YAML value") if value else ""
    cfg = RunConfig(path=str(path), overrides=tuple(overrides))
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section {_show(section)} (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        setattr(cfg, section, _build(path, section, _SECTIONS[section], values))
    _validate(path, cfg)
    return cfg


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name not in ("path", "overrides", "member")}
_SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in _SECTIONS.items()}


def _build(path: Path, section: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key '{section}.{_show(key, quote=False)}' "
                              f"(known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(path, f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(path: Path, key: str, typ, value):
    if isinstance(typ, types.UnionType):
        args = [t for t in typing.get_args(typ) if t is not type(None)]
        if list[int] in args:  # `int | list[int]` (a suite's layers or widths): a list of one is the int
            if not isinstance(value, list):
                return _coerce(path, key, int, value)
            if not value:
                raise ConfigError(f"{path}: '{key}' must be an int or a non-empty list of ints, got []")
            items = [_coerce(path, key, int, v) for v in value]
            if len(set(items)) != len(items):
                raise ConfigError(f"{path}: '{key}' = {value!r}: lists the same value twice")
            return items[0] if len(items) == 1 else sorted(items)
        typ = args[0]
    if typing.get_origin(typ) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(path, key, typing.get_args(typ)[0], v) for v in value]
    if typ in (int, float) and isinstance(value, str):
        try:  # PyYAML reads 1e6 (no dot) as a string
            value = float(value.replace("_", ""))
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: '{key}' must be a finite number, got {_show(value)}")
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: '{key}' must be {typ.__name__}, got {type(value).__name__} {_show(value)}")
    if typ is int and abs(value) > MAX_INT:
        raise ConfigError(f"{path}: '{key}' = {value:.3g}: too large (at most 2^53)")
    return value


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlong = 40


def _show(value, quote: bool = True) -> str:
    """A value as a message shows it: short, whatever its size (a message never prints a whole file)."""
    text = _repr.repr(value) if quote else _repr.repr(str(value))[1:-1]
    return text


def _check_run_name(path: Path) -> None:
    """The run folder is runs/<file stem>: a stem that is empty, a dot name or hidden would put the
    run in runs/ itself or the project root, beside and over other runs' files."""
    name = path.stem
    if not name or name.startswith(".") or any(c in name for c in "/\\") or not name.isprintable():
        raise ConfigError(f"{path}: the run folder is named after the config file, and {_show(name)} cannot "
                          f"name a folder in runs/ (empty, a dot name or hidden); rename the file, e.g. to run.yaml")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_show(key)}",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                pass
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str, what: str = "not valid YAML"):
    """Parse YAML with bounds: nesting depth, nodes after alias expansion; one ConfigError on any problem."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):  # the event parser is iterative: no recursion
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep "
                                      f"(line {event.start_mark.line + 1})")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
                raise ConfigError(f"{where}: more than {MAX_YAML_NODES:,} values once its aliases are expanded")
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = _show(getattr(e, "problem", None) or str(e), quote=False)
        raise ConfigError(f"{where}: {what}{line}: {problem}") from None


def _expanded_size(node, sizes: dict) -> int:
    """How many nodes `node` stands for with every alias expanded (shared nodes counted each time)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias counts once
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        n = 1
    sizes[id(node)] = n = min(n, MAX_YAML_NODES + 1)
    return n


def _matryoshka_groups_ok(sae: SAEConfig) -> bool:
    groups = sae.matryoshka_groups
    if not groups:
        return True
    increasing = all(a < b for a, b in zip(groups, groups[1:]))
    fractions = groups[0] > 0 and groups[-1] <= 1
    widths = groups[0] >= 1 and groups[-1] <= min(_as_tuple(sae.d_sae)) and all(float(g).is_integer() for g in groups)
    return sae.architecture == "matryoshka" and increasing and (fractions or widths)


def _validate(path: Path, cfg: RunConfig) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            raise ConfigError(f"{path}: '{key}' = {_show(value)}: {msg}")

    need(min(cfg.layers) >= 0, "model.layer", "must be >= 0")
    need(not cfg.model.gguf_file or cfg.model.gguf_file.endswith(".gguf"), "model.gguf_file", "must end in .gguf")
    need(not (cfg.model.gguf_file and cfg.model.name.endswith(".gguf")), "model.gguf_file",
         "model.name is a .gguf file already; set model.gguf_file only with a directory or hub repo")
    need(cfg.model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", "must be float32, float16 or bfloat16")
    need(bool(DEVICE.fullmatch(cfg.model.device)), "model.device", "must be auto, cpu, cuda, cuda:N or mps")
    need(cfg.corpus.ctx_len >= 2, "corpus.ctx_len", "must be >= 2")
    need(cfg.corpus.n_tokens >= cfg.corpus.ctx_len, "corpus.n_tokens", "must hold at least one context")
    need(cfg.corpus.batch_size >= 1, "corpus.batch_size", "must be >= 1")
    need(cfg.corpus.chunk_contexts >= 1, "corpus.chunk_contexts", "must be >= 1")
    need(cfg.corpus.store_dtype in ("float16", "float32"), "corpus.store_dtype", "must be float16 or float32")
    need(0 <= cfg.corpus.eval_fraction < 1, "corpus.eval_fraction", "must be in [0, 1)")
    need(cfg.sae.architecture in ARCHITECTURES, "sae.architecture", f"must be one of {', '.join(ARCHITECTURES)}")
    need(1 <= min(cfg.widths) and max(cfg.widths) < 2**31, "sae.d_sae", "must be between 1 and 2^31 - 1")
    need(1 <= cfg.sae.k <= min(cfg.widths), "sae.k", "must be between 1 and d_sae")
    need(0 <= cfg.sae.aux_k <= min(cfg.widths), "sae.aux_k", "must be between 0 and d_sae")
    for key in ("lr_scale_w_dec", "lr_scale_b_enc", "lr_scale_b_dec"):
        need(getattr(cfg.sae, key) is None or getattr(cfg.sae, key) > 0, f"sae.{key}", "must be > 0")
    need(_matryoshka_groups_ok(cfg.sae), "sae.matryoshka_groups",
         "for sae.architecture matryoshka only: increasing widths up to d_sae, or fractions in (0, 1]")
    need(cfg.sae.l1_coefficient >= 0, "sae.l1_coefficient", "must be >= 0")
    need(cfg.sae.b_dec_init in ("geometric_median", "mean", "zeros"), "sae.b_dec_init",
         "must be geometric_median, mean or zeros")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.n_tokens >= 0, "train.n_tokens", "must be >= 0")
    need(cfg.train.lr is None or cfg.train.lr > 0, "train.lr", "must be > 0 (or unset: derived from the data)")
    need(0 <= cfg.train.decay_fraction <= 1, "train.decay_fraction", "must be in [0, 1]")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(cfg.train.l1_warmup_steps >= 0, "train.l1_warmup_steps", "must be >= 0")
    need(cfg.train.dead_after_tokens >= 1, "train.dead_after_tokens", "must be >= 1")
    need(cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    need(cfg.train.in_memory_max_gb >= 0, "train.in_memory_max_gb", "must be >= 0")
    need(cfg.train.source in ("store", "model"), "train.source", "must be store or model")
    need(cfg.analyze.n_top >= 1, "analyze.n_top", "must be >= 1")
    need(cfg.analyze.shard_size >= 1, "analyze.shard_size", "must be >= 1")
    need(2 <= cfg.analyze.histogram_bins <= 10_000, "analyze.histogram_bins", "must be between 2 and 10,000")
    need(cfg.analyze.map_method in ("umap", "pca"), "analyze.map_method", "must be umap or pca")
    need(cfg.analyze.batch_tokens >= 1, "analyze.batch_tokens", "must be >= 1")
    need(cfg.analyze.n_intervals >= 1, "analyze.n_intervals", "must be >= 1")
    need(cfg.analyze.per_interval >= 0, "analyze.per_interval", "must be >= 0")
    need(cfg.analyze.context_left >= 0, "analyze.context_left", "must be >= 0")
    need(cfg.analyze.context_right >= 0, "analyze.context_right", "must be >= 0")
    need(cfg.analyze.checkpoint_every >= 1, "analyze.checkpoint_every", "must be >= 1")
    need(cfg.analyze.n_neighbours >= 0, "analyze.n_neighbours", "must be >= 0")
    need(cfg.analyze.n_logits >= 0, "analyze.n_logits", "must be >= 0")
    need(0 <= cfg.analyze.dense_threshold <= 1, "analyze.dense_threshold", "must be in [0, 1]")
    need(cfg.analyze.label_tokens >= 0, "analyze.label_tokens", "must be >= 0")
    need(cfg.analyze.explainer != "openai-compatible" or bool(cfg.analyze.explainer_base_url),
         "analyze.explainer_base_url", "must be set for the openai-compatible explainer (e.g. http://localhost:11434/v1)")
    need(not cfg.analyze.explainer_base_url or bool(re.fullmatch(r"https?://[^/\s]+\S*", cfg.analyze.explainer_base_url)),
         "analyze.explainer_base_url", "must be an http(s) URL")
    need(cfg.analyze.explainer != "openai-compatible" or bool(cfg.analyze.explainer_model),
         "analyze.explainer_model", "must be set for the openai-compatible explainer")
    need(cfg.analyze.explainer_concurrency >= 1, "analyze.explainer_concurrency", "must be >= 1")
    need(cfg.analyze.explainer_retries >= 0, "analyze.explainer_retries", "must be >= 0")
    need(cfg.analyze.explainer_timeout > 0, "analyze.explainer_timeout", "must be > 0")
    need(cfg.analyze.explainer_detection_contexts >= 2, "analyze.explainer_detection_contexts", "must be >= 2")
    # site_url ends up in attributes of every page: a plain http(s) URL or nothing
    need(not cfg.build.site_url or bool(re.fullmatch(r"https?://[^\s\"'<>`]+", cfg.build.site_url)),
         "build.site_url", "must be an http(s) URL")
    need(cfg.export.top_k >= 1, "export.top_k", "must be >= 1")  # and at most the SAE's d_sae (atlas export)
    need(cfg.export.parity_texts >= 1, "export.parity_texts", "must be >= 1")
    need(cfg.export.opset in OPSETS, "export.opset", f"must be between {OPSETS[0]} and {OPSETS[-1]}")
    need(cfg.export.quantization in WEB_QUANTIZATIONS, "export.quantization",
         f"must be one of {', '.join(WEB_QUANTIZATIONS)}")
    need(0 <= cfg.export.min_top1_agreement <= 1, "export.min_top1_agreement", "must be in [0, 1]")
    need(0 <= cfg.export.min_topk_overlap <= 1, "export.min_topk_overlap", "must be in [0, 1]")
    need(0 <= cfg.export.min_steer_agreement <= 1, "export.min_steer_agreement", "must be in [0, 1]")
