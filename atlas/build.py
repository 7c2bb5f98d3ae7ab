"""`atlas build`: features/ (+ sae/metrics.jsonl, + onnx/) -> site/, a static MkDocs-Material site.

1. Read the small columns of every feature (labels, density, …) once.
2. Copy site_src/ to a temporary docs dir, write the generated pages into it (home, notable
   features, the feature-page skeleton under features/), and run MkDocs on it: the shell.
3. Stamp one page per feature from the built skeleton (atlas/pages.py), shard by shard in
   worker processes, and write the explorer/map/search indexes (atlas/search_index.py).
4. Copy the vendored npm files (site_src/vendor.json) and the web encoder (onnx/), put a
   Content-Security-Policy <meta> in every page, and check that no file is over 95 MB.

The site links relatively everywhere (`use_directory_urls: false`), so it works at a GitHub
Pages sub-path, from `python -m http.server` and from file://.

vendor.json (written by the export stage's owner) maps site paths to files or folders in the
repository, e.g. {"vendor/katex/katex.min.js": "node_modules/katex/dist/katex.min.js"}; a list
of {"from": …, "to": …} objects or {"files": {…}} is read the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from markupsafe import Markup

from atlas import links, page_data, pages, search_index, shards
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.stage import input_digest, open_stage, read_stamp, rerun, sae_digest, sha256_file
from atlas.suite import configs, is_suite, members

ROOT = Path(__file__).resolve().parent.parent
SITE_SRC = ROOT / "site_src"
MKDOCS_YML = ROOT / "mkdocs.yml"
MAX_FILE_BYTES = 95 * 1024 * 1024
NOTABLE_MARK = "@@ATLAS_NOTABLE@@"


def run(cfg: RunConfig, force: bool = False, analyser: bool = True) -> Path:
    """Build runs/<name>/site from the run's features (skipped when already current).

    With `analyser` the export's files are required (a site whose prompt analyser silently went
    missing is not published); without it the site is built without them (`--no-analyser`)."""
    if is_suite(cfg):
        return run_suite(cfg, force, analyser)
    features_dir, onnx_dir, out = cfg.features_dir, cfg.onnx_dir, cfg.site_dir
    metrics = cfg.sae_dir / "metrics.jsonl"
    if analyser and not onnx_dir.exists():
        raise AtlasError(f"{onnx_dir}: missing: the prompt analyser needs the export's files; run "
                         f"`{rerun('export', cfg)}` first, or build without the analyser (--no-analyser)")
    inputs = {"features": input_digest(features_dir, "analyze", cfg),
              "onnx": input_digest(onnx_dir, "export", cfg) if analyser else "none",
              "metrics": sha256_file(metrics) if metrics.exists() else "none", "source": _source_hash()}
    _require_same_sae(cfg, [(features_dir, "analyze")] + ([(onnx_dir, "export")] if analyser else []))
    opening = open_stage("build", cfg, out, ("build",), inputs, force)
    if opening.current:
        return out
    manifest = shards.read_manifest(features_dir)
    _require_finite_features(features_dir, cfg)
    with opening.write() as tmp:
        build_site(cfg, manifest, features_dir, tmp, metrics_path=metrics,
                   onnx_dir=onnx_dir if analyser else None)
        n_pages = sum(1 for _ in (tmp / "features").glob("*/index.html"))
        if n_pages != manifest["n_features"]:
            raise AtlasError(f"{features_dir / 'manifest.json'}: {manifest['n_features']:,} features, but the shards "
                             f"hold {n_pages:,}; run `{rerun('analyze', cfg)} --force`")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"build: wrote {out} ({manifest['n_features']:,} feature pages, {size / 1e6:,.0f} MB)")
    return out


def run_suite(cfg: RunConfig, force: bool = False, analyser: bool = True) -> Path:
    """Build runs/<name>/site for a suite: each member's whole site (the single-SAE build, pages with
    the suite's switcher and cross-SAE links) under site/<id>/, and at the root the suite's home
    (members' table, metrics across layers), its prompt analyser (one trunk, an encoder per SAE)
    and the theme it needs."""
    views, ms = configs(cfg), members(cfg)
    out, onnx_dir, links_dir = cfg.site_dir, cfg.onnx_dir, cfg.links_dir
    if analyser and not onnx_dir.exists():
        raise AtlasError(f"{onnx_dir}: missing: the prompt analyser needs the export's files; run "
                         f"`{rerun('export', cfg)}` first, or build without the analyser (--no-analyser)")
    inputs = {"source": _source_hash(), "onnx": input_digest(onnx_dir, "export", cfg) if analyser else "none",
              "links": input_digest(links_dir, "links", cfg)}
    for m, view in zip(ms, views):
        metrics = view.sae_dir / "metrics.jsonl"
        inputs[m.id] = input_digest(view.features_dir, "analyze", view)
        inputs[m.id + ":metrics"] = sha256_file(metrics) if metrics.exists() else "none"
        _require_same_sae(view, [(view.features_dir, "analyze")])
    opening = open_stage("build", cfg, out, ("build",), inputs, force)
    if opening.current:
        return out
    manifests = {m.id: shards.read_manifest(v.features_dir) for m, v in zip(ms, views)}
    tables = {m.id: search_index.read_feature_table(v.features_dir) for m, v in zip(ms, views)}
    labels = {k: _dense_labels(t) for k, t in tables.items()}
    titles = [(m.id, f"layer {m.layer}, {m.d_sae:,} features") for m in ms]
    with opening.write() as tmp:
        with tempfile.TemporaryDirectory(prefix="atlas-docs-") as docs:   # the root first: MkDocs empties its folder
            docs = Path(docs)
            write_suite_docs(docs, cfg, ms, manifests, tables)
            build_shell(docs, tmp, cfg)
        prune_theme(tmp)
        add_csp(tmp)
        copy_vendor(tmp)
        if analyser:
            copy_onnx(onnx_dir, tmp)
        for m, view in zip(ms, views):
            _require_finite_features(view.features_dir, view)
            facts = pages.SuiteFacts(sae=m.id, members=titles, links=labelled_links(links_dir, m.id, labels))
            build_site(view, manifests[m.id], view.features_dir, tmp / m.id,
                       metrics_path=view.sae_dir / "metrics.jsonl", suite=facts)
            n_pages = sum(1 for _ in (tmp / m.id / "features").glob("*/index.html"))
            if n_pages != manifests[m.id]["n_features"]:
                raise AtlasError(f"{view.features_dir / 'manifest.json'}: {manifests[m.id]['n_features']:,} features, "
                                 f"but the shards hold {n_pages:,}; run `{rerun('analyze', view)} --force`")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    n = sum(int(mf["n_features"]) for mf in manifests.values())
    print(f"build: wrote {out} ({len(ms)} SAEs, {n:,} feature pages, {size / 1e6:,.0f} MB)")
    return out


def labelled_links(links_dir: Path, member_id: str, labels: dict[str, list[str]]) -> dict[int, dict[str, list[dict]]]:
    """links/<member>.parquet (links.read_links) with each linked feature's label."""
    if not (links_dir / f"{member_id}.parquet").exists():
        raise AtlasError(f"{links_dir / (member_id + '.parquet')}: missing; run `atlas links --force`")

    def label(sae: str, fid: int) -> str:
        other = labels.get(sae, [])
        return other[fid] if 0 <= fid < len(other) else ""

    return {fid: {rel: [{"sae": sae, "id": int(i), "cosine": float(c), "label": label(sae, int(i))} for sae, i, c in rows]
                  for rel, rows in by_relation.items()}
            for fid, by_relation in links.read_links(links_dir, member_id).items()}


def _require_same_sae(cfg: RunConfig, outputs: list[tuple[Path, str]]) -> None:
    """Pages and the browser's encoder must describe the run's current SAE, never a mix of two."""
    sae_dir = cfg.sae_dir
    if read_stamp(sae_dir) is None:
        return  # features published without their SAE
    current = sae_digest(cfg)
    for path, stage in outputs:
        made_from = ((read_stamp(path) or {}).get("inputs") or {}).get("sae")
        if made_from and made_from != current:
            raise AtlasError(f"{path}: made from an earlier {sae_dir}; run `{rerun(stage, cfg)}` first")


FINITE_COLUMNS = ("density", "mean_act", "max_act", "map_x", "map_y", "hist_edges", "interval_edges",
                  "top_logit_values", "bottom_logit_values", "neighbour_cosines")


def _require_finite_features(features_dir: Path, cfg: RunConfig) -> None:
    """A page shows numbers; NaN or inf in a shard is a broken analysis, not something to render."""
    import pyarrow as pa

    for path in sorted(features_dir.glob("features-*.parquet")):
        table = shards.read_table(path, shards.FEATURES_SCHEMA)
        ids = table.column("feature_id").to_numpy()
        for name in FINITE_COLUMNS:
            col = table.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                values, owner = col.values.to_numpy(zero_copy_only=False), col.value_parent_indices().to_numpy()
            else:
                values, owner = col.to_numpy(zero_copy_only=False), np.arange(len(col))
            bad = ~np.isfinite(values)
            if bad.any():
                raise AtlasError(f"{path}: feature {ids[owner[bad.argmax()]]} has {name} = {values[bad][0]}; "
                                 f"run `{rerun('analyze', cfg)} --force`")


def build_site(cfg: RunConfig, manifest: dict, features_dir: Path, site: Path, *, metrics_path: Path | None = None,
               onnx_dir: Path | None = None, workers: int | None = None,
               suite: pages.SuiteFacts | None = None) -> dict:
    """Write the whole site into `site`; returns timings in seconds (for the benchmark)."""
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    table = search_index.read_feature_table(features_dir)
    vocab = shards.read_vocab(features_dir)
    steering = onnx_dir is not None and (onnx_dir / "steering.json").exists()   # only a single SAE's export has it
    with tempfile.TemporaryDirectory(prefix="atlas-docs-") as docs:
        docs = Path(docs)
        write_docs(docs, cfg, manifest, table, _read_metrics(metrics_path), in_suite=suite is not None,
                   steering=steering)
        build_shell(docs, site, cfg)
    prune_theme(site)
    add_csp(site)
    t_shell = time.perf_counter()

    skel_dir = site / "features" / pages.SKELETON
    skeleton = pages.Skeleton.from_html((skel_dir / "index.html").read_text(encoding="utf-8"),
                                        lambda path: (site / path).read_text(encoding="utf-8"))
    shutil.rmtree(skel_dir)
    for name, text in skeleton.assets.items():          # the shared files the lean chrome refers to
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text, encoding="utf-8")
    facts = pages.SiteFacts(n_features=table.n, labels=_dense_labels(table), vocab=vocab,
                            group_size=page_data.group_size(int(manifest["shard_size"])), suite=suite,
                            steering=steering)
    page_data.write_vocab(site, vocab)
    n_shards = len(list(features_dir.glob("features-*.parquet")))
    parts = []
    with tqdm(total=n_shards, desc="feature pages", unit="shard", disable=None) as bar:
        for part in pages.render_all(features_dir, site, skeleton, facts, workers, bar.update):
            parts.append(part)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    top_token = np.full(table.n, -1, np.int32)
    consistency = np.zeros(table.n, np.float32)
    top_token[cat["ids"]], consistency[cat["ids"]] = cat["top_token"], cat["consistency"]
    t_pages = time.perf_counter()

    data = site / "data"
    search_index.write_features(data, table, top_token[table.ids], vocab)
    search_index.write_tokens(data, cat["tok_token"], cat["tok_feature"], cat["tok_act"], vocab)
    search_index.add_to_header_search(site, table)
    fill_notable(site, features_dir, manifest, table, top_token, consistency, facts)
    if suite is None:   # a suite's members use the vendored files at the suite's root
        copy_vendor(site)
    if onnx_dir is not None:
        copy_onnx(onnx_dir, site)
    check_sizes(site)
    return {"shell_s": t_shell - t0, "pages_s": t_pages - t_shell, "indexes_s": time.perf_counter() - t_pages,
            "total_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- the MkDocs shell


def write_docs(docs: Path, cfg: RunConfig, manifest: dict, table: search_index.FeatureTable, metrics: list[dict],
               in_suite: bool = False, steering: bool = False):
    """site_src/ plus the generated pages, ready for MkDocs (`in_suite`: for one member of a suite's site,
    under site/<id>/, whose prompt analyser is the suite's, at the root; `steering`: the export has the
    steering file, so the prompt page keeps its steer box)."""
    shutil.copytree(SITE_SRC, docs, dirs_exist_ok=True)
    if not steering:
        drop_steer_box(docs / "prompt.md")
    (docs / "js" / "suite-search.js").unlink()   # only a suite's root search page uses it
    env = pages.jinja_env()
    (docs / "index.md").write_text(env.get_template("home.md").render(home_view(cfg, manifest, table, metrics)))
    (docs / "notable.md").write_text(env.get_template("notable.md").render(mark=NOTABLE_MARK))
    search = docs / "search.md"   # its help names the atlas's own model and its tokens
    if search.exists():
        model = pages.html.escape(str(manifest.get("model") or cfg.model.name))
        search.write_text(search.read_text(encoding="utf-8").replace("{{ model }}", model), encoding="utf-8")
    skel = docs / "features" / pages.SKELETON
    skel.mkdir(parents=True)
    (skel / "index.md").write_text(f"---\ntitle: '{pages.TITLE_MARK}'\nhide: [navigation, toc]\nsearch:\n  exclude: true\n---\n\n{pages.CONTENT_MARK}\n")
    if in_suite:
        with open(docs / "index.md", "a", encoding="utf-8") as home:
            home.write("\n\nThis SAE is one of a suite: see [the suite's home](../index.html) for the others.\n")
        (docs / "prompt.md").write_text("# Try a prompt\n\nThe suite's prompt analyser runs every SAE of the suite "
                                        "on your text: [try a prompt](../prompt.html).\n")
    elif not (docs / "prompt.md").exists():
        (docs / "prompt.md").write_text("# Try a prompt\n\nThe in-browser prompt analyser is not part of this build.\n")


STEER_HEADING = "## Steer the model"


def drop_steer_box(prompt_md: Path) -> None:
    """The prompt page without its steer box section (the site has no steering file to run it on)."""
    text = prompt_md.read_text(encoding="utf-8")
    start = text.index(STEER_HEADING)
    end = text.index("</script>", text.index("js/steer/box.js", start)) + len("</script>")
    prompt_md.write_text(text[:start] + text[end:].lstrip("\n"), encoding="utf-8")


SUITE_SECTIONS = {"explorer": ("Explorer", "explorer.html"), "map": ("Feature map", "map.html"),
                  "search": ("Search", "search.html"), "notable": ("Notable features", "notable.html")}
"""The per-SAE pages; the suite's root has one page each linking to every member's."""


def write_suite_docs(docs: Path, cfg: RunConfig, ms: list, manifests: dict[str, dict],
                     tables: dict[str, search_index.FeatureTable]) -> None:
    """The suite root's MkDocs sources: site_src/ (the prompt analyser, methodology, about), the suite's
    home, and for each per-SAE page (explorer, map, search, notable) one listing every member's."""
    shutil.copytree(SITE_SRC, docs, dirs_exist_ok=True)
    drop_steer_box(docs / "prompt.md")   # a suite exports no steering file
    env = pages.jinja_env()
    rows = [suite_row(m, manifests[m.id], tables[m.id]) for m in ms]
    (docs / "index.md").write_text(env.get_template("suite_home.md").render(
        title=markdown_text(cfg.build.title), rows=rows, charts=suite_charts(rows)), encoding="utf-8")
    for name, (title, page) in SUITE_SECTIONS.items():
        if name == "search":
            continue
        items = "\n".join(f"- [{r['id']}]({r['id']}/{page}): layer {r['layer']}, {r['width']} features" for r in rows)
        (docs / f"{name}.md").write_text(f"# {title}\n\nEach SAE of the suite has its own {title.lower()}:\n\n{items}\n",
                                         encoding="utf-8")


    saes = " ".join(r["id"] for r in rows)   # ids are L<layer> or L<layer>-<width>: no quoting needed
    (docs / "search.md").write_text(
        "# Search\n\nFind features by their **label** in every SAE of the suite (each SAE's own search page "
        "also finds them by the tokens they fire on: "
        + ", ".join(f"[{r['id']}]({r['id']}/search.html)" for r in rows) + ").\n\n"
        f'<div id="atlas-suite-search" class="atlas-app" data-saes="{saes}">\n<div class="atlas-controls">\n'
        '<input type="search" id="atlas-q" placeholder="Search labels…" autocomplete="off" aria-label="Search labels">\n'
        '<span id="atlas-search-status" aria-live="polite"></span>\n</div>\n'
        '<ol id="atlas-results" class="atlas-results"></ol>\n</div>\n\n<script src="js/suite-search.js"></script>\n',
        encoding="utf-8")


def suite_row(m, manifest: dict, table: search_index.FeatureTable) -> dict:
    """One line of the suite home's table, from the member's features manifest (its SAE's cfg and metrics)."""
    sae = manifest.get("sae_cfg") or {}
    values = manifest.get("metrics") or {}
    arch = (sae.get("metadata") or {}).get("training_architecture") or sae.get("architecture") or "–"

    def num(key):
        v = values.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    dead = num("dead_fraction")
    if dead is None:   # no held-out metrics: the analysed tokens' count
        dead = float(table.is_dead.mean()) if table.n else None
    cells = {"l0": num("l0"), "explained_variance": num("explained_variance"), "ce_loss_score": num("ce_loss_score")}
    return {"id": m.id, "layer": m.layer, "d_sae": m.d_sae, "width": f"{m.d_sae:,}", "architecture": arch,
            "values": cells, "text": {k: pages.fmt_num(v) if v is not None else "–" for k, v in cells.items()},
            "dead": pages.fmt_pct(dead) if dead is not None else "–"}


SUITE_CHART_METRICS = {"explained_variance": "Explained variance", "ce_loss_score": "CE-loss score", "l0": "L0"}


def suite_charts(rows: list[dict], width: int = 260, height: int = 140) -> list[dict]:
    """One small inline-SVG chart per metric: its value at each layer, one line per SAE width."""
    left, bottom, top, right = 40, 28, 8, 10
    plot_w, plot_h = width - left - right, height - top - bottom
    layers = sorted({r["layer"] for r in rows})
    x0, x1 = layers[0], layers[-1]
    out = []
    for key, name in SUITE_CHART_METRICS.items():
        pts = [(r["layer"], r["values"][key], r["d_sae"]) for r in rows if r["values"][key] is not None]
        if not pts:
            continue
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)

        def xy(layer, v):
            x = left + (plot_w * (layer - x0) / (x1 - x0) if x1 > x0 else plot_w / 2)
            return f"{x:.1f}", f"{top + plot_h - (plot_h * (v - y0) / (y1 - y0) if y1 > y0 else plot_h / 2):.1f}"

        lines = []
        for w in sorted({p[2] for p in pts}):
            mine = sorted((p for p in pts if p[2] == w), key=lambda p: p[0])
            dots = [dict(zip(("x", "y"), xy(layer, v)), title=f"layer {layer}, {w:,} features: {pages.fmt_num(v)}")
                    for layer, v, _ in mine]
            lines.append({"width": f"{w:,}", "points": " ".join(f"{d['x']},{d['y']}" for d in dots), "dots": dots})
        base = top + plot_h
        out.append({"name": name, "width": width, "height": height, "lines": lines,
                    "axes": f"M{left} {top}V{base}H{width - right}",
                    "xticks": [{"x": xy(layer, y0)[0], "y": base + 14, "text": layer} for layer in layers],
                    "yticks": [{"x": left - 4, "y": f"{float(xy(x0, v)[1]) + 4:.0f}", "text": pages.fmt_num(v)}
                               for v in ((y0, y1) if y1 > y0 else (y0,))],
                    "x_title": {"x": left + plot_w / 2, "y": height - 2}})
    return out


