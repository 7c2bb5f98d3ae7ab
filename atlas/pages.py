"""Feature pages: one static HTML page per feature, stamped into the theme's built skeleton.

MkDocs renders one skeleton page (`features/<SKELETON>/index.html`, at the same depth as every
feature page, so its relative links already fit); every feature page is that HTML with the
title and content placeholders replaced. Content comes from `templates/feature.html` (Jinja,
autoescape on). Token windows are the one hot loop, so they are escaped and marked up here, in
plain Python over a pre-escaped vocabulary, and handed to the template as markup.

Shards are rendered one per task (`multiprocessing`), so memory is bounded by one shard.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
import re
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from atlas import shards

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SKELETON = "__atlas_skeleton__"
TITLE_MARK = "@@ATLAS_TITLE@@"
CONTENT_MARK = "@@ATLAS_CONTENT@@"
LEVELS = 8                       # highlight intensity classes a1..a8
INTERVAL_WINDOW = (8, 4)         # tokens shown left and right of the marked one in interval samples


def jinja_env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    return env


def fmt_num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"


def fmt_pct(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return "0%" if x == 0 else f"{100 * x:.3g}%"


def display_token(text: str) -> str:
    """How a token is shown: whitespace made visible where it would otherwise vanish."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


@dataclass
class Skeleton:
    """The theme's built page split around the placeholders."""

    parts: list[str]             # head, [title, ...], content-split

    @classmethod
    def from_html(cls, text: str) -> "Skeleton":
        text = text.replace(SKELETON, "{id}")
        text = with_csp(_squeeze(text))
        # MkDocs wraps the placeholder in a paragraph; drop the paragraph with it
        for wrapped in (f"<p>{CONTENT_MARK}</p>", CONTENT_MARK):
            if wrapped in text:
                head, tail = text.split(wrapped, 1)
                break
        else:
            raise ValueError("skeleton page lost its content placeholder")
        return cls([head, tail])

    def page(self, feature_id: int, title: str, content: str) -> str:
        head, tail = self.parts
        esc = html.escape(title)
        head = head.replace(TITLE_MARK, esc).replace("{id}", str(feature_id))
        tail = tail.replace(TITLE_MARK, esc).replace("{id}", str(feature_id))
        return head + content + tail


CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'{hashes}; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self' data: blob:; worker-src 'self' blob:; "
       "object-src 'none'; base-uri 'self'; form-action 'self'")
_INLINE_SCRIPT = re.compile(r"<script(\s[^>]*)?>(.*?)</script>", re.S)


def with_csp(text: str) -> str:
    """The page with a Content-Security-Policy <meta> first in its <head>, allowing exactly its inline scripts."""
    hashes = []
    for m in _INLINE_SCRIPT.finditer(text):
        attrs = m.group(1) or ""
        if "src=" in attrs or re.search(r'type="(application/json|text/template)"', attrs):
            continue
        digest = base64.b64encode(hashlib.sha256(m.group(2).encode()).digest()).decode()
        hashes.append(f"'sha256-{digest}'")
    policy = CSP.format(hashes="".join(" " + h for h in dict.fromkeys(hashes)))
    head = re.search(r"<head[^>]*>", text)
    if head is None:
        return text
    return f'{text[:head.end()]}\n<meta http-equiv="Content-Security-Policy" content="{policy}">{text[head.end():]}'


def _squeeze(text: str) -> str:
    """Drop the theme's indentation and blank lines (the skeleton has no <pre> or <textarea>)."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class SiteFacts:
    """What every shard's renderer needs to know about the whole run (small: O(n_features))."""

    n_features: int
    labels: list[str]
    has_logits: bool
    vocab: list[str]


# ---------------------------------------------------------------- view models


def token_markup(vocab_html: list[str], token_ids, acts, max_act: float, mark: int,
                 window: tuple[int, int] | None = None) -> Markup:
    """A token window as HTML: active tokens become <i class=aN> with the value on hover/focus (title, tabindex).

    Attributes are unquoted (their values never need quotes) to keep 24,576 pages small.
    """
    if window is not None:
        lo, hi = max(0, mark - window[0]), mark + window[1] + 1
        token_ids, acts, mark = token_ids[lo:hi], acts[lo:hi], mark - lo
    out = []
    scale = LEVELS / max_act if max_act > 0 else 0.0
    n = len(vocab_html)
    for i, (t, a) in enumerate(zip(token_ids, acts)):
        text = vocab_html[t] if 0 <= t < n else "\ufffd"
        if a > 0:
            lvl = min(LEVELS, int(a * scale) + 1)
            cls = f'"a{lvl} pk"' if i == mark else f"a{lvl}"
            out.append(f"<i class={cls} title={a:.2g} tabindex=0>{text}</i>")
        else:
            out.append(text)
    return Markup("".join(out))


def histogram(edges: list[float], counts: list[int], width=560, height=120) -> dict | None:
    """Bars of the activation histogram (log-spaced edges drawn at equal widths) for an SVG."""
    if not counts or not any(counts):
        return None
    top = max(counts)
    bw = width / len(counts)
    path = "".join(f"M{i * bw:.0f} {height}v-{height * math.log1p(c) / math.log1p(top):.0f}h{bw - 1:.0f}V{height}z"
                   for i, c in enumerate(counts) if c > 0)
    return {"path": path, "width": width, "height": height, "lo": fmt_num(edges[0]), "hi": fmt_num(edges[-1]),
            "top": f"{top:,}"}


