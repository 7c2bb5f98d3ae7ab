"""The built site in headless Chromium, served at a sub-path as GitHub Pages serves a project site
(`user.github.io/my-atlas/`): every page loads without console errors, failed requests or a request
outside the site; the explorer, map, search and the prompt analyser work, the analyser's results
match Python onnxruntime on the same web file; screenshots of the main views are kept for a look.

Two sites are built once per session: the tiny run end to end (`atlas all`: a trained TopK SAE,
k = 8, exported with `export.top_k = 4`, so the browser sees fewer latents than fire and has to
say so), served at /my-atlas/, and the synthetic run of test_build (hostile labels and tokens),
served at /hostile/.

Screenshots go to $ATLAS_SCREENSHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import quote, urldefrag

import numpy as np
import pytest

from browser import all_in_sight, check_heatmap, close, ort_reference, serve
from support import built_site, tiny_yaml  # noqa: F401  (the synthetic site, hostile text included)

pytestmark = pytest.mark.browser

PREFIX, HOSTILE = "/my-atlas/", "/hostile/"
TOP_K = 4          # what the browser sees per token; the tiny SAE fires k = 8 latents per token
TEXT = "Once upon a time, Lily saw a big red ball in the park. She was happy."
PAGES = ["index.html", "explorer.html", "map.html", "search.html", "notable.html", "methodology.html",
         "about.html", "prompt.html"]


@pytest.fixture(scope="session")
def tiny_run(tiny_world, tmp_path_factory) -> Path:
    """runs/tiny of the tiny world, built once by `atlas all` (training shortened: 60k tokens)."""
    from atlas.cli import main

    work = tmp_path_factory.mktemp("tiny-site")
    # The web file's agreement with PyTorch is test_export's subject (its gate is kept low here, so the
    # shortened training cannot fail the fixture); these tests compare the browser with Python
    # onnxruntime on the same web file, which must agree whatever its agreement with PyTorch.
    tiny_yaml(tiny_world, work, export={"top_k": TOP_K, "min_top1_agreement": 0.8, "min_topk_overlap": 0.8},
              train={"n_tokens": 60_000})
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["all", "--config", "tiny.yaml"]) == 0
    finally:
        os.chdir(cwd)
    return work / "runs" / "tiny"


@pytest.fixture(scope="module")
def tiny_site(tiny_run) -> Path:
    return tiny_run / "site"


@pytest.fixture(scope="module")
def server(tiny_site):
    with serve({PREFIX: tiny_site}) as s:
        yield s


@pytest.fixture(scope="module")
def hostile_server(built_site):  # noqa: F811
    with serve({HOSTILE: built_site}) as s:
        yield s


@pytest.fixture(scope="module")
def site_url(server):
    return server.url(PREFIX)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("ATLAS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def live_feature(tiny_site) -> int:
    """A feature whose page shows highlighted examples."""
    from atlas import page_data

    size = page_data.group_size(json.loads((tiny_site.parent / "features" / "manifest.json").read_text())["shard_size"])
    return next(i for i in range(256)
                if any(e["feature_id"] == i for e in page_data.read_group(tiny_site, i // size)["examples"]))


def _visit(browser, url, shot: Path | None = None, dark=False):
    page = browser.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    if dark:
        page.emulate_media(color_scheme="dark")
    page.goto(url)
    page.wait_for_load_state("networkidle")
    if "/features/" in url:     # feature pages draw their examples from a shared data file (js/feature.js)
        page.wait_for_selector("#atlas-feature[data-state=done], #atlas-feature[data-state=error]", state="attached")
    if shot:
        page.screenshot(path=str(shot), full_page=False)
    return page


def _clean(page, server, base: str):
    """No console error, no failed response, no request outside the site at `base` (same origin included)."""
    assert not page.console_errors, page.console_errors
    assert not page.failed, page.failed
    outside = [u for u in page.requests if not u.startswith(base) and not u.startswith(("data:", "blob:"))]
    assert not outside, outside
    assert not server.stray, server.stray


AFTER = "(sel) => getComputedStyle(document.querySelector(sel), '::after').content"


# ---------------------------------------------------------------- the site at a sub-path


def test_every_page_loads_clean_at_the_sub_path(browser, server, site_url, live_feature):
    """Each hand-written page and some feature pages load with no error and no request outside
    /my-atlas/, and every link, script and stylesheet they name is served (HTTP 200) there."""
    checked: dict[str, int] = {}
    for name in PAGES + ["features/0/index.html", f"features/{live_feature}/index.html", "features/255/index.html"]:
        page = _visit(browser, site_url + name)
        _clean(page, server, site_url)
        refs = page.eval_on_selector_all("a[href], link[href], script[src], img[src]",
                                         "els => els.map(e => e.href || e.src)")
        for ref in refs:
            url = urldefrag(ref).url
            if not url.startswith(server.origin) or url in checked:
                continue
            assert url.startswith(site_url), f"{name}: {ref} is outside the site"
            with urllib.request.urlopen(url) as r:
                checked[url] = r.status
        page.close()
    assert set(checked.values()) == {200}
    assert sum("/features/" in u for u in checked) >= 50                  # the explorer's first page of features
    assert any("/js/analyser/" in u for u in checked) and any("/assets/vendor/" in u for u in checked)
    # GitHub Pages answers /my-atlas with a redirect to /my-atlas/; so does this server
    page = _visit(browser, site_url.rstrip("/"))
    assert page.url == site_url and page.locator("h1").first.inner_text()


def test_home_and_feature_page(browser, server, site_url, live_feature, shots):
    page = _visit(browser, site_url + "index.html", shots / "home.png")
    assert page.locator("h1").first.inner_text()
    _clean(page, server, site_url)
    for dark in (False, True):
        page = _visit(browser, site_url + f"features/{live_feature}/index.html",
                      shots / f"feature{'-dark' * dark}.png", dark=dark)
        assert page.locator(".atlas-win span.a1, .atlas-win span.a8").count() > 0
        # the theme's icons are CSS masks on empty <svg>s: painted, at the theme's size
        icon = page.locator(".md-header__button.md-logo svg")
        assert "data:image/svg+xml" in icon.evaluate("e => getComputedStyle(e).webkitMaskImage || getComputedStyle(e).maskImage")
        assert icon.bounding_box()["width"] > 10
        scheme = page.evaluate("() => document.body.getAttribute('data-md-color-scheme')")
        assert scheme == ("slate" if dark else "default")
        _clean(page, server, site_url)
    assert not browser.external_requests, browser.external_requests


def test_hostile_text_stays_text(browser, hostile_server):
    """The synthetic run's labels and tokens carry markup: pages and the explorer show it as text."""
    server = hostile_server
    base = server.url(HOSTILE)
    page = _visit(browser, base + "features/53/index.html")
    assert page.get_attribute("#atlas-feature", "data-state") == "done"
    assert page.locator(".atlas-win span").count() > 0
    assert page.evaluate("() => !!window.__pwned") is False
    assert page.locator("img[src=x]").count() == 0
    _clean(page, server, base)
    page = _visit(browser, base + "explorer.html")
    page.wait_for_selector("#atlas-rows a")
    page.fill("#atlas-filter", "script")
    page.wait_for_function("() => document.querySelectorAll('#atlas-rows tr').length < 50")
    assert "<script>" in page.locator("#atlas-rows").inner_text()
    assert page.locator("#atlas-rows script, #atlas-rows img").count() == 0
    _clean(page, server, base)
    assert not browser.external_requests, browser.external_requests


