"""Benchmark `atlas build` against plain `mkdocs build` of the same feature pages as Markdown.

    python tests/bench/bench_build.py [N_FEATURES=24576] [MKDOCS_SUBSET=1024]

On a synthetic shard set of N features: our build (MkDocs shell + stamped Jinja pages + indexes)
versus MkDocs building the same page contents as Markdown files kept out of the nav, with the
project's mkdocs.yml. MkDocs is timed on a subset of pages (it is too slow for all of them);
its time for N is its shell time plus the measured per-page time × N, as the table says. Also
page weight (median and max, raw and gzipped) and total site size. Prints a Markdown table and
writes runs/bench/build.json.
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
from atlas import build, pages, shards  # noqa: E402
from atlas.config import RunConfig  # noqa: E402


def mkdocs_time(features_dir: Path, ids: list[int], cfg: RunConfig, manifest: dict) -> float:
    """Seconds for `mkdocs build` with these features' page contents as Markdown (out of nav)."""
    from atlas import search_index

    table = search_index.read_feature_table(features_dir)
    vocab = shards.read_vocab(features_dir)
    facts = pages.SiteFacts(n_features=table.n, labels=build._dense_labels(table), vocab=vocab,
                            has_logits=bool(manifest.get("has_logits", True)))
    vocab_html = [pages.html.escape(pages.display_token(t)) for t in vocab]
    template = pages.jinja_env().get_template("feature.html")
    with tempfile.TemporaryDirectory() as tmp:
        docs, site = Path(tmp) / "docs", Path(tmp) / "site"
        build.write_docs(docs, cfg, manifest, table, [])
        for fid in ids:
            rec = shards.read_feature(features_dir, fid, manifest)
            view = pages.feature_view(rec.row, rec.examples, facts, vocab_html)
            d = docs / "features" / str(fid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "index.md").write_text(f"# Feature {fid}\n\n" + template.render(f=view), encoding="utf-8")
        t0 = time.perf_counter()
        build.build_shell(docs, site, cfg)
        return time.perf_counter() - t0


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

    shell = mkdocs_time(run / "features", [], cfg, manifest)
    sub = mkdocs_time(run / "features", list(range(0, n, max(1, n // subset)))[:subset], cfg, manifest)
    per_page = (sub - shell) / subset
    mk_est = shell + per_page * n

    files = [p for p in site.rglob("*") if p.is_file()]
    feat = sorted(site.glob("features/*/index.html"), key=lambda p: int(p.parent.name))
    raw = [p.stat().st_size for p in feat]
    gz = [len(gzip.compress(p.read_bytes(), 6)) for p in feat]
    total = sum(p.stat().st_size for p in files)
    result = {
        "n_features": n, "cpus": os.cpu_count(), "synthetic_s": round(t_synth, 1),
        "ours_total_s": round(ours, 1), "ours_shell_s": round(phases["shell_s"], 1),
        "ours_pages_s": round(phases["pages_s"], 1), "ours_indexes_s": round(phases["indexes_s"], 1),
        "ours_pages_plus_indexes_s": round(phases["pages_s"] + phases["indexes_s"], 1),
        "mkdocs_shell_s": round(shell, 1), "mkdocs_subset_pages": subset, "mkdocs_subset_s": round(sub, 1),
        "mkdocs_per_page_ms": round(1000 * per_page, 2), "mkdocs_estimated_s": round(mk_est, 1),
        "speedup": round(mk_est / ours, 1),
        "page_raw_median_kb": round(statistics.median(raw) / 1024, 1), "page_raw_max_kb": round(max(raw) / 1024, 1),
        "page_gz_median_kb": round(statistics.median(gz) / 1024, 1), "page_gz_max_kb": round(max(gz) / 1024, 1),
        "site_mb": round(total / 2**20, 1), "site_files": len(files),
        "largest_file_mb": round(max(p.stat().st_size for p in files) / 2**20, 2),
    }
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs" / "bench" / "build.json").write_text(json.dumps(result, indent=2))
    print(f"\n| build of {n:,} feature pages ({result['cpus']} CPUs) | seconds |\n| --- | ---: |")
    print(f"| atlas build, total | {result['ours_total_s']} |")
    print(f"| — MkDocs shell (8 pages + skeleton) | {result['ours_shell_s']} |")
    print(f"| — feature pages | {result['ours_pages_s']} |")
    print(f"| — indexes, notable page, copies | {result['ours_indexes_s']} |")
    print(f"| plain mkdocs build, measured on {subset:,} pages | {result['mkdocs_subset_s']} |")
    print(f"| plain mkdocs build, {n:,} pages (shell {result['mkdocs_shell_s']} s + "
          f"{result['mkdocs_per_page_ms']} ms/page × {n:,}) | {result['mkdocs_estimated_s']} |")
    print(f"| **speed-up** | **{result['speedup']}×** |")
    print("\n| site | value |\n| --- | ---: |")
    print(f"| feature page, median (raw / gzip) | {result['page_raw_median_kb']} KB / {result['page_gz_median_kb']} KB |")
    print(f"| feature page, max (raw / gzip) | {result['page_raw_max_kb']} KB / {result['page_gz_max_kb']} KB |")
    print(f"| whole site | {result['site_mb']} MB in {result['site_files']:,} files |")
    print(f"| largest file | {result['largest_file_mb']} MB |")
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
