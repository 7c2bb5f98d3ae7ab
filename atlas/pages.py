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
import json
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
# Interval samples (kind != "top") are shown trimmed, and only the first few of each interval: with
# 20 full top windows they would otherwise more than double the page (see tests/bench/bench_build.py).
INTERVAL_WINDOW = (8, 4)         # tokens shown left and right of the marked one in interval samples
INTERVAL_SAMPLES = 1             # samples shown per interval (by rank)


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
    """The theme's built page split around the placeholders, with its chrome made lean (see `lean_chrome`)."""

    parts: list[str]             # head, tail
    assets: dict[str, str]       # site path -> text of the shared files the lean chrome refers to

    @classmethod
    def from_html(cls, text: str) -> "Skeleton":
        text = text.replace(SKELETON, "{id}")
        text, assets = lean_chrome(_squeeze(text))
        text = with_csp(text)
        # MkDocs wraps the placeholder in a paragraph; drop the paragraph with it
        for wrapped in (f"<p>{CONTENT_MARK}</p>", CONTENT_MARK):
            if wrapped in text:
                head, tail = text.split(wrapped, 1)
                break
        else:
            raise ValueError("skeleton page lost its content placeholder")
        return cls([head, tail], assets)

    def page(self, feature_id: int, title: str, content: str) -> str:
        head, tail = self.parts
        esc = html.escape(title)
        head = head.replace(TITLE_MARK, esc).replace("{id}", str(feature_id))
        tail = tail.replace(TITLE_MARK, esc).replace("{id}", str(feature_id))
        return head + content + tail


# The theme's chrome is ~11 KB of every feature page; 24,576 copies of it were most of the site.
# lean_chrome() keeps the theme's markup and classes (so the look and the theme's JavaScript are
# unchanged) but (1) drops the sidebars the skeleton's front matter hides (`hide: [navigation, toc]`)
# and the drawer button that would open the emptied drawer, and the header's search box (MkDocs'
# search covers the hand-written pages only; feature pages link to the feature search instead), (2) turns each inline SVG icon into an
# empty <svg class=atlas-icN> painted by a CSS mask (a data: URL, so it works from file:// too),
# (3) moves the theme's inline scripts into one shared file each (same order, still synchronous).
ICON_CSS = "assets/stylesheets/atlas-icons.css"
_SVG = re.compile(r'<svg xmlns="http://www.w3.org/2000/svg" viewBox="([^"]+)">(.*?)</svg>', re.S)


def _drop_element(text: str, start_pattern: str, tag: str = "div") -> str:
    """Remove every element whose start tag matches `start_pattern`, with its (nested) content."""
    while (m := re.search(start_pattern, text)) is not None:
        depth, pos = 0, m.start()
        for t in re.finditer(rf"<(/?){tag}\b[^>]*>", text[m.start():]):
            depth += -1 if t.group(1) else 1
            if depth == 0:
                pos = m.start() + t.end()
                break
        else:
            return text
        text = text[:m.start()] + text[pos:]
    return text


def lean_chrome(text: str) -> tuple[str, dict[str, str]]:
    """The skeleton with less repeated markup, and the shared files it now refers to (see above)."""
    assets: dict[str, str] = {}
    text = _drop_element(text, r'<div class="md-sidebar md-sidebar--\w+"[^>]*\shidden>')
    if 'data-md-type="navigation"' not in text:
        text = _drop_element(text, r'<label class="md-header__button md-icon" for="__drawer">', "label")
    text = _drop_element(text, r'<label class="md-header__button md-icon" for="__search">', "label")
    text = _drop_element(text, r'<div class="md-search" data-md-component="search"')
    text = re.sub(r'<meta name="generator"[^>]*>', "", text)
    text = re.sub(r'(<script id="__config" type="application/json">)(.*?)(</script>)',
                  lambda m: m.group(1) + json.dumps(json.loads(m.group(2)), separators=(",", ":")) + m.group(3), text,
                  flags=re.S)

    icons: dict[tuple[str, str], int] = {}

    def icon(m: re.Match) -> str:
        n = icons.setdefault((m.group(1), m.group(2)), len(icons))
        return f'<svg viewBox="{m.group(1)}" class="atlas-ic{n}"></svg>'

    text = _SVG.sub(icon, text)
    if icons:
        rules = []
        for (box, body), n in icons.items():
            svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='{box}'>{body.replace(chr(34), chr(39))}</svg>"
            url = "url(\"data:image/svg+xml," + re.sub(r"[<>#%\"\n]", lambda c: f"%{ord(c.group()):02X}", svg) + "\")"
            rules.append(f".atlas-ic{n}{{-webkit-mask-image:{url};mask-image:{url}}}")
        assets[ICON_CSS] = ("/* The theme's icons on feature pages (atlas/pages.py lean_chrome) */\n"
                            "svg[class^=atlas-ic]{background-color:currentcolor;-webkit-mask-repeat:no-repeat;"
                            "mask-repeat:no-repeat;-webkit-mask-position:center;mask-position:center;"
                            "-webkit-mask-size:contain;mask-size:contain}\n" + "\n".join(rules) + "\n")
        link = f'<link rel="stylesheet" href="../../{ICON_CSS}">'
        text = text.replace("</head>", link + "\n</head>", 1)

    def script(m: re.Match) -> str:
        attrs, body = m.group(1) or "", m.group(2)
        if "src=" in attrs or "type=" in attrs or len(body) < 40:
            return m.group(0)
        name = f"assets/javascripts/atlas-{hashlib.sha256(body.encode()).hexdigest()[:10]}.js"
        assets[name] = body + "\n"
        return f'<script src="../../{name}"></script>'

    text = _INLINE_SCRIPT.sub(script, text)
    text = re.sub(r">\n<(?!/?(a|span|code|em|strong|b|i)\b)", "><", text)
    return text, assets


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


