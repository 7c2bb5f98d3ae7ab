"""`atlas steer`: steered logits against the model with the vector added by hand, for every SAE
architecture; clamping; the CLI on the tiny world."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import synthetic_shards
import torch

from atlas import steer
from atlas.config import SAEConfig
from atlas.model import load_model
from atlas.saes import ARCHITECTURES, build_sae
from atlas.shards import read_feature

ROOT = Path(__file__).resolve().parent.parent
LAYER = 2
PROMPT = [0, 40, 71, 33, 90, 12, 7]


@pytest.fixture(scope="module")
def loaded(tiny_world):
    return load_model(str(tiny_world / "model"))


def sae_of(arch: str, d_in: int, d_sae: int = 128):
    cfg = SAEConfig(architecture=arch, d_sae=d_sae, k=8, aux_k=16)
    sae = build_sae(cfg, d_in, seed=1).eval().requires_grad_(False)
    with torch.no_grad():  # a non-zero encoder bias, so clamping sees varied activations
        sae.b_enc.add_(0.05 * torch.randn(d_sae, generator=torch.Generator().manual_seed(2)))
    return sae


def logits_with_block_output_changed(loaded, layer: int, ids: list[int], change) -> torch.Tensor:
    """Independent of `loaded.splice` (a pre-hook on block `layer`): a forward hook on block
    `layer - 1` changes its output hidden state, which is the residual before block `layer`."""
    block = loaded.model.transformer.h[layer - 1]

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        changed = change(hidden)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return loaded.model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_steered_logits_equal_the_vector_added_by_hand(loaded, arch):
    sae = sae_of(arch, loaded.d_model)
    feature, strength, unit = 5, 3.0, 2.5
    v = steer.steering_vector(sae, feature, strength, unit)
    # the vector: strength x unit along the feature's decoder direction, |v| = S * unit * |W_dec[i]|
    direction = sae.W_dec[feature] / sae.W_dec[feature].norm()
    assert torch.allclose(v, strength * unit * sae.W_dec[feature].norm() * direction, atol=1e-6)
    got = steer.next_logits(loaded, LAYER, PROMPT, steer.add_vector(v))
    want = logits_with_block_output_changed(loaded, LAYER, PROMPT, lambda h: h + v)
    plain = steer.next_logits(loaded, LAYER, PROMPT, None)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the vector does change the logits


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_clamp_replaces_the_features_own_contribution(loaded, arch):
    sae = sae_of(arch, loaded.d_model)
    feature, value = 3, 4.0

    def by_hand(h):
        acts = sae.encode(h.reshape(-1, h.shape[-1]))[:, feature].reshape(*h.shape[:-1], 1)
        return h + (value - acts) * sae.W_dec[feature]

    got = steer.next_logits(loaded, LAYER, PROMPT, steer.clamp_feature(sae, feature, value))
    want = logits_with_block_output_changed(loaded, LAYER, PROMPT, by_hand)
    assert torch.allclose(got, want, atol=1e-5)


def test_greedy_generation_follows_the_steered_argmax(loaded):
    sae = sae_of("topk", loaded.d_model)
    v = steer.steering_vector(sae, 7, 8.0, 1.0)
    out = steer.generate(loaded, LAYER, PROMPT, steer.add_vector(v), n_new=6)
    ids = list(PROMPT)
    for tok in out.token_ids:  # each token is the argmax of the hand-steered logits of what precedes it
        assert tok == int(logits_with_block_output_changed(loaded, LAYER, ids, lambda h: h + v)[-1].argmax())
        ids.append(tok)
    assert out.text == loaded.tokenizer.decode(out.token_ids)
    sampled = [steer.generate(loaded, LAYER, PROMPT, None, 6, temperature=1.0, seed=s).token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # seeded


def test_random_control_has_the_norm_and_not_the_direction(loaded):
    sae = sae_of("relu", loaded.d_model)
    v = steer.steering_vector(sae, 0, -2.0, 3.0)
    r = steer.random_control(v)
    assert torch.isclose(r.norm(), v.norm())
    assert abs(float(torch.nn.functional.cosine_similarity(r, v, dim=0))) < 0.5
    assert torch.equal(r, steer.random_control(v))


def test_cli(tiny_config, loaded):
    run = tiny_config.parent / "runs" / "tiny"
    sae_of("topk", loaded.d_model, d_sae=256).save(run / "sae")
    cmd = [sys.executable, "-m", "atlas", "steer", "--config", str(tiny_config), "--feature", "5",
           "--prompt", "Once upon a time", "--tokens", "5"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(cmd + ["--clamp", "20"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "unsteered: Once upon a time[" in r.stdout and "clamped to 20: Once upon a time[" in r.stdout
    r = subprocess.run(cmd + ["--strength", "4"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr  # no features/ yet
    r = subprocess.run(cmd[:7] + ["999", *cmd[8:], "--clamp", "1"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "--feature 999" in r.stderr and "Traceback" not in r.stderr
    features = synthetic_shards.write(run, 256, shard_size=64, n_top=2, n_intervals=1, per_interval=1, n_vocab=600)
    feature = next(i for i in range(256) if (read_feature(features, i).row["max_act"] or 0) > 0)
    max_act = read_feature(features, feature).row["max_act"]
    r = subprocess.run(cmd[:7] + [str(feature), *cmd[8:], "--strength", "4", "--control"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"strength 4 x max_act {max_act:.3g}" in r.stdout
    assert all(f"{name}: Once upon a time[" in r.stdout for name in ("unsteered", "steered +4", "random control"))