def test_token_value_on_hover_and_focus(browser, server, site_url, live_feature):
    """Every token shows its position in its context (and its value where the feature fires) on hover and on
    keyboard focus; each example is one tab stop, arrow keys move between its tokens."""
    page = _visit(browser, site_url + f"features/{live_feature}/index.html")
    sel = ".atlas-win span.pk"
    token = page.locator(sel).first
    tip = token.get_attribute("data-tip")
    assert re.fullmatch(r"[\d.e+-]+ at position \d+", tip), tip
    assert page.evaluate(AFTER, sel) in ("none", "normal")
    token.hover()
    assert page.evaluate(AFTER, sel) == f'"{tip}"'
    page.mouse.move(0, 0)
    page.locator(".atlas-pager a").last.focus()            # from the pager, Tab walks into the example windows
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("() => !!document.activeElement.closest('.atlas-win')"):
            break
    state = "() => [document.activeElement.getAttribute('data-tip'), getComputedStyle(document.activeElement, '::after').content, " \
            "[...document.querySelectorAll('.atlas-ex > li')].indexOf(document.activeElement.closest('li'))]"
    first = page.evaluate(state)
    assert first[0] and first[1] == f'"{first[0]}"' and first[2] == 0
    page.keyboard.press("ArrowRight")                       # the next token of the same example
    moved = page.evaluate(state)
    assert moved[2] == 0 and moved[0] != first[0]
    page.keyboard.press("Tab")                              # the next example, not the next token
    assert page.evaluate(state)[2] == 1
    _clean(page, server, site_url)


