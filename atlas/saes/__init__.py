"""Sparse autoencoders: one module per architecture over a shared base (`base.py`).

    build_sae(cfg.sae, d_in)  -> a freshly initialised SparseAutoencoder
    sae.save(dir)             -> dir/cfg.json + dir/sae_weights.safetensors (SAELens format)
    load_sae(dir)             -> the SAE in dir, ours or SAELens's (standard, topk, jumprelu)
    sae.encode(x)             -> dense latents [n, d_sae];  sae.decode(f) -> [n, d_in]
    sae.encode_sparse(x)      -> SparseCodes: (row, latent id, value) of every active latent
    sae.encode_top(x, k)      -> TopLatents: the k strongest latents per row, and how many are active
    sae.encode_topk(x, k)     -> (values, indices) of the k largest latents per row

Adding an architecture is one module here and one line in `registry.py`: the stages call these
methods and never ask which architecture they hold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from atlas.config import SAEConfig
from atlas.errors import AtlasError
from atlas.saes.base import (CFG_FILE, CONFIG_KEY, WEIGHTS_FILE, ForwardOutput, SparseAutoencoder, SparseCodes,
                             TopLatents)
from atlas.saes.registry import ARCHITECTURES, SAELENS_ARCHITECTURES

__all__ = ["build_sae", "load_sae", "SparseAutoencoder", "SparseCodes", "TopLatents", "ForwardOutput",
           "ARCHITECTURES", "CFG_FILE", "WEIGHTS_FILE"]


def build_sae(cfg: SAEConfig, d_in: int, seed: int = 0, metadata: dict | None = None) -> SparseAutoencoder:
    """A new SAE of `cfg.architecture`, initialised (decoder random, encoder = decoder^T)."""
    if cfg.architecture not in ARCHITECTURES:
        raise AtlasError(f"unknown SAE architecture '{cfg.architecture}' (known: {', '.join(ARCHITECTURES)})")
    sae = ARCHITECTURES[cfg.architecture](cfg, d_in, metadata=metadata)
    sae.initialize(torch.Generator().manual_seed(seed))
    return sae


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder (cfg.json + sae_weights.safetensors) written here or by SAELens."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise AtlasError(f"{p}: missing; an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    raw = _read_cfg(cfg_path)
    raw = _v6_layout(raw)
    arch = raw.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in SAELENS_ARCHITECTURES:
        raise AtlasError(f"{cfg_path}: architecture {str(arch)[:80]!r} is not supported "
                         f"(supported: {', '.join(SAELENS_ARCHITECTURES)})")
    for key, ok in (("normalize_activations", ("none", None)), ("reshape_activations", ("none", None))):
        if raw.get(key) not in ok:
            raise AtlasError(f"{cfg_path}: '{key}' = {str(raw.get(key))[:80]!r} is not supported (only 'none'); "
                             f"fold the normalisation into the weights first")
    for key in ("d_in", "d_sae"):  # read by the architecture's from_saelens_cfg, which allocates them
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**31:
            raise AtlasError(f"{cfg_path}: '{key}' = {str(value)[:40]}: needs an integer between 1 and 2^31 - 1")
    if not isinstance(raw.get("metadata", {}), dict):
        raise AtlasError(f"{cfg_path}: 'metadata' must be a JSON object, got {type(raw['metadata']).__name__}")
    _check_shapes(weights_path, raw["d_in"], raw["d_sae"])
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types
        raise AtlasError(f"{weights_path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None

    cls = SAELENS_ARCHITECTURES[arch]
    sae = cls.from_saelens_cfg(raw, _recorded_config(raw.get("metadata") or {}, cfg_path), cfg_path)
    sae.load_saelens_state(state, raw, weights_path)
    return sae.to(device).eval().requires_grad_(False)


def _read_cfg(cfg_path: Path) -> dict:
    """cfg.json as a dict, or one line saying why it is not one (encoding, syntax, depth, size)."""
    if cfg_path.stat().st_size > 1 << 20:
        raise AtlasError(f"{cfg_path}: {cfg_path.stat().st_size:,} bytes; an SAE's cfg.json is a few kB")
    try:
        raw = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AtlasError(f"{cfg_path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise AtlasError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise AtlasError(f"{cfg_path}: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise AtlasError(f"{cfg_path}: expected a JSON object")
    return raw


def _check_shapes(weights_path: Path, d_in: int, d_sae: int) -> None:
    """The tensors must have the shapes cfg.json declares, read from the file's header before any
    SAE of that size is allocated (a cfg.json declaring a huge d_sae over small tensors)."""
    from safetensors import safe_open

    want = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_enc": [d_sae], "b_dec": [d_in]}
    try:
        with safe_open(str(weights_path), "pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in want if name in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise AtlasError(f"{weights_path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    for name, shape in shapes.items():
        if shape != want[name]:
            raise AtlasError(f"{weights_path}: '{name}' has shape {shape}, but cfg.json declares d_in = {d_in}, "
                             f"d_sae = {d_sae} (so {want[name]})")


def _recorded_config(metadata: dict, cfg_path: Path) -> SAEConfig:
    """The SAEConfig our trainer recorded in metadata (defaults for folders written elsewhere)."""
    recorded = metadata.get(CONFIG_KEY) if isinstance(metadata, dict) else None
    if not isinstance(recorded, dict):
        return SAEConfig()
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    try:  # keys a newer version added are left out
        return SAEConfig(**{k: v for k, v in recorded.items() if k in known})
    except TypeError as e:
        raise AtlasError(f"{cfg_path}: metadata.{CONFIG_KEY} is not a valid SAE config ({e})") from None


def _v6_layout(raw: dict) -> dict:
    """SAELens before 6.0 kept metadata at the top level and named TopK as an activation."""
    if "metadata" in raw:
        return raw
    out = dict(raw)
    meta_keys = ("model_name", "hook_name", "hook_point", "hook_layer", "hook_head_index", "context_size",
                 "prepend_bos", "dataset_path", "model_class_name", "neuronpedia_id", "sae_lens_training_version",
                 "model_from_pretrained_kwargs", "seqpos_slice", "exclude_special_tokens")
    out["metadata"] = {("hook_name" if k == "hook_point" else k): raw[k] for k in meta_keys if k in raw}
    fn = raw.get("activation_fn_str") or raw.get("activation_fn")
    kwargs = raw.get("activation_fn_kwargs") or {}
    if fn == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
        out["architecture"], out["k"] = "topk", kwargs["k"]
    out.setdefault("architecture", "standard")
    if out.get("normalize_activations") in (False, "false"):
        out["normalize_activations"] = "none"
    return out
