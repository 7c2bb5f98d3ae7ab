"""Headless Debian Chromium for the browser tests, driven with Playwright (no browser download).

`serve({"/my-atlas/": site})` serves built sites on 127.0.0.1, each under its own path prefix, as
GitHub Pages serves project sites (user.github.io/<repo>/), and records every request outside
them. `open_browser()` starts Chromium with the flags this offline world needs and blocks (and
records) every request that leaves 127.0.0.1; each page also records the URLs it requested.
Tests that need a browser use the `browser` fixture from conftest.py, which skips with a clear
notice when Chromium is not installed (`.ci/run` installs it, so CI always runs them).
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlsplit

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

# A served test page: the site's Content-Security-Policy, a page shell, and a project site's path
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; worker-src 'self'; "
       "img-src 'self' data:; style-src 'self' 'unsafe-inline'; font-src 'self'; object-src 'none'; base-uri 'self'")
PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}"><title>{title}</title></head>
<body>{body}</body></html>"""
PREFIX = "/atlas/"    # a project site's path, as on GitHub Pages
ROOT = Path(__file__).resolve().parent.parent


def copy_scripts(site: Path) -> None:
    """The site's browser code into `site`: the vendored npm files (site_src/vendor.json) and site_src/js."""
    for dest, src in json.loads((ROOT / "site_src/vendor.json").read_text()).items():
        (site / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / src, site / dest)
    shutil.copytree(ROOT / "site_src/js", site / "js", dirs_exist_ok=True)


def assemble_steer_site(site: Path, onnx_dir: Path, meta: dict, feature: int, max_act: float) -> Path:
    """A site with the steer box alone: the scripts, the steering files of `meta` (steering.json) from
    `onnx_dir` with tokenizer.json, and features/<feature>/index.html holding the box. Returns that page."""
    from atlas.export.steering import META_FILE

    copy_scripts(site)
    (site / "onnx").mkdir()
    for f in [META_FILE, "tokenizer.json", *meta["files"]]:
        shutil.copy2(onnx_dir / f, site / "onnx" / f)
    page = site / "features" / str(feature) / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(PAGE.format(csp=CSP, title="Feature", body=(
        f'<section class="atlas-steer" data-feature-id="{feature}" data-max-act="{max_act}"></section>'
        '<script type="module" src="../../js/steer/box.js"></script>')))
    return page


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _SitesHandler(http.server.SimpleHTTPRequestHandler):
    """Serves each site of `sites` (path prefix -> directory) under its prefix; anything else is a 404."""

    sites: dict[str, str] = {}
    stray: list[str] = []

    def translate_path(self, path):
        clean = urlsplit(path).path
        for prefix, directory in sorted(self.sites.items(), key=lambda s: -len(s[0])):  # nested: longest first
            if clean.startswith(prefix) or clean + "/" == prefix:  # "/my-atlas" redirects to "/my-atlas/"
                self.directory = directory
                return super().translate_path("/" + path[len(prefix):])
        self.stray.append(path)
        return str(Path(next(iter(self.sites.values()))) / "__outside_every_site__")

    def log_message(self, *args):
        pass


class SiteServer:
    """A local server for sites under path prefixes; `stray` lists the paths requested outside all of them."""

    def __init__(self, sites: dict[str, Path]):
        assert all(p.startswith("/") and p.endswith("/") for p in sites), sites
        self.stray: list[str] = []
        handler = type("Handler", (_SitesHandler,), {"sites": {p: str(d) for p, d in sites.items()}, "stray": self.stray})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, prefix: str = "/") -> str:
        return self.origin + prefix

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def serve(sites: dict[str, Path] | Path):
    """Serve `sites` ({"/my-atlas/": directory, …}, or one directory at "/") on 127.0.0.1 at a free port."""
    server = SiteServer(sites if isinstance(sites, dict) else {"/": sites})
    try:
        yield server
    finally:
        server.close()