def test_katex_renders_formulas(browser, server, site_url, shots):
    """methodology.html: the TeX that arithmatex leaves is typeset by KaTeX, copied from node_modules."""
    page = _visit(browser, site_url + "methodology.html")
    page.wait_for_selector(".arithmatex .katex", timeout=10_000)
    n_math, n_katex = page.evaluate("() => [document.querySelectorAll('.arithmatex').length, "
                                    "document.querySelectorAll('.arithmatex .katex').length]")
    assert n_math > 0 and n_katex == n_math
    assert page.locator(".katex-error").count() == 0
    assert page.locator(".katex-display").count() > 0       # display formulas too
    page.screenshot(path=str(shots / "methodology.png"))
    _clean(page, server, site_url)


def test_explorer_sorts_and_filters(browser, server, site_url, tiny_site, shots):
    text = (tiny_site / "data/features.js").read_text(encoding="utf-8")
    labels = [lab.lower() for lab in json.loads(text[text.index(",") + 1: text.rindex(")")])["label"]]
    words = sorted({w for lab in labels for w in re.findall(r"[a-z]{4,}", lab)})
    word = next(w for w in words if 1 < sum(w in lab for lab in labels) < 20)   # fits one page of rows
    page = _visit(browser, site_url + "explorer.html")
    page.wait_for_selector("#atlas-rows a")
    page.click("button[data-sort=max_act]")
    first = page.locator("#atlas-rows tr").first.inner_text()
    page.fill("#atlas-filter", word)
    n = sum(word in lab for lab in labels)
    page.wait_for_function(f"() => document.querySelectorAll('#atlas-rows tr').length === {n}")
    rows = page.locator("#atlas-rows tr").all_inner_texts()
    assert all(word in r.lower() for r in rows)
    page.fill("#atlas-filter", "")
    page.screenshot(path=str(shots / "explorer.png"))
    assert first
    _clean(page, server, site_url)


def test_explorer_state_survives_back(browser, hostile_server):
    """Filter, sort, a switch and a page of the explorer are kept in the URL: open a feature, go Back, the
    same rows in the same order; the URL alone gives the same view. Special-token/position features
    (planted in the synthetic run) carry a badge and the switch hides them."""
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + "explorer.html")
    page.wait_for_selector("#atlas-rows a")
    assert page.locator("#atlas-rows .atlas-badge.dominated").count() > 0
    page.fill("#atlas-filter", "after")
    page.check("#atlas-hide-dominated")
    page.click("button[data-sort=f1]")
    page.click("button[data-sort=f1]")                      # twice: ascending
    page.click("#atlas-next")
    page.wait_for_function("() => document.getElementById('atlas-page').textContent.startsWith('page 2')")
    rows = page.locator("#atlas-rows tr").all_inner_texts()
    assert page.locator("#atlas-rows .atlas-badge.dominated").count() == 0
    url = page.url
    assert "filter=after" in url and "sort=f1" in url and "page=2" in url and "hide-dominated=1" in url, url
    page.locator("#atlas-rows a").first.click()
    page.wait_for_url("**/features/*/index.html")
    page.go_back()
    page.wait_for_selector("#atlas-rows a")
    assert page.url == url
    assert page.input_value("#atlas-filter") == "after" and page.is_checked("#atlas-hide-dominated")
    assert not page.locator(".md-search__input").evaluate("e => e === document.activeElement")  # the theme's search stays shut
    assert page.locator("#atlas-rows tr").all_inner_texts() == rows
    assert page.get_attribute("th:has(button[data-sort=f1])", "aria-sort") == "ascending"
    fresh = _visit(browser, url)                             # shared as a link
    fresh.wait_for_selector("#atlas-rows a")
    assert fresh.locator("#atlas-rows tr").all_inner_texts() == rows
    _clean(page, hostile_server, base)


