"""Steering in the browser on the demo's real model (SmolLM2-135M, configs/demo.yaml with
export.steering: true): the steering download, the first steered token cold (download + start) and
after the download is cached (a new page: start + prompt), tokens per second warm on 1 wasm
thread in Chromium, against Python onnxruntime (1 thread) on the same file; and the export gate's figures.

    python tests/bench/bench_steer.py [--onnx runs/demo/onnx]    # writes runs/bench/steer.json

Goals (issue 20): >= 10 tokens/s warm on 1 wasm thread, first steered token <= 5 s after the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from atlas.export import steering  # noqa: E402
from browser import assemble_steer_site, open_browser, serve  # noqa: E402

PROMPT = "The function returns a list of"
N_NEW = 40


def browser_run(page, url: str) -> dict:
    """One Generate (unsteered + steered, N_NEW tokens each) on a fresh page; timings from the box."""
    page.goto(url)
    page.fill(".atlas-steer-prompt", PROMPT)
    page.fill(".atlas-steer-tokens", str(N_NEW))
    t0 = time.perf_counter()
    page.click(".atlas-steer-go")
    page.wait_for_selector("section.atlas-steer[data-state=done], section.atlas-steer[data-state=error]",
                           state="attached", timeout=600_000)
    assert page.get_attribute("section.atlas-steer", "data-state") == "done", page.inner_text(".atlas-steer-status")
    return {"first_s": float(page.get_attribute("section.atlas-steer", "data-first-ms")) / 1000,
            "tokens_per_s": float(page.get_attribute("section.atlas-steer", "data-tokens-per-second")),
            "wall_s": time.perf_counter() - t0}


def python_run(onnx_dir: Path, meta: dict) -> dict:
    """Python onnxruntime, 1 thread, on the same file: session start, first token, tokens/s after it."""
    import onnx
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    ids = [meta["bos_token_id"], *tok.encode(PROMPT, add_special_tokens=False).ids]
    t0 = time.perf_counter()
    sess = steering.session_of(onnx.load(str(onnx_dir / steering.WEB_FILE)), threads=1)
    start = time.perf_counter() - t0
    shape = steering.CacheShape(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"])
    t0 = time.perf_counter()
    steering.onnx_generate(sess, ids, np.zeros(meta["d_model"], np.float32), 1, shape)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    steering.onnx_generate(sess, ids, np.zeros(meta["d_model"], np.float32), N_NEW + 1, shape)
    per = (time.perf_counter() - t0 - first) / N_NEW
    return {"start_s": start, "first_s": first, "tokens_per_s": 1 / per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", default=str(ROOT / "runs/demo/onnx"), help="an export folder with steering.json")
    onnx_dir = Path(ap.parse_args().onnx)
    if not (onnx_dir / steering.META_FILE).exists():
        sys.exit(f"bench_steer: {onnx_dir / steering.META_FILE} missing: run `make demo` (configs/demo.yaml "
                 f"exports the steering file) or pass --onnx")
    meta = json.loads((onnx_dir / steering.META_FILE).read_text())
    py = python_run(onnx_dir, meta)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        assemble_steer_site(site, onnx_dir, meta, feature=0, max_act=1)
        with serve({"/atlas/": site}) as server, open_browser() as b:
            url = server.url("/atlas/") + "features/0/index.html"
            context = b.new_context()
            cold = browser_run(b.new_page(context), url)
            warm = browser_run(b.new_page(context), url)  # a new page: files from the Cache API, model started anew
    gate = meta["gate"]
    web = gate["modes"][meta["quantization"]]
    rows = [
        ["steering download (steer.web.onnx + decoder)", f"{meta['total_bytes'] / 1e6:.1f} MB", "", ""],
        ["first steered token, cold (download from localhost + start)", f"{cold['first_s']:.1f} s", "",
         ""],
        ["first steered token, files cached (start + prompt)", f"{warm['first_s']:.1f} s", f"{py['start_s'] + py['first_s']:.1f} s",
         "≤ 5 s: " + ("met" if warm["first_s"] <= 5 else "missed")],
        ["tokens/s warm, 1 thread", f"{warm['tokens_per_s']:.1f}", f"{py['tokens_per_s']:.1f}",
         "≥ 10: " + ("met" if warm["tokens_per_s"] >= 10 else "missed")],
        [f"gate: greedy tokens equal to PyTorch's ({meta['quantization']})", f"{web['agreement']:.1%} of {web['n_tokens']}",
         "", "≥ 95%"],
    ] + [[f"gate, {k}", f"{v:.1%}", "", ""] for k, v in web["by_condition"].items()]
    result = {"title": "Steering in the browser (SmolLM2-135M, the demo's model)",
              "columns": ["", "Chromium (onnxruntime-web, wasm)", "Python onnxruntime", "goal"], "rows": rows,
              "notes": f"Prompt \"{PROMPT}\", {N_NEW} tokens per column, unsteered and steered alternating (tokens/s "
                       f"counts both). Gate modes tried: " + ", ".join(f"{m} {r['agreement']:.1%}" for m, r in gate["modes"].items())}
    out = ROOT / "runs/bench/steer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
