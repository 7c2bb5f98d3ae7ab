"""`make bench`: run every benchmark in tests/bench/ one after another, then write their tables
into README.md between the bench markers, with the date and the machine they were measured on.

Each bench_*.py writes runs/bench/<name>.json: {"title", "columns", "rows", "notes"}.
    python tests/bench/run_all.py [name ...]    # e.g. collect train; default: all
    python tests/bench/run_all.py --report      # only rewrite the README table from runs/bench/*.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["collect", "train", "analyze", "labels", "browser", "build", "quality"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores of {cpu}, {mem:.0f} GiB RAM, no GPU"


def table(result: dict) -> str:
    lines = [f"**{result['title']}**", "", "| " + " | ".join(result["columns"]) + " |",
             "|" + "---|" * len(result["columns"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in result["rows"]]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines)


def main(names: list[str]) -> int:
    failed = []
    for name in names:
        script = ROOT / "tests" / "bench" / f"bench_{name}.py"
        if not script.exists():
            continue
        print(f"== bench {name}", flush=True)
        t0 = time.time()
        if subprocess.run([sys.executable, str(script)], cwd=ROOT).returncode != 0:
            failed.append(name)
        print(f"== bench {name}: {time.time() - t0:.0f} s", flush=True)
    sections = [f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}, {machine()}.", ""]
    for name in ORDER:
        path = ROOT / "runs" / "bench" / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if "title" in result:
            sections += [table(result), ""]
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        readme.write_text(head + START + "\n" + "\n".join(sections) + END + tail)
        print("README.md benchmark table updated")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([] if args == ["--report"] else args or ORDER))
