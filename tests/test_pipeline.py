"""The whole chain on the tiny run, as `make site` runs it: collect → train → analyze → export → build."""

import json
from pathlib import Path

import pytest

from atlas.cli import main


@pytest.fixture(scope="module")
def built_tiny_run(tiny_world, tmp_path_factory):
    import os

    from conftest import tiny_yaml

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
