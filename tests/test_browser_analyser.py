"""The prompt analyser and the feature-page box in headless Chromium, against Python onnxruntime.

The test site is assembled here (site_src/js, the vendored npm files, the exported onnx/ and two
small pages carrying the Content-Security-Policy the analyser needs), so these tests do not
depend on `atlas build`; it is served at a sub-path (/atlas/), as GitHub Pages serves a project
site. The exported SAE is test_export's stand-in ReLU SAE: about half of its 256 latents fire on
every token, far more than the 32 the export shows the browser, so the analyser has to say so.
tests/test_site_browser.py runs the analyser of a site built by `atlas build`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from browser import CSP, PAGE, PREFIX, check_heatmap, close, copy_scripts, ort_reference, serve
from support import export_tiny

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not (ROOT / "node_modules/onnxruntime-web").exists(),
                                                       reason="node_modules missing (npm ci)")]


def assemble_site(site: Path, onnx_dir: Path, labels: list[str] | None = None) -> Path:
    """A minimal site: js/, assets/vendor/ (site_src/vendor.json), onnx/, prompt.html, features/N/index.html
    (a try box for every feature) and data/features.js with `labels`; for a suite, the features and
    data of each SAE under <id>/ (the layout model.js saePages assumes)."""
    copy_scripts(site)
    meta = json.loads((onnx_dir / "model.json").read_text())
    (site / "onnx").mkdir(exist_ok=True)
    for f in meta["files"] + ["model.json"]:
        shutil.copy2(onnx_dir / f, site / "onnx" / f)
    md = (ROOT / "site_src/prompt.md").read_text()
    body = md[md.index("<section"):]
    (site / "prompt.html").write_text(PAGE.format(csp=CSP, title="Prompt analyser", body=body))
    for sae in meta["saes"]:
        pages = site / sae["id"] if len(meta["saes"]) > 1 else site
        up = "../../.." if len(meta["saes"]) > 1 else "../.."
        for fid in range(sae["d_sae"]):
            d = pages / "features" / str(fid)
            d.mkdir(parents=True, exist_ok=True)
            (d / "index.html").write_text(PAGE.format(csp=CSP, title=f"Feature {fid}", body=(
                f'<section class="atlas-try" data-feature-id="{fid}" data-sae="{sae["id"]}" data-root="{up}"></section>'
                f'<script src="{up}/js/analyser/boot.js" data-module="try.js" defer></script>')))
        if labels is not None:
            (pages / "data").mkdir(exist_ok=True)
            (pages / "data/features.js").write_text(f'Atlas.loaded("features",{json.dumps({"label": labels})});\n')
    return site


@pytest.fixture(scope="module")
def site(tiny_world, tmp_path_factory):
    # the stand-in SAE's random weights are touchier to weight rounding than a trained SAE's
    onnx_dir = export_tiny(tiny_world, tmp_path_factory.mktemp("onnx"), min_top1=0.9)
    labels = [f"label <b>{i}</b>" for i in range(256)]
    return assemble_site(tmp_path_factory.mktemp("site"), onnx_dir, labels)


@pytest.fixture(scope="module")
def url(site):
    with serve({PREFIX: site}) as server:
        yield server.url(PREFIX)
        assert not server.stray, server.stray      # nothing was asked for outside the site


def analyse(page, text: str, timeout: float = 60_000):
    page.fill(".atlas-prompt-input", text)
    page.click(".atlas-prompt-form button")
    page.wait_for_selector("section.atlas-prompt[data-state=done], section.atlas-prompt[data-state=error]",
                           state="attached", timeout=timeout)
    assert page.get_attribute("section.atlas-prompt", "data-state") == "done", page.inner_text(".atlas-status")


def test_prompt_page_matches_python(browser, site, url):
    """The web file (4-bit GatherBlockQuantized embedding) in onnxruntime-web's wasm build gives what
    Python onnxruntime gives on the same file, and the page says how much of it the browser sees."""
    import onnx

    ops = {n.op_type for n in onnx.load(site / "onnx/trunk.web.onnx", load_external_data=False).graph.node}
    assert "GatherBlockQuantized" in ops
    page = browser.new_page()
    page.goto(url + "prompt.html")
    text = "Once upon a time, there was a little dog named Max. Max liked to play in the park."
    analyse(page, text)
    ref = ort_reference(site, text)
    ids, k, n_active = ref["ids"], ref["k"], ref["n_active"]
    assert n_active is not None and (n_active[1:] > k).all()
    spans = page.query_selector_all(".atlas-tokens .atlas-token")
    assert len(spans) == len(ids)
    # strongest features: max over non-BOS tokens of what the browser sees, as Python computes it
    best: dict[int, float] = {}
    for t in range(1, len(ids)):
        for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]):
            if a > 0 and a > best.get(int(i), 0):
                best[int(i)] = float(a)
    want = sorted(best.items(), key=lambda x: -x[1])[:5]
    items = page.query_selector_all(".atlas-strongest li")
    got = [(int(li.get_attribute("data-feature-id")), float(li.get_attribute("data-act"))) for li in items[:5]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(close(g[1], w[1]) for g, w in zip(got, want)), (got, want)
    # how many it shows of how many fire
    assert page.inner_text(".atlas-coverage") == (
        f"The analyser sees the {k} strongest features of each token: on {len(ids) - 1} of the {len(ids) - 1} "
        f"tokens more fire (up to {int(n_active[1:].max())}), and the weaker ones are left out of the lists and colours.")
    # heatmap of the chosen feature (the strongest, chosen by default): Python's values, or "unseen"
    feature = int(page.input_value(".atlas-feature-input"))
    assert feature == want[0][0]
    check_heatmap(spans, ref, feature)
    assert page.locator(".atlas-tokens .atlas-token-unseen").count() > 0
    # hovering a token lists its features, linked to their pages, labels inserted as text
    spans[4].hover()
    assert page.get_attribute(".atlas-token-features", "data-index") == "4"
    first = page.query_selector(".atlas-token-features li")
    assert int(first.get_attribute("data-feature-id")) == int(ref["top_ids"][4][0])
    link = first.query_selector("a")
    assert link.evaluate("a => a.href") == f"{url}features/{int(ref['top_ids'][4][0])}/index.html"
    assert f"label <b>{int(ref['top_ids'][4][0])}</b>" in link.inner_text()
    assert page.query_selector(".atlas-token-features b") is None
    assert len(page.query_selector_all(".atlas-token-features li")) == 10
    assert page.inner_text(".atlas-token-coverage") == \
        f"The 10 strongest of the {int(n_active[4])} features that fire on this token."
    assert browser.external_requests == [] and page.console_errors == [] and page.failed == []
    assert all(u.startswith(url) for u in page.requests), page.requests


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
    assert browser.external_requests == [] and page.console_errors == []


def test_long_prompts_are_cut_into_windows_or_refused(browser, site, url):
    """A prompt longer than the model's context is cut into windows, each BOS first as the training
    contexts were, and matches Python onnxruntime run window by window; an ~8,000-token prompt ends
    in a result, a longer one in a clear refusal, never a crash."""
    page = browser.new_page()
    page.goto(url + "prompt.html")
    text = "Tom and Lily play. " * 60                       # far over the tiny model's 128 tokens
    analyse(page, text)
    ref = ort_reference(site, text)
    assert ref["windows"] > 1
    spans = page.query_selector_all(".atlas-tokens .atlas-token")
    assert len(spans) == len(ref["ids"])                    # every token, not the first 128
    check_heatmap(spans, ref, int(page.input_value(".atlas-feature-input")))
    notice = page.inner_text(".atlas-notice")
    assert f"cut into {ref['windows']} windows" in notice and "start token" in notice, notice
    # ~8,000 tokens: a result (the tiny model runs them as 64 windows)
    words = "Tom and Lily play. " * 1600
    n = _n_tokens(site, words)
    assert 7_500 <= n <= 8_192, n
    analyse(page, words, timeout=120_000)
    assert len(page.query_selector_all(".atlas-tokens .atlas-token")) == n + 1
    # past the stated limit: one clear line, no result and no error
    page.fill(".atlas-prompt-input", words * 2)
    page.click(".atlas-prompt-form button")
    page.wait_for_selector("section.atlas-prompt[data-state=refused]", state="attached", timeout=60_000)
    assert re.fullmatch(r"The prompt has [\d,]+ tokens; the analyser takes at most 8,192\. Shorten it and analyse again\.",
                        page.inner_text(".atlas-notice")), page.inner_text(".atlas-notice")
    assert browser.external_requests == [] and page.console_errors == []


def _n_tokens(site: Path, text: str) -> int:
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(site / "onnx/tokenizer.json")).encode(text, add_special_tokens=False).ids)


def test_page_stays_responsive_and_recolours(browser, site, url):
    """The model runs in a Web Worker: while a ~1,000-token prompt is analysed (model start included),
    a timer on the page keeps ticking at least every 200 ms. A second analysis colours the tokens by
    its own strongest feature, not the first prompt's."""
    page = browser.new_page()
    page.goto(url + "prompt.html")
    first = "Tom and Lily play in the park. " * 125
    assert 900 <= _n_tokens(site, first) <= 1_200
    page.fill(".atlas-prompt-input", first)
    page.evaluate("""() => { window.gaps = []; let last = performance.now();
      const state = () => document.querySelector("section.atlas-prompt").dataset.state;
      window.ticker = setInterval(() => { const now = performance.now();
        window.gaps.push([now - last, state()]); last = now; }, 20); }""")
    page.click(".atlas-prompt-form button")
    page.wait_for_selector("section.atlas-prompt[data-state=done]", state="attached", timeout=60_000)
    gaps = page.evaluate("() => { clearInterval(window.ticker); return window.gaps; }")
    running = [g for g, state in gaps if state == "running"]
    assert len(running) > 10 and max(running) < 200, [g for g in gaps if g[0] > 60]
    seen = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
    assert any(u.endswith("/js/analyser/worker.js") for u in seen)
    # a second prompt with another strongest feature: coloured by its own
    ref1 = ort_reference(site, first)
    second = next(t for t in ("Zebras quickly jumped over 42 lazy boxes!", "The sun is hot.", "1 2 3 4 5 6 7 8 9")
                  if _strongest(ort_reference(site, t)) != _strongest(ref1))
    analyse(page, second)
    ref2 = ort_reference(site, second)
    feature = int(page.input_value(".atlas-feature-input"))
    assert feature == int(page.get_attribute(".atlas-strongest li", "data-feature-id")) != _strongest(ref1)
    assert page.get_attribute(".atlas-tokens", "data-feature") == str(feature)
    spans = page.query_selector_all(".atlas-tokens .atlas-token")
    assert len(spans) == len(ref2["ids"])
    check_heatmap(spans, ref2, feature)
    assert browser.external_requests == [] and page.console_errors == []


