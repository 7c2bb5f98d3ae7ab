"""An LLM explainer: any OpenAI-compatible chat-completions endpoint writes the labels.

`analyze.explainer: openai-compatible` with `explainer_base_url` (Ollama, llama.cpp's server,
vLLM or a hosted API, e.g. http://localhost:11434/v1), `explainer_model` and, for hosted APIs,
`explainer_api_key_env` (the name of the environment variable that holds the key; the key
itself is never written anywhere). Off by default.

Per live feature, two requests (`POST {base_url}/chat/completions`, temperature 0):

1. **explain**: the feature's top and interval examples (never from the score split's contexts),
   with the tokens it fires on marked <<like this>>; the answer's first line is the label.
2. **detect** (the score, after EleutherAI's delphi): score-split contexts, half where the feature
   fires and half where it does not, shuffled and unmarked; the model says for each whether the
   label's feature fires in it. Precision is the share of the contexts it picked that fire;
   recall the share of the shown contexts' activation (each context's maximum) in the ones it
   picked (atlas/labels/scores.py `detection_score`).

Every answer is cached on disk (`runs/<run>/llm-cache/`, one JSON file per request, keyed by
a hash of the endpoint, model and messages), so a rerun or an interrupted run never pays for the
same request twice. Requests run `explainer_concurrency` at a time; a failed one (connection
error, timeout, a broken HTTP answer, HTTP 408/409/429/5xx) is retried `explainer_retries` times
with exponential backoff, honouring Retry-After; any other HTTP error stops the run with one line.
`explainer_timeout` bounds each request as a whole (connecting, waiting, reading: a server that
trickles its answer a byte at a time is cut off), and an answer is read up to MAX_BODY bytes and
kept up to MAX_ANSWER characters, so neither a request nor the cache can grow without end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas.config import AnalyzeConfig
from atlas.errors import AtlasError, ConfigError
from atlas.labels.interface import UNSCORED, Evidence, Explainer, Explanation, register
from atlas.labels.scores import detection_score

MAX_LABEL = 80
MAX_BODY = 1 << 20
"""Bytes of one HTTP answer read at most (a chat completion of a few hundred tokens is a few kB)."""
MAX_ANSWER = 16_384
"""Characters of an answer's content kept (labels and detection lists are far shorter)."""
EXPLAIN_EXAMPLES = (10, 5)
"""Top examples and interval samples shown to the explainer."""
WINDOW = (24, 8)
"""Tokens shown before and after the peak of each held-out detection context."""

EXPLAIN_SYSTEM = (
    "You are studying one feature of a sparse autoencoder trained on a language model's activations. "
    "You are shown text excerpts in which the feature is active; the tokens where it is active are marked "
    "<<like this>>. Say in at most 12 words what the feature detects: the pattern shared by the marked tokens "
    "and what comes just before them. Answer with the description only, no preamble.")
DETECT_SYSTEM = (
    "You are checking an explanation of one feature of a sparse autoencoder trained on a language model. "
    "You are given the explanation and numbered text excerpts. For each excerpt decide whether the feature, "
    "as explained, is active on some token in it. Answer with a JSON list of 0s and 1s, one per excerpt, in "
    "order, and nothing else.")


