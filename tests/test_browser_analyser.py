"""The prompt analyser and the feature-page box in headless Chromium, against Python onnxruntime.

The test site is assembled here (site_src/js, the vendored npm files, the exported onnx/ and two
small pages carrying the Content-Security-Policy the analyser needs), so these tests do not
depend on `atlas build`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from browser import serve
from test_export import export_tiny

ROOT = Path(__file__).resolve().parent.parent
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; worker-src 'self'; "
       "img-src 'self' data:; style-src 'self' 'unsafe-inline'; font-src 'self'; object-src 'none'; base-uri 'self'")
PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}"><title>{title}</title></head>
<body>{body}</body></html>"""

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not (ROOT / "node_modules/onnxruntime-web").exists(),
                                                       reason="node_modules missing (npm ci)")]


def assemble_site(site: Path, onnx_dir: Path, labels: list[str] | None = None) -> Path:
    """A minimal site: js/, assets/vendor/ (site_src/vendor.json), onnx/, prompt.html, features/N/index.html."""
    for dest, src in json.loads((ROOT / "site_src/vendor.json").read_text()).items():
        (site / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / src, site / dest)
    shutil.copytree(ROOT / "site_src/js", site / "js", dirs_exist_ok=True)
    meta = json.loads((onnx_dir / "model.json").read_text())
    (site / "onnx").mkdir(exist_ok=True)
    for f in meta["files"] + ["model.json"]:
        shutil.copy2(onnx_dir / f, site / "onnx" / f)
    md = (ROOT / "site_src/prompt.md").read_text()
    body = md[md.index("<section"):]
    (site / "prompt.html").write_text(PAGE.format(csp=CSP, title="Prompt analyser", body=body))
    for fid in (3, 5):
        d = site / "features" / str(fid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "index.html").write_text(PAGE.format(csp=CSP, title=f"Feature {fid}", body=(
            f'<section class="atlas-try" data-feature-id="{fid}" data-root="../.."></section>'
            '<script type="module" src="../../js/analyser/try.js"></script>')))
    if labels is not None:
        (site / "data").mkdir(exist_ok=True)
        (site / "data/features.js").write_text(f'Atlas.loaded("features",{json.dumps({"label": labels})});\n')
    return site


@pytest.fixture(scope="module")
def site(tiny_world, tmp_path_factory):
    onnx_dir = export_tiny(tiny_world, tmp_path_factory.mktemp("onnx"))
    labels = [f"label <b>{i}</b>" for i in range(256)]
    return assemble_site(tmp_path_factory.mktemp("site"), onnx_dir, labels)


@pytest.fixture(scope="module")
def url(site):
    with serve(site) as base:
        yield base


def python_result(site: Path, text: str):
    from atlas import export
    from tokenizers import Tokenizer

    meta = json.loads((site / "onnx/model.json").read_text())
    tok = Tokenizer.from_file(str(site / "onnx/tokenizer.json"))
    ids = ([meta["bos_token_id"]] + tok.encode(text, add_special_tokens=False).ids)[: meta["max_tokens"]]
    top_ids, top_acts = export.run_session(export.session(site / "onnx/encoder.web.onnx", threads=1), ids)
    return ids, top_ids, top_acts


def analyse(page, text: str, timeout: float = 60_000):
    page.fill(".atlas-prompt-input", text)
    page.click(".atlas-prompt-form button")
    page.wait_for_selector("section.atlas-prompt[data-state=done], section.atlas-prompt[data-state=error]",
                           state="attached", timeout=timeout)
    assert page.get_attribute("section.atlas-prompt", "data-state") == "done", page.inner_text(".atlas-status")