def fmt_value(a: float) -> str:
    """An activation as few characters as reads well: .53, 3.4, 12, 140 (never needs attribute quotes)."""
    if a >= 99.5:
        return f"{a:.0f}"
    s = f"{a:.2g}"
    return s[1:] if s.startswith("0.") else s


def token_markup(vocab_html: list[str], token_ids, acts, max_act: float, mark: int,
                 window: tuple[int, int] | None = None) -> Markup:
    """A token window as HTML: zero tokens as plain text, active ones as <i class=aN data-v=VALUE>.

    The class picks the highlight colour (LEVELS steps of max_act), CSS shows data-v on hover and
    focus, and site_src/js/feature.js makes the active tokens focusable (tabindex) for the keyboard;
    the marked (peak) token also gets class pk. Attributes are unquoted (their values never need
    quotes) to keep 24,576 pages small.
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
            out.append(f'<i class="a{lvl} pk" data-v={fmt_value(a)}>{text}</i>' if i == mark
                       else f"<i class=a{lvl} data-v={fmt_value(a)}>{text}</i>")
        else:
            out.append(text)
    return Markup("".join(out))


def histogram(edges: list[float], counts: list[int], width=560, height=120) -> dict | None:
    """Bars of the activation histogram (log-spaced edges drawn at equal widths) for an SVG: one stroke per bar."""
    if not counts or not any(counts):
        return None
    top = max(counts)
    bw = max(3, round(width / len(counts)) | 1)          # odd, so bar centres fall on whole units
    path = "".join(f"M{i * bw + bw // 2} {height}V{height - height * math.log1p(c) / math.log1p(top):.0f}"
                   for i, c in enumerate(counts) if c > 0)
    return {"path": path, "width": bw * len(counts), "height": height, "bar": bw - 1, "lo": fmt_num(edges[0]),
            "hi": fmt_num(edges[-1]), "top": f"{top:,}"}


BANDS = ((0.7, "high"), (0.4, "medium"), (0.0, "low"))
"""Label-score bands by F1, the measured version of a case study's hand-rated monosemanticity."""


def _known(x) -> bool:
    return x is not None and math.isfinite(x)


def score_view(precision, recall, f1, matched: int, fired: int, scoring: str, is_dead: bool) -> dict | None:
    """A label's held-out score (atlas/labels/scores.py) in plain words; None for a dead feature."""
    if is_dead:
        return None
    if not _known(f1):
        why = ("the feature never fired on the held-out text" if scoring and not fired
               else "this label has no held-out score")
        return {"f1": "–", "band": "unscored", "text": f"Not scored: {why}.", "detail": ""}
    band = next(name for lo, name in BANDS if f1 >= lo)
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    if scoring == "detection":
        text = (f"Asked which held-out excerpts fire this feature, a reader of this label picked ones holding "
                f"{pct(recall)} of its activation; "
                + (f"{pct(precision)} of the excerpts it picked fire it." if _known(precision) else "it picked none."))
        detail = f"{matched:,} excerpts picked, {fired:,} of those shown fire the feature"
    else:
        text = (f"This label covers {pct(recall)} of the feature's activation on held-out text; "
                + (f"{pct(precision)} of its tokens there fire it." if _known(precision)
                   else "none of its tokens occur there."))
        detail = f"{matched:,} held-out tokens match it, {fired:,} fire the feature"
    return {"f1": f"{f1:.2f}", "band": band, "text": text, "detail": detail}


def rule_text(rule_json: str, vocab: list[str], label: str) -> str:
    """The whole rule when the label had to shorten it ("+N more"); else ""."""
    from atlas.labels.rules import Rule

    rule = Rule.from_json(rule_json) if rule_json else None
    if rule is None:
        return ""
    full = rule.text(vocab, limit=None)
    return full if full != label else ""


def feature_view(row: dict, examples: list[dict], facts: SiteFacts, vocab_html: list[str]) -> dict:
    """Exactly the values feature.html shows for one feature."""
    fid = row["feature_id"]
    max_act = row["max_act"] or 0.0

    def window(ex, trim=None):
        return {"act": fmt_num(ex["activation"]),
                "html": token_markup(vocab_html, ex["token_ids"], ex["acts"], max_act, ex["offset"] - ex["window_start"],
                                     trim)}

    top = [window(e) for e in sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"])]
    samples = sorted((e for e in examples if e["kind"] != "top" and e["rank"] < INTERVAL_SAMPLES),
                     key=lambda e: (-e["activation"], e["interval"], e["rank"]))
    intervals = [window(e, INTERVAL_WINDOW) for e in samples]

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
        "score": score_view(row["label_precision"], row["label_recall"], row["label_f1"], row["label_matched"],
                            row["heldout_fired"], row["label_scoring"], row["is_dead"]),
        "rule": rule_text(row["label_rule"], facts.vocab, row["label"] or ""),
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
    examples = []
    if epath.exists():
        import pyarrow.compute as pc

        ex = shards.read_table(epath, shards.EXAMPLES_SCHEMA)
        # only the examples a page shows: every top one, the first INTERVAL_SAMPLES of each interval
        examples = ex.filter(pc.or_(pc.equal(ex["kind"], "top"), pc.less(ex["rank"], INTERVAL_SAMPLES))).to_pylist()
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
