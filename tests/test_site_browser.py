"""The built site in headless Chromium: pages load without console errors or outside requests,
the explorer, map and search work, and screenshots of the main views are kept for a look.

Screenshots go to $ATLAS_SCREENSHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser import serve
from test_build import built_site  # noqa: F401  (the shared built site fixture)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("ATLAS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def site_url(built_site):
    with serve(built_site) as url:
        yield url


def _visit(browser, url, shot: Path | None = None, dark=False):
    page = browser.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    if dark:
        page.emulate_media(color_scheme="dark")
    page.goto(url)
    page.wait_for_load_state("networkidle")
    if shot:
        page.screenshot(path=str(shot), full_page=False)
    return page


def _clean(page):
    errors = [e for e in page.console_errors if "analyser" not in e]
    assert not errors, errors


AFTER = "(sel) => getComputedStyle(document.querySelector(sel), '::after').content"


def test_home_and_feature_page(browser, site_url, shots):
    page = _visit(browser, site_url + "index.html", shots / "home.png")
    assert page.locator("h1").first.inner_text()
    _clean(page)
    for dark in (False, True):
        page = _visit(browser, site_url + "features/53/index.html", shots / f"feature{'-dark' * dark}.png", dark=dark)
        assert page.locator(".atlas-ex i[data-v]").count() > 0
        assert page.evaluate("() => !!window.__pwned") is False
        assert page.locator("img[src=x]").count() == 0
        # the theme's icons are CSS masks on empty <svg>s: painted, at the theme's size
        icon = page.locator(".md-header__button.md-logo svg")
        assert "data:image/svg+xml" in icon.evaluate("e => getComputedStyle(e).webkitMaskImage || getComputedStyle(e).maskImage")
        assert icon.bounding_box()["width"] > 10
        scheme = page.evaluate("() => document.body.getAttribute('data-md-color-scheme')")
        assert scheme == ("slate" if dark else "default")
        _clean(page)
    assert not browser.external_requests, browser.external_requests


def test_token_value_on_hover_and_focus(browser, site_url):
    """Active tokens show their value (data-v) on hover, and on keyboard focus (feature.js adds tabindex)."""
    page = _visit(browser, site_url + "features/53/index.html")
    sel = ".atlas-ex i[data-v]"
    token = page.locator(sel).first
    value = token.get_attribute("data-v")
    assert page.evaluate(AFTER, sel) in ("none", "normal")
    token.hover()
    assert page.evaluate(AFTER, sel) == f'"{value}"'
    page.mouse.move(0, 0)
    assert token.evaluate("e => e.tabIndex") == 0
    page.locator(".atlas-pager a").last.focus()            # from the pager, Tab walks into the example windows
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.matches('.atlas-ex i[data-v]')"):
            break
    focused = page.evaluate("() => [document.activeElement.getAttribute('data-v'), "
                            "getComputedStyle(document.activeElement, '::after').content]")
    assert focused[0] and focused[1] == f'"{focused[0]}"'
    _clean(page)


def test_katex_renders_formulas(browser, site_url, shots):
    """methodology.html: the TeX that arithmatex leaves is typeset by KaTeX, copied from node_modules."""
    page = _visit(browser, site_url + "methodology.html")
    page.wait_for_selector(".arithmatex .katex", timeout=10_000)
    n_math, n_katex = page.evaluate("() => [document.querySelectorAll('.arithmatex').length, "
                                    "document.querySelectorAll('.arithmatex .katex').length]")
    assert n_math > 0 and n_katex == n_math
    assert page.locator(".katex-error").count() == 0
    assert page.locator(".katex-display").count() > 0       # display formulas too
    page.screenshot(path=str(shots / "methodology.png"))
    _clean(page)
    assert not browser.external_requests, browser.external_requests


def test_explorer_sorts_and_filters(browser, site_url, shots):
    page = _visit(browser, site_url + "explorer.html")
    page.wait_for_selector("#atlas-rows a")
    page.click("button[data-sort=max_act]")
    first = page.locator("#atlas-rows tr").first.inner_text()
    page.fill("#atlas-filter", "script")
    page.wait_for_function("() => document.querySelectorAll('#atlas-rows tr').length < 50")
    assert "<script>" in page.locator("#atlas-rows").inner_text()
    page.fill("#atlas-filter", "")
    page.screenshot(path=str(shots / "explorer.png"))
    assert first
    _clean(page)


def test_map_hover_and_click(browser, site_url, shots):
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
    page.wait_for_url("**/features/*/index.html")
    _clean(page)


def test_search_by_label_and_token(browser, site_url, shots):
    page = _visit(browser, site_url + "search.html")
    page.fill("#atlas-q", "after")
    page.wait_for_selector("#atlas-results li")
    page.check("input[value=token]")
    page.fill("#atlas-q", "Once")
    page.wait_for_function("() => document.getElementById('atlas-search-status').textContent.includes('fire on')")
    assert page.locator("#atlas-results li").count() > 0
    # functional only: its speed is measured by tests/bench/bench_build.py (timing targets live in `make bench`)
    entry = page.evaluate("() => Atlas.tokenEntry(' Once')")
    assert entry and entry[0] and len(entry[0]) == len(entry[1])
    assert page.evaluate("() => Atlas.tokenEntry('no such token at all')") is None
    page.screenshot(path=str(shots / "search.png"))
    _clean(page)
    assert not browser.external_requests, browser.external_requests


def test_file_url_pages_work(browser, built_site):
    """Page by page from file://: links resolve and the explorer loads its index by <script>."""
    page = browser.new_page()
    page.goto((built_site / "explorer.html").as_uri())
    page.wait_for_selector("#atlas-rows a")
    href = page.locator("#atlas-rows a").first.get_attribute("href")
    assert href.startswith("file://") and href.endswith("/index.html")
    page.goto(href)
    assert page.locator(".atlas-ex i[data-v]").count() > 0 or page.locator(".atlas-badge.dead").count() > 0
