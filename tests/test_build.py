"""`atlas build` on a tiny synthetic run: pages, links, escaping, offline-ness, CSP, indexes."""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import numpy as np
import pytest

import synthetic_shards
from atlas import build, search_index
from atlas.config import RunConfig
from atlas.stage import read_stamp, write_stamp
from support import BUILT_FEATURES as N_FEATURES, built_site, same_values  # noqa: F401  (a fixture)



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
    assert "<script src=../../js/analyser/boot.js data-module=try.js defer></script>" in page
    assert "<script src=../../js/feature.js defer></script>" in page        # draws examples, histogram, logits
    assert "<div id=atlas-feature data-id=0 data-group=0>" in page
    assert "href=../1/index.html" in page
    dead = (built_site / "features" / "5" / "index.html").read_text(encoding="utf-8")
    assert "atlas-badge dead" in dead
    assert "Nesting level" not in page and "atlas-badge dominated" not in page     # shards without those columns
    # feature pages are in MkDocs' search index by title ("#id label") only, without their text
    index = json.loads((built_site / "search" / "search_index.json").read_text())
    entries = [d for d in index["docs"] if d["location"].startswith("features/")]
    assert entries and all(d["text"] == "" and re.fullmatch(r"features/\d+/index\.html", d["location"]) for d in entries)
    assert {"location": "features/0/index.html", "title": "#0 " + search_index.read_feature_table(
        built_site.parent / "features").labels[0], "text": ""} in entries
    home = (built_site / "index.html").read_text(encoding="utf-8")
    assert "features/0/" not in home


def test_feature_pages_have_lean_chrome(built_site):
    """The theme's chrome is stamped into every feature page, so it is kept small (pages.lean_chrome)."""
    page = (built_site / "features" / "7" / "index.html").read_text(encoding="utf-8")
    assert 'class="md-header' in page and "md-content__inner md-typeset" in page    # the theme's look
    assert "<path" not in page.split("<h1", 1)[0]          # icons are CSS masks, not inline SVG paths
    assert 'data-md-type="navigation"' not in page and 'class="md-search"' not in page
    assert not re.search(r"<script>", page)                # the theme's inline scripts are shared files
    assert page.count('rel="stylesheet"') == 1 and "atlas-palette" in page
    css = (built_site / "assets" / "stylesheets" / "atlas-page.css").read_text(encoding="utf-8")
    used = set(re.findall(r'class="(atlas-ic\d+)"', page))
    assert used and all(f".{c}{{" in css for c in used)
    assert ".atlas-stats" in css and ".md-typeset" in css  # ours and the theme's, in one file
    # hand-written pages keep the full chrome (nav, search)
    home = (built_site / "index.html").read_text(encoding="utf-8")
    assert 'data-md-type="navigation"' in home and 'class="md-search"' in home
    assert not list(built_site.rglob("*.map"))             # the theme's source maps are not shipped


class _Text(HTMLParser):
    """A page's visible text, with script, style and noscript left out."""

    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style", "noscript")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def test_label_score_and_statistics_in_static_html(built_site):
    """Without JavaScript every page reads its label, score and statistics (compared with the shards)."""
    from atlas import pages, shards

    features = built_site.parent / "features"
    rows = [r for p in sorted(features.glob("features-*.parquet"))
            for r in shards.read_table(p, shards.FEATURES_SCHEMA).to_pylist()]
    assert len(rows) == N_FEATURES
    for row in rows:
        p = _Text()
        p.feed((built_site / "features" / str(row["feature_id"]) / "index.html").read_text(encoding="utf-8"))
        text = re.sub(r"\s+", " ", " ".join(p.parts))
        assert (row["label"] or "no label") in text, row["feature_id"]
        if not row["is_dead"]:
            f1 = row["label_f1"]
            assert f"Label score {'–' if f1 is None else format(f1, '.2f')}" in text, row["feature_id"]
        for name, value in (("Density", pages.fmt_pct(row["density"])), ("Tokens fired", f"{row['n_fired']:,}"),
                            ("Mean activation", pages.fmt_num(row["mean_act"])),
                            ("Max activation", pages.fmt_num(row["max_act"]))):
            assert f"{name} {value}" in text, (row["feature_id"], name)