def build_shell(docs: Path, site: Path, cfg: RunConfig) -> None:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    # The theme puts site_name into every page, mostly without escaping it: hand it over as markup
    # already escaped (templates that do escape leave Markup alone, so nothing is escaped twice).

    for name in ("mkdocs", "material"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        mk = load_config(config_file=str(MKDOCS_YML), docs_dir=str(Path(docs).resolve()), site_dir=str(Path(site).resolve()),
                         site_name=Markup.escape(cfg.build.title), site_url=cfg.build.site_url or None)
        build(mk)
    except MkDocsException as e:
        raise AtlasError(f"{MKDOCS_YML}: MkDocs failed: {e}") from None
    # the skeleton is not a page of the site: keep it out of the sitemap
    for sm in ("sitemap.xml", "sitemap.xml.gz"):
        (site / sm).unlink(missing_ok=True)
    # 404.html links from the server root ("/…"), which is wrong at a sub-path unless site_url names it
    if not cfg.build.site_url:
        (site / "404.html").unlink(missing_ok=True)


def prune_theme(site: Path) -> None:
    """Drop theme files no page loads: source maps, and lunr's language packs when search is English only
    (~2.2 MB, a third of a KB per feature of the demo; see tests/bench/bench_pages.py)."""
    for path in site.glob("assets/**/*.map"):
        path.unlink()
    index = site / "search" / "search_index.json"
    langs = json.loads(index.read_text(encoding="utf-8")).get("config", {}).get("lang", []) if index.exists() else []
    if langs == ["en"]:
        shutil.rmtree(site / "assets" / "javascripts" / "lunr", ignore_errors=True)


def add_csp(site: Path) -> None:
    """Put the Content-Security-Policy <meta> into every page MkDocs built (feature pages get it from the skeleton)."""
    for path in site.rglob("*.html"):
        if pages.SKELETON not in path.parts:
            path.write_text(pages.with_csp(path.read_text(encoding="utf-8")), encoding="utf-8")


# ---------------------------------------------------------------- generated pages


def home_view(cfg: RunConfig, manifest: dict, table: search_index.FeatureTable, metrics: list[dict]) -> dict:
    sae = manifest.get("sae_cfg") or {}
    # the SAE's own cfg.json (recorded by analyze), never the run config's sae section: after
    # import-sae the two differ
    arch = (sae.get("metadata") or {}).get("training_architecture") or sae.get("architecture") or "–"
    n = int(sae.get("d_sae", table.n))
    n_tokens = manifest.get("n_tokens")
    analysed = f"the {n_tokens:,} analysed tokens" if isinstance(n_tokens, int) else "the analysed tokens"
    glance = [
        ("Model", cfg.build.model_name or manifest.get("model", cfg.model.name)),
        ("Layer", f"{manifest.get('layer', cfg.model.layer)} ({manifest.get('hook_name', cfg.hook_name)})"),
        ("SAE", arch + (f", k = {sae['k']}" if "k" in sae else "")),
        ("Width", f"{n:,} features"),
        ("Analysed tokens", f"{n_tokens:,}" if isinstance(n_tokens, int) else "–"),
        ("Dead features", f"{int(table.is_dead.sum()):,} of {n:,} never fired on {analysed}"),
        ("Dense features", f"{int(table.is_dense.sum()):,} of {n:,} fired on more than "
                           f"{pages.fmt_pct(cfg.analyze.dense_threshold)} of {analysed}"),
    ]
    values = manifest.get("metrics") or {}
    held_out = (f"the {int(values['eval_tokens']):,} held-out evaluation tokens"
                if isinstance(values.get("eval_tokens"), (int, float)) else "the held-out evaluation tokens")
    metric_rows = []
    for k, name in METRIC_NAMES.items():
        v = values.get(k)
        if not isinstance(v, (int, float)):
            continue
        if k in ("dead_fraction", "dense_fraction"):   # a share of features: as a percentage and a count
            text = f"{pages.fmt_pct(float(v))} ({round(v * n):,} of {n:,})"
            help = METRIC_HELP[k].format(held_out=held_out, dense=pages.fmt_pct(cfg.analyze.dense_threshold))
        else:
            text, help = pages.fmt_num(float(v)), METRIC_HELP.get(k, "")
        metric_rows.append((name, text, help))
    return {"title": markdown_text(cfg.build.title), "glance": glance, "metrics": metric_rows, "curves": curves(metrics),
            "scores": score_distribution(table, manifest)}


def markdown_text(text: str) -> str:
    """`text` shown literally where Markdown is rendered: its link, emphasis and attribute syntax
    ([x](javascript:…), {: onclick=…}) escaped. The template's HTML escaping still applies."""
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in " ".join(text.split()))


