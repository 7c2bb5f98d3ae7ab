"""Benchmark `atlas build` against plain `mkdocs build` of the same feature pages as Markdown.

    python tests/bench/bench_build.py [N_FEATURES=24576] [MKDOCS_SUBSET=1024]

On a synthetic shard set of N features: our build (MkDocs shell + stamped Jinja pages + indexes)
versus MkDocs building the same page contents as Markdown files kept out of the nav, with the
project's mkdocs.yml. MkDocs is timed on a subset of pages (it is too slow for all of them);
its time for N is its shell time plus the measured per-page time × N, as the table says. Also
page weight (median and max, raw and gzipped, ours and MkDocs' for the same content), total site
size and largest file, and the token search's lookup time in headless Chromium on the built site
(the speed target that used to be asserted in tests/test_site_browser.py). The synthetic shards
have the GPT-2 Small config's shapes (tests/synthetic_shards.py). Prints a Markdown table and
writes runs/bench/build.json ({"title", "columns", "rows", "notes"}, see run_all.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import synthetic_shards  # noqa: E402
from atlas import build, page_data, pages, shards  # noqa: E402
from atlas.config import RunConfig  # noqa: E402


def mkdocs_time(features_dir: Path, ids: list[int], cfg: RunConfig, manifest: dict) -> tuple[float, list[int]]:
    """Seconds for `mkdocs build` with these features' page contents as Markdown (out of nav), and the pages' sizes."""
    from atlas import search_index

    table = search_index.read_feature_table(features_dir)
    vocab = shards.read_vocab(features_dir)
    facts = pages.SiteFacts(n_features=table.n, labels=build._dense_labels(table), vocab=vocab)
    template = pages.jinja_env().get_template("feature.html")
    with tempfile.TemporaryDirectory() as tmp:
        docs, site = Path(tmp) / "docs", Path(tmp) / "site"
        build.write_docs(docs, cfg, manifest, table, [])
        for fid in ids:
            rec = shards.read_feature(features_dir, fid, manifest)
            view = pages.feature_view(rec.row, facts)
            d = docs / "features" / str(fid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "index.md").write_text(f"# Feature {fid}\n\n" + template.render(f=view), encoding="utf-8")
        t0 = time.perf_counter()
        build.build_shell(docs, site, cfg)
        took = time.perf_counter() - t0
        sizes = [len(gzip.compress((site / "features" / str(fid) / "index.html").read_bytes(), 6)) for fid in ids]
        return took, sizes


def search_ms(site: Path, repeats: int = 5) -> tuple[float, float] | None:
    """Token search in headless Chromium: ms for Atlas.tokenEntry(' Once'), first (cold) and median warm."""
    try:
        from browser import chromium_path, open_browser, serve
    except ImportError:
        return None
    if chromium_path() is None:
        return None
    with serve(site) as server, open_browser() as b:
        page = b.new_page()
        page.goto(server.url() + "search.html")
        page.wait_for_load_state("networkidle")
        timing = "async () => { const t = performance.now(); await Atlas.tokenEntry(' Once'); return performance.now() - t; }"
        cold = page.evaluate(timing)
        warm = sorted(page.evaluate(timing) for _ in range(repeats))[repeats // 2]
        return cold, warm


def main(n: int = 24576, subset: int = 1024) -> dict:
    work = ROOT / "runs" / "bench"
    run = work / "runs" / "bench-build"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    synthetic_shards.write(run, n)
    t_synth = time.perf_counter() - t0
    os.chdir(work)
    cfg = RunConfig(path="bench-build.yaml")
    manifest = shards.read_manifest(run / "features")

    site = run / "site"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run) as tmp:
        phases = build.build_site(cfg, manifest, run / "features", Path(tmp) / "site",
                                  metrics_path=run / "sae" / "metrics.jsonl")
        shutil.move(Path(tmp) / "site", site)
    ours = time.perf_counter() - t0

    shell, _ = mkdocs_time(run / "features", [], cfg, manifest)
    sub_ids = list(range(0, n, max(1, n // subset)))[:subset]
    sub, mk_gz = mkdocs_time(run / "features", sub_ids, cfg, manifest)
    per_page = (sub - shell) / subset
    mk_est = shell + per_page * n

    files = [p for p in site.rglob("*") if p.is_file()]
    feat = sorted(site.glob("features/*/index.html"), key=lambda p: int(p.parent.name))
    raw = [p.stat().st_size for p in feat]
    gz = [len(gzip.compress(p.read_bytes(), 6)) for p in feat]
    total = sum(p.stat().st_size for p in files)
    largest = max(files, key=lambda p: p.stat().st_size)
    search = search_ms(site)
    d = {
        "n_features": n, "cpus": os.cpu_count(), "synthetic_s": round(t_synth, 1),
        "ours_total_s": round(ours, 1), "ours_shell_s": round(phases["shell_s"], 1),
        "ours_pages_s": round(phases["pages_s"], 1), "ours_indexes_s": round(phases["indexes_s"], 1),
        "mkdocs_shell_s": round(shell, 1), "mkdocs_subset_pages": subset, "mkdocs_subset_s": round(sub, 1),
        "mkdocs_per_page_ms": round(1000 * per_page, 2), "mkdocs_estimated_s": round(mk_est, 1),
        "page_raw_median_kb": round(statistics.median(raw) / 1024, 1), "page_raw_max_kb": round(max(raw) / 1024, 1),
        "page_gz_median_kb": round(statistics.median(gz) / 1024, 1), "page_gz_max_kb": round(max(gz) / 1024, 1),
        "mkdocs_page_gz_median_kb": round(statistics.median(mk_gz) / 1024, 1),
        "feature_pages_mb": round(sum(raw) / 2**20, 1), "site_mb": round(total / 2**20, 1), "site_files": len(files),
        "largest_file_mb": round(largest.stat().st_size / 2**20, 2), "largest_file": str(largest.relative_to(site)),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "search_cold_ms": round(search[0], 1) if search else None, "search_warm_ms": round(search[1], 2) if search else None,
    }
    cores = f"{d['cpus']} cores"
    rows = [
        [f"build {n:,} feature pages, {cores} (s)", d["ours_total_s"], d["mkdocs_estimated_s"],
         f"{mk_est / ours:.1f}× faster", "≤ 60 s"],
        ["— of which feature pages / indexes (s)", f"{d['ours_pages_s']} / {d['ours_indexes_s']}",
         f"{d['mkdocs_per_page_ms']} ms/page", "", ""],
        ["whole site (MB)", d["site_mb"], "", "", "≤ 400 MB"],
        ["— of which feature pages (MB)", d["feature_pages_mb"], "", "", ""],
        ["feature page, median raw / gzip (KB)", f"{d['page_raw_median_kb']} / {d['page_gz_median_kb']}",
         f"– / {d['mkdocs_page_gz_median_kb']}", f"{d['mkdocs_page_gz_median_kb'] / d['page_gz_median_kb']:.1f}× smaller",
         "≤ 15 KB gzip"],
        ["feature page, max raw / gzip (KB)", f"{d['page_raw_max_kb']} / {d['page_gz_max_kb']}", "", "", ""],
        ["largest file (MB)", f"{d['largest_file_mb']} ({d['largest_file']})", "", "", "≤ 95 MB"],
    ]
    if search:
        rows.append(["token search lookup in Chromium, cold / warm (ms)", f"{d['search_cold_ms']} / {d['search_warm_ms']}",
                     "", "", "< 100 ms"])
    result = {
        "title": f"Site build ({n:,} synthetic features, GPT-2 Small shapes)",
        "columns": ["measure", "ours", "peer", "ratio", "goal"],
        "rows": rows,
        "notes": (f"Peer: plain `mkdocs build` of the same page contents as Markdown out of the nav, timed on "
                  f"{subset:,} pages and extrapolated (shell {d['mkdocs_shell_s']} s + {d['mkdocs_per_page_ms']} ms/page "
                  f"× {n:,}); its page weight is measured on those pages. Synthetic examples: 20 top windows of 33 tokens "
                  f"(24 left, 8 right) + 10 intervals × 5, ~18% of tokens active, tokens ~4.2 characters; a page's HTML "
                  f"holds its label, score and statistics, and its data file (atlas/page_data.py) the top windows in "
                  f"full and {page_data.INTERVAL_SAMPLES} sample per interval trimmed to "
                  f"{sum(page_data.INTERVAL_WINDOW) + 1} tokens ({page_data.INTERVAL_WINDOW[0]} left, "
                  f"{page_data.INTERVAL_WINDOW[1]} right); tests/bench/bench_pages.py measures the site's bytes. Token search: Atlas.tokenEntry(' Once') on search.html, first call (loads the shard) and "
                  f"median of 5 warm calls. Load average at the end: {d['load_average_1m_at_end']} on {d['cpus']} "
                  f"CPUs (timings are only comparable on a quiet machine)."),
        "details": d,
    }
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs" / "bench" / "build.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"\n**{result['title']}**\n\n| " + " | ".join(result["columns"]) + " |\n|" + "---|" * 5)
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print("\n" + result["notes"])
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
