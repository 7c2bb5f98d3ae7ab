"""Suites: the config's lists of layers and widths, members, ids and folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.config import load_config
from atlas.errors import AtlasError, ConfigError
from atlas.links import neighbours, read_links
from atlas.suite import configs, is_suite, members


def _config(tmp_path: Path, body: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_a_single_sae_config_is_the_suite_of_one_in_the_run_folder(tmp_path):
    cfg = load_config(_config(tmp_path, "model: {layer: 3}\nsae: {d_sae: 64, k: 4, aux_k: 8}\n"))
    (m,) = members(cfg)
    assert (m.id, m.layer, m.d_sae, m.hook_name, m.dir) == ("L3", 3, 64, "blocks.3.hook_resid_pre", Path("runs/s"))
    assert not is_suite(cfg)
    assert configs(cfg) == [cfg]
    assert cfg.sae_dir == Path("runs/s/sae") and cfg.features_dir == Path("runs/s/features")
    # a list of one is the same run, with the same fingerprints
    one = load_config(_config(tmp_path, "model: {layer: [3]}\nsae: {d_sae: [64], k: 4, aux_k: 8}\n"))
    assert one.section_hash("model", "sae") == cfg.section_hash("model", "sae")


def test_a_suite_has_one_member_per_layer_and_width(tmp_path):
    cfg = load_config(_config(tmp_path, "model: {layer: [11, 3]}\nsae: {d_sae: [128, 64], k: 4, aux_k: 8}\n"))
    ids = [m.id for m in members(cfg)]
    assert ids == ["L3-64", "L3-128", "L11-64", "L11-128"]
    assert cfg.model.layer == [3, 11] and cfg.sae.d_sae == [64, 128]
    views = configs(cfg, "L11-64")
    assert len(views) == 1
    v = views[0]
    assert (v.model.layer, v.sae.d_sae, v.member, v.hook_name) == (11, 64, "L11-64", "blocks.11.hook_resid_pre")
    assert v.sae_dir == Path("runs/s/saes/L11-64/sae") and v.store_path == Path("runs/s/activations.h5")
    assert members(cfg)[2].dir == v.member_dir
    one_width = load_config(_config(tmp_path, "model: {layer: [1, 2]}\nsae: {d_sae: 64, k: 4, aux_k: 8}\n"))
    assert [m.id for m in members(one_width)] == ["L1", "L2"]


@pytest.mark.parametrize("body, message", [
    ("model: {layer: [3, 3]}\n", "lists the same value twice"),
    ("model: {layer: []}\n", "non-empty list"),
    ("model: {layer: [1, -1]}\n", "must be >= 0"),
    ("model: {layer: [1, x]}\n", "must be int"),
    ("sae: {d_sae: [64, 64], k: 4, aux_k: 8}\n", "lists the same value twice"),
    ("sae: {d_sae: [64, 2], k: 4, aux_k: 1}\n", "'sae.k'"),
])
def test_bad_lists_are_refused_naming_the_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, body))


def test_an_unknown_member_is_refused(tmp_path):
    cfg = load_config(_config(tmp_path, "model: {layer: [1, 2]}\nsae: {d_sae: 64, k: 4, aux_k: 8}\n"))
    with pytest.raises(ConfigError, match=r"--sae L7: .* \(its SAEs: L1, L2\)"):
        configs(cfg, "L7")


def test_one_collection_runs_the_model_once_per_batch_for_every_hook(tiny_config, tiny_world, monkeypatch):
    """The suite's store: every hook's rows are hidden_states[layer] of an independent full forward
    pass over the same stored tokens, from one truncated pass per batch to the deepest hook."""
    import numpy as np
    import torch

    from atlas.cli import main
    from atlas.model import TruncatedModel, load_model
    from atlas.store import ActivationStore

    passes = []
    forward = TruncatedModel.forward

    def counting(self, input_ids):
        passes.append((len(self.base.h), input_ids.shape[0]))
        return forward(self, input_ids)

    monkeypatch.setattr(TruncatedModel, "forward", counting)
    assert main(["collect", "--config", str(tiny_config), "--set", "model.layer=[3, 0, 1]"]) == 0
    cfg = load_config(tiny_config, ["model.layer=[3, 0, 1]"])
    n_contexts = cfg.corpus.n_tokens // cfg.corpus.ctx_len
    assert len(passes) == -(-n_contexts // cfg.corpus.batch_size)  # one pass per batch
    assert all(depth == 3 for depth, _ in passes)  # to the deepest hook only
    assert sum(n for _, n in passes) == n_contexts
    m = load_model(str(tiny_world / "model"))
    for layer in (0, 1, 3):
        with ActivationStore(cfg.store_path, layer=layer) as store:
            assert store.info.hook_name == f"blocks.{layer}.hook_resid_pre" and store.info.layers == (0, 1, 3)
            assert store.acts.shape == (n_contexts * 32, 64)
            for c in (0, 9, store.n_contexts - 1):
                ids = torch.from_numpy(store.tokens[c:c + 1]).long()
                want = m.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
                np.testing.assert_allclose(store.read(c * 32, (c + 1) * 32), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(AtlasError, match="holds layers 0, 1, 3, not layer 2"):
        ActivationStore(cfg.store_path, layer=2)
    with pytest.raises(AtlasError, match="say which to read"):
        ActivationStore(cfg.store_path)


def test_every_layer_is_checked_before_the_store_is_touched(tiny_config, capsys):
    from atlas.cli import main

    assert main(["collect", "--config", str(tiny_config)]) == 0
    store = Path("runs/tiny/activations.h5")
    before = store.stat().st_mtime_ns
    assert main(["collect", "--config", str(tiny_config), "--set", "model.layer=[1, 4]"]) != 0
    assert "'model.layer' = 4" in capsys.readouterr().err
    assert store.stat().st_mtime_ns == before


SUITE = ["model.layer=[1, 2, 3]", "sae.d_sae=[64, 128]", "train.n_tokens=60000"]


def _atlas(command: str, config: Path, *extra: str) -> int:
    from atlas.cli import main

    return main([command, "--config", str(config), *extra, *[a for s in SUITE for a in ("--set", s)]])


@pytest.mark.slow
def test_the_tiny_worlds_suite_end_to_end(tiny_config, capsys):
    """Three layers x a width family of two: one collection, six SAEs in SAELens' format, each analysed
    in its own folder, the links between them, and the export (a trunk and six encoders)."""
    import json

    import pyarrow.parquet as pq

    from atlas.saes import load_sae

    cfg = load_config(tiny_config, SUITE)
    for command in ("collect", "train", "analyze", "links"):
        assert _atlas(command, tiny_config) == 0, capsys.readouterr().err
    assert not Path("runs/tiny/sae").exists() and not Path("runs/tiny/features").exists()
    ids = [m.id for m in members(cfg)]
    assert ids == ["L1-64", "L1-128", "L2-64", "L2-128", "L3-64", "L3-128"]
    for m in members(cfg):
        assert m.dir == Path("runs/tiny/saes") / m.id
        raw = json.loads((m.dir / "sae" / "cfg.json").read_text())  # SAELens 6 layout
        assert raw["d_sae"] == m.d_sae and raw["d_in"] == 64 and raw["architecture"] == "topk"
        assert raw["metadata"]["hook_name"] == m.hook_name
        assert load_sae(m.dir / "sae").d_sae == m.d_sae
        manifest = json.loads((m.dir / "features" / "manifest.json").read_text())
        assert (manifest["n_features"], manifest["hook_name"], manifest["layer"]) == (m.d_sae, m.hook_name, m.layer)
    links_manifest = json.loads(Path("runs/tiny/links/manifest.json").read_text())
    assert links_manifest["members"]["L2-64"]["prev"] == "L1-64" and links_manifest["members"]["L2-64"]["child"] == "L2-128"
    rows = pq.read_table("runs/tiny/links/L2-64.parquet").to_pylist()
    assert {r["feature_id"] for r in rows if r["relation"] == "next"} == set(range(64))
    # the browser's files: one trunk to the deepest hook, one encoder per SAE, the gate per SAE
    assert _atlas("export", tiny_config) == 0, capsys.readouterr().err
    meta = json.loads(Path("runs/tiny/onnx/model.json").read_text())
    assert meta["trunk"]["outputs"] == {"1": "resid_1", "2": "resid_2", "3": "resid_3"}
    assert [(s["id"], s["layer"], s["d_sae"]) for s in meta["saes"]] == [(m.id, m.layer, m.d_sae) for m in members(cfg)]
    parity = json.loads(Path("runs/tiny/onnx/parity.json").read_text())
    for sae_id, r in parity["saes"].items():
        assert r["full"]["ok"] and r["web"]["ok"] and r["web"]["pages_top1_agreement"] >= 0.9, (sae_id, r["web"])
    # the site: every member's pages under site/<id>/, linked to the neighbouring layers' and widths' SAEs
    assert _atlas("build", tiny_config) == 0, capsys.readouterr().err
    site = Path("runs/tiny/site")
    home = (site / "index.html").read_text(encoding="utf-8")
    near = neighbours(cfg)
    for m in members(cfg):
        assert f'<a href="{m.id}/index.html">{m.id}</a>' in home
        assert sorted(int(p.parent.name) for p in (site / m.id / "features").glob("*/index.html")) == list(range(m.d_sae))
        rows = read_links(Path("runs/tiny/links"), m.id)
        for fid in (0, m.d_sae // 2):
            page = site / m.id / "features" / str(fid) / "index.html"
            text = page.read_text(encoding="utf-8")
            assert f"data-sae={m.id}" in text
            for relation in ("prev", "next", "parent", "child"):
                expected = rows.get(fid, {}).get(relation, [])
                if relation in ("prev", "next", "parent") and getattr(near[m.id], relation) is not None:
                    assert len(expected) >= (3 if relation != "parent" else 1), (m.id, fid, relation)
                for other, oid, _ in expected:
                    href = f"../../../{other}/features/{oid}/index.html"
                    assert href in text and (page.parent / href).resolve().is_file(), (m.id, fid, href)
    assert any(r.get("child") for r in read_links(Path("runs/tiny/links"), "L2-64").values())
    assert (site / "onnx" / "model.json").exists() and not (site / "L2-64" / "onnx").exists()
    # one member at a time: only it is looked at
    capsys.readouterr()
    assert _atlas("analyze", tiny_config, "--sae", "L3-128") == 0
    out = capsys.readouterr().out
    assert "runs/tiny/saes/L3-128/features is up to date" in out and "L1-64" not in out
    assert _atlas("train", tiny_config, "--sae", "L9") != 0
    assert "--sae L9: " in capsys.readouterr().err


@pytest.mark.slow
def test_import_of_a_release_maps_each_sae_to_its_member(tiny_config, tmp_path, capsys):
    """A folder of SAELens folders (written by our own saver, named anyhow) becomes the suite's SAEs."""
    from atlas.saes import build_sae, load_sae

    cfg = load_config(tiny_config, SUITE)
    release = tmp_path / "release"
    saved = {}
    for i, view in enumerate(reversed(configs(cfg))):
        sae = build_sae(view.sae, d_in=64, seed=i, metadata={"hook_name": view.hook_name, "model_name": "model"})
        folder = release / f"sae-{i}"
        folder.mkdir(parents=True)
        sae.save(folder)
        saved[view.member] = sae
    other = build_sae(configs(cfg)[0].sae, d_in=64, seed=7, metadata={"hook_name": "blocks.0.hook_resid_pre"})
    (release / "extra").mkdir()
    other.save(release / "extra")
    assert _atlas("collect", tiny_config) == 0
    from atlas import import_sae

    done = import_sae.run(cfg, release)
    assert "extra" in capsys.readouterr().out  # a hook the config does not list: left out, said so
    assert len(done) == 6
    for view in configs(cfg):
        got = load_sae(view.sae_dir)
        assert got.metadata["hook_name"] == view.hook_name
        assert (got.W_dec == saved[view.member].W_dec).all()
    # the train stage counts every imported SAE as done
    capsys.readouterr()
    assert _atlas("train", tiny_config) == 0
    assert capsys.readouterr().out.count("is up to date") == 6
    import shutil

    shutil.rmtree(release / "sae-0")
    with pytest.raises(AtlasError, match=r"no SAE folder for L3-128 \(blocks.3.hook_resid_pre, d_sae 128\)"):
        import_sae.run(cfg, release)
