"""Cross-SAE links of a suite, against a brute-force cosine matrix."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from atlas import links
from atlas.config import load_config
from atlas.saes import build_sae
from atlas.stage import atomic_dir
from atlas.suite import configs, members


@pytest.fixture
def suite_of_saes(tmp_path, monkeypatch):
    """Six random SAEs (layers 1, 2, 3 x widths 24, 40) saved in a suite's folders, no store needed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("model: {layer: [3, 1, 2]}\nsae: {d_sae: [40, 24], k: 4, aux_k: 8}\nexport: {top_k: 4}\n")
    cfg = load_config(tmp_path / "s.yaml")
    for i, view in enumerate(configs(cfg)):
        sae = build_sae(view.sae, d_in=16, seed=i, metadata={"hook_name": view.hook_name})
        with atomic_dir(view.sae_dir, f"fp{i}") as d:
            sae.save(d)
    return cfg


def _unit(view) -> np.ndarray:
    from atlas.saes import load_sae

    w = load_sae(view.sae_dir).W_dec.detach().double().numpy()
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_links_match_a_brute_force_cosine_computation(suite_of_saes):
    cfg = suite_of_saes
    out = links.run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"]["L2-24"] == {"layer": 2, "d_sae": 24, "hook_name": "blocks.2.hook_resid_pre",
                                            "file": "L2-24.parquet", "n_rows": manifest["members"]["L2-24"]["n_rows"],
                                            "prev": "L1-24", "next": "L3-24", "parent": None, "child": "L2-40"}
    unit = {v.member: _unit(v) for v in configs(cfg)}
    for m in members(cfg):
        table = pq.read_table(out / f"{m.id}.parquet")
        assert table.schema.equals(links.SCHEMA)
        rows = table.to_pylist()
        got: dict = {}
        for r in rows:
            got.setdefault((r["feature_id"], r["relation"]), []).append(r)
        info = manifest["members"][m.id]
        for relation in ("prev", "next"):
            other = info[relation]
            if other is None:
                assert not any(k[1] == relation for k in got)
                continue
            cos = unit[m.id] @ unit[other].T  # brute force, float64
            for f in range(m.d_sae):
                listed = got[f, relation]
                assert [r["rank"] for r in listed] == list(range(links.PER_LAYER))
                assert all(r["other_sae"] == other for r in listed)
                want = np.sort(cos[f])[::-1][:links.PER_LAYER]
                np.testing.assert_allclose([r["cosine"] for r in listed], want, atol=1e-5)
                np.testing.assert_allclose(cos[f, [r["other_id"] for r in listed]], want, atol=1e-5)
        if info["parent"]:
            cos = unit[m.id] @ unit[info["parent"]].T
            for f in range(m.d_sae):
                (p,) = got[f, "parent"]
                assert p["other_id"] == int(np.argmax(cos[f])) and p["other_sae"] == info["parent"]
        if info["child"]:
            cos = unit[info["child"]] @ unit[m.id].T  # wider x this
            parent_of = cos.argmax(axis=1)
            for f in range(m.d_sae):
                children = [r["other_id"] for r in got.get((f, "child"), [])]
                assert sorted(children) == sorted(np.flatnonzero(parent_of == f).tolist())
                assert [cos[c, f] for c in children] == sorted((cos[c, f] for c in children), reverse=True)
        # every wider feature is somebody's child, exactly once
        if info["child"]:
            all_children = [r["other_id"] for r in rows if r["relation"] == "child"]
            assert sorted(all_children) == list(range(cfg.widths[1]))
    ids = [r["feature_id"] for r in pq.read_table(out / "L1-40.parquet").to_pylist()]
    assert ids == sorted(ids)


def test_links_are_up_to_date_until_an_sae_changes(suite_of_saes, capsys):
    cfg = suite_of_saes
    out = links.run(cfg)
    assert links.run(cfg) == out and "is up to date" in capsys.readouterr().out
    view = configs(cfg, "L3-24")[0]
    with atomic_dir(view.sae_dir, "other") as d:
        build_sae(view.sae, d_in=16, seed=99).save(d)
    links.run(cfg)
    assert "wrote" in capsys.readouterr().out


def test_links_wait_for_every_sae_and_skip_a_single_run(suite_of_saes, tmp_path, capsys):
    import shutil

    cfg = suite_of_saes
    shutil.rmtree(configs(cfg, "L2-40")[0].sae_dir)
    assert links.run(cfg) is None and "waiting for L2-40" in capsys.readouterr().out
    (tmp_path / "one.yaml").write_text("model: {layer: 2}\nsae: {d_sae: 24, k: 4, aux_k: 8}\nexport: {top_k: 4}\n")
    assert links.run(load_config(tmp_path / "one.yaml")) is None
