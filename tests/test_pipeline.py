"""The whole chain on the tiny run, as `make site` runs it: collect → train → analyze → export → build."""

import json
from pathlib import Path

import pandas as pd
import pytest

from support import tiny_yaml

from atlas.cli import main


@pytest.fixture(scope="module")
def built_tiny_run(tiny_world, tmp_path_factory):
    import os


    work = tmp_path_factory.mktemp("pipeline")
    tiny_yaml(tiny_world, work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["all", "--config", "tiny.yaml"]) == 0
        yield work
    finally:
        os.chdir(cwd)


def test_every_stage_wrote_its_output(built_tiny_run):
    run = built_tiny_run / "runs" / "tiny"
    for path in ("activations.h5", "sae/cfg.json", "sae/sae_weights.safetensors", "sae/metrics.json",
                 "features/manifest.json", "onnx/model.json", "onnx/parity.json", "site/index.html"):
        assert (run / path).exists(), path
    metrics = json.loads((run / "sae" / "metrics.json").read_text())
    assert 0 < metrics["explained_variance"] <= 1
    manifest = json.loads((run / "features" / "manifest.json").read_text())
    assert manifest["n_features"] == 256 and manifest["hook_name"] == "blocks.2.hook_resid_pre"
    n_pages = len(list((run / "site" / "features").glob("*/index.html")))
    assert n_pages == 256


def test_a_finished_run_rebuilds_nothing(built_tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(built_tiny_run)
    run = Path("runs/tiny")
    stamps = {p: p.stat().st_mtime for p in run.glob("*/stamp.json")}
    assert main(["all", "--config", "tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 5, out
    assert {p: p.stat().st_mtime for p in run.glob("*/stamp.json")} == stamps


def test_the_analyser_shows_the_pages_strongest_feature(built_tiny_run):
    """parity.json's pages_top1_agreement: the web file against the SAE on the stored activations,
    which is what the pages show; the full-precision file on the tiny run's float32 store agrees on
    every token, a garbage 'web file' (another SAE's encoder) on few."""
    import torch

    from atlas import export
    from atlas.saes import load_sae

    run = built_tiny_run / "runs" / "tiny"
    parity = json.loads((run / "onnx" / "parity.json").read_text())
    (sae_id, report), = parity["saes"].items()   # a single-SAE run: a suite of one
    assert report["web"]["pages_top1_agreement"] >= 0.97
    sae = load_sae(run / "sae").float().eval()
    n, layer, onnx = parity["n_contexts"], report["layer"], run / "onnx"
    files = (onnx / "trunk.onnx", onnx / f"{export.encoder_name(sae_id)}.onnx", layer)
    assert export.pages_agreement(*files, run / "activations.h5", sae, n, True) > 0.999
    other = load_sae(run / "sae").float().eval()
    with torch.no_grad():
        other.W_enc.copy_(other.W_enc[:, torch.randperm(other.W_enc.shape[1], generator=torch.Generator().manual_seed(0))])
    assert export.pages_agreement(*files, run / "activations.h5", other, n, True) < 0.2


@pytest.mark.slow
def test_matryoshka_runs_every_stage(tiny_config):
    """A Matryoshka SAE trains, evaluates, analyses, exports and builds like the others; each
    feature's nesting level reaches the features table and the explorer's data."""
    assert main(["all", "--config", "tiny.yaml", "--set", "sae.architecture=matryoshka",
                 "--set", "sae.matryoshka_groups=[32, 128]", "--set", "train.n_tokens=100000"]) == 0
    run = Path("runs") / "tiny"
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["atlas_sae_config"]["matryoshka_groups"] == [32, 128, 256]
    assert json.loads((run / "sae" / "metrics.json").read_text())["explained_variance"] > 0.5
    groups = pd.concat([pd.read_parquet(p, columns=["feature_id", "group"])
                        for p in sorted((run / "features").glob("features-*.parquet"))]).sort_values("feature_id")
    assert groups["group"].tolist() == [0] * 32 + [1] * 96 + [2] * 128
    text = (run / "site" / "data" / "features.js").read_text(encoding="utf-8")
    data = json.loads(text[text.index(",") + 1:text.rindex(")")])
    assert data["group"] == [0] * 32 + [1] * 96 + [2] * 128
    assert (run / "onnx" / "model.json").exists()