def feature_view(row: dict, examples: list[dict], facts: SiteFacts, vocab_html: list[str]) -> dict:
    """Exactly the values feature.html shows for one feature."""
    fid = row["feature_id"]
    max_act = row["max_act"] or 0.0

    def window(ex, trim=None):
        return {"act": fmt_num(ex["activation"]),
                "html": token_markup(vocab_html, ex["token_ids"], ex["acts"], max_act, ex["offset"] - ex["window_start"],
                                     trim)}

    top = [window(e) for e in sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"])]
    by_interval: dict[int, list] = {}
    for e in sorted((e for e in examples if e["kind"] != "top"), key=lambda e: (e["interval"], e["rank"])):
        by_interval.setdefault(e["interval"], []).append(window(e, INTERVAL_WINDOW))
    edges = row["interval_edges"] or []
    intervals = [{"lo": fmt_num(edges[i]) if i < len(edges) else "", "hi": fmt_num(edges[i + 1]) if i + 1 < len(edges) else "",
                  "examples": exs} for i, exs in sorted(by_interval.items(), reverse=True)]

    def logits(ids, values):
        return [{"text": display_token(facts.vocab[t]) if 0 <= t < len(facts.vocab) else "?", "value": f"{v:+.3f}"}
                for t, v in zip(ids, values)]

    n = facts.n_features
    neighbours = [{"id": int(i), "label": facts.labels[i] if 0 <= i < n else "", "cos": f"{c:.2f}"}
                  for i, c in zip(row["neighbour_ids"], row["neighbour_cosines"]) if 0 <= i < n and i != fid]
    return {
        "id": fid,
        "label": row["label"] or "",
        "label_source": row["label_source"] or "",
        "density": fmt_pct(row["density"]),
        "n_fired": f"{row['n_fired']:,}",
        "mean_act": fmt_num(row["mean_act"]),
        "max_act": fmt_num(row["max_act"]),
        "is_dead": row["is_dead"],
        "is_dense": row["is_dense"],
        "hist": histogram(row["hist_edges"] or [], row["hist_counts"] or []),
        "top": top,
        "intervals": intervals,
        "has_logits": facts.has_logits and bool(row["top_logit_ids"]),
        "top_logits": logits(row["top_logit_ids"], row["top_logit_values"]),
        "bottom_logits": logits(row["bottom_logit_ids"], row["bottom_logit_values"]),
        "neighbours": neighbours,
        "prev": fid - 1 if fid > 0 else None,
        "next": fid + 1 if fid + 1 < n else None,
        "random": random_neighbour(fid, n),
    }


def random_neighbour(fid: int, n: int) -> int:
    """A fixed pseudo-random other feature (the page is static, so 'random' is chosen at build time)."""
    if n < 2:
        return fid
    j = (fid * 2654435761 + 40503) % n
    return j if j != fid else (j + 1) % n


# ---------------------------------------------------------------- rendering

_STATE: dict = {}


def _init(skeleton: Skeleton, facts: SiteFacts, out_dir: str):
    env = jinja_env()
    _STATE.update(skeleton=skeleton, facts=facts, out=Path(out_dir), template=env.get_template("feature.html"),
                  vocab_html=[html.escape(display_token(t)) for t in facts.vocab])


def render_shard(features_path: str) -> dict:
    """Render every page of one shard; returns what the search indexes need from its examples."""
    st = _STATE
    facts: SiteFacts = st["facts"]
    fpath = Path(features_path)
    rows = shards.read_table(fpath, shards.FEATURES_SCHEMA).to_pylist()
    epath = fpath.with_name(fpath.name.replace("features-", "examples-", 1))
    examples = shards.read_table(epath, shards.EXAMPLES_SCHEMA).to_pylist() if epath.exists() else []
    by_feature: dict[int, list] = {}
    for e in examples:
        by_feature.setdefault(e["feature_id"], []).append(e)
    tok_t, tok_f, tok_a = [], [], []
    top_token, consistency = [], []
    for row in rows:
        fid = row["feature_id"]
        exs = by_feature.get(fid, [])
        view = feature_view(row, exs, facts, st["vocab_html"])
        page = st["skeleton"].page(fid, f"#{fid} {view['label']}".strip(), st["template"].render(f=view))
        d = st["out"] / str(fid)
        d.mkdir(exist_ok=True)
        (d / "index.html").write_text(page, encoding="utf-8")
        marked = [e["token_ids"][e["offset"] - e["window_start"]] for e in exs
                  if e["kind"] == "top" and 0 <= e["offset"] - e["window_start"] < len(e["token_ids"])]
        for e, t in zip((e for e in exs if e["kind"] == "top"), marked):
            tok_t.append(t)
            tok_f.append(fid)
            tok_a.append(e["activation"])
        if marked:
            vals, cnt = np.unique(marked, return_counts=True)
            top_token.append(int(vals[cnt.argmax()]))
            consistency.append(float(cnt.max() / len(marked)))
        else:
            top_token.append(-1)
            consistency.append(0.0)
    return {"ids": np.array([r["feature_id"] for r in rows], np.int32),
            "top_token": np.array(top_token, np.int32), "consistency": np.array(consistency, np.float32),
            "tok_token": np.array(tok_t, np.int32), "tok_feature": np.array(tok_f, np.int32),
            "tok_act": np.array(tok_a, np.float32)}


def render_all(features_dir: Path, out_dir: Path, skeleton: Skeleton, facts: SiteFacts, workers: int | None = None,
               progress=None):
    """Render all shards into out_dir/<id>/index.html; yields each shard's search-index data."""
    paths = sorted(str(p) for p in Path(features_dir).glob("features-*.parquet"))
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        _init(skeleton, facts, str(out_dir))
        for p in paths:
            yield render_shard(p)
            progress and progress()
        return
    with get_context("fork").Pool(workers, _init, (skeleton, facts, str(out_dir))) as pool:
        for result in pool.imap_unordered(render_shard, paths):
            yield result
            progress and progress()