def test_prompt_page_matches_python(browser, site, url):
    """The default web file (int8 MatMuls, 4-bit GatherBlockQuantized embedding) in onnxruntime-web's
    wasm build gives what Python onnxruntime gives on the same file."""
    import onnx

    ops = {n.op_type for n in onnx.load(site / "onnx/encoder.web.onnx", load_external_data=False).graph.node}
    assert {"GatherBlockQuantized", "MatMulInteger"} <= ops
    page = browser.new_page()
    page.goto(url + "prompt.html")
    text = "Once upon a time, there was a little dog named Max. Max liked to play in the park."
    analyse(page, text)
    ids, top_ids, top_acts = python_result(site, text)
    spans = page.query_selector_all(".atlas-tokens .atlas-token")
    assert len(spans) == len(ids)
    # strongest features: max over non-BOS tokens, as Python computes it
    best: dict[int, float] = {}
    for t in range(1, len(ids)):
        for i, a in zip(top_ids[t], top_acts[t]):
            if a > 0 and a > best.get(int(i), 0):
                best[int(i)] = float(a)
    want = sorted(best.items(), key=lambda x: -x[1])[:5]
    items = page.query_selector_all(".atlas-strongest li")
    got = [(int(li.get_attribute("data-feature-id")), float(li.get_attribute("data-act"))) for li in items[:5]]
    assert [g[0] for g in got] == [w[0] for w in want]
    # Same int8 file, different int8 kernels (wasm vs x86): activations are re-quantised to 8 bits
    # before every MatMul (resolution ~1/127), so rounding differences of a few 1e-3 are expected;
    # the feature ids above must agree exactly.
    assert np.allclose([g[1] for g in got], [w[1] for w in want], rtol=5e-3, atol=1e-3)
    # heatmap of the chosen feature (the strongest, chosen by default)
    feature = int(page.input_value(".atlas-feature-input"))
    assert feature == want[0][0]
    acts = [float(s.get_attribute("data-act")) for s in spans]
    ref = [float(top_acts[t][list(top_ids[t]).index(feature)]) if feature in top_ids[t] else 0.0 for t in range(len(ids))]
    assert np.allclose(acts, ref, rtol=5e-3, atol=2e-3)
    # hovering a token lists its features, linked to their pages, labels inserted as text
    spans[4].hover()
    assert page.get_attribute(".atlas-token-features", "data-index") == "4"
    first = page.query_selector(".atlas-token-features li")
    assert int(first.get_attribute("data-feature-id")) == int(top_ids[4][0])
    link = first.query_selector("a")
    assert link.get_attribute("href").endswith(f"/features/{int(top_ids[4][0])}/index.html")
    assert f"label <b>{int(top_ids[4][0])}</b>" in link.inner_text()
    assert page.query_selector(".atlas-token-features b") is None
    assert browser.external_requests == [] and page.console_errors == []


def test_untrusted_prompt_is_text_and_edge_cases(browser, url):
    page = browser.new_page()
    page.goto(url + "prompt.html")
    page.click(".atlas-prompt-form button")  # empty input does nothing
    assert page.get_attribute("section.atlas-prompt", "data-state") is None
    analyse(page, '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">')
    text = "".join(s.inner_text() for s in page.query_selector_all(".atlas-tokens .atlas-token")[1:])
    assert "<script>window.pwned=1</script>" in text
    assert page.evaluate("window.pwned") is None
    assert page.query_selector(".atlas-tokens script, .atlas-tokens img") is None
    analyse(page, "Tom and Lily play. " * 60)  # far over the 128-token maximum
    assert len(page.query_selector_all(".atlas-tokens .atlas-token")) == 128
    assert re.search(r"only the first 128", page.inner_text(".atlas-notice"))
    assert browser.external_requests == [] and page.console_errors == []


def test_feature_page_box(browser, site, url):
    page = browser.new_page()
    page.goto(url + "features/5/index.html")
    text = "Lily was happy. She played with a red ball in the garden."
    page.fill(".atlas-try-input", text)
    page.click(".atlas-try-form button")
    page.wait_for_selector("section.atlas-try[data-state=done]", state="attached", timeout=60_000)
    ids, top_ids, top_acts = python_result(site, text)
    acts = [float(s.get_attribute("data-act")) for s in page.query_selector_all(".atlas-try .atlas-token")]
    ref = [float(top_acts[t][list(top_ids[t]).index(5)]) if 5 in top_ids[t] else 0.0 for t in range(len(ids))]
    assert np.allclose(acts, ref, rtol=5e-3, atol=2e-3)
    assert browser.external_requests == [] and page.console_errors == []


def test_model_is_cached_for_later_visits(browser, url):
    page = browser.new_page()
    page.goto(url + "prompt.html")
    analyse(page, "The cat sat.")
    cached = page.evaluate("(async () => { const ks = await caches.keys(); const c = await caches.open(ks[0]);"
                           " return (await c.keys()).map(r => r.url.split('/').pop()); })()")
    assert {"encoder.web.onnx", "tokenizer.json", "model.json"} <= set(cached)


def test_file_url_explains_local_server(browser, site):
    page = browser.new_page()
    page.goto((site / "prompt.html").as_uri())
    page.wait_for_load_state("load")
    notice = page.inner_text(".atlas-needs-server")  # static: Chromium runs no module from file://
    assert "python -m http.server" in notice and page.is_disabled(".atlas-prompt-form button")
