"""`make bench`: run every benchmark in tests/bench/ one after another, then write their tables
into README.md between the bench markers, with the date and the machine they were measured on.

Each bench_*.py writes runs/bench/<name>.json: {"title", "columns", "rows", "notes"}; one with
"section": "stages" (bench_stages.py) goes between the README's stages markers instead.
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
ORDER = ["stages", "collect", "data", "train", "lr", "analyze", "labels", "browser", "browser_real", "steer", "build", "pages",
         "quality", "matryoshka"]
"""Scripts run in this order (bench_<name>.py, where there is one) and tables written in it."""


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores of {cpu}, {mem:.0f} GiB RAM, no GPU"


def table(result: dict, heading: str = "**{}**") -> str:
    lines = [heading.format(result["title"]), "", "| " + " | ".join(result["columns"]) + " |",
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
    tables = [f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}, {machine()}.", ""]
    stages = []
    for name in ORDER:
        path = ROOT / "runs" / "bench" / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if "title" in result:
            if result.get("section") == "stages":
                stages = [table(result, heading="### {}"), ""]
            else:
                tables += [table(result), ""]
    readme = ROOT / "README.md"
    text = readme.read_text()
    for marker, lines in (("bench", tables), ("stages", stages)):
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        if lines and start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + "\n".join(lines) + end + rest.split(end, 1)[1]
    readme.write_text(text)
    print("README.md benchmark tables updated")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([] if args == ["--report"] else args or ORDER))
