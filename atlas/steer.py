"""Steering: generate text with a feature's decoder direction added to (or its activation clamped in)
the residual stream at the SAE's hook, beside the unsteered text. The Python reference of the
steering web file (atlas/export/steering.py) and of the steer box on the pages.

    atlas steer --config C --feature I --strength S --prompt TEXT     # add S units of feature I
    atlas steer --config C --feature I --clamp V --prompt TEXT        # set feature I to V

Units. The strength is in units of the feature's typical activation: its largest activation on
the analysed tokens (`max_act` of the feature shards). Strength S adds

    v = S * max_act * W_dec[I]  =  S * max_act * |W_dec[I]| * (W_dec[I] / |W_dec[I]|)

to the residual at every position, so S = 1 is what the feature contributes to the SAE's
reconstruction where it fires most strongly, whatever the decoder's norm convention. Negative S
pushes against the feature. The control is a random direction of the same norm |v|.

Clamp. `--clamp V` replaces the feature's own contribution by V's: x + (V - f_I(x)) * W_dec[I],
with f_I(x) the SAE's activation of the feature on x (any architecture, through `sae.encode`), so
every position reads as if the feature fired at exactly V (V = 0 ablates it).

Generation is greedy unless `--temperature` > 0 (then sampled with `--seed`); every step reruns
the whole sequence (the reference favours plainness over speed; the web file keeps a KV cache).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from atlas.errors import AtlasError

DEFAULT_NEW_TOKENS = 20
CONTROL_SEED = 0
"""Seed of the random control direction (the same for every feature, so it is reproducible)."""

Edit = Callable[[Tensor], Tensor]
"""A change of the residual stream at the hook: [..., seq, d_model] -> the same shape."""


@dataclass(frozen=True)
class Continuation:
    """A prompt's greedy (or sampled) continuation."""

    token_ids: list[int]
    """The generated tokens, without the prompt."""
    text: str
    """Their decoded text."""


def feature_unit(features_dir: Path, feature: int) -> float:
    """The feature's typical activation, the unit of steering strength: its `max_act` on the
    analysed tokens (from the feature shards)."""
    from atlas.shards import read_feature

    row = read_feature(features_dir, feature).row
    unit = float(row["max_act"] or 0.0)
    if not unit > 0:
        raise AtlasError(f"feature {feature} never fired on the analysed tokens (max_act {unit}): "
                         f"it has no typical activation to steer with; use --clamp VALUE instead")
    return unit


def steering_vector(sae, feature: int, strength: float, unit: float) -> Tensor:
    """S * unit * W_dec[feature]: `strength` units of the feature's typical activation [d_model]."""
    return (strength * unit) * sae.W_dec[feature].detach().float()


def random_control(vector: Tensor, seed: int = CONTROL_SEED) -> Tensor:
    """A random direction with the norm of `vector` (seeded, so the same every time)."""
    direction = torch.randn(vector.shape[-1], generator=torch.Generator().manual_seed(seed))
    return direction * (vector.norm() / direction.norm())


def add_vector(vector: Tensor) -> Edit:
    """The edit that adds `vector` at every position."""
    return lambda resid: resid + vector.to(resid.dtype)


def clamp_feature(sae, feature: int, value: float) -> Edit:
    """The edit that sets the feature's activation to `value` at every position:
    resid + (value - f(resid)) * W_dec[feature]."""
    w = sae.W_dec[feature].detach().float()

    def edit(resid: Tensor) -> Tensor:
        flat = resid.reshape(-1, resid.shape[-1]).float()
        act = sae.encode(flat)[:, feature].reshape(*resid.shape[:-1], 1)
        return resid + ((value - act) * w).to(resid.dtype)

    return edit


def check_feature(sae, feature: int) -> None:
    if not 0 <= feature < sae.d_sae:
        raise AtlasError(f"--feature {feature}: the SAE has features 0..{sae.d_sae - 1}")


@torch.no_grad()
def next_logits(loaded, layer: int, token_ids: list[int], edit: Edit | None) -> Tensor:
    """The model's logits [seq, vocab] for `token_ids`, with the residual before block `layer`
    changed by `edit` (None: unchanged)."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    if edit is None:
        return loaded.model(input_ids=ids).logits[0].float()
    with loaded.splice(layer, edit):
        return loaded.model(input_ids=ids).logits[0].float()


def generate(loaded, layer: int, prompt_ids: list[int], edit: Edit | None, n_new: int = DEFAULT_NEW_TOKENS,
             temperature: float = 0.0, seed: int = 0) -> Continuation:
    """`n_new` tokens after `prompt_ids`: greedy (ties to the lowest id) or, with temperature > 0,
    sampled from softmax(logits / temperature) with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(n_new):
        logits = next_logits(loaded, layer, ids, edit)[-1]
        if temperature > 0:
            tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        else:
            tok = int(logits.argmax())
        ids.append(tok)
    new = ids[len(prompt_ids):]
    return Continuation(new, loaded.tokenizer.decode(new))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `atlas steer` options (besides --config and --set)."""
    p.add_argument("--feature", type=int, required=True, help="feature id")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--strength", type=float,
                     help="add this many units of the feature's typical activation (its max_act); negative pushes away")
    how.add_argument("--clamp", type=float, metavar="V", help="set the feature's activation to V at every position")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=DEFAULT_NEW_TOKENS, help="tokens to generate (default 20)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampled")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--control", action="store_true",
                   help="also show a random direction of the same norm (with --strength)")


def run(cfg, args: argparse.Namespace) -> dict[str, Continuation]:
    """`atlas steer`: print the unsteered and steered continuations of `args.prompt`; return them."""
    from atlas.export.parity import encode_with_bos
    from atlas.export.tracing import max_tokens
    from atlas.model import check_layer, load_model
    from atlas.saes import load_sae

    if args.tokens < 1:
        raise AtlasError(f"--tokens {args.tokens}: must be >= 1")
    if args.temperature < 0:
        raise AtlasError(f"--temperature {args.temperature}: must be >= 0")
    sae = load_sae(cfg.sae_dir).float().eval().requires_grad_(False)
    check_feature(sae, args.feature)
    loaded = load_model(cfg.model.name, cfg.model.revision, device="cpu", dtype="float32",
                        gguf_file=cfg.model.gguf_file)
    check_layer(cfg.path, cfg.model.layer, loaded)
    if not loaded.has_lm_head:
        raise AtlasError(f"{loaded.name} has no LM head: it does not generate text, so there is nothing to steer")
    prompt = encode_with_bos(loaded, args.prompt, max_tokens(loaded) - args.tokens)
    edits: dict[str, Edit | None] = {"unsteered": None}
    if args.clamp is not None:
        edits[f"clamped to {args.clamp:g}"] = clamp_feature(sae, args.feature, args.clamp)
    else:
        unit = feature_unit(cfg.features_dir, args.feature)
        vector = steering_vector(sae, args.feature, args.strength, unit)
        print(f"steer: feature {args.feature}, strength {args.strength:g} x max_act {unit:.3g}: "
              f"|v| = {float(vector.norm()):.3g} added at {cfg.hook_name}")
        edits[f"steered {args.strength:+g}"] = add_vector(vector)
        if args.control:
            edits["random control"] = add_vector(random_control(vector))
    out = {}
    for name, edit in edits.items():
        out[name] = generate(loaded, cfg.model.layer, prompt, edit, args.tokens, args.temperature, args.seed)
        print(f"{name}: {args.prompt}[{out[name].text}]")
    return out