def _strongest(ref) -> int:
    """The strongest feature over the non-BOS tokens the browser sees."""
    acts = ref["top_acts"][1:]
    t, r = np.unravel_index(int(np.argmax(acts)), acts.shape)
    return int(ref["top_ids"][1:][t, r])


def test_training_context_note(browser, site, tmp_path):
    """When the SAE's training contexts are shorter than a prompt, the page says from which token on
    its features may fire differently."""
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    meta = json.loads((copy / "onnx/model.json").read_text())
    meta["ctx_len"] = 32
    (copy / "onnx/model.json").write_text(json.dumps(meta))
    with serve({PREFIX: copy}) as server:
        page = browser.new_page()
        page.goto(server.url(PREFIX) + "prompt.html")
        analyse(page, "Lily and Tom went to the park to play with a ball.")
        assert page.is_hidden(".atlas-notice")                # shorter than 32 tokens: nothing to say
        analyse(page, "Lily and Tom went to the park to play with a ball. " * 5)
        notice = page.inner_text(".atlas-notice")
        assert "trained on contexts of 32 tokens (the start token and 31 of text)" in notice, notice
        assert "from the 32nd token of a window on" in notice and "windows" not in notice, notice


def test_text_in_the_url_is_analysed(browser, url):
    """prompt.html#text=... (the feature pages' "analyse this example") fills in the text and runs it."""
    text = "Lily said: <b>hi</b> & \"bye\"\n  indented"
    page = browser.new_page()
    page.goto(url + "prompt.html#text=" + quote(text, safe=""))
    page.wait_for_selector("section.atlas-prompt[data-state=done]", state="attached", timeout=60_000)
    assert page.input_value(".atlas-prompt-input") == text
    tokens = page.query_selector_all(".atlas-tokens .atlas-token")
    assert "".join(t.text_content() for t in tokens[1:]).replace("↵", "") == text
    assert page.query_selector(".atlas-tokens b") is None
    assert page.console_errors == []