def test_header_search_finds_features_by_label(browser, hostile_server, built_site):  # noqa: F811
    """The theme's search box in the header finds a feature by one word of its label."""
    from atlas import search_index

    table = search_index.read_feature_table(built_site.parent / "features")
    word = "happy"                      # a word of some synthetic labels (lunr drops stop words such as "after")
    ids = [i for i, lab in zip(table.ids.tolist(), table.labels) if word in lab.lower().split()]
    assert ids
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + "about.html")
    page.click("label.md-search__icon, .md-search__input")
    page.locator(".md-search__input").press_sequentially(word, delay=30)   # the theme searches on key presses
    page.wait_for_selector(".md-search-result__item a[href*='features/']", timeout=20_000)
    hrefs = page.eval_on_selector_all(".md-search-result__item a", "els => els.map(e => e.href)")
    found = {int(m) for h in hrefs for m in re.findall(r"/features/(\d+)/index.html", h)}
    assert found & set(ids), (word, ids, hrefs[:5])
    assert all(h.startswith(base) for h in hrefs)
    _clean(page, hostile_server, base)


def test_token_search_finds_non_peak_tokens(browser, hostile_server, built_site):  # noqa: F811
    """Token search covers every token a feature fires on in its shown windows, not only the marked peak
    of its top examples: a feature is found by a token it fires on only away from its peaks."""
    from atlas import search_index, shards

    features = built_site.parent / "features"
    vocab = shards.read_vocab(features)
    manifest = shards.read_manifest(features)
    found = None
    for fid in range(40):
        rec = shards.read_feature(features, fid, manifest)
        peaks = {e["token_ids"][e["offset"] - e["window_start"]] for e in rec.examples if e["kind"] == "top"}
        best: dict[int, float] = {}
        for e in rec.examples:
            for t, a in zip(e["token_ids"], e["acts"]):
                if a > 0:
                    best[t] = max(a, best.get(t, 0.0))
        # the index keeps a feature's strongest distinct tokens: look among those, strongest first
        strongest = sorted(best, key=lambda t: -best[t])[:search_index.MAX_TOKENS_PER_FEATURE]
        for t in (t for t in strongest if t not in peaks):
            text = vocab[t]
            if text.strip() and text.isprintable() and "<" not in text:
                found = (fid, text)
                break
        if found:
            break
    assert found, "no feature fires on a token away from its peaks"
    fid, text = found
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + "search.html?token=" + urllib.parse.quote(text))
    page.wait_for_function("() => document.getElementById('atlas-search-status').textContent.includes('fire on')")
    entry = page.evaluate("(t) => Atlas.tokenEntry(t)", text)
    assert entry and fid in entry[0], (text, fid, entry)
    links = page.eval_on_selector_all("#atlas-results a", "els => els.map(e => e.getAttribute('href'))")
    assert any(h.endswith(f"features/{fid}/index.html") for h in links)
    _clean(page, hostile_server, base)


def test_map_hover_and_click(browser, server, site_url, shots):
    page = _visit(browser, site_url + "map.html")
    page.wait_for_function("() => document.getElementById('atlas-map-status').textContent.includes('live')")
    box = page.locator("#atlas-map-canvas").bounding_box()
    # find a point by scanning: move across the canvas until a tooltip shows
    found = False
    for fy in (0.5, 0.4, 0.6, 0.3, 0.7):
        for fx in [i / 40 for i in range(2, 39)]:
            page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            if page.locator("#atlas-map-tip").is_visible():
                found = True
                break
        if found:
            break
    page.screenshot(path=str(shots / "map.png"))
    assert found
    page.mouse.down()
    page.mouse.up()
    page.wait_for_url(site_url + "features/*/index.html")
    _clean(page, server, site_url)


def _features_js(site: Path) -> dict:
    text = (site / "data/features.js").read_text(encoding="utf-8")
    return json.loads(text[text.index(",") + 1: text.rindex(")")])


