"""Headless Debian Chromium for the browser tests, driven with Playwright (no browser download).

`serve(path)` serves a built site on 127.0.0.1; `open_browser()` starts Chromium with the flags
this offline world needs and blocks (and records) every request that leaves 127.0.0.1.
Tests that need a browser use the `browser` fixture from conftest.py, which skips with a clear
notice when Chromium is not installed (`.ci/run` installs it, so CI always runs them).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(directory: Path):
    """Serve `directory` on 127.0.0.1 at a free port; yields the base URL (ends with '/')."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class Browser:
    """A Chromium instance plus the list of outside requests it tried (and was refused)."""

    def __init__(self, playwright, executable: str):
        self._browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        self.external_requests: list[str] = []

    def new_page(self):
        """A page whose console errors are collected in `page.console_errors`."""
        context = self._browser.new_context()
        context.route("**/*", self._guard)
        page = context.new_page()
        page.console_errors = []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
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