def _try(browser, url: str, feature: int, text: str):
    page = browser.new_page()
    page.goto(url + f"features/{feature}/index.html")
    page.fill(".atlas-try-input", text)
    page.click(".atlas-try-form button")
    page.wait_for_selector("section.atlas-try[data-state=done]", state="attached", timeout=60_000)
    return page


def test_feature_page_box(browser, site, url):
    """A feature page's box shows Python's values where the feature is among a token's top 32; where
    it is not and more than 32 fire, it is marked unseen, and a feature never among the top 32 is
    not said not to fire: the box says it is not among the 32 strongest of the N that fire."""
    text = "Lily was happy. She played with a red ball in the garden."
    ref = ort_reference(site, text)
    ids, k, n_active = ref["ids"], ref["k"], ref["n_active"]
    seen = [{int(i) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]) if a > 0} for t in range(1, len(ids))]
    strongest = int(ref["top_ids"][1][0])
    never = next(f for f in range(256) if not any(f in s for s in seen))
    for feature in (strongest, never):
        hidden = [int(n_active[t]) for t in range(1, len(ids)) if feature not in seen[t - 1]]
        lo, hi = min(hidden), max(hidden)      # how many fire where the feature is out of sight
        page = _try(browser, url, feature, text)
        spans = page.query_selector_all(".atlas-try .atlas-token")
        assert len(spans) == len(ids)
        check_heatmap(spans, ref, feature)
        status = page.inner_text("section.atlas-try .atlas-status")
        n_unseen = page.locator(".atlas-try .atlas-token-unseen").count()
        assert n_unseen == sum(feature not in s for s in seen)
        if feature == strongest:
            assert status.startswith(f"Feature {feature} fires on this text (max "), status
            assert f"On {n_unseen} other tokens it is not among the {k} strongest of the {lo}–{hi} features" in status
        else:
            assert status == (f"Feature {feature} is not among the {k} strongest of the {lo}–{hi} features that fire "
                              f"on any of the {len(ids) - 1} tokens, so it may still fire, more weakly (dotted "
                              f"underline): the analyser sees only each token's {k} strongest."), status
        assert browser.external_requests == [] and page.console_errors == [] and page.failed == []