def test_map_legend_regions_locate_enter_and_back(browser, hostile_server, built_site, shots):  # noqa: F811
    """The map's legend, its region names (those features.js holds, hostile text shown as text), finding a
    feature by a label word and by its number, Enter on the map opening the located feature, and Back
    (or the address alone) bringing the same view back."""
    data = _features_js(built_site)
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + "map.html")
    page.wait_for_function("() => document.getElementById('atlas-map-status').textContent.includes('live')")
    assert page.locator("#atlas-map-ticks span").all_inner_texts() == ["≤0.0001%", "0.01%", "1%", "≥10%"]
    assert data["regions"], "the synthetic run's map has named regions"
    names = page.locator("#atlas-map-regions button").all_text_contents()
    assert names == [r[0] for r in data["regions"]]
    assert page.locator("#atlas-map-regions button:not([hidden])").count() >= 1

    live = [i for i in range(data["n"]) if not data["flags"][i] & 1 and (not data["present"] or data["present"][i])]
    word = "happy"
    with_word = [i for i in live if word in data["label"][i].lower()]
    assert with_word
    page.fill("#atlas-map-q", word)
    page.press("#atlas-map-q", "Enter")
    page.wait_for_function("() => location.search.includes('f=')")
    matches = [int(b) for b in page.eval_on_selector_all("#atlas-map-matches button", "bs => bs.map(b => b.dataset.feature)")]
    assert matches and set(matches) <= set(with_word) and len(matches) == min(8, len(with_word))
    located = matches[0]
    assert page.locator("#atlas-map-tip").inner_text().startswith(f"#{located} ")
    page.screenshot(path=str(shots / "map-located.png"))

    target = live[-1]
    page.fill("#atlas-map-q", f"#{target}")
    page.press("#atlas-map-q", "Enter")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('f') === '{target}'")
    assert page.locator("#atlas-map-tip").inner_text().startswith(f"#{target} ")
    url = page.url
    page.focus("#atlas-map-canvas")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/features/{target}/index.html")
    page.go_back()
    page.wait_for_function("() => document.getElementById('atlas-map-status').textContent.includes('live')")
    assert page.url == url
    assert page.input_value("#atlas-map-q") == f"#{target}"
    page.wait_for_function(f"() => document.getElementById('atlas-map-tip').textContent.startsWith('#{target} ')")
    fresh = _visit(browser, url)                             # shared as a link
    fresh.wait_for_function(f"() => document.getElementById('atlas-map-tip').textContent.startsWith('#{target} ')")

    dead = next((i for i in range(data["n"]) if data["flags"][i] & 1), None)
    if dead is not None:                                     # a dead feature has no point: said, and its page linked
        page.fill("#atlas-map-q", str(dead))
        page.press("#atlas-map-q", "Enter")
        page.wait_for_function("() => document.getElementById('atlas-map-found').textContent.includes('not on the map')")
    _clean(page, hostile_server, base)


def test_search_by_label_and_token(browser, server, site_url, shots):
    page = _visit(browser, site_url + "search.html")
    page.fill("#atlas-q", "after")
    page.wait_for_selector("#atlas-results li")
    page.check("input[value=token]")
    page.fill("#atlas-q", "Lily")
    page.wait_for_function("() => document.getElementById('atlas-search-status').textContent.includes('fire on')")
    assert page.locator("#atlas-results li").count() > 0
    assert page.locator("#atlas-results a").first.evaluate("a => a.href").startswith(site_url + "features/")
    # functional only: its speed is measured by tests/bench/bench_build.py (timing targets live in `make bench`)
    entry = page.evaluate("() => Atlas.tokenEntry(' Lily')")
    assert entry and entry[0] and len(entry[0]) == len(entry[1])
    assert page.evaluate("() => Atlas.tokenEntry('no such token at all')") is None
    page.screenshot(path=str(shots / "search.png"))
    _clean(page, server, site_url)
    assert not browser.external_requests, browser.external_requests