class AnswerCache:
    """Answers on disk, one file per request key, written atomically (safe across threads and kills)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.folder is None:
            return None
        try:
            return json.loads(self._path(key).read_text())["answer"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, request: dict, answer: str) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{id(answer)}")
        tmp.write_text(json.dumps({"request": request, "answer": answer}))
        os.replace(tmp, path)


class ChatClient:
    """POST /chat/completions with caching and retries; `complete` is safe to call from threads.

    The settings are the analyze config's `explainer_*` keys (their one declaration); the key itself
    comes from the environment variable they name, `backoff` is the first retry's wait in seconds."""

    RETRY_STATUS = {408, 409, 429}

    def __init__(self, a: AnalyzeConfig, cache: AnswerCache, api_key: str = "", backoff: float = 1.0):
        self.cache, self.api_key, self.backoff = cache, api_key, backoff
        self.model, self.retries, self.timeout = a.explainer_model, a.explainer_retries, a.explainer_timeout
        self.url = a.explainer_base_url.rstrip("/") + "/chat/completions"

    def complete(self, system: str, user: str, max_tokens: int) -> str:
        request = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                        {"role": "user", "content": user}],
                   "temperature": 0, "max_tokens": max_tokens}
        key = hashlib.sha256(json.dumps({"url": self.url, **request}, sort_keys=True).encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        answer = self._post(request)
        self.cache.put(key, request, answer)
        return answer

    def _post(self, request: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(request).encode()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            wait = self.backoff * 2 ** attempt * (1 + random.random() / 4)
            try:
                status, reason, retry_after, body = self._send(data, headers)
                if status < 400:
                    return _content(json.loads(body.decode("utf-8")), self.url)[:MAX_ANSWER]
                if status not in self.RETRY_STATUS and status < 500:
                    detail = body[:200].decode("utf-8", "replace").replace("\n", " ")
                    raise AtlasError(f"explainer: POST {self.url}: HTTP {status} {reason} ({detail})")
                if last:
                    raise AtlasError(f"explainer: POST {self.url}: HTTP {status} after {attempt + 1} tries")
                wait = max(wait, _retry_after(retry_after))
            except (OSError, http.client.HTTPException, ValueError) as e:
                # OSError: refused, reset, timed out; HTTPException: a broken status line or a body
                # shorter than its Content-Length; ValueError: an answer that is not UTF-8 or JSON
                if last:
                    reason = _failure(e)
                    raise AtlasError(f"explainer: POST {self.url}: {reason} after {attempt + 1} tries") from None
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _send(self, data: bytes, headers: dict) -> tuple[int, str, str | None, bytes]:
        """One POST, done within `timeout` seconds in all: (status, reason, Retry-After, body)."""
        url = urllib.parse.urlsplit(self.url)
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)
        cut_off = threading.Event()

        def stop():  # the deadline: end the connection, so the read under way returns at once
            cut_off.set()
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, stop)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body=data, headers=headers)
            r = conn.getresponse()
            length = r.getheader("Content-Length")
            if length and length.isdigit() and int(length) > MAX_BODY:
                raise ValueError(f"an answer of {int(length):,} bytes (at most {MAX_BODY:,} are read)")
            body = bytearray()
            while chunk := r.read(min(65536, MAX_BODY + 1 - len(body))):
                body += chunk
                if len(body) > MAX_BODY:
                    raise ValueError(f"an answer over {MAX_BODY:,} bytes")
            if r.length:  # the connection closed before the Content-Length was read
                raise http.client.IncompleteRead(bytes(body), r.length)
            if cut_off.is_set():
                raise TimeoutError(f"no complete answer within {self.timeout:g} s")
            return r.status, r.reason, r.getheader("Retry-After"), bytes(body)
        except (OSError, http.client.HTTPException):
            if cut_off.is_set():
                raise TimeoutError(f"no complete answer within {self.timeout:g} s") from None
            raise
        finally:
            timer.cancel()
            conn.close()


def _failure(e: Exception) -> str:
    """Why a request failed, on one short line."""
    if isinstance(e, UnicodeDecodeError):
        return "the answer is not UTF-8"
    if isinstance(e, json.JSONDecodeError):
        return f"the answer is not JSON ({e.msg})"
    if isinstance(e, http.client.IncompleteRead):
        return f"the answer ended after {len(e.partial):,} bytes, {e.expected:,} short of its Content-Length"
    text = (str(getattr(e, "reason", None) or e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, http.client.HTTPException):
        return f"a broken HTTP answer ({type(e).__name__}: {text!r})"
    return text or type(e).__name__


def _retry_after(value: str | None) -> float:
    try:
        return min(float(value), 300.0) if value else 0.0
    except ValueError:
        return 0.0


def _content(body: dict, url: str) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        raise AtlasError(f"explainer: {url}: not a chat-completions answer (no choices[0].message.content)") from None


# --------------------------------------------------------------------------------------------
# Prompts


def marked(tokens: list[int], acts: list[float], vocab: list[str]) -> str:
    """A window as text with the tokens where the feature is active marked <<like this>>."""
    out = []
    for t, a in zip(tokens, acts):
        text = vocab[t] if 0 <= t < len(vocab) else ""
        out.append(f"<<{text}>>" if a > 0 else text)
    return "".join(out).replace("\n", "\\n")


def explain_prompt(e: Evidence, vocab: list[str]) -> str:
    n_top, n_sample = EXPLAIN_EXAMPLES
    lines = ["Strongest activations:"]
    lines += [f"{i + 1}. {marked(w, a, vocab)}" for i, (w, a) in enumerate(zip(e.windows[:n_top], e.window_acts))]
    if e.sample_windows:
        lines.append("Weaker activations:")
        lines += [f"{i + 1}. {marked(w, a, vocab)}"
                  for i, (w, a) in enumerate(zip(e.sample_windows[:n_sample], e.sample_acts))]
    return "\n".join(lines)


def label_from(answer: str) -> str:
    """The label in an answer: its first non-empty line, without quotes or a "Explanation:" prefix."""
    line = next((x.strip() for x in answer.splitlines() if x.strip()), "")
    line = re.sub(r"^(explanation|label|answer)\s*:\s*", "", line, flags=re.I).strip().strip("\"'`").strip()
    return line[:MAX_LABEL]


@dataclass
class Contexts:
    """Held-out excerpts shown for detection: token ids, and the feature's max activation in each."""

    windows: list[list[int]]
    activation: list[float]


def detection_contexts(data, f: int, n: int, seed: int = 0) -> Contexts:
    """Up to n/2 held-out excerpts where feature f fires (one per context, spread over its
    activation range) and as many where it does not, shuffled. Deterministic in (seed, f)."""
    split, L = data.score, data.score.ctx_len
    tokens = data.store_tokens
    left, right = WINDOW
    pos, act = split.codes(f)
    rows = split.rows[pos]
    fired_rows = np.sort(rows)
    rng = np.random.default_rng([seed, f])

    def window(row: int) -> tuple[int, int]:
        c0 = row - row % L
        return max(c0, row - left), min(c0 + L, row + right + 1)

    def max_act(lo: int, hi: int) -> float:
        i, j = np.searchsorted(rows_sorted, [lo, hi])
        return float(acts_sorted[i:j].max()) if j > i else 0.0

    order = np.argsort(rows)
    rows_sorted, acts_sorted = rows[order], act[order]
    # the peak of each context the feature fires in, then n/2 of them evenly over their activations
    ctx = rows // L
    peaks = {}
    for r, a, c in zip(rows.tolist(), act.tolist(), ctx.tolist()):
        if a > peaks.get(c, (0.0, 0))[0]:
            peaks[c] = (a, r)
    ranked = sorted(peaks.values())
    k = min(n // 2, len(ranked))
    chosen = [ranked[int(i)][1] for i in np.linspace(0, len(ranked) - 1, k).round()] if k else []
    spans = [window(r) for r in dict.fromkeys(chosen)]
    # as many windows where it never fires
    quiet: list[tuple[int, int]] = []
    for r in rng.permutation(split.rows)[: 50 * n]:
        if len(quiet) >= n - len(spans):
            break
        lo, hi = window(int(r))
        i = np.searchsorted(fired_rows, lo)
        if (i >= len(fired_rows) or fired_rows[i] >= hi) and (lo, hi) not in quiet:
            quiet.append((lo, hi))
    allspans = spans + quiet
    shuffle = rng.permutation(len(allspans))
    picked = [allspans[i] for i in shuffle]
    return Contexts([tokens[lo:hi].tolist() for lo, hi in picked], [max_act(lo, hi) for lo, hi in picked])


def detect_prompt(label: str, c: Contexts, vocab: list[str]) -> str:
    texts = ["".join(vocab[t] if 0 <= t < len(vocab) else "" for t in w).replace("\n", "\\n") for w in c.windows]
    return f"Explanation: {label}\n\n" + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))


