"""Site size at scale: the lean page format against the format before it, on synthetic GPT-2 Small shapes.

    python tests/bench/bench_pages.py [N_FEATURES=131072] [OLD_SAMPLE=4096]

1. Writes N synthetic features (tests/synthetic_shards.py: analyze's defaults, 20 top windows of 33
   tokens and 10 intervals x 5 samples each, hostile text mixed in, pessimistic token entropy: tokens
   drawn uniformly from 5,000) and builds the site with this checkout's code, timing the build.
2. Builds the first OLD_SAMPLE features of the same shards with the code at OLD_COMMIT (every page
   stamped with its examples as markup), from `git archive`, in a subprocess; its bytes per feature
   are measured on that sample (the format's size is linear in the number of pages).
3. Reports, for both: site bytes (all but the analyser's model files `onnx/` and the vendored
   libraries `assets/vendor/`), file count, bytes per feature (that size / N), median page, the
   data files, and time to first paint and to drawn examples of one feature page in headless Chromium
   (median of 5 cold loads, served over http on this machine).
4. Projects the 12 x 24,576 suite from the measured bytes per feature, and adds the analyser for the
   1 GB question: its size is not built here (no GPT-2 weights offline); it is computed from GPT-2
   Small's shapes at the web file's measured bytes per weight (the demo's w8-emb4 file, README), and
   the notes say so.

Writes runs/bench/pages.json ({"title", "columns", "rows", "notes"}, see run_all.py).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import synthetic_shards  # noqa: E402
from atlas import build, shards  # noqa: E402
from atlas.config import RunConfig  # noqa: E402

OLD_COMMIT = "314d883"
"""The last commit whose feature pages carried their examples as markup (the format this one replaces)."""
EXCLUDED = ("onnx", "assets/vendor")
"""What "bytes per feature" leaves out: the analyser's model files and the vendored libraries."""
GPT2_SMALL_TRUNK_WEIGHTS = 50257 * 768 + 1024 * 768 + 8 * (12 * 768 * 768 + 13 * 768)
"""Embeddings, positions and blocks 0-7 (up to blocks.8.hook_resid_pre) of GPT-2 Small."""
WEB_BYTES_PER_WEIGHT = 1.0
"""8-bit weights (the web file stores int8 weights and per-channel scales; scales are ~0.1% more)."""


def site_stats(site: Path, n_features: int) -> dict:
    """Sizes of a built site; "scaling" is what grows with the features (features/, data/ but the vocabulary)."""
    files = [p for p in site.rglob("*") if p.is_file()]
    counted = [p for p in files if not any(str(p.relative_to(site)).startswith(x) for x in EXCLUDED)]
    scaling = [p for p in counted if str(p.relative_to(site)).startswith(("features/", "data/")) and p.name != "vocab.js"]
    pages = sorted(p.stat().st_size for p in site.glob("features/*/index.html"))
    data = list(site.glob("data/pages/*.js"))
    total = sum(p.stat().st_size for p in counted)
    grows = sum(p.stat().st_size for p in scaling)
    return {"site_bytes": total, "files": len(counted), "bytes_per_feature": total / n_features,
            "scaling_per_feature": grows / n_features, "fixed_bytes": total - grows,
            "page_median": statistics.median(pages), "page_max": max(pages), "pages_bytes": sum(pages),
            "data_files": len(data), "data_bytes": sum(p.stat().st_size for p in data)}


def first_paint(site: Path, ids: list[int], repeats: int = 5) -> dict | None:
    """Median ms to first contentful paint, and to the examples drawn (lean format only), cold, over http."""
    try:
        from browser import chromium_path, open_browser, serve
    except ImportError:
        return None
    if chromium_path() is None:
        return None
    fcp, drawn = [], []
    with serve({"/s/": site}) as server, open_browser() as b:
        for fid in ids[:repeats]:
            page = b.new_page()
            t0 = time.perf_counter()
            page.goto(server.url("/s/") + f"features/{fid}/index.html")
            if page.locator("#atlas-feature").count():
                page.wait_for_selector("#atlas-feature[data-state=done]", state="attached")
                drawn.append(1000 * (time.perf_counter() - t0))
            page.wait_for_load_state("load")
            fcp.append(page.evaluate("() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"))
            page.context.close()
    return {"fcp_ms": statistics.median(fcp), "examples_ms": statistics.median(drawn) if drawn else None}