MARKDOWN_SPECIAL = set("\\`*_{}[]#+-.!|$")
"""Not ( ): without [ ] they make no link, and escaped they open arithmatex's inline math."""


def score_distribution(table: search_index.FeatureTable, manifest: dict, bins: int = 10, width: int = 320,
                       height: int = 100) -> dict | None:
    """The home page's histogram of label scores (F1 on held-out text) over the live features."""
    live = ~table.is_dead
    f1 = table.label_f1[live]
    scored = f1[np.isfinite(f1)]
    if not len(scored):
        return None
    counts, _ = np.histogram(scored, bins=bins, range=(0.0, 1.0))
    bw = width / bins
    top = max(int(counts.max()), 1)
    bars = [{"x": f"{i * bw + 1:.0f}", "w": f"{bw - 2:.0f}", "y": f"{height - height * c / top:.0f}",
             "h": f"{height * c / top:.0f}", "title": f"{i / bins:.1f}–{(i + 1) / bins:.1f}: {c:,} features"}
            for i, c in enumerate(counts.tolist())]
    ls = manifest.get("label_scores") or {}
    return {"bars": bars, "width": width, "height": height, "median": f"{np.median(scored):.2f}",
            "at_least_half": pages.fmt_pct(float((scored >= 0.5).mean())), "n_scored": f"{len(scored):,}",
            "n_unscored": f"{int(live.sum()) - len(scored):,}", "source": manifest.get("label_source", ""),
            "score_tokens": f"{ls['score_tokens']:,}" if isinstance(ls.get("score_tokens"), int) else ""}