def test_file_url_pages_work(browser, tiny_site):
    """Page by page from file://: links resolve and the explorer loads its index by <script>; the
    prompt page says that analysis needs a local server."""
    page = browser.new_page()
    page.goto((tiny_site / "explorer.html").as_uri())
    page.wait_for_selector("#atlas-rows a")
    href = page.locator("#atlas-rows a").first.get_attribute("href")
    assert href.startswith("file://") and href.endswith("/index.html")
    page.goto(href)
    page.wait_for_selector("#atlas-feature[data-state=done]", state="attached")
    assert page.locator(".atlas-win span").count() > 0 or page.locator(".atlas-badge.dead").count() > 0
    page.goto((tiny_site / "prompt.html").as_uri())
    assert "python -m http.server" in page.inner_text(".atlas-needs-server")
    assert page.is_disabled(".atlas-prompt-form button")
    page.goto(href)                       # a feature page's "Try your own text" says the same
    page.wait_for_load_state("load")
    assert "python -m http.server" in page.inner_text("section.atlas-try .atlas-needs-server")


# ---------------------------------------------------------------- the prompt analyser, end to end


def _wait_done(page, section: str):
    page.wait_for_selector(f"{section}[data-state=done], {section}[data-state=error]", state="attached", timeout=60_000)
    assert page.get_attribute(section, "data-state") == "done", page.inner_text(f"{section} .atlas-status")


def test_prompt_page_end_to_end(browser, server, site_url, tiny_site, shots):
    """At /my-atlas/: the model loads from /my-atlas/onnx/, each token's features match Python
    onnxruntime on the same web file, and the page says how many features it shows of how many fire."""
    page = _visit(browser, site_url + "prompt.html")
    page.fill(".atlas-prompt-input", TEXT)
    page.click(".atlas-prompt-form button")
    _wait_done(page, "section.atlas-prompt")
    ref = ort_reference(tiny_site, TEXT)
    ids, k = ref["ids"], ref["k"]
    assert k == TOP_K and ref["n_active"] is not None, "the export has no n_active output"
    spans = page.query_selector_all(".atlas-tokens .atlas-token")
    assert len(spans) == len(ids)
    # each token's strongest feature (hover shows the token's features, strongest first)
    for t in range(1, len(ids)):
        spans[t].dispatch_event("mouseover")
        assert page.get_attribute(".atlas-token-features", "data-index") == str(t)
        items = page.query_selector_all(".atlas-token-features li")
        got = [(int(li.get_attribute("data-feature-id")), float(li.get_attribute("data-act"))) for li in items]
        want = [(int(i), float(a)) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]) if a > 0]
        assert len(got) == len(want)
        if got[0][0] != want[0][0]:        # a near-tie may flip between kernels, never a clear winner
            acts = dict(want)
            assert got[0][0] in acts and close(acts[got[0][0]], want[0][1]), (t, got, want)
        assert close(got[0][1], want[0][1]), (t, got, want)
        n = int(ref["n_active"][t])
        coverage = page.inner_text(".atlas-token-coverage")
        assert coverage == (f"All {n} features that fire on this token." if n == len(want)
                            else f"The {len(want)} strongest of the {n} features that fire on this token."), coverage
        href = items[0].query_selector("a").evaluate("a => a.href")
        assert href == f"{site_url}features/{got[0][0]}/index.html"
    # the prompt as a whole: how many tokens have more features than the browser sees
    hidden = [t for t in range(1, len(ids)) if not all_in_sight(ref, t)]
    assert hidden, "the tiny SAE fires 8 latents per token and the export shows 4: some must be out of sight"
    line = page.inner_text(".atlas-coverage")
    assert line == (f"The analyser sees the {k} strongest features of each token: on {len(hidden)} of the "
                    f"{len(ids) - 1} tokens more fire (up to {int(ref['n_active'][1:].max())}), and the weaker "
                    "ones are left out of the lists and colours."), line
    # the heatmap of the strongest feature (chosen by default)
    feature = int(page.input_value(".atlas-feature-input"))
    best = max(((float(a), int(i)) for t in range(1, len(ids)) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t])))
    assert feature == best[1] or close(best[0], float(page.get_attribute(".atlas-strongest li", "data-act")))
    check_heatmap(spans, ref, feature)
    page.screenshot(path=str(shots / "prompt.png"), full_page=True)
    _clean(page, server, site_url)
    assert not browser.external_requests, browser.external_requests


def _dense_acts(run: Path, ids: list[int]) -> np.ndarray:
    """Every latent's activation [seq, d_sae], in full precision from the run's model and SAE."""
    import json

    import torch

    from atlas.model import load_model
    from atlas.saes import load_sae

    meta = json.loads((run / "onnx" / "model.json").read_text())
    loaded = load_model(meta["model"], device="cpu", dtype="float32")
    sae = load_sae(run / "sae").float().eval()
    with torch.no_grad():
        resid = loaded.truncated(meta["saes"][0]["layer"])(torch.tensor([ids]))
        return sae.encode(resid)[0].numpy()


