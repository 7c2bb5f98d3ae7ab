"""Prompt-analyser benchmark: a GPT-2-Small-shaped encoder in headless Chromium vs Python onnxruntime.

    python tests/bench/bench_browser.py [--modes int8-emb4 int8 int4] [--repeats 5] [--keep]

A GPT-2 Small shape (GPT2Config() defaults, random weights; the tiny world's tokenizer, whose ids
fit the 50,257-token vocabulary) at layer 8 plus a 24,576-latent random SAE encoder is exported
with `atlas.export` in each quantisation mode, served from 127.0.0.1 and run single-threaded with
onnxruntime-web (wasm). Measures the web download, time to first result (download + init + run,
cold cache, local server), warm latency for 64- and 128-token prompts and the same file in Python
onnxruntime (1 thread, the peer). The first mode (the default, `export.quantization`) gets the
full table; the others a size/latency row each. Writes runs/bench/browser.json
({"title", "columns", "rows", "notes", "results"}); the model, exports and sites are made in a
temporary folder under runs/bench/ and removed afterwards (--keep keeps them). Parity on random
weights says little about a trained model; it is reported for completeness.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

OUT = ROOT / "runs/bench"
GOALS = {"warm_64_s": 0.5, "first_result_s": 5.0, "web_mb": 100}


def gpt2_shaped(out: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tiny_world import build as build_tiny_world

    if (out / "model.safetensors").exists():
        return out
    world = build_tiny_world(out.parent / "tiny-world")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(world / "model").save_pretrained(out)
    return out


def export_mode(model_dir: Path, mode: str, work: Path) -> Path:
    from atlas import export
    from atlas.config import RunConfig
    from atlas.model import load_model
    from test_export import make_sae

    out = work / f"onnx-{mode}"
    if (out / "parity.json").exists():
        return out
    cfg = RunConfig()
    cfg.model.name, cfg.model.layer = str(model_dir), 8
    cfg.export.quantization, cfg.export.min_top1_agreement = mode, 0.0
    loaded = load_model(cfg.model.name)
    out.mkdir(parents=True, exist_ok=True)
    export.export_dir(out, loaded, make_sae(loaded.d_model, 24576), cfg, f"bench-{mode}",
                      [export.encode_with_bos(loaded, t, 128) for t in export.FALLBACK_TEXTS])
    return out


def prompt_of(tokenizer, bos: int, n: int) -> str:
    """A text that tokenises to exactly n tokens with BOS."""
    words = "Once upon a time there was a little dog named Max who liked to play in the park with a red ball".split()
    text, i = "", 0
    while len(tokenizer.encode(text, add_special_tokens=False).ids) < n - 1:
        text += (" " if text else "") + words[i % len(words)]
        i += 1
    while len(tokenizer.encode(text, add_special_tokens=False).ids) > n - 1:
        text = text[:-1]
    return text


def browser_times(site: Path, prompts: dict[int, str], repeats: int) -> dict:
    from browser import open_browser, serve

    sel = "section.atlas-prompt[data-state=done], section.atlas-prompt[data-state=error]"

    def run(page, text):
        page.evaluate("document.querySelector('section.atlas-prompt').removeAttribute('data-state')")
        page.fill(".atlas-prompt-input", text)
        t0 = time.perf_counter()
        page.click(".atlas-prompt-form button")
        page.wait_for_selector(sel, state="attached", timeout=300_000)
        wall = time.perf_counter() - t0
        status = page.inner_text(".atlas-status")
        assert page.get_attribute("section.atlas-prompt", "data-state") == "done", status
        return wall, float(status.split(" in ")[1].split(" ms")[0]) / 1000

    with serve(site) as base, open_browser() as b:
        page = b.new_page()
        page.goto(base + "prompt.html")
        first, _ = run(page, prompts[64])
        res = {"first_result_s": first}
        for text in [*prompts.values()] * 2:  # warm-up: wasm code is tiered up while it runs
            run(page, text)
        for n, text in prompts.items():
            res[f"warm_{n}_s"] = statistics.median(run(page, text)[1] for _ in range(repeats))
        page.reload()  # second visit: model from the Cache API
        res["cached_first_result_s"] = run(page, prompts[64])[0]
        assert not b.external_requests and not page.console_errors, (b.external_requests, page.console_errors)
    return res


def python_times(onnx: Path, tokenizer, bos: int, prompts: dict[int, str], repeats: int) -> dict:
    from atlas import export

    t0 = time.perf_counter()
    sess = export.session(onnx / "encoder.web.onnx", threads=1)
    res = {"py_init_s": time.perf_counter() - t0}
    for n, text in prompts.items():
        ids = [bos] + tokenizer.encode(text, add_special_tokens=False).ids
        export.run_session(sess, ids)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            export.run_session(sess, ids)
            ts.append(time.perf_counter() - t0)
        res[f"py_warm_{n}_s"] = statistics.median(ts)
    return res


def measure(model_dir: Path, mode: str, work: Path, repeats: int) -> dict:
    from tokenizers import Tokenizer

    from test_browser_analyser import assemble_site

    t0 = time.perf_counter()
    onnx = export_mode(model_dir, mode, work)
    export_s = time.perf_counter() - t0
    meta = json.loads((onnx / "model.json").read_text())
    parity = json.loads((onnx / "parity.json").read_text())
    tok = Tokenizer.from_file(str(onnx / "tokenizer.json"))
    prompts = {n: prompt_of(tok, meta["bos_token_id"], n) for n in (64, 128)}
    site = work / f"site-{mode}"
    shutil.rmtree(site, ignore_errors=True)
    assemble_site(site, onnx, labels=[])
    row = {"web_mb": meta["total_bytes"] / 1e6, "files": meta["bytes"], "export_s": export_s,
           "top1_vs_torch": parity["web"]["top1_agreement"], "topk_overlap_vs_torch": parity["web"]["topk_overlap"]}
    row.update(browser_times(site, prompts, repeats))
    row.update(python_times(onnx, tok, meta["bos_token_id"], prompts, repeats))
    row["ratio_64"] = row["warm_64_s"] / row["py_warm_64_s"]
    row["ratio_128"] = row["warm_128_s"] / row["py_warm_128_s"]
    print(f"{mode}: {json.dumps({k: round(v, 3) for k, v in row.items() if isinstance(v, float)})}", flush=True)
    return row


def table(results: dict[str, dict]) -> dict:
    mode, r = next(iter(results.items()))
    ok = lambda x, goal: f"{'✓' if x <= goal else '✗'} ≤ {goal}"  # noqa: E731
    rows = [
        ["web download (MB)", f"{r['web_mb']:.1f}", "", "", ok(r["web_mb"], GOALS["web_mb"])],
        ["warm 64 tokens, browser vs Python ORT (s)", f"{r['warm_64_s']:.3f}", f"{r['py_warm_64_s']:.3f}",
         f"{r['ratio_64']:.1f}×", ok(r["warm_64_s"], GOALS["warm_64_s"])],
        ["warm 128 tokens, browser vs Python ORT (s)", f"{r['warm_128_s']:.3f}", f"{r['py_warm_128_s']:.3f}",
         f"{r['ratio_128']:.1f}×", ""],
        ["first result, cold cache, local server (s)", f"{r['first_result_s']:.2f}", "", "",
         ok(r["first_result_s"], GOALS["first_result_s"])],
        ["first result, second visit, Cache API (s)", f"{r['cached_first_result_s']:.2f}", "", "", ""],
        ["web top-1 agreement with PyTorch (random weights)", f"{r['top1_vs_torch']:.3f}", "", "", ""],
    ]
    for other, o in list(results.items())[1:]:
        rows.append([f"{other} instead: download MB / warm 64 s / warm 128 s / top-1",
                     f"{o['web_mb']:.1f} / {o['warm_64_s']:.3f} / {o['warm_128_s']:.3f} / {o['top1_vs_torch']:.3f}",
                     f"{r['web_mb']:.1f} / {r['warm_64_s']:.3f} / {r['warm_128_s']:.3f} / {r['top1_vs_torch']:.3f}",
                     f"{o['warm_64_s'] / r['warm_64_s']:.2f}× (64)", ""])
    return {
        "title": f"Prompt analyser (GPT-2 Small shape to layer 8 + 24,576-latent SAE encoder, web file "
                 f"{mode}, headless Chromium, onnxruntime-web wasm, 1 thread)",
        "columns": ["measure", "ours", "peer", "ratio", "goal"],
        "rows": rows,
        "notes": (f"{mode}: int8 MatMuls (MatMulInteger) and a 4-bit blockwise token-embedding table "
                  "(GatherBlockQuantized) when mode is int8-emb4. Peer for latency: Python onnxruntime, "
                  "1 thread, same file, same tokens (median of repeats). Rows for other modes compare them "
                  f"(ours column) with {mode} (peer column). Random weights: parity is for completeness only."),
    }


def main() -> None:
    from atlas.export import QUANTIZATIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(QUANTIZATIONS), choices=QUANTIZATIONS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the model, exports and sites in runs/bench/browser-work")
    args = ap.parse_args()

    work = OUT / "browser-work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = gpt2_shaped(work / "gpt2-shaped")
        results = {mode: measure(model_dir, mode, work, args.repeats) for mode in args.modes}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = table(results)
    result["results"] = results
    result["goals"] = GOALS
    print("\n" + "\n".join(["| " + " | ".join(result["columns"]) + " |", "|---" * 5 + "|"]
                           + ["| " + " | ".join(map(str, row)) + " |" for row in result["rows"]]))
    (OUT / "browser.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"wrote {OUT / 'browser.json'}")


if __name__ == "__main__":
    main()
