"""Model adapter: load a Hugging Face model and read its residual stream before block L.

`hidden_states[L]` in Hugging Face terms is `blocks.L.hook_resid_pre` in TransformerLens
terms: the input of block L. `TruncatedModel` computes exactly that by running the embeddings
and blocks 0..L-1 and nothing after (no final norm, no later blocks, no LM head). The same
module is what `atlas export` traces to ONNX.

Nothing here is GPT-2 specific: decoder models (GPT-2, Llama-style) and encoder models
(BERT-style, e.g. all-MiniLM-L6-v2) are handled by finding their block list and final norm.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError, ConfigError

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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(name: str, revision: str = "main", what: str = "model") -> str:
    """Return something `from_pretrained` can load without hanging on an unreachable hub.

    A local directory is used as is. A hub id is used from the local cache when it is there;
    otherwise the hub must answer within seconds, else a one-line error names the alternatives.
    """
    if Path(name).exists():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise AtlasError(
            f"cannot reach the Hugging Face hub and {what} '{name}' is not in the local cache; "
            f"point the config at a local directory (--set model.name=PATH, or "
            f"make site MODEL=PATH DATASET=FILE), or run the offline demo: make demo"
        )
    return name


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
        t = self.tokenizer
        for tid in (t.bos_token_id, t.cls_token_id, t.eos_token_id):
            if tid is not None:
                return int(tid)
        raise AtlasError(f"tokenizer of '{self.name}' has no BOS, CLS or EOS token")

    @property
    def separator_token_id(self) -> int:
        """The token placed between documents (GPT-2: <|endoftext|>, BERT: [SEP])."""
        t = self.tokenizer
        for tid in (t.eos_token_id, t.sep_token_id, t.bos_token_id):
            if tid is not None:
                return int(tid)
        raise AtlasError(f"tokenizer of '{self.name}' has no EOS or SEP token")

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


def load_model(name: str, revision: str = "main", device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model and its fast tokenizer by hub id or local directory."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    source = resolve_pretrained(name, revision)
    kw = {} if Path(source).exists() else {"revision": revision}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kw)
        causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(source, dtype=getattr(torch, dtype), **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise AtlasError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise AtlasError(f"model '{name}' has no fast tokenizer (tokenizer.json); the browser needs one")
    model.eval().requires_grad_(False).to(resolve_device(device))
    _, blocks = _blocks(model.base_model)
    d_model = getattr(config, "n_embd", None) or config.hidden_size
    return LoadedModel(model, tokenizer, name, revision, len(blocks), int(d_model), causal)


def check_layer(cfg_path: str, layer: int, loaded: LoadedModel) -> None:
    if not 0 <= layer < loaded.n_layers:
        raise ConfigError(
            f"{cfg_path}: 'model.layer' = {layer}: {loaded.name} has {loaded.n_layers} blocks "
            f"(layers 0..{loaded.n_layers - 1})"
        )