def _try(browser, url: str, text: str):
    page = _visit(browser, url)
    page.fill(".atlas-try-input", text)
    page.click(".atlas-try-form button")
    _wait_done(page, "section.atlas-try")
    return page


def test_try_box_end_to_end(browser, server, site_url, tiny_site, tiny_run, shots):
    """A feature page's box at /my-atlas/: a feature among a token's top k is shown with Python's
    values; a feature that fires on the text (full-precision SAE) but is never among the top k the
    browser sees is not reported as "does not fire": the box says what it knows."""
    ref = ort_reference(tiny_site, TEXT)
    ids = ref["ids"]
    shown = {int(i) for t in range(1, len(ids)) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]) if a > 0}
    dense = _dense_acts(tiny_run, ids)[1:]
    fires_unseen = [int(f) for f in np.flatnonzero((dense > 0).any(0)) if int(f) not in shown]
    assert fires_unseen, "every feature that fires is among some token's top 4"
    # 1. the strongest feature of the first word: it fires, with Python's values
    visible = int(ref["top_ids"][1][0])
    page = _try(browser, site_url + f"features/{visible}/index.html", TEXT)
    spans = page.query_selector_all(".atlas-try .atlas-token")
    assert len(spans) == len(ids)
    check_heatmap(spans, ref, visible)
    top = max(float(a) for t in range(1, len(ids)) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]) if i == visible)
    status = page.inner_text("section.atlas-try .atlas-status")
    m = re.match(rf"Feature {visible} fires on this text \(max ([\d.]+)\)\.", status)
    assert m and abs(float(m.group(1)) - top) <= 0.005 + 2e-3 + 5e-3 * top, status   # shown to 2 decimals
    _clean(page, server, site_url)
    # 2. a feature that fires but is never among the 4 strongest: no "does not fire"
    feature = fires_unseen[0]
    page = _try(browser, site_url + f"features/{feature}/index.html", TEXT)
    spans = page.query_selector_all(".atlas-try .atlas-token")
    check_heatmap(spans, ref, feature)
    status = page.inner_text("section.atlas-try .atlas-status")
    assert "does not fire on this text" not in status and "fires on this text" not in status, status
    counts = sorted({int(ref["n_active"][t]) for t in range(1, len(ids)) if not all_in_sight(ref, t)})
    of = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    assert f"not among the {TOP_K} strongest of the {of} features that fire" in status, status
    n_seen = sum(all_in_sight(ref, t) for t in range(1, len(ids)))   # tokens where every active feature is seen
    assert status.startswith(f"Feature {feature} does not fire on {n_seen} of the {len(ids) - 1} tokens. On the other "
                             if n_seen else f"Feature {feature} is not among"), status
    assert n_seen or f"on any of the {len(ids) - 1} tokens" in status, status
    page.screenshot(path=str(shots / "try.png"), full_page=False)
    _clean(page, server, site_url)
    assert not browser.external_requests, browser.external_requests


# ---------------------------------------------------------------- feature pages drawn from their data files


GLYPH = {"\n": "↵", "\t": "⇥", " ": "·"}


def _shown(text: str) -> str:
    """How js/feature.js writes a token into an example window (see its fillToken)."""
    text = text.replace("\r", "")
    if text and not text.strip():
        return "".join("↵\n" if c == "\n" else GLYPH[c] for c in text)
    return text.replace("\n", "↵\n").replace("\t", "⇥\t")