def parse_detection(answer: str, n: int) -> list[bool] | None:
    """The judge's 0/1 per excerpt, or None when the answer is not n of them."""
    m = re.search(r"\[[^\[\]]*\]", answer)
    if m:
        try:
            values = json.loads(m.group(0))
        except json.JSONDecodeError:
            values = None
        if isinstance(values, list) and len(values) == n and all(v in (0, 1, True, False) for v in values):
            return [bool(v) for v in values]
    digits = re.findall(r"\b[01]\b", answer)
    return [d == "1" for d in digits] if len(digits) == n else None


# --------------------------------------------------------------------------------------------
# The explainer


@register("openai-compatible")
class OpenAICompatible(Explainer):
    """Labels from an LLM behind an OpenAI-compatible endpoint, scored by detection (see the module docstring)."""

    def __init__(self, a: AnalyzeConfig, cache_dir: Path | None = None, api_key: str = "", backoff: float = 1.0):
        self.concurrency, self.detection_contexts, self.seed = (a.explainer_concurrency,
                                                                a.explainer_detection_contexts, a.seed)
        self.client = ChatClient(a, AnswerCache(cache_dir), api_key, backoff)

    @classmethod
    def from_config(cls, a: AnalyzeConfig, cache_dir: Path | None) -> "OpenAICompatible":
        key = ""
        if a.explainer_api_key_env:
            key = os.environ.get(a.explainer_api_key_env, "")
            if not key:
                raise ConfigError(f"'analyze.explainer_api_key_env' = {a.explainer_api_key_env!r}: "
                                  f"environment variable {a.explainer_api_key_env} is not set")
        return cls(a, cache_dir, key)

    def _map(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time; after a failure no further request is started."""
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[Explanation]:
        def one(e: Evidence) -> Explanation:
            if e.is_dead:
                return Explanation("dead feature", source=self.name)
            if not e.windows:
                return Explanation("", source=self.name)
            return Explanation(label_from(self.client.complete(EXPLAIN_SYSTEM, explain_prompt(e, vocab), 60)),
                               source=self.name)

        return self._map(one, evidence)

    def detect(self, evidence: list[Evidence], explanations: list[Explanation], data, vocab: list[str]):
        n = self.detection_contexts

        def one(pair):
            e, x = pair
            c = detection_contexts(data, e.feature_id, n, self.seed)
            if not any(a > 0 for a in c.activation):
                return UNSCORED
            said = parse_detection(self.client.complete(DETECT_SYSTEM, detect_prompt(x.label, c, vocab),
                                                        8 * len(c.windows) + 16), len(c.windows))
            return UNSCORED if said is None else detection_score(said, c.activation)

        scores = self._map(one, list(zip(evidence, explanations)))
        unread = sum(s.method == "" for s in scores)
        if unread:
            print(f"analyze: warning: {unread} detection answers were not a list of 0/1s (or the feature never "
                  f"fired on held-out contexts); those labels are unscored", file=sys.stderr)
        return scores