def build_old(features: Path, sample: int, work: Path) -> tuple[Path, float] | None:
    """The first `sample` features built with OLD_COMMIT's code; None if that commit is not in this clone."""
    code = work / "old-code"
    code.mkdir()
    archive = work / "old.tar"
    with open(archive, "wb") as f:
        if subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "atlas", "templates", "site_src",
                           "mkdocs.yml"], stdout=f).returncode != 0:
            return None
    with tarfile.open(archive) as t:
        t.extractall(code)
    (code / "node_modules").symlink_to(ROOT / "node_modules")
    run = work / "runs" / "old"
    (run / "features").mkdir(parents=True)
    manifest = shards.read_manifest(features)
    size = manifest["shard_size"]
    n_shards = -(-sample // size)
    for name in ["vocab.parquet"] + [shards.shard_name(k, s) for s in range(n_shards)
                                                   for k in ("features", "examples")]:
        shutil.copy2(features / name, run / "features" / name)
    manifest.update(n_features=min(manifest["n_features"], n_shards * size), n_shards=n_shards)
    (run / "features" / "manifest.json").write_text(json.dumps(manifest))
    script = ("import json; from pathlib import Path; from atlas import build; from atlas.config import RunConfig; "
              "f = Path('runs/old/features'); "
              "build.build_site(RunConfig(path='old.yaml'), json.loads((f / 'manifest.json').read_text()), f, "
              "Path('runs/old/site'))")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True,
                   env={**os.environ, "PYTHONPATH": str(code)}, stdout=subprocess.DEVNULL)
    return run / "site", time.perf_counter() - t0