class Browser:
    """A Chromium instance plus the list of outside requests it tried (and was refused)."""

    def __init__(self, playwright, executable: str):
        self._browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        self.external_requests: list[str] = []

    def new_context(self):
        """A browser context (its own storage: cookies, Cache API) whose outside requests are refused."""
        context = self._browser.new_context()
        context.route("**/*", self._guard)
        return context

    def new_page(self, context=None):
        """A page (in a fresh context unless one is given) that collects its console errors in
        `page.console_errors`, the URLs it requested in `page.requests`, and failed responses
        (HTTP status >= 400) in `page.failed`."""
        page = (context or self.new_context()).new_page()
        page.console_errors, page.requests, page.failed = [], [], []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        page.on("request", lambda r: page.requests.append(r.url))
        page.on("response", lambda r: r.status >= 400 and page.failed.append(f"{r.status} {r.url}"))
        return page

    def _guard(self, route):
        url = urlparse(route.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in ("127.0.0.1", "localhost"):
            self.external_requests.append(route.request.url)
            return route.abort()
        return route.continue_()

    def close(self):
        self._browser.close()


@contextmanager
def open_browser():
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    with sync_playwright() as p:
        b = Browser(p, exe)
        try:
            yield b
        finally:
            b.close()


# ---------------------------------------------------------------- what the analyser should show


WINDOW_CAP = 1024   # the most tokens the analyser runs the model on at once (site_src/js/analyser/model.js)


def ort_reference(site: Path, text: str, sae_id: str = "") -> dict:
    """Python onnxruntime on the site's own web files, as the browser runs them (the trunk, then SAE
    `sae_id`'s encoder, default the first): the text's tokens cut into windows of
    min(max_tokens, 1024) tokens, each BOS first, the rows joined (a later window's BOS row dropped).
    Returns token ids (BOS first), top_ids/top_acts [seq, k], n_active [seq] (None when the export
    has no such output) and the number of windows."""
    import json

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    meta = json.loads((site / "onnx/model.json").read_text())
    tok = Tokenizer.from_file(str(site / "onnx" / meta["tokenizer"]))
    text_ids = tok.encode(text, add_special_tokens=False).ids
    bos = [meta["bos_token_id"]] if meta["prepend_bos"] else []
    body = min(meta["max_tokens"], WINDOW_CAP) - len(bos)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    trunk, sae = meta["trunk"], next((s for s in meta["saes"] if s["id"] == sae_id), meta["saes"][0])
    session = lambda f: ort.InferenceSession(str(site / "onnx" / f), opts, providers=["CPUExecutionProvider"])  # noqa: E731
    trunk_session, encoder = session(trunk["onnx"]), session(sae["onnx"])
    names = sae["outputs"]
    wanted = [names["ids"], names["acts"]] + ([names["n_active"]] if "n_active" in names else [])
    parts = []
    for w, s in enumerate(range(0, max(len(text_ids), 1), body)):
        window = np.asarray([bos + text_ids[s:s + body]], np.int32)
        (resid,) = trunk_session.run([sae["input"]["from"]], {trunk["input"]["name"]: window})
        out = encoder.run(wanted, {sae["input"]["name"]: resid})
        parts.append([o[0][len(bos) if w else 0:] for o in out])
    joined = [np.concatenate(p) for p in zip(*parts)]
    return {"ids": bos + text_ids, "k": sae["top_k"], "top_ids": joined[0], "top_acts": joined[1],
            "n_active": joined[2] if len(joined) > 2 else None, "windows": len(parts)}


def all_in_sight(ref: dict, t: int) -> bool:
    """Whether every feature that fires on token t is among the top k the browser sees."""
    shown = int((ref["top_acts"][t] > 0).sum())
    if ref["n_active"] is not None:
        return int(ref["n_active"][t]) <= shown
    return shown < ref["k"]          # without n_active: a full top k may hide more


def close(a: float, b: float) -> bool:
    """Activations of the browser and of Python onnxruntime on the same web file: kernels differ (wasm
    vs x86, summation order), so values may differ by rounding, never by more than this."""
    return abs(a - b) <= 2e-3 + 5e-3 * abs(b)


def check_heatmap(spans, ref, feature: int):
    """Each token's colour value is Python's activation of `feature` there, or, where the feature is
    not among the top k and more fire than that, the token is marked unseen with Python's counts."""
    k = ref["k"]
    for t, span in enumerate(spans[1:], start=1):
        listed = [int(i) for i, a in zip(ref["top_ids"][t], ref["top_acts"][t]) if a > 0]
        unseen = span.get_attribute("data-unseen")
        # the two may order a near-tie at the k-th place differently, nothing else
        if feature in listed and unseen is not None:
            assert close(float(ref["top_acts"][t][listed.index(feature)]), float(ref["top_acts"][t][-1])), t
            continue
        if feature not in listed and unseen is None and not all_in_sight(ref, t):
            assert close(float(span.get_attribute("data-act")), float(ref["top_acts"][t][-1])), t
            continue
        if feature in listed or all_in_sight(ref, t):
            assert unseen is None, (t, unseen)
            want = float(ref["top_acts"][t][listed.index(feature)]) if feature in listed else 0.0
            assert close(float(span.get_attribute("data-act")), want), (t, span.get_attribute("data-act"), want)
        else:
            assert span.get_attribute("data-act") is None
            n_active = ref["n_active"]
            assert unseen == f"{len(listed)}/{'' if n_active is None else int(n_active[t])}", (t, unseen)
            assert len(listed) == k and "atlas-token-unseen" in span.get_attribute("class")
