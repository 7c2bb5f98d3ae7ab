"""`atlas build` on a tiny synthetic run: pages, links, escaping, offline-ness, CSP, indexes."""

from __future__ import annotations

import gzip
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

import synthetic_shards
from atlas import build, search_index
from atlas.config import RunConfig
from atlas.stage import read_stamp
from support import BUILT_FEATURES as N_FEATURES, built_site  # noqa: F401  (a fixture)



class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []    # (tag, attribute, value)
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" and v:
                self.ids.add(v)
            if k in ("href", "src") and v:
                self.refs.append((tag, k, v))


def _html_files(site: Path):
    return sorted(site.rglob("*.html"))


def test_one_page_per_feature(built_site):
    pages = list((built_site / "features").glob("*/index.html"))
    assert len(pages) == N_FEATURES
    assert {p.parent.name for p in pages} == {str(i) for i in range(N_FEATURES)}
    assert not (built_site / "features" / "__atlas_skeleton__").exists()
    assert read_stamp(built_site)["fingerprint"]


def test_every_internal_link_resolves(built_site):
    broken = []
    for page in _html_files(built_site):
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        for tag, attr, ref in p.refs:
            url = urlparse(ref)
            if url.scheme or ref.startswith("//"):
                continue  # external ones are checked in test_no_external_urls
            path, _ = urldefrag(url.path)
            if not path:
                continue
            target = (page.parent / unquote(path)).resolve()
            if not target.is_file() or built_site.resolve() not in target.parents:
                broken.append(f"{page.relative_to(built_site)}: {tag} {attr}={ref}")
    assert not broken, "\n".join(broken[:20])