METRIC_NAMES = {"explained_variance": "Explained variance", "l0": "L0", "mse": "MSE",
                "dead_fraction": "Dead features", "dense_fraction": "Dense features",
                "ce_loss_score": "CE-loss score", "kl_score": "KL score", "ce_clean": "CE loss, clean",
                "ce_sae": "CE loss with SAE", "ce_zero": "CE loss, zero-ablated"}
"""The evaluation metrics (sae/metrics.json) the home page shows, in order."""
METRIC_HELP = {"explained_variance": "1 − FVU on held-out activations", "l0": "mean active features per token",
               "ce_loss_score": "share of the CE loss increase from zero-ablation recovered by the SAE",
               "kl_score": "1 − KL(SAE) / KL(zero-ablation)",
               "dead_fraction": "features that never fired on {held_out} (the run at a glance counts the analysed tokens)",
               "dense_fraction": "features that fired on more than {dense} of {held_out}"}


CURVE_UNITS = {"loss": "training loss, per token", "mse": "per token", "l0": "features per token",
               "dead_fraction": "share of features", "explained_variance": "share of variance"}
"""What the training curves' y axes measure (sae/metrics.jsonl keys)."""


def _tick(x: float) -> str:
    """An axis label: 2.5M, 400k, 0.31."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return pages.fmt_num(x)


def curves(metrics: list[dict], width=320, height=150) -> list[dict]:
    """One small inline-SVG line chart per numeric metric in sae/metrics.jsonl, with both axes labelled."""
    if not metrics:
        return []
    xkey = next((k for k in ("tokens", "step") if k in metrics[0]), None)
    xs = [r.get(xkey, i) for i, r in enumerate(metrics)] if xkey else list(range(len(metrics)))
    keys = [k for k in metrics[0] if k not in ("step", "tokens", "lr", "time", "elapsed")
            and isinstance(metrics[0][k], (int, float)) and not isinstance(metrics[0][k], bool)]
    left, bottom, top, right = 44, 30, 6, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    out = []
    for k in keys[:8]:
        pts = [(x, r[k]) for x, r in zip(xs, metrics)
               if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if len(pts) < 2:
            continue
        x1 = max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = plot_w / (x1 or 1)
        sy = plot_h / ((y1 - y0) or 1)
        step = max(1, len(pts) // 400)
        poly = " ".join(f"{left + x * sx:.1f},{top + plot_h - (y - y0) * sy:.1f}" for x, y in pts[::step])
        base = top + plot_h
        yticks = [{"x": left - 4, "y": f"{top + plot_h - (v - y0) * sy + 4:.0f}", "text": _tick(v)}
                  for v in ((y0, y1) if y1 > y0 else (y0,))]
        xticks = [{"x": f"{left + v * sx:.0f}", "y": base + 13, "text": _tick(v), "anchor": a}
                  for v, a in ((0, "start"), (x1 / 2, "middle"), (x1, "end"))]
        ticks = "".join(f"M{left + v * sx:.0f} {base}v3" for v in (0, x1 / 2, x1))
        ticks += "".join(f"M{left - 3} {top + plot_h - (v - y0) * sy:.0f}h3" for v in (y0, y1))
        out.append({"name": METRIC_NAMES.get(k, k), "unit": CURVE_UNITS.get(k, ""), "points": poly,
                    "width": width, "height": height, "lo": pages.fmt_num(y0), "hi": pages.fmt_num(y1),
                    "last": pages.fmt_num(pts[-1][1]), "xmax": _tick(x1),
                    "x_name": {"tokens": "tokens", "step": "steps"}.get(xkey, "records"),
                    "axes": f"M{left} {top}V{base}H{width - right}" + ticks, "yticks": yticks, "xticks": xticks,
                    "x_title": {"x": left + plot_w / 2, "y": height - 3}})
    return out


NOTABLE_MIN_FIRED = 10
"""Held-out firings a feature needs before the notable page trusts its score either way."""


def notable_ids(table: search_index.FeatureTable, n: int = 24, vague: bool = False, dominated: bool = False) -> list[int]:
    """The best-labelled features (the measured "high monosemanticity"): alive, not dense, not dominated
    by special tokens or position, scored on at least NOTABLE_MIN_FIRED held-out firings, highest label
    F1 first (ties: stronger max activation). With `vague`, the worst-labelled such features instead,
    lowest F1 first; with `dominated`, the dominated ones only."""
    is_dominated = np.array([bool(d) for d in table.dominated_by], bool)
    ok = ~(table.is_dead | table.is_dense) & np.isfinite(table.label_f1) & (table.heldout_fired >= NOTABLE_MIN_FIRED)
    ok &= is_dominated if dominated else ~is_dominated
    f1 = np.where(ok, table.label_f1, np.nan)
    key = f1 if vague else -f1
    order = np.lexsort((-table.max_act, np.nan_to_num(key, nan=np.inf)))
    return [int(table.ids[i]) for i in order[:n] if ok[i]]


def fill_notable(site: Path, features_dir: Path, manifest: dict, table, top_token, consistency, facts) -> None:
    path = site / "notable.html"
    if not path.exists():
        return
    vocab_html = [pages.html.escape(pages.display_token(t)) for t in facts.vocab]
    index = {int(i): k for k, i in enumerate(table.ids)}

    def card(fid: int, with_examples: bool) -> dict:
        k = index[fid]
        t = int(top_token[fid])
        c = {"id": fid, "label": table.labels[k], "density": pages.fmt_pct(table.density[k]),
             "max_act": pages.fmt_num(table.max_act[k]), "consistency": f"{100 * consistency[fid]:.0f}%",
             "token": pages.display_token(facts.vocab[t]) if 0 <= t < len(facts.vocab) else "", "examples": [],
             "score": None, "f1": f"{table.label_f1[k]:.2f}"}
        if with_examples:  # case studies: their score in words and their strongest contexts
            rec = shards.read_feature(features_dir, fid, manifest)
            r = rec.row
            c["score"] = pages.score_view(r["label_precision"], r["label_recall"], r["label_f1"], r["label_matched"],
                                          r["heldout_fired"], r["label_scoring"], r["is_dead"])
            top = sorted((e for e in rec.examples if e["kind"] == "top"), key=lambda e: e["rank"])[:3]
            c["examples"] = [Markup(pages.token_markup(vocab_html, e["token_ids"], e["acts"], r["max_act"],
                                                       e["offset"] - e["window_start"])) for e in top]
        return c

    best = [card(fid, rank < 6) for rank, fid in enumerate(notable_ids(table))]
    vague = [card(fid, False) for fid in notable_ids(table, 12, vague=True)]
    dominated = [dict(card(fid, False), dominated_by=table.dominated_by[index[fid]])
                 for fid in notable_ids(table, dominated=True)]
    html = pages.jinja_env().get_template("notable.html").render(cards=best, vague=vague, dominated=dominated,
                                                                 min_fired=NOTABLE_MIN_FIRED)
    text = path.read_text(encoding="utf-8")
    text = text.replace(f"<p>{NOTABLE_MARK}</p>", html).replace(NOTABLE_MARK, html)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- copied files


def copy_vendor(site: Path) -> None:
    """Copy the npm files named in site_src/vendor.json into the site (never a CDN)."""
    path = SITE_SRC / "vendor.json"
    if not path.exists():
        return
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AtlasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(spec, dict) and isinstance(spec.get("files"), (dict, list)):
        spec = spec["files"]
    pairs = spec.items() if isinstance(spec, dict) else [(e.get("to") or e.get("dest"), e.get("from") or e.get("src"))
                                                          for e in spec if isinstance(e, dict)]
    for dest, src in pairs:
        if not isinstance(dest, str) or not isinstance(src, str) or dest.startswith("_"):
            continue
        source, target = ROOT / src, site / dest.lstrip("/")
        if not source.exists():
            print(f"build: warning: {path}: {src} is missing (run `npm ci`); {dest} left out", file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)


def copy_onnx(onnx_dir: Path, site: Path) -> None:
    """What the prompt analyser downloads: model.json and the files it lists (the web encoder,
    its external data, tokenizer.json) -- not the full-precision encoder or the parity report."""
    try:
        files = json.loads((onnx_dir / "model.json").read_text())["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        raise AtlasError(f"{onnx_dir / 'model.json'}: missing or unreadable; run `atlas export` again") from None
    dest = site / "onnx"
    dest.mkdir(exist_ok=True)
    for name in ["model.json", *files]:
        shutil.copy2(onnx_dir / name, dest / Path(name).name)
    if (onnx_dir / "steering.json").exists():  # the steer box's file (export.steering)
        for name in ["steering.json", *json.loads((onnx_dir / "steering.json").read_text())["files"]]:
            shutil.copy2(onnx_dir / name, dest / Path(name).name)


def check_sizes(site: Path) -> None:
    big = [p for p in site.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    if big:
        raise AtlasError(f"{big[0]}: {big[0].stat().st_size / 2**20:.0f} MB, over GitHub's 95 MB file limit")


# ---------------------------------------------------------------- helpers


def _dense_labels(table: search_index.FeatureTable) -> list[str]:
    labels = [""] * table.n
    for i, lab in zip(table.ids.tolist(), table.labels):
        labels[i] = lab
    return labels


def _read_metrics(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"build: warning: {path} line {n}: not JSON, skipped", file=sys.stderr)
    return rows


def _source_hash() -> str:
    """What the site is made with besides the data: site_src/, templates/, mkdocs.yml and this code."""
    h = hashlib.sha256()
    files = [MKDOCS_YML, *sorted(SITE_SRC.rglob("*")), *sorted((ROOT / "templates").rglob("*")),
             *(Path(__file__).parent / m for m in ("build.py", "links.py", "page_data.py", "pages.py", "search_index.py", "shards.py"))]
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]

