"""The shared base of every SAE architecture: parameters, encode/decode, loss outputs, save/load.

An SAE maps a residual-stream vector x [d_in] to latents f [d_sae] and back:

    pre   = (x - b_dec) @ W_enc + b_enc        (b_dec subtracted when apply_b_dec_to_input)
    f     = activation(pre)                    (relu, top-k, batch top-k or jump-relu)
    x_hat = f @ W_dec + b_dec

Tensor names, shapes and the `cfg.json` keys are SAELens's (v6 layout), so a folder written by
`save` loads with `sae_lens.SAE.load_from_disk` and a SAELens folder loads with `load_sae`.
Each architecture computes its own training loss in `forward`; the trainer only calls
`forward`, `before_step` and `after_step` and never asks which architecture it holds. The other
stages do the same with the inference methods: `encode_sparse` (analysis and labels), `encode_top`
(the ONNX graph, hence the browser), `encode`/`decode` (evaluation), and the SAELens file format
through `from_saelens_cfg`/`to_saelens_cfg` and `load_saelens_state`/`saelens_state`. An
architecture overrides whichever of them its activation makes cheaper or different.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from atlas.config import SAEConfig
from atlas.errors import AtlasError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens reads files without it as the pre-6.0 layout."""
LR_SCALE_KEYS = {"W_dec": "lr_scale_w_dec", "b_enc": "lr_scale_b_enc", "b_dec": "lr_scale_b_dec"}
"""Parameter -> the `SAEConfig` field holding its learning-rate multiplier."""
CONFIG_KEY = "atlas_sae_config"
"""metadata key holding the `SAEConfig` the SAE was trained with (k, aux_k, learning-rate scales,
...): SAELens keeps metadata as free-form keys and ignores this one; `load_sae` reads it back."""


class ForwardOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns during training."""

    sae_out: Tensor
    """The reconstruction [n, d_in]."""
    latent_acts: Tensor
    """Values of the active latents: flat [nnz] in compressed rows with `latent_indices` and
    `latent_offsets` (as `atlas.saes.fused.Active`), or dense [n, d_sae] when those are None.
    Zeros mean inactive."""
    latent_indices: Tensor | None
    """Latent ids [nnz] of `latent_acts`, or None when `latent_acts` is dense."""
    latent_offsets: Tensor | None
    """[n + 1]: row i's latents are entries offsets[i]:offsets[i+1]; None when `latent_acts` is dense."""
    fvu: Tensor
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2 over the batch."""
    mse: Tensor
    """Mean squared error per element."""
    aux_loss: Tensor
    """The architecture's second loss term, already weighted: AuxK (topk, batchtopk), the
    decoder-norm-weighted L1 penalty (relu) or the L0 penalty (jumprelu)."""
    loss: Tensor
    """What the trainer minimises."""
    l0: Tensor
    """Mean number of active latents per token."""
    fired: Tensor
    """[d_sae] bool: latents active on at least one token of the batch."""


class SparseCodes(NamedTuple):
    """The active latents of a batch x [n, d_in], one entry per (row, latent), in row order."""

    rows: Tensor
    """[nnz] int64: the row of x each entry belongs to (ascending)."""
    ids: Tensor
    """[nnz] int64: the latent."""
    values: Tensor
    """[nnz]: its activation (> 0)."""


class TopLatents(NamedTuple):
    """The k strongest latents of each row, in a fixed width (what the ONNX graph outputs)."""

    ids: Tensor
    """[..., k] int64: latent ids, strongest first."""
    values: Tensor
    """[..., k]: their activations (0 past the active ones)."""
    n_active: Tensor
    """[...]: how many of all d_sae latents are > 0."""


def top_of_dense(codes: Tensor, k: int) -> TopLatents:
    """`TopLatents` of dense latents [..., d_sae]."""
    values, ids = codes.topk(k, dim=-1)
    return TopLatents(ids, values, (codes > 0).sum(-1))


class SparseAutoencoder(nn.Module):
    """Base class; subclasses set `architecture`, `saelens_architecture` and the activation."""

    architecture = ""
    """Our name (atlas.config.ARCHITECTURES)."""
    saelens_architecture = ""
    """The name in SAELens's cfg.json."""

    def __init__(self, cfg: SAEConfig, d_in: int, apply_b_dec_to_input: bool = True,
                 metadata: dict | None = None):
        super().__init__()
        unset = {key: self.default_lr_scales.get(name, 1.0) for name, key in LR_SCALE_KEYS.items()
                 if getattr(cfg, key) is None}
        self.cfg = dataclasses.replace(cfg, **unset)  # explicit, so the saved cfg.json records them
        self.d_in, self.d_sae = int(d_in), int(cfg.d_sae)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(self.d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(self.d_sae, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    # ---- initialisation -------------------------------------------------------------------
    decoder_init_norm = 1.0

    @torch.no_grad()
    def initialize(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random directions of norm `decoder_init_norm`; encoder = decoder^T."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        w *= self.decoder_init_norm / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- inference ------------------------------------------------------------------------
    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [n, d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae] (plain torch ops, traceable by torch.onnx.export)."""
        raise NotImplementedError

    def encode_topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest activations per row and their latent ids, sorted descending."""
        values, indices = self.encode(x).topk(k, dim=-1)
        return values, indices

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """The active latents of x [n, d_in], without any [n, d_sae] matrix the caller must scan
        (here: the dense codes' nonzero entries; TopK reads its k per row directly)."""
        codes = self.encode(x)
        rows, ids = (codes > 0).nonzero(as_tuple=True)
        return SparseCodes(rows, ids, codes[rows, ids])

    def encode_top(self, x: Tensor, k: int) -> TopLatents:
        """The k strongest latents per row and the number active (plain torch ops, traceable)."""
        return top_of_dense(self.encode(x), k)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def latent_groups(self) -> Tensor | None:
        """Each latent's nesting level [d_sae] (0: the first prefix) when the SAE was trained as
        nested prefixes (matryoshka: `cfg.matryoshka_groups` holds their widths, recorded in the
        saved config, so an SAE loaded from such a folder keeps them); None otherwise."""
        widths = torch.tensor([int(w) for w in self.cfg.matryoshka_groups])
        if not len(widths):
            return None
        return torch.searchsorted(widths, torch.arange(self.d_sae), right=True)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---- training -------------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, sparsity_scale: float = 1.0) -> ForwardOutput:
        """The training forward pass. `dead_mask` [d_sae] marks latents counted dead (for the
        AuxK loss); `sparsity_scale` in [0, 1] warms up the sparsity penalty."""
        raise NotImplementedError

    default_lr_scales: dict[str, float] = {}
    """This architecture's multipliers of the trainer's learning rate for the parameters whose
    `sae.lr_scale_*` is unset (parameters not named: 1)."""

    @property
    def lr_scales(self) -> dict[str, float]:
        """Per-parameter multipliers of the trainer's learning rate, from the config (others: 1)."""
        return {name: getattr(self.cfg, key) for name, key in LR_SCALE_KEYS.items()}

    def optimizer_groups(self) -> list[dict]:
        """Adam parameter groups, one per parameter, each with its `lr_scale` (see `lr_scales`)."""
        return [{"params": [p], "name": n, "lr_scale": float(self.lr_scales.get(n, 1.0))}
                for n, p in self.named_parameters()]

    def before_step(self) -> None:
        """Called after backward, before the optimiser step (e.g. project gradients)."""

    def after_step(self) -> None:
        """Called after the optimiser step (e.g. renormalise the decoder)."""

    def revive(self, x: Tensor, dead_mask: Tensor, optimizer: torch.optim.Optimizer) -> int:
        """Re-initialise dead latents if the architecture does that; returns how many."""
        return 0

    # ---- helpers for subclasses -----------------------------------------------------------
    @staticmethod
    def _fvu_mse(x: Tensor, sae_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(squared error per row summed over dims [n], fvu, mse)."""
        err = (sae_out - x).pow(2).sum(dim=-1)
        total = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return err, err.sum() / total, err.mean() / x.shape[-1]

    @torch.no_grad()
    def _unit_norm_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def _remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the (unit) row itself."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec)

    def copy(self) -> SparseAutoencoder:
        """A copy on the CPU: the same class, config and weights."""
        out = type(self)(self.cfg, self.d_in, self.apply_b_dec_to_input, self.metadata)
        out.load_state_dict(self.state_dict())
        return out

    # ---- folding (exact reparametrisations) -----------------------------------------------
    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """The SAE was trained on x * scale; make it take raw x (latents unchanged)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @torch.no_grad()
    def fold_decoder_norm(self) -> Tensor:
        """Make decoder rows unit norm, scaling each latent's activation by its old norm (returned)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        return norms

    # ---- the SAELens format ---------------------------------------------------------------
    saelens_tensors: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
    """The tensors of sae_weights.safetensors that `load_saelens_state` reads."""

    @classmethod
    def from_saelens_cfg(cls, raw: dict, recorded: SAEConfig, cfg_path: Path) -> SparseAutoencoder:
        """A zero-weight SAE of this class shaped as cfg.json `raw` says (v6 layout, whose common keys
        `load_sae` has checked). `recorded`: the SAEConfig our trainer kept in its metadata
        (defaults for folders written elsewhere); `cfg_path` is named in errors."""
        cfg = dataclasses.replace(recorded, architecture=cls.architecture, d_sae=int(raw["d_sae"]))
        return cls(cfg, int(raw["d_in"]), apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                   metadata=raw.get("metadata") or {})

    def to_saelens_cfg(self) -> dict:
        """cfg.json in SAELens's v6 layout (architecture-specific keys added by subclasses)."""
        meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "training_architecture": self.architecture, CONFIG_KEY: dataclasses.asdict(self.cfg),
                **self.metadata}
        return {
            "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": meta, "architecture": self.saelens_architecture,
        }

    @torch.no_grad()
    def load_saelens_state(self, state: dict[str, Tensor], raw: dict, weights_path: Path) -> None:
        """Copy `saelens_tensors` from a sae_weights.safetensors (`state`) in, checking their shapes;
        `raw` is the folder's cfg.json, `weights_path` is named in errors."""
        for name in self.saelens_tensors:
            shape = tuple(getattr(self, name).shape)
            if name not in state:
                raise AtlasError(f"{weights_path}: missing tensor '{name}'")
            if tuple(state[name].shape) != shape:
                raise AtlasError(f"{weights_path}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                                 f"expected {shape} from {CFG_FILE}")
            getattr(self, name).copy_(state[name].float())

    def saelens_state(self) -> dict[str, Tensor]:
        """The tensors written to sae_weights.safetensors."""
        return {n: t.detach().float().contiguous().cpu() for n, t in
                (("W_enc", self.W_enc), ("b_enc", self.b_enc), ("W_dec", self.W_dec), ("b_dec", self.b_dec))}

    def save(self, directory: str | Path) -> Path:
        """Write cfg.json and sae_weights.safetensors into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.saelens_state(), str(directory / WEIGHTS_FILE))
        (directory / CFG_FILE).write_text(json.dumps(self.to_saelens_cfg(), indent=2) + "\n")
        return directory

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}"
