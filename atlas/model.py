"""Model adapter: load a Hugging Face model and read its residual stream before block L.

`hidden_states[L]` in Hugging Face terms is `blocks.L.hook_resid_pre` in TransformerLens
terms: the input of block L. `TruncatedModel` computes exactly that by running the embeddings
and blocks 0..L-1 and nothing after (no final norm, no later blocks, no LM head). The same
module is what `atlas export` traces to ONNX.

Nothing here is GPT-2 specific: decoder models (GPT-2, Llama-style) and encoder models
(BERT-style, e.g. all-MiniLM-L6-v2) are handled by finding their block list and final norm.

Where a model comes from (`model.name`, `model.gguf_file`): a hub id, a folder saved with
`save_pretrained`, or a GGUF file as llama.cpp and Ollama keep models (`model.name: x.gguf`, or a
folder or hub repo plus `model.gguf_file`). transformers reads a GGUF, dequantises its weights to
float32 and rebuilds its tokenizer from the file's metadata: ~25 s for SmolLM2-135M on 2 cores, paid
by every stage that loads the model. So the result is kept once as an ordinary model folder in a
cache keyed by the GGUF's content digest and the converting transformers version (a changed file or
converter gets a new entry; an old entry is never served for it), and later loads take about a second.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atlas.corpus import DOC_SEPARATOR
from atlas.errors import AtlasError, ConfigError
from atlas.hub import hub_reachable
from atlas.stage import sha256_file

GGUF_SUFFIX = ".gguf"

# Where models keep their list of blocks and their final norm, by attribute path.
_BLOCK_PATHS = ("h", "layers", "blocks", "encoder.layer", "decoder.layers")
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(obj, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def resolve_device(device: str) -> torch.device:
    """model.device as a torch device; one that this machine lacks is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"'model.device' = {device!r}: not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'model.device' = {device!r}: this machine has no CUDA device; use auto or cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"'model.device' = {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"'model.device' = {device!r}: MPS is not available here; use auto or cpu")
    return resolved


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.endswith(GGUF_SUFFIX)


