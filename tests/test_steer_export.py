"""The steering web file: its KV-cache generation against PyTorch on the tiny world with planted
massive activations, its gate, and what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from atlas import steer
from atlas.config import RunConfig, SAEConfig
from atlas.export import parity_contexts, steering
from atlas.model import load_model
from atlas.saes import build_sae
from tiny_world import build_massive

LAYER = 2


@pytest.fixture(scope="module")
def massive(tiny_world, tmp_path_factory) -> Path:
    return build_massive(tmp_path_factory.mktemp("massive"), tiny_world)


@pytest.fixture(scope="module")
def exported(massive, tmp_path_factory):
    """The steering files of the massive tiny world (layer 2, a random TopK SAE), auto mode; the gate
    on 2 prompts of 10 tokens (the tiny model's Python forward dominates the time)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(steering, "GATE_PROMPTS", 2)
    mp.setattr(steering, "GATE_TOKENS", 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = RunConfig()
    cfg.model.name, cfg.model.layer = str(massive / "model"), LAYER
    cfg.corpus.dataset = str(massive / "corpus.jsonl")
    cfg.export.steering = True
    loaded = load_model(cfg.model.name)
    sae = build_sae(SAEConfig(architecture="topk", d_sae=128, k=8, aux_k=16), loaded.d_model, seed=3).eval()
    sae.requires_grad_(False)
    out = tmp_path_factory.mktemp("onnx")
    meta = steering.export_steering(out, loaded, sae, cfg, parity_contexts(cfg, loaded), 128, 18)
    yield out, meta, loaded, sae
    torch.set_num_threads(threads)
    mp.undo()


@pytest.mark.slow
def test_the_web_file_passes_its_gate_and_says_so(exported):
    out, meta, loaded, sae = exported
    gate = json.loads((out / steering.META_FILE).read_text())["gate"]
    web = gate["modes"][meta["quantization"]]
    assert web["ok"] and web["agreement"] >= 0.95 and web["n_tokens"] == 3 * 2 * 10
    assert gate["full"]["agreement"] == 1.0
    assert set(web["by_condition"]) == set(gate["gate"]["conditions"]) and len(web["by_condition"]) == 3
    assert meta["total_bytes"] == sum((out / f).stat().st_size for f in meta["files"])
    decoder = np.frombuffer((out / steering.DECODER_FILE).read_bytes(), "<f2").reshape(meta["d_sae"], meta["d_model"])
    assert np.allclose(decoder, sae.W_dec.numpy(), atol=2e-3)


@pytest.mark.slow
def test_cached_steps_give_the_steered_models_logits(exported):
    """Prompt in one call, then token by token through the cache: each step's logits are PyTorch's
    for the whole sequence so far with the vector added by `atlas steer`'s reference."""
    out, meta, loaded, sae = exported
    sess = steering.session_of(onnx.load(str(out / steering.WEB_FILE)))
    v = steer.steering_vector(sae, 4, 6.0, 1.0)
    ids = [loaded.bos_token_id] + loaded.tokenizer("Once upon a time")["input_ids"]
    past = np.zeros((2 * meta["n_layers"], meta["n_kv_heads"], 0, meta["head_dim"]), np.float32)
    feed = ids
    for step in range(6):
        logits, past = sess.run(None, {"input_ids": np.array([feed], np.int32), "steer": v.numpy(), "past": past})
        want = steer.next_logits(loaded, LAYER, ids, steer.add_vector(v))[-1].numpy()
        assert past.shape[2] == len(ids)
        assert np.abs(logits[0] - want).max() < 0.05 * np.abs(want).max()  # 8-bit weights
        ids.append(int(want.argmax()))
        feed = [ids[-1]]


@pytest.mark.slow
def test_the_gate_fails_another_models_file(exported, tiny_world):
    """The gate's references are the model's own: the massive world's file fails against the plain
    tiny world's continuations (the same tokenizer and shapes, other weights)."""
    out, meta, loaded, sae = exported
    plain = load_model(str(tiny_world / "model"))
    prompts = [[plain.bos_token_id] + plain.tokenizer(t)["input_ids"] for t in
               ("Once upon a time, there was", "Tom liked to play in the park with")]
    cases = steering.gate_cases(plain, sae, LAYER, prompts)
    r = steering.check(steering.session_of(onnx.load(str(out / steering.WEB_FILE))), cases, steering.cache_shape(plain))
    assert r["agreement"] < 0.95