def test_hostile_text_is_escaped(built_site):
    texts = "".join(p.read_text(encoding="utf-8") for p in (built_site / "features").glob("*/index.html"))
    texts += (built_site / "notable.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in texts
    assert "<img src=x" not in texts
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in texts            # a hostile label and token, shown as text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in texts or "&quot;&gt;&lt;img src=x" in texts
    assert "{{ 7*7 }}" in texts and ">49<" not in texts                  # labels are not templates
    data = (built_site / "data" / "features.js").read_text(encoding="utf-8")
    assert "</script" not in data


ALLOWED = re.compile(r"https?://((www\.)?w3\.org/|localhost[:/]|127\.0\.0\.1[:/])")


def test_no_external_urls(built_site):
    """Nothing the site loads points outside it; our own code and data have no absolute URL at all."""
    bad = []
    for page in _html_files(built_site):
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        for tag, attr, ref in p.refs:
            if re.match(r"^([a-z]+:)?//", ref, re.I) and not ALLOWED.match(ref):
                bad.append(f"{page.name}: {tag} {attr}={ref}")
        text = page.read_text(encoding="utf-8")
        bad += [f"{page.name}: {m}" for m in re.findall(r"https?://[^\s\"'<>)]+", text) if not ALLOWED.match(m)]
    for css in built_site.rglob("*.css"):
        bad += [f"{css.name}: {m}" for m in re.findall(r"(?:url\(|@import)\s*['\"]?(?:https?:)?//[^)'\"]+",
                                                         css.read_text(encoding="utf-8"))]
    for folder in ("js", "css", "data"):
        for f in (built_site / folder).rglob("*"):
            if f.is_file():
                bad += [f"{f.name}: {m}" for m in re.findall(r"https?://[^\s\"'<>)]+", f.read_text(encoding="utf-8"))
                        if not ALLOWED.match(m)]
    assert not bad, "\n".join(bad[:20])


def test_csp_on_every_page(built_site):
    for page in _html_files(built_site):
        head = page.read_text(encoding="utf-8")[:3000]
        m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', head)
        assert m, page
        assert "default-src 'self'" in m.group(1) and "'wasm-unsafe-eval'" in m.group(1)
        assert "unsafe-eval'" not in m.group(1).replace("'wasm-unsafe-eval'", "")


def test_feature_page_content(built_site):
    page = (built_site / "features" / "0" / "index.html").read_text(encoding="utf-8")
    assert "class=atlas-try data-feature-id=0 data-root=../.." in page
    assert "<script type=module src=../../js/analyser/try.js></script>" in page
    assert "<script src=../../js/feature.js defer></script>" in page        # makes active tokens focusable
    assert "<svg" in page and "Logit effects" in page and "<details" in page
    assert re.search(r'<i class="?a\d( pk")? data-v=[\d.e+-]+>', page)  # active token: colour class + value
    assert "href=../1/index.html" in page
    dead = (built_site / "features" / "5" / "index.html").read_text(encoding="utf-8")
    assert "atlas-badge dead" in dead
    # feature pages stay out of MkDocs' search index and nav
    index = json.loads((built_site / "search" / "search_index.json").read_text())
    assert not [d for d in index["docs"] if d["location"].startswith("features/")]
    home = (built_site / "index.html").read_text(encoding="utf-8")
    assert "features/0/" not in home


def test_feature_pages_have_lean_chrome(built_site):
    """The theme's chrome is stamped into every feature page, so it is kept small (pages.lean_chrome)."""
    page = (built_site / "features" / "7" / "index.html").read_text(encoding="utf-8")
    assert 'class="md-header' in page and "md-content__inner md-typeset" in page    # the theme's look
    assert "<path" not in page.split("<h1", 1)[0]          # icons are CSS masks, not inline SVG paths
    assert 'data-md-type="navigation"' not in page and 'class="md-search"' not in page
    assert not re.search(r"<script>", page)                # the theme's inline scripts are shared files
    icons = (built_site / "assets" / "stylesheets" / "atlas-icons.css").read_text(encoding="utf-8")
    used = set(re.findall(r'class="(atlas-ic\d+)"', page))
    assert used and all(f".{c}{{" in icons for c in used)
    # hand-written pages keep the full chrome (nav, search)
    home = (built_site / "index.html").read_text(encoding="utf-8")
    assert 'data-md-type="navigation"' in home and 'class="md-search"' in home


def test_logits_omitted_without_unembedding(tmp_path, monkeypatch):
    synthetic_shards.write(tmp_path / "runs" / "nologits", 20, shard_size=16, n_vocab=100, has_logits=False)
    monkeypatch.chdir(tmp_path)
    site = build.run(RunConfig(path="nologits.yaml"), analyser=False)
    page = (site / "features" / "1" / "index.html").read_text(encoding="utf-8")
    assert "Logit effects" not in page and "Promoted" not in page


def test_indexes(built_site):
    text = (built_site / "data" / "features.js").read_text(encoding="utf-8")
    data = json.loads(text[text.index(",") + 1: text.rindex(")")])
    assert data["n"] == N_FEATURES and len(data["label"]) == N_FEATURES and len(data["x"]) == N_FEATURES
    meta = (built_site / "data" / "tokens" / "meta.js").read_text()
    n_shards = json.loads(meta[meta.index(",") + 1: meta.rindex(")")])["shards"]
    shard = search_index.fnv1a(" Once") % n_shards
    text = (built_site / "data" / "tokens" / f"{shard}.js").read_text(encoding="utf-8")
    entry = json.loads(text[text.index(",") + 1: text.rindex(")")])[" Once"]
    assert entry[0] and entry[1] == sorted(entry[1], reverse=True)


def test_sizes_and_skip(built_site, capsys, monkeypatch):
    pages = list((built_site / "features").glob("*/index.html"))
    sizes = sorted(len(gzip.compress(p.read_bytes())) for p in pages)
    assert sizes[len(sizes) // 2] <= 15_000
    # 24,576 pages of the GPT-2 Small shapes must fit a 400 MB site (~16 KB each; make bench measures the site)
    raw = sorted(p.stat().st_size for p in pages)
    assert raw[len(raw) // 2] <= 16_500
    monkeypatch.chdir(built_site.parent.parent.parent)
    before = read_stamp(built_site)["created"]
    build.run(RunConfig(path="synth.yaml"), analyser=False)
    assert "is up to date" in capsys.readouterr().out
    assert read_stamp(built_site)["created"] == before


def test_missing_features_is_one_clear_error(tmp_path, monkeypatch):
    from atlas.errors import AtlasError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(AtlasError, match="features"):
        build.run(RunConfig(path="nothing.yaml"), analyser=False)