def test_examples_render_the_shard_data(browser, hostile_server, built_site):  # noqa: F811
    """Examples in Chromium equal the shards' (the kept ones: every top example, one sample per interval):
    tokens (whitespace as ↵ · ⇥, hostile text as text), positions, highlighted values; one tab stop each."""
    import pyarrow.compute as pc

    from atlas import page_data, shards

    features = built_site.parent / "features"
    vocab = shards.read_vocab(features)
    fid = 53
    manifest = shards.read_manifest(features)
    ex = shards.read_table(features / shards.shard_name("examples", fid // manifest["shard_size"]), shards.EXAMPLES_SCHEMA)
    want = page_data.site_examples(ex.filter(pc.equal(ex["feature_id"], fid))).to_pylist()
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + f"features/{fid}/index.html")
    page.click(".atlas-more")                                          # "more examples": the rest of the top ones
    got = page.evaluate("""() => [...document.querySelectorAll('.atlas-ex > li')].map(li => ({
        act: li.querySelector('b').textContent,
        tokens: [...li.querySelectorAll('.atlas-win span')].map(s => [s.textContent, s.getAttribute('data-tip'),
                                                                     s.className, s.tabIndex]),
        href: li.querySelector('a.atlas-analyse').getAttribute('href')}))""")
    top = [e for e in want if e["kind"] == "top"]
    samples = sorted((e for e in want if e["kind"] != "top"), key=lambda e: -e["activation"])
    assert len(got) == len(top) + len(samples) > 20
    blanks = 0
    for shown, e in zip(got, top + samples):
        # three significant digits of the float16 value the data file holds
        assert abs(float(shown["act"].replace(",", "")) - e["activation"]) <= 0.006 * e["activation"], shown["act"]
        assert len(shown["tokens"]) == len(e["token_ids"])
        for i, ((text, tip, cls, tab), t, a) in enumerate(zip(shown["tokens"], e["token_ids"], e["acts"])):
            assert text == _shown(vocab[t]), (i, text, vocab[t])
            blanks += "ws" in cls.split()
            assert tip.endswith(f"position {e['window_start'] + i}")
            assert (a > 0) == bool(re.search(r"\ba[1-8]\b", cls)), (i, a, cls)
            if a > 0:
                assert abs(float(tip.split(" at ")[0]) - a) <= 0.06 * a, (tip, a)
        assert sum(tok[3] == 0 for tok in shown["tokens"]) == 1        # one tab stop per example
        assert shown["href"].endswith("prompt.html#text=" + quote("".join(vocab[t] for t in e["token_ids"]), safe="-_.!~*'()"))
    assert blanks, "no whitespace-only token among the examples (the synthetic vocabulary has \\n and ' ')"
    assert page.locator(".atlas-ex script, .atlas-ex img").count() == 0 and not page.evaluate("() => !!window.__pwned")
    _clean(page, hostile_server, base)


def test_download_json_is_the_shard_record(browser, hostile_server, built_site):  # noqa: F811
    import pyarrow.compute as pc

    from atlas import page_data, shards
    from support import same_values as _same

    features = built_site.parent / "features"
    fid = 70
    rec = shards.read_feature(features, fid)
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + f"features/{fid}/index.html")
    with page.expect_download() as info:
        page.click(".atlas-download")
    assert info.value.suggested_filename == f"feature-{fid}.json"
    data = json.loads(Path(info.value.path()).read_text(encoding="utf-8"))
    for key, value in rec.row.items():
        assert _same(data["feature"][key], value), (key, data["feature"][key], value)
    ex = shards.read_table(features / shards.shard_name("examples", 1), shards.EXAMPLES_SCHEMA)
    want = page_data.site_examples(ex.filter(pc.equal(ex["feature_id"], fid))).to_pylist()
    vocab = shards.read_vocab(features)
    assert len(data["examples"]) == len(want)
    half = ("acts", "activation")
    for a, b in zip(data["examples"], want):
        assert _same({k: a[k] for k in b if k not in half}, {k: v for k, v in b.items() if k not in half})
        assert _same([a["activation"], *a["acts"]], [b["activation"], *b["acts"]], rel=1e-3)
        assert a["tokens"] == [vocab[t] for t in b["token_ids"]]
    _clean(page, hostile_server, base)


def test_logits_show_whitespace(browser, hostile_server, built_site):  # noqa: F811
    """Whitespace in logit tables is visible (· for a space, ↵, ⇥): a whitespace-only token is never a blank cell."""
    base = hostile_server.url(HOSTILE)
    page = _visit(browser, base + "features/70/index.html")
    cells = page.eval_on_selector_all(".atlas-logits td:first-child", "tds => tds.map(t => t.textContent)")
    assert cells and all(c.strip() and " " not in c and "\n" not in c for c in cells)
    _clean(page, hostile_server, base)