def _cache_name(prefix: str, fingerprint: str) -> str:
    """The Cache API name model.js gives a site at `prefix` (encodeURIComponent of its path)."""
    return f"feature-atlas-model:{quote(prefix, safe='')}:{fingerprint}"


CACHES = """async () => Object.fromEntries(await Promise.all((await caches.keys()).map(async (n) =>
  [n, (await (await caches.open(n)).keys()).map((r) => new URL(r.url).pathname)])))"""


def _set_fingerprint(site: Path, fingerprint: str):
    meta = json.loads((site / "onnx/model.json").read_text())
    meta["fingerprint"] = fingerprint
    (site / "onnx/model.json").write_text(json.dumps(meta))


def test_two_sites_on_one_origin_keep_their_caches(browser, site, tmp_path):
    """Two atlases on one origin (user.github.io/a/ and /b/) each keep their cached model: a site
    deletes only its own stale caches (a new build, or an unnamed cache of an older version that
    holds its files), and a later visit analyses from its cache without downloading the model."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(site, a)
    shutil.copytree(site, b)
    _set_fingerprint(a, "a-build-1")
    _set_fingerprint(b, "b-build-1")
    with serve({"/a/": a, "/b/": b}) as server:
        ua, ub = server.url("/a/"), server.url("/b/")
        context = browser.new_context()                       # one origin's storage, shared by its pages
        page = browser.new_page(context)
        page.goto(ua + "prompt.html")
        # caches named the old way, before they were keyed by site: one holds a's model, one b's
        page.evaluate("""async ([ua, ub]) => {
          await (await caches.open("feature-atlas-model-old-a")).put(ua + "onnx/model.json", new Response("{}"));
          await (await caches.open("feature-atlas-model-old-b")).put(ub + "onnx/model.json", new Response("{}"));
        }""", [ua, ub])
        analyse(page, "The cat sat.")
        held = page.evaluate(CACHES)
        assert set(held) == {_cache_name("/a/", "a-build-1"), "feature-atlas-model-old-b"}, held
        assert set(held[_cache_name("/a/", "a-build-1")]) == {"/a/onnx/model.json", "/a/onnx/trunk.web.onnx",
                                                             "/a/onnx/encoder-L2.web.onnx", "/a/onnx/tokenizer.json"}
        page = browser.new_page(context)
        page.goto(ub + "prompt.html")
        analyse(page, "The cat sat.")
        held = page.evaluate(CACHES)
        assert set(held) == {_cache_name("/a/", "a-build-1"), _cache_name("/b/", "b-build-1")}, held
        assert held[_cache_name("/a/", "a-build-1")] and all(p.startswith("/b/onnx/") for p in held[_cache_name("/b/", "b-build-1")])
        # a new build of a: a's old cache goes, b's stays
        _set_fingerprint(a, "a-build-2")
        page = browser.new_page(context)
        page.goto(ua + "prompt.html")
        analyse(page, "The cat sat.")
        held = page.evaluate(CACHES)
        assert set(held) == {_cache_name("/a/", "a-build-2"), _cache_name("/b/", "b-build-1")}, held
        # b again with its model files unreachable: analysed from b's cache, model.json included
        page = browser.new_page(context)
        page.route("**/b/onnx/**", lambda route: route.abort())
        page.goto(ub + "prompt.html")
        analyse(page, "The dog ran.")
        assert [u for u in page.requests if "/onnx/" in u] == [ub + "onnx/model.json"]   # tried, refused
        assert len(page.query_selector_all(".atlas-tokens .atlas-token")) > 1
        context.close()
        assert not server.stray, server.stray


def test_file_url_explains_local_server(browser, site):
    page = browser.new_page()
    page.goto((site / "prompt.html").as_uri())
    page.wait_for_load_state("load")
    notice = page.inner_text(".atlas-needs-server")  # static: Chromium runs no module from file://
    assert "python -m http.server" in notice and page.is_disabled(".atlas-prompt-form button")
    page.goto((site / "features/3/index.html").as_uri())   # the try box says the same, with no console error
    page.wait_for_load_state("load")
    assert "python -m http.server" in page.inner_text("section.atlas-try .atlas-needs-server")
    # (prompt.html's steer box, a module script, still logs that file:// blocked it: not the analyser's)
    assert not [e for e in page.console_errors if "/analyser/" in e], page.console_errors


# ---------------------------------------------------------------- a suite: every layer


@pytest.fixture(scope="module")
def suite_site(tiny_suite_onnx, tmp_path_factory):
    """The tiny suite (test_export.SUITE: layers 1, 2 (two widths) and 3) as a minimal site."""
    return assemble_site(tmp_path_factory.mktemp("suite-site"), tiny_suite_onnx, [f"label <i>{i}</i>" for i in range(512)])


def test_every_layer_matches_python(browser, suite_site):
    """The cross-layer view: one row per SAE, one column per token; each cell's three strongest
    features are what Python onnxruntime computes on the same trunk and encoder files, linked to
    that SAE's pages. The trunk is downloaded once; each encoder once, when first needed."""
    from support import SUITE

    text = "Tom met Lily in the park. They played with a red ball."
    with serve({PREFIX: suite_site}) as server:
        url = server.url(PREFIX)
        page = browser.new_page()
        page.goto(url + "prompt.html")
        analyse(page, text)
        assert "tokens analysed" in page.inner_text(".atlas-status")  # not the last encoder's "Starting the model…"
        rows = page.query_selector_all(".atlas-layer-table tbody tr")
        assert [r.get_attribute("data-sae") for r in rows] == [i for i, _, _ in SUITE]
        for row in rows:
            sae_id = row.get_attribute("data-sae")
            ref = ort_reference(suite_site, text, sae_id)
            cells = row.query_selector_all("td")
            assert len(cells) == len(ref["ids"]) - 1                   # BOS left out
            for cell in cells:
                t = int(cell.get_attribute("data-index"))
                links = cell.query_selector_all("a")
                want = [(int(i), float(a)) for i, a in zip(ref["top_ids"][t][:3], ref["top_acts"][t][:3]) if a > 0]
                got = [(int(a.get_attribute("data-feature-id")), float(a.get_attribute("data-act"))) for a in links]
                assert len(got) == len(want), (sae_id, t)
                for (gi, ga), (wi, wa) in zip(got, want):
                    assert close(ga, wa), (sae_id, t, got, want)
                    # a near-tie may swap two ids between the two runtimes, nothing else
                    assert gi == wi or any(close(wa, float(a)) for a in ref["top_acts"][t] if a != wa), (sae_id, t, got, want)
                assert all(a.evaluate("a => a.href") == f"{url}{sae_id}/features/{i}/index.html"
                           for a, (i, _) in zip(links, got))
        # the layers × tokens table's headers are the tokens, as text
        assert page.query_selector(".atlas-layer-table b, .atlas-layer-table i") is None
        onnx_requests = [u[len(url):] for u in page.requests if "/onnx/" in u]
        assert sorted(onnx_requests) == sorted(["onnx/model.json", "onnx/trunk.web.onnx", "onnx/tokenizer.json"]
                                               + [f"onnx/encoder-{i}.web.onnx" for i, _, _ in SUITE])
        assert browser.external_requests == [] and page.console_errors == [] and page.failed == []
        # the lists and colours follow the chosen SAE (the first by default), linked to its pages
        assert page.input_value(".atlas-sae-select") == SUITE[0][0]
        page.select_option(".atlas-sae-select", "L3")
        page.wait_for_function("() => document.querySelector('.atlas-strongest a')?.href.includes('/L3/features/')")
        ref = ort_reference(suite_site, text, "L3")
        first = page.query_selector(".atlas-strongest li")
        best = max(((float(a), int(i)) for t in range(1, len(ref["ids"]))
                    for i, a in zip(ref["top_ids"][t], ref["top_acts"][t])), default=(0.0, -1))
        assert close(float(first.get_attribute("data-act")), best[0])
        # a feature page of one SAE runs that SAE's encoder
        page = _try(browser, url + "L3/", 5, text)
        ref = ort_reference(suite_site, text, "L3")
        check_heatmap(page.query_selector_all(".atlas-try .atlas-token"), ref, 5)
        assert not server.stray, server.stray