def main(n: int = 131072, old_sample: int = 4096) -> dict:
    work = ROOT / "runs" / "bench" / "pages"
    if work.exists():
        shutil.rmtree(work)
    run = work / "runs" / "synth"
    t0 = time.perf_counter()
    synthetic_shards.write(run, n)
    t_synth = time.perf_counter() - t0
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = RunConfig(path="synth.yaml")
        manifest = shards.read_manifest(run / "features")
        site = work / "site"
        t0 = time.perf_counter()
        phases = build.build_site(cfg, manifest, run / "features", site, metrics_path=run / "sae" / "metrics.jsonl")
        t_build = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    new = site_stats(site, n)
    probe = [n // 7, n // 3, n // 2, 2 * n // 3, n - 5]
    new_paint = first_paint(site, probe)
    old_dir = Path(tempfile.mkdtemp(dir=work))
    old = build_old(run / "features", min(old_sample, n), old_dir)
    if old is not None:
        old_site, t_old = old
        n_old = shards.read_manifest(old_dir / "runs" / "old" / "features")["n_features"]
        old_stats = site_stats(old_site, n_old)
        old_paint = first_paint(old_site, [i % n_old for i in probe])
        old_at_n = old_stats["fixed_bytes"] + old_stats["scaling_per_feature"] * n   # projected to n features
    shutil.rmtree(run / "features")  # the shards are ~1 GB at 131,072 features; the site stays for a look

    kb = lambda b: f"{b / 1024:,.2f}"  # noqa: E731
    mb = lambda b: f"{b / 1e6:,.0f}"  # noqa: E731
    analyser = GPT2_SMALL_TRUNK_WEIGHTS * WEB_BYTES_PER_WEIGHT + 768 * n * WEB_BYTES_PER_WEIGHT
    suite = 12 * 24576
    per = new["bytes_per_feature"]
    rows = [
        [f"site bytes, {n:,} features (MB)", mb(new["site_bytes"]), f"{mb(old_at_n)} (projected)" if old else "–",
         f"{old_at_n / new['site_bytes']:.1f}× smaller" if old else "", ""],
        ["bytes per feature (KB)", kb(per), kb(old_at_n / n) if old else "–",
         f"{old_at_n / n / per:.1f}× smaller" if old else "", "≤ 6 KB"],
        ["— page / its share of data/pages / indexes (KB)",
         f"{kb(new['pages_bytes'] / n)} / {kb(new['data_bytes'] / n)} / "
         f"{kb(new['scaling_per_feature'] - (new['pages_bytes'] + new['data_bytes']) / n)}",
         f"{kb(old_stats['pages_bytes'] / n_old)} / – / {kb(old_stats['scaling_per_feature'] - old_stats['pages_bytes'] / n_old)}"
         if old else "–", "", ""],
        ["median page (KB)", kb(new["page_median"]), kb(old_stats["page_median"]) if old else "–", "", ""],
        ["files", f"{new['files']:,} ({new['data_files']:,} data files)",
         f"{old_stats['files'] - n_old + n:,} (projected)" if old else "–", "", ""],
        [f"build, {os.cpu_count()} cores (s)", f"{t_build:.0f}", f"{t_old:.0f} (for {n_old:,})" if old else "–", "",
         "≤ 300 s on 2 cores"],
        ["— of which pages and data files (s)", f"{phases['pages_s']:.0f}", "", "", ""],
    ]
    if new_paint:
        rows.append(["feature page: first paint / examples drawn, cold (ms)",
                     f"{new_paint['fcp_ms']:.0f} / {new_paint['examples_ms']:.0f}",
                     f"{old_paint['fcp_ms']:.0f} / (in the page)" if old and old_paint else "–", "", ""])
    rows += [
        ["analyser: GPT-2 Small to layer 8 + encoder (MB, computed)", mb(analyser), "", "", ""],
        [f"site + analyser, {n:,} features (MB)", mb(new["site_bytes"] + analyser),
         mb(old_at_n + analyser) if old else "–", "", "≤ 1,000 MB"],
        ["12 × 24,576 suite, all but analyser (MB, projected)", mb(new["fixed_bytes"] + new["scaling_per_feature"] * suite),
         mb(old_stats["fixed_bytes"] + old_stats["scaling_per_feature"] * suite) if old else "–", "", "≤ 2,000 MB"],
    ]
    d = {"n_features": n, "cpus": os.cpu_count(), "synthetic_s": round(t_synth, 1), "build_s": round(t_build, 1),
         "phases": {k: round(v, 1) for k, v in phases.items()}, "new": new, "paint": new_paint,
         "old": ({"sample": n_old, "build_s": round(t_old, 1), **old_stats, "paint": old_paint} if old else None),
         "analyser_bytes_computed": analyser, "load_average_1m_at_end": round(os.getloadavg()[0], 1)}
    result = {
        "title": f"Site size: lean pages vs the page format before them ({n:,} synthetic features, GPT-2 Small shapes)",
        "columns": ["measure", "lean pages (this code)", f"examples as markup ({OLD_COMMIT})", "ratio", "goal"],
        "rows": rows,
        "notes": (f"Both built from the same synthetic shards (tests/synthetic_shards.py; tokens uniform over 5,000, "
                  f"so their ids barely compress: real text compresses better). Site bytes: every file but `onnx/` and "
                  f"`assets/vendor/`; bytes per feature: that / the number of features (the site's fixed part, theme "
                  f"and hand-written pages, {new['fixed_bytes'] / 1e6:.1f} MB, included). The old format was built on "
                  f"its first {n_old if old else 0:,} features and projected to {n:,} (its fixed part plus its "
                  f"measured bytes per feature × {n:,}). The suite row is the fixed part plus 12 × 24,576 × the "
                  f"bytes per feature that grow with the features (one site; a suite shares its theme). The analyser is computed, not "
                  f"built (no GPT-2 weights offline): {GPT2_SMALL_TRUNK_WEIGHTS / 1e6:.1f}M trunk weights plus the "
                  f"encoder's 768 × {n:,} at 1 byte per weight (8-bit, as the web file). First paint: Chromium's "
                  f"first-contentful-paint, median of 5 cold page loads over http on this machine; 'examples drawn' "
                  f"is the lean page's data file loaded, inflated and rendered. Load average at the end: "
                  f"{d['load_average_1m_at_end']} on {d['cpus']} CPUs (this machine was shared; times are upper bounds)."),
        "details": d,
    }
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pages.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=float))
    print(f"\n**{result['title']}**\n\n| " + " | ".join(result["columns"]) + " |\n|" + "---|" * 5)
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print("\n" + result["notes"])
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