def resolve_pretrained(name: str, revision: str = "main", filename: str = "") -> str:
    """Return something `from_pretrained` can load without hanging on an unreachable hub: a local
    folder, a hub id, or with `filename` the local path of that file in the folder or hub repo.

    A local path is used as is; a name that cannot be a hub id ("runs/x/model", "./m", "m.gguf") must
    be one. A hub id is used from the local cache when it is there; otherwise the hub must answer
    within seconds, else a one-line error names the alternatives.
    """
    if Path(name).exists():
        return str(Path(name) / filename) if filename else name
    if not _is_hub_id(name):
        raise AtlasError(f"model path '{name}' does not exist")
    from huggingface_hub import hf_hub_download, snapshot_download

    def fetch(**kw) -> str:
        if filename:
            return hf_hub_download(name, filename, revision=revision, **kw)
        return snapshot_download(name, revision=revision, **kw)

    try:
        return fetch(local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise AtlasError(
            f"cannot reach the Hugging Face hub and model '{name}' is not in the local cache; "
            f"point the config at a local directory (--set model.name=PATH, or "
            f"make site MODEL=PATH DATASET=FILE), or run the offline demo: make demo"
        )
    if not filename:
        return name  # from_pretrained downloads what it needs
    try:
        return fetch()
    except Exception as e:
        raise AtlasError(f"cannot download '{filename}' from '{name}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass
class LoadedModel:
    """A model ready to use: the full model (with LM head when it has one) and its tokenizer."""

    model: nn.Module
    """The full model; its `base_model` holds the blocks."""
    tokenizer: object
    """A fast `transformers` tokenizer."""
    name: str
    revision: str
    n_layers: int
    d_model: int
    has_lm_head: bool

    @property
    def bos_token_id(self) -> int:
        """The token every context starts with.

        A tokenizer that adds a BOS itself (Llama: <s>, BERT: [CLS]) shows what the model saw first in
        training, so that one. One that adds none (GPT-2, SmolLM2) belongs to a model pretrained on
        documents packed into one stream with the separator between them, so a context starts as a
        document does there: after the separator. For SmolLM2-Instruct that is <|endoftext|>, not its
        BOS <|im_start|>, which opens a chat turn and never occurred in pretraining.
        """
        t = self.tokenizer
        with_special = t("a")["input_ids"]
        plain = t("a", add_special_tokens=False)["input_ids"]
        if len(with_special) > len(plain) and with_special[0] != plain[0]:
            return int(with_special[0])
        return self.separator_token_id

    @property
    def separator_token_id(self) -> int:
        """The token placed between documents: the pretraining stream's separator.

        <|endoftext|> where the vocabulary has it (GPT-2, SmolLM2, Qwen: byte-level BPE models whose
        pretraining packs documents with it) -- an instruct model's EOS (SmolLM2-Instruct: <|im_end|>)
        ends a chat turn, not a document; else EOS (Llama: </s>), else [SEP] (BERT).
        """
        t = self.tokenizer
        for tid in (t.get_vocab().get(DOC_SEPARATOR), t.eos_token_id, t.sep_token_id, t.bos_token_id):
            if tid is not None:
                return int(tid)
        raise AtlasError(f"tokenizer of '{self.name}' has no <|endoftext|>, EOS, SEP or BOS token")

    def truncated(self, layer: int) -> "TruncatedModel":
        return TruncatedModel(self.model, layer)

    def unembedding(self) -> torch.Tensor | None:
        """W_U as [d_model, vocab] with the final norm's scale folded in, or None without an LM head.

        Logit effects of a feature are W_dec[i] @ W_U. The final layer norm is treated as in
        sae_vis/Neuronpedia: its centring and variance normalisation depend on the whole residual
        and are left out; its per-dimension scale (gamma) is folded into W_U, since it multiplies
        every direction alike.
        """
        if not self.has_lm_head:
            return None
        w_u = self.model.get_output_embeddings().weight.detach().float().T  # [d_model, vocab]
        norm = next((m for p in _FINAL_NORMS if (m := _get(self.model.base_model, p)) is not None), None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            w_u = norm.weight.detach().float()[:, None] * w_u
        return w_u

    def splice(self, layer: int, fn):
        """Context manager: replace the residual stream before block `layer` with fn(resid)."""
        block = _blocks(self.model.base_model)[1][layer]

        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        class _Splice:
            def __enter__(self_inner):
                self_inner.handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)

            def __exit__(self_inner, *exc):
                self_inner.handle.remove()

        return _Splice()


def _blocks(base: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _BLOCK_PATHS:
        blocks = _get(base, path)
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise AtlasError(f"cannot find the list of blocks in {type(base).__name__}")


class TruncatedModel(nn.Module):
    """Embeddings and blocks 0..L-1 of a model: input ids -> residual stream before block L."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        base = copy.copy(model.base_model)  # shallow: shares parameters, own module dicts
        base._modules = dict(base._modules)
        path, blocks = _blocks(base)
        if "." in path:  # e.g. BERT's encoder.layer: copy the parent too, so the original keeps its blocks
            parent_path = path.rsplit(".", 1)[0]
            parent = copy.copy(_get(base, parent_path))
            parent._modules = dict(parent._modules)
            _set(base, parent_path, parent)
        _set(base, path, nn.ModuleList(list(blocks)[:layer]))
        for norm in _FINAL_NORMS:
            if _get(base, norm) is not None:
                _set(base, norm, nn.Identity())
        if "pooler" in base._modules:
            base._modules["pooler"] = None
        self.base = base
        self.layer = layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask = torch.ones_like(input_ids)
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def residuals(self, input_ids: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """One forward pass -> {layer: residual stream before block `layer`} for every layer in
        `layers` (each at most `self.layer`): the inputs of the earlier blocks, caught as they go by."""
        caught: dict[int, torch.Tensor] = {}
        blocks = _blocks(self.base)[1]

        def catch(layer: int):
            def pre_hook(module, args, kwargs):
                caught[layer] = args[0] if args else kwargs["hidden_states"]
            return pre_hook

        handles = [blocks[layer].register_forward_pre_hook(catch(layer), with_kwargs=True)
                   for layer in layers if layer < self.layer]
        try:
            last = self(input_ids)
        finally:
            for h in handles:
                h.remove()
        if self.layer in layers:
            caught[self.layer] = last
        return {layer: caught[layer] for layer in layers}


def load_model(name: str, revision: str = "main", device: str = "cpu", dtype: str = "float32",
               gguf_file: str = "") -> LoadedModel:
    """Load a model and its fast tokenizer: hub id, local folder, or GGUF file (see the module doc)."""
    import transformers
    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if name.endswith(GGUF_SUFFIX) or gguf_file:
        source = str(gguf_folder(Path(resolve_pretrained(name, revision, gguf_file))))
    else:
        source = resolve_pretrained(name, revision)
    kw = {} if Path(source).exists() else {"revision": revision}
    _check_folder(source)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kw)
        causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(source, dtype=getattr(torch, dtype), **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
    except SafetensorError as e:
        fix = (f"delete {source} to convert the GGUF again" if Path(source).is_relative_to(cache_dir())
               else "download or save the model again")
        raise AtlasError(f"{_unreadable_weights(source) or name}: unreadable weights ({_first_line(e)}); "
                         f"the file is truncated or corrupt: {fix}") from None
    except (OSError, ValueError) as e:
        raise AtlasError(f"cannot load model '{name}': {_first_line(e)}") from None
    _check_tokenizer(name, tokenizer)
    model.eval().requires_grad_(False).to(resolve_device(device))
    _, blocks = _blocks(model.base_model)
    d_model = getattr(config, "n_embd", None) or config.hidden_size
    return LoadedModel(model, tokenizer, name, revision, len(blocks), int(d_model), causal)


def _check_folder(source: str) -> None:
    """A local folder must be one `save_pretrained` wrote; say so, naming GGUF files found instead."""
    folder = Path(source)
    if not folder.is_dir() or (folder / "config.json").exists():
        return
    ggufs = sorted(f.name for f in folder.glob(f"*{GGUF_SUFFIX}"))
    if ggufs:
        raise AtlasError(f"{folder}: no config.json, but GGUF files ({', '.join(ggufs)}): "
                         f"set model.gguf_file to one, or model.name to its path")
    raise AtlasError(f"{folder}: no config.json: not a model folder (save_pretrained writes one)")


def _unreadable_weights(folder: str) -> Path | None:
    """The first safetensors file in a local folder whose header cannot be read."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else ():
        try:
            with safe_open(f, "pt"):
                pass
        except Exception:
            return f
    return None


def _check_tokenizer(name: str, tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AtlasError(f"model '{name}' has no fast tokenizer (tokenizer.json); the browser needs one")
    # Without tokenizer files transformers builds an empty one that encodes every text to nothing,
    # and a collection would store token id 0 everywhere.
    ids = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise AtlasError(f"model '{name}' has no usable tokenizer (it encodes text to "
                         f"{'nothing' if not ids else 'unknown tokens only'}); the model folder needs "
                         f"tokenizer.json or the tokenizer's vocabulary files")


# ---------------------------------------------------------------- GGUF


def cache_dir() -> Path:
    """Where converted models are kept: $ATLAS_CACHE, else $XDG_CACHE_HOME/feature-atlas (~/.cache)."""
    if os.environ.get("ATLAS_CACHE"):
        return Path(os.environ["ATLAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "feature-atlas"


def gguf_folder(path: Path) -> Path:
    """A model folder holding the GGUF's weights dequantised to float32 and its tokenizer.

    Converted once per (file content, transformers version); an entry appears by an atomic rename
    when complete, so an existing entry is a finished one, and concurrent converters (torchrun
    ranks) cannot leave a half-written one behind.
    """
    import transformers

    if not path.is_file():
        raise AtlasError(f"{path}: no such GGUF file")
    key = f"{sha256_file(path)[:32]}-transformers-{transformers.__version__}"
    folder = cache_dir() / "gguf" / key
    if folder.is_dir():
        return folder
    print(f"model: converting {path.name} to float32 (once per file) into {folder}")
    tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
    try:
        _convert_gguf(path, tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(path: Path, out: Path) -> None:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    except Exception as e:  # the gguf reader fails on damaged files with any of several errors
        raise AtlasError(f"{path}: cannot read this GGUF file ({_first_line(e)})") from None
    # transformers refuses save_pretrained on a model it loaded from GGUF (its quantization_config
    # marks it so), though the weights are plain float32 tensors by now: copy them to a fresh model.
    config = model.config
    del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_ctx_len(cfg_path: str, ctx_len: int, loaded: LoadedModel) -> None:
    """A context must fit the model's positions (checked before any output is touched)."""
    config = loaded.model.config
    positions = next((int(v) for key in ("n_positions", "max_position_embeddings")
                      if isinstance(v := getattr(config, key, None), int) and v > 0), None)
    if positions is not None and ctx_len > positions:
        raise ConfigError(f"{cfg_path}: 'corpus.ctx_len' = {ctx_len}: {loaded.name} has {positions} positions; "
                          f"set corpus.ctx_len to at most {positions}")


def check_layer(cfg_path: str, layer: int, loaded: LoadedModel) -> None:
    if not 0 <= layer < loaded.n_layers:
        raise ConfigError(
            f"{cfg_path}: 'model.layer' = {layer}: {loaded.name} has {loaded.n_layers} blocks "
            f"(layers 0..{loaded.n_layers - 1})"
        )