def test_page_data_holds_the_shard_records(built_site):
    """data/pages/<g>.js, decoded, equals the shards: every feature row exactly, and the examples the site
    keeps (every top one; per interval the first sample, trimmed), their activations to float16 precision."""
    import pyarrow.compute as pc

    from atlas import page_data, shards

    features = built_site.parent / "features"
    manifest = shards.read_manifest(features)
    size = page_data.group_size(manifest["shard_size"])
    groups: dict[int, dict] = {}
    for fid in range(N_FEATURES):
        if fid // size not in groups:
            groups[fid // size] = page_data.read_group(built_site, fid // size)
        g = groups[fid // size]
        rec = shards.read_feature(features, fid, manifest)
        row = next(r for r in g["features"] if r["feature_id"] == fid)
        for key, value in rec.row.items():
            assert same_values(row[key], value), (fid, key, row[key], value)
        ex = shards.read_table(features / shards.shard_name("examples", fid // manifest["shard_size"]),
                               shards.EXAMPLES_SCHEMA)
        want = page_data.site_examples(ex.filter(pc.equal(ex["feature_id"], fid))).to_pylist()
        got = [e for e in g["examples"] if e["feature_id"] == fid]
        assert len(got) == len(want) == sum(e["kind"] == "top" or e["rank"] < page_data.INTERVAL_SAMPLES
                                            for e in rec.examples)
        half = ("acts", "activation")                                   # float16 in the data files
        for a, b in zip(got, want):
            assert same_values({k: v for k, v in a.items() if k not in half}, {k: v for k, v in b.items() if k not in half})
            assert same_values([a["activation"], *a["acts"]], [b["activation"], *b["acts"]], rel=1e-3), fid
        top = sorted((e for e in rec.examples if e["kind"] == "top"), key=lambda e: e["rank"])
        assert [e for e in want if e["kind"] == "top"] == top           # top examples whole, in rank order
        # trimmed interval windows are the shard's own tokens around the marked one
        for e in (e for e in want if e["kind"] != "top"):
            mark = e["offset"] - e["window_start"]
            assert 0 <= mark <= page_data.INTERVAL_WINDOW[0] and len(e["token_ids"]) - mark - 1 <= page_data.INTERVAL_WINDOW[1]
            full = next(x for x in rec.examples if x["kind"] == e["kind"] and x["interval"] == e["interval"]
                        and x["rank"] == e["rank"])
            start = e["window_start"] - full["window_start"]
            assert full["token_ids"][start:start + len(e["token_ids"])] == e["token_ids"]
            assert full["offset"] == e["offset"]


def test_bytes_per_feature(built_site):
    """What grows with the number of features (pages, their data files, the indexes) stays under the bound
    that lets 131,072 features and their analyser fit a 1 GB site: at most 6 KB a feature of all the site
    but the analyser's model files and vendored libraries (make bench measures whole sites)."""
    per_feature = [p for folder in ("features", "data") for p in (built_site / folder).rglob("*")
                   if p.is_file() and p.name != "vocab.js"]
    assert len(per_feature) <= N_FEATURES * 1.1 + 20           # a page each, a data file per 64, a few indexes
    size = sum(p.stat().st_size for p in per_feature) / N_FEATURES
    assert size <= 5_800, f"{size:.0f} bytes a feature"
    pages = sorted(p.stat().st_size for p in (built_site / "features").glob("*/index.html"))
    assert pages[len(pages) // 2] <= 3_200


def test_logits_omitted_without_unembedding(tmp_path, monkeypatch):
    """Without an output embedding the data files carry no logit ids, so js/feature.js draws no logit tables."""
    from atlas import page_data

    synthetic_shards.write(tmp_path / "runs" / "nologits", 20, shard_size=16, n_vocab=100, has_logits=False)
    monkeypatch.chdir(tmp_path)
    site = build.run(RunConfig(path="nologits.yaml"), analyser=False)
    rows = page_data.read_group(site, 0)["features"] + page_data.read_group(site, 1)["features"]
    assert len(rows) == 20 and not any(r["top_logit_ids"] or r["bottom_logit_ids"] for r in rows)
    assert "if (!f.top_logit_ids || !f.top_logit_ids.length) return;" in (site / "js" / "feature.js").read_text()


def test_group_and_dominated_by_shown_when_present(tmp_path, monkeypatch):
    """Analysis may add `group` (Matryoshka nesting level) and `dominated_by` ("special-token", "position"):
    the page shows them when the column exists, and the data file carries them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from atlas import page_data

    features = synthetic_shards.write(tmp_path / "runs" / "extra", 32, shard_size=16, n_vocab=100)
    for path in sorted(features.glob("features-*.parquet")):
        table = pq.read_table(path)
        ids = table.column("feature_id").to_numpy()
        group = pa.array(ids % 3, pa.int16())
        table = (table.set_column(table.column_names.index("group"), "group", group) if "group" in table.column_names
                 else table.append_column("group", group))
        dominated = pa.array(["special-token" if i % 4 == 1 else "position" if i % 4 == 2 else "" for i in ids])
        table = table.set_column(table.column_names.index("dominated_by"), "dominated_by", dominated)
        pq.write_table(table, path)
    write_stamp(features, "synthetic with group and dominated_by")
    monkeypatch.chdir(tmp_path)
    site = build.run(RunConfig(path="extra.yaml"), analyser=False)
    for fid in (1, 2, 3):
        text = re.sub(r"\s+", " ", (site / "features" / str(fid) / "index.html").read_text(encoding="utf-8"))
        assert f"Nesting level<dd>{fid % 3}<" in text
        mark = {1: "special-token", 2: "position", 3: None}[fid]
        assert ("atlas-badge dominated" in text) == bool(mark) and (not mark or f">{mark}</span>" in text)
    rows = {r["feature_id"]: r for r in page_data.read_group(site, 0)["features"]}
    assert rows[1]["group"] == 1 and rows[1]["dominated_by"] == "special-token" and rows[3]["dominated_by"] == ""


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


def test_skip_when_current(built_site, capsys, monkeypatch):
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


def test_notable_leaves_out_special_token_and_position_features(built_site):
    """Features the analysis marked dominated_by (planted in the synthetic run) are not among the notable
    cards or vague features by default, although some would rank there; the switch lists them."""
    table = search_index.read_feature_table(built_site.parent / "features")
    dominated = {int(i) for i, d in zip(table.ids, table.dominated_by) if d}
    assert dominated
    unmarked = dataclasses.replace(table, dominated_by=[""] * len(table.dominated_by))
    would_rank = set(build.notable_ids(unmarked)) | set(build.notable_ids(unmarked, 12, vague=True))
    assert would_rank & dominated, "no planted feature would rank: the test could not fail"
    page = (built_site / "notable.html").read_text(encoding="utf-8")
    ranked, _, switch = page.partition('<details class="atlas-dominated"')
    assert switch, "no switch showing the dominated features"
    shown = {int(m) for m in re.findall(r'href="features/(\d+)/index.html"', ranked)}
    assert shown and not shown & dominated
    listed = {int(m) for m in re.findall(r'href="features/(\d+)/index.html"', switch.split("</details>")[0])}
    assert listed and listed <= dominated
    assert "special-token" in switch and "position" in switch


def test_steer_box_only_where_the_export_has_the_steering_file(built_site, tmp_path, monkeypatch):
    """Without export.steering the feature pages and the prompt page carry no steer box (it would only fail);
    with a steering.json beside the analyser's files, both do."""
    from atlas.config import RunConfig

    page = (built_site / "features" / "3" / "index.html").read_text(encoding="utf-8")
    prompt = (built_site / "prompt.html").read_text(encoding="utf-8")
    assert "steer/box.js" not in page and "steer/box.js" not in prompt and "atlas-steer" not in prompt
    assert "atlas-prompt" in prompt                                       # the analyser itself stays

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.json").write_text(json.dumps({"files": []}))
    (onnx / "steering.json").write_text(json.dumps({"files": []}))
    features = built_site.parent / "features"
    monkeypatch.chdir(built_site.parent.parent.parent)
    site = tmp_path / "site"
    build.build_site(RunConfig(path="synth.yaml"), json.loads((features / "manifest.json").read_text()), features,
                     site, onnx_dir=onnx)
    assert "steer/box.js" in (site / "features" / "3" / "index.html").read_text(encoding="utf-8")
    prompt = (site / "prompt.html").read_text(encoding="utf-8")
    assert "steer/box.js" in prompt and "atlas-steer" in prompt and "atlas-prompt" in prompt


def test_strongest_tokens_per_feature_match_brute_force_and_reduce_by_shard():
    """The token index keeps, per feature, its MAX_TOKENS_PER_FEATURE strongest distinct tokens at their
    highest activation: checked against a dictionary built by hand, and reducing each shard's rows
    first (as the page workers do) gives the same rows as reducing all at once."""
    rng = np.random.default_rng(0)
    n = 20_000
    tok, feat = rng.integers(0, 60, n), rng.integers(0, 50, n)
    act = rng.random(n).astype(np.float32)
    best: dict[tuple[int, int], float] = {}
    for t, f, a in zip(tok.tolist(), feat.tolist(), act.tolist()):
        best[t, f] = max(a, best.get((t, f), a))
    want = set()
    for f in range(50):
        mine = sorted(((a, t) for (t, g), a in best.items() if g == f), reverse=True)
        want |= {(t, f, a) for a, t in mine[:search_index.MAX_TOKENS_PER_FEATURE]}
    t, f, a = search_index.strongest_tokens(tok, feat, act)
    assert set(zip(t.tolist(), f.tolist(), a.tolist())) == want
    parts = [search_index.strongest_tokens(tok[feat % 3 == s], feat[feat % 3 == s], act[feat % 3 == s]) for s in range(3)]
    joined = set(zip(*(np.concatenate([p[i] for p in parts]).tolist() for i in range(3))))
    assert joined == want
