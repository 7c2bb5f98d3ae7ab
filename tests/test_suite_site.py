"""The site of a suite (`atlas build` of several SAEs), from synthetic shards and real links."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from markupsafe import escape

import synthetic_shards
from atlas import build, links
from atlas.config import load_config
from atlas.stage import write_stamp
from atlas.suite import configs, members

LAYERS, WIDTHS = (1, 2), (32, 64)


def write_links(cfg) -> None:
    """runs/<name>/links/ as `atlas links` writes it, from random decoder directions."""
    gen = torch.Generator().manual_seed(0)
    unit = {m.id: links.unit_rows(torch.randn(m.d_sae, 16, generator=gen)) for m in members(cfg)}
    near = links.neighbours(cfg)
    out = cfg.links_dir
    out.mkdir(parents=True)
    for m in members(cfg):
        pq.write_table(links.member_links(unit, m, near[m.id]), out / f"{m.id}.parquet")
    (out / "manifest.json").write_text("{}\n")
    write_stamp(out, "synthetic-links")


@pytest.fixture(scope="module")
def suite_site(tmp_path_factory):
    work = tmp_path_factory.mktemp("suite")
    (work / "s.yaml").write_text(f"model: {{layer: {list(LAYERS)}}}\nsae: {{d_sae: {list(WIDTHS)}, k: 4, aux_k: 8}}\n")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config(Path("s.yaml"))
        for view in configs(cfg):
            synthetic_shards.write(view.member_dir, view.sae.d_sae, shard_size=32, n_vocab=300, seed=view.sae.d_sae)
        write_links(cfg)
        site = build.run(cfg, analyser=False)
        again = build.run(cfg, analyser=False)
        assert again == site
        yield cfg, work / site, work
    finally:
        os.chdir(cwd)


def _hrefs(page: Path) -> list[str]:
    return re.findall(r'href="?([^" >]+)', page.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_member_has_every_page_and_the_home_lists_them(suite_site):
    cfg, site, _ = suite_site
    home = (site / "index.html").read_text(encoding="utf-8")
    for m in members(cfg):
        assert len(list((site / m.id / "features").glob("*/index.html"))) == m.d_sae
        for page in ("index.html", "explorer.html", "map.html", "search.html", "data/features.js"):
            assert (site / m.id / page).exists(), (m.id, page)
        assert f'<a href="{m.id}/index.html">{m.id}</a>' in home
        assert '<a href="../index.html">the suite' in (site / m.id / "index.html").read_text(encoding="utf-8")
        assert (site / m.id / "onnx").exists() is False and (site / m.id / "assets/vendor").exists() is False
    # the synthetic manifest's metrics, and one line per width in each chart across layers
    assert home.count(">0.81</td>") == len(members(cfg)) and home.count("<polyline") == 3 * len(WIDTHS)
    assert (site / "prompt.html").exists() and (site / "js/analyser/try.js").exists()
    assert not (site / "features").exists()


@pytest.mark.slow
def test_feature_pages_link_their_neighbours_across_the_suite(suite_site):
    cfg, site, _ = suite_site
    labels = {m.id: build._dense_labels(build.search_index.read_feature_table(v.features_dir))
              for m, v in zip(members(cfg), configs(cfg))}
    near = links.neighbours(cfg)
    for m in members(cfg):
        rows = links.read_links(cfg.links_dir, m.id)
        for fid in (0, m.d_sae - 1):
            page = site / m.id / "features" / str(fid) / "index.html"
            text = page.read_text(encoding="utf-8")
            hrefs = _hrefs(page)
            for relation in ("prev", "next", "parent", "child"):
                other = getattr(near[m.id], relation)
                expected = rows.get(fid, {}).get(relation, [])
                if relation in ("prev", "next"):
                    assert (len(expected) >= 3) == (other is not None), (m.id, relation)
                if relation == "parent":
                    assert (len(expected) == 1) == (other is not None)
                for sae, oid, cos in expected:
                    href = f"../../../{sae}/features/{oid}/index.html"
                    assert href in hrefs, (m.id, fid, relation, href)
                    assert (page.parent / href).resolve().is_file()
                    assert str(escape(labels[sae][oid])) in text
                    assert f"cosine {cos:.2f}" in text
            # the switcher reaches every member's home; the try box names this SAE and loads the suite's analyser
            for other in members(cfg):
                assert (page.parent / f"../../../{other.id}/index.html").resolve().is_file()
                assert f"../../../{other.id}/index.html" in hrefs
            assert f"data-sae={m.id}" in text and "src=../../../js/analyser/boot.js data-module=try.js" in text
            assert (page.parent / "../../../js/analyser/try.js").resolve().is_file()
    # a width family: some page of the narrower SAE lists children, every page of the wider its parent
    narrow, wide = f"L{LAYERS[0]}-{WIDTHS[0]}", f"L{LAYERS[0]}-{WIDTHS[1]}"
    with_children = [fid for fid, r in links.read_links(cfg.links_dir, narrow).items() if r.get("child")]
    assert with_children
    text = (site / narrow / "features" / str(with_children[0]) / "index.html").read_text(encoding="utf-8")
    assert "Children (wider SAE)" in text and f"../../../{wide}/features/" in text
    assert "Parent (narrower SAE)" in (site / wide / "features/5/index.html").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.browser
def test_the_suite_search_finds_labels_in_every_sae(suite_site, browser):
    from browser import serve

    cfg, site, _ = suite_site
    labels = {m.id: build._dense_labels(build.search_index.read_feature_table(v.features_dir))
              for m, v in zip(members(cfg), configs(cfg))}
    word = "after"    # in nearly every synthetic label (hostile ones included), of every SAE
    expected = sorted(f"{sae} #{i}" for sae, ls in labels.items() for i, lab in enumerate(ls) if word in lab.lower())
    assert len({e.split()[0] for e in expected}) == len(members(cfg))
    with serve({"/suite/": site}) as server:
        page = browser.new_page()
        page.goto(server.url("/suite/") + "search.html?label=" + word)
        page.wait_for_selector("#atlas-search-status:has-text('features')")
        found = sorted(page.eval_on_selector_all("#atlas-results li a", "els => els.map(e => e.textContent)"))
        assert found == expected
        assert page.eval_on_selector_all("#atlas-results img", "els => els.length") == 0   # labels are text
        href = page.eval_on_selector("#atlas-results li a", "e => e.href")
        page.goto(href)
        page.wait_for_load_state("networkidle")
        assert "/features/" in page.url and not page.console_errors, page.console_errors
        home = browser.new_page()
        home.goto(server.url("/suite/") + "index.html")
        home.wait_for_load_state("networkidle")
        assert not home.console_errors and not home.failed and not server.stray, (home.console_errors, home.failed)
        assert home.eval_on_selector_all("table.atlas-suite tbody tr", "els => els.length") == len(members(cfg))
