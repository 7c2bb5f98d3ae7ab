"""The steer box in headless Chromium: its greedy continuations (onnxruntime-web in a Web Worker,
KV cache) equal Python onnxruntime's on the same steering file, unsteered and steered; the random
control streams too. Tiny world, layer 2, a random TopK SAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from atlas.config import RunConfig, SAEConfig
from atlas.export import parity_contexts, steering
from atlas.model import load_model
from atlas.saes import build_sae
from browser import PREFIX, assemble_steer_site, serve

ROOT = Path(__file__).resolve().parent.parent
FEATURE, MAX_ACT, STRENGTH = 5, 2.5, 6.0

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not (ROOT / "node_modules/onnxruntime-web").exists(), reason="node_modules missing (npm ci)")]


@pytest.fixture(scope="module")
def site(tiny_world, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(steering, "GATE_PROMPTS", 2)
    mp.setattr(steering, "GATE_TOKENS", 10)
    cfg = RunConfig()
    cfg.model.name, cfg.model.layer = str(tiny_world / "model"), 2
    cfg.corpus.dataset = str(tiny_world / "corpus.jsonl")
    loaded = load_model(cfg.model.name)
    sae = build_sae(SAEConfig(architecture="topk", d_sae=64, k=8, aux_k=16), loaded.d_model, seed=4).eval()
    onnx_dir = tmp_path_factory.mktemp("onnx")
    with torch.no_grad():
        meta = steering.export_steering(onnx_dir, loaded, sae, cfg, parity_contexts(cfg, loaded), 128, 18)
    mp.undo()
    loaded.tokenizer.backend_tokenizer.save(str(onnx_dir / "tokenizer.json"))
    site = tmp_path_factory.mktemp("site")
    assemble_steer_site(site, onnx_dir, meta, FEATURE, MAX_ACT)
    return site, meta, loaded


def test_browser_generation_equals_python_onnxruntime(browser, site):
    site_dir, meta, loaded = site
    with serve({PREFIX: site_dir}) as server:
        page = browser.new_page()
        page.goto(server.url(PREFIX) + f"features/{FEATURE}/index.html")
        page.fill(".atlas-steer-prompt", "Once upon a time, there was")
        page.evaluate(f"document.querySelector('.atlas-steer-strength').value = '{STRENGTH}'")
        page.check(".atlas-steer-control")
        page.fill(".atlas-steer-tokens", "12")
        page.click(".atlas-steer-go")
        page.wait_for_selector("section.atlas-steer[data-state=done], section.atlas-steer[data-state=error]",
                               state="attached", timeout=120_000)
        assert page.get_attribute("section.atlas-steer", "data-state") == "done", page.inner_text(".atlas-steer-status")
        got = {run: [int(x) for x in page.get_attribute(f".atlas-steer-text[data-run={run}]", "data-ids").split(",")]
               for run in ("unsteered", "steered", "control")}
        prompt = [int(x) for x in page.get_attribute("section.atlas-steer", "data-prompt-ids").split(",")]
        changed = page.locator(".atlas-steer-text[data-run=steered] .atlas-steer-changed").count()
        assert not page.console_errors and not server.stray
    assert prompt == [loaded.bos_token_id] + loaded.tokenizer("Once upon a time, there was", add_special_tokens=False)["input_ids"]
    decoder = np.frombuffer((site_dir / "onnx" / steering.DECODER_FILE).read_bytes(), "<f2").reshape(meta["d_sae"], -1)
    vector = (decoder[FEATURE].astype(np.float64) * (STRENGTH * MAX_ACT)).astype(np.float32)
    sess = steering.session_of(onnx.load(str(site_dir / "onnx" / steering.WEB_FILE)))
    shape = steering.CacheShape(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"])
    want = {"unsteered": steering.onnx_generate(sess, prompt, np.zeros_like(vector), 12, shape),
            "steered": steering.onnx_generate(sess, prompt, vector, 12, shape)}
    assert got["unsteered"] == want["unsteered"]
    assert got["steered"] == want["steered"]
    assert want["steered"] != want["unsteered"]  # the vector does steer, so the comparison means something
    assert changed == sum(a != b for a, b in zip(got["steered"], got["unsteered"]))
    assert len(got["control"]) == 12
