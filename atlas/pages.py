"""Feature pages: one static HTML page per feature, stamped into the theme's built skeleton.

MkDocs renders one skeleton page (`features/<SKELETON>/index.html`, at the same depth as every
feature page, so its relative links already fit); every feature page is that HTML with the
title and content placeholders replaced. Content comes from `templates/feature.html` (Jinja,
autoescape on): what must be readable without JavaScript (label, score, statistics). Examples,
histogram, logits and neighbours are drawn by site_src/js/feature.js from one shared data file
per group of features (atlas/page_data.py), which keeps a page under 3 KB.

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
import signal
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from atlas import page_data, search_index, shards
from atlas.labels.rules import Rule

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SKELETON = "__atlas_skeleton__"
TITLE_MARK = "@@ATLAS_TITLE@@"
CONTENT_MARK = "@@ATLAS_CONTENT@@"
LEVELS = 8                       # highlight intensity classes a1..a8 (site_src/js/feature.js uses the same)


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


WHITESPACE_GLYPHS = {"\n": "↵", "\t": "⇥", " ": "·", "\r": ""}
"""How whitespace is shown where it would otherwise vanish (site_src/js/feature.js uses the same glyphs)."""


def display_token(text: str) -> str:
    """A token as a list or table shows it: a whitespace-only token as glyphs, else newlines and tabs as glyphs."""
    if text and not text.strip():
        return "".join(WHITESPACE_GLYPHS.get(c, c) for c in text)
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")


@dataclass
class Skeleton:
    """The theme's built page split around the placeholders, with its chrome made lean (see `lean_chrome`)."""

    parts: list[str]             # head, tail
    assets: dict[str, str]       # site path -> text of the shared files the lean chrome refers to

    @classmethod
    def from_html(cls, text: str, read_asset) -> "Skeleton":
        text = text.replace(SKELETON, "{id}")
        text, assets = lean_chrome(_squeeze(text), read_asset)
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


# The theme's chrome was ~11 KB of every feature page, then 4.7 KB; 131,072 copies of it would be most of
# the site. lean_chrome() keeps the theme's markup and classes for what a feature page shows (header with
# logo, site name and colour-scheme switch; the content column) and (1) drops the rest: sidebars, drawer,
# search, overlay, footer, dialog, back-to-top, and the theme's bundle (which drives those) with its config;
# (2) turns each inline SVG icon into an empty <svg class=atlas-icN> painted by a CSS mask (a data: URL,
# so it works from file:// too); (3) moves the inline scripts into one shared file and concatenates the
# stylesheets into another; (4) replaces the palette form by one button that
# site_src/js/palette.js drives with the theme's stored choice (`__md_get("__palette")`), so a reader's
# light/dark choice carries across the hand-written pages and the feature pages.
PAGE_CSS = "assets/stylesheets/atlas-page.css"
PAGE_JS = "assets/javascripts/atlas-page.js"
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


def _palette(text: str) -> tuple[str, list[dict]]:
    """The palette form replaced by one button; the form's options (scheme, colours, icon) as data."""
    form = re.search(r'<form class="md-header__option" data-md-component="palette">.*?</form>', text, re.S)
    if form is None:
        return text, []
    options = []
    for m in re.finditer(r'<input class="md-option" ([^>]*)>\s*<label [^>]*title="([^"]*)"[^>]*>\s*'
                         r'<svg viewBox="[^"]*" class="(atlas-ic\d+)"></svg>', form.group(0)):
        attrs = dict(re.findall(r'data-md-color-(\w+)="([^"]*)"', m.group(1)))
        options.append({"color": attrs, "title": html.unescape(m.group(2)), "icon": m.group(3)})
    if not options:
        return text, []
    first = options[0]
    button = (f'<button type="button" class="md-header__button md-icon atlas-palette" title="{html.escape(first["title"])}" '
              f'aria-label="{html.escape(first["title"])}"><svg viewBox="0 0 24 24" class="{first["icon"]}"></svg></button>')
    text = text[:form.start()] + button + text[form.end():]
    # the theme's script that applies a stored palette reads the form; palette.js does it instead
    text = re.sub(r'<script>var palette=__md_get\("__palette"\).*?</script>', "", text, flags=re.S)
    return text, options


def lean_chrome(text: str, read_asset) -> tuple[str, dict[str, str]]:
    """The skeleton with less repeated markup, and the shared files it now refers to (see above).

    `read_asset(site_path)` returns the text of a file of the built site (stylesheets, site_src/js/palette.js).
    """
    assets: dict[str, str] = {}
    text = _drop_element(text, r'<div class="md-sidebar md-sidebar--\w+"[^>]*\shidden>')
    for pattern, tag in ((r'<label class="md-header__button md-icon" for="__drawer">', "label"),
                         (r'<label class="md-header__button md-icon" for="__search">', "label"),
                         (r'<div class="md-search" data-md-component="search"', "div"),
                         (r'<div data-md-component="(skip|announce)"', "div"),
                         (r'<div class="md-header__topic" data-md-component="header-topic"', "div"),
                         (r'<div class="md-dialog"', "div"), (r'<footer class="md-footer"', "footer"),
                         (r'<button type="button" class="md-top', "button")):
        text = _drop_element(text, pattern, tag)
    text = re.sub(r'<input class="md-toggle"[^>]*>|<label class="md-overlay"[^>]*></label>|<meta name="generator"[^>]*>',
                  "", text)
    text = re.sub(r'<script id="__config" type="application/json">.*?</script>', "", text, flags=re.S)
    text = re.sub(r'<script src="[^"]*assets/javascripts/bundle\.[^"]*"></script>', "", text)
    # the theme's script that checks a content tab named in the URL: feature pages have no tabs
    text = re.sub(r'<script>var target=document\.getElementById\(location\.hash.*?</script>', "", text, flags=re.S)

    icons: dict[tuple[str, str], int] = {}

    def icon(m: re.Match) -> str:
        n = icons.setdefault((m.group(1), m.group(2)), len(icons))
        return f'<svg viewBox="{m.group(1)}" class="atlas-ic{n}"></svg>'

    text = _SVG.sub(icon, text)
    rules = []
    for (box, body), n in icons.items():
        svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='{box}'>{body.replace(chr(34), chr(39))}</svg>"
        url = "url(\"data:image/svg+xml," + re.sub(r"[<>#%\"\n]", lambda c: f"%{ord(c.group()):02X}", svg) + "\")"
        rules.append(f".atlas-ic{n}{{-webkit-mask-image:{url};mask-image:{url}}}")
    icon_css = ("/* The theme's icons on feature pages (atlas/pages.py lean_chrome) */\n"
                "svg[class^=atlas-ic]{background-color:currentcolor;-webkit-mask-repeat:no-repeat;"
                "mask-repeat:no-repeat;-webkit-mask-position:center;mask-position:center;"
                "-webkit-mask-size:contain;mask-size:contain}\n" + "\n".join(rules) + "\n")
    text, palette = _palette(text)

    # one stylesheet: the theme's, ours and the icons, concatenated (they hold no relative url())
    links = re.findall(r'<link rel="stylesheet" href="\.\./\.\./([^"]+)">', text)
    assets[PAGE_CSS] = "\n".join(read_asset(p) for p in links) + "\n" + icon_css
    text = re.sub(r'<link rel="stylesheet" href="[^"]+">', "", text)
    text = text.replace("</head>", f'<link rel="stylesheet" href="../../{PAGE_CSS}">\n</head>', 1)
    # the theme's remaining inline scripts (they define __md_get/__md_set; none touches the page before the
    # header is parsed) and the palette switch: one shared file, run right after the header
    inline = [m.group(2) for m in _INLINE_SCRIPT.finditer(text) if not m.group(1)]
    text = _INLINE_SCRIPT.sub(lambda m: "" if not m.group(1) else m.group(0), text)
    code = "\n".join(inline)
    if palette:
        code += "\nvar ATLAS_PALETTE = " + json.dumps(palette, separators=(",", ":")) + ";\n" + read_asset("js/palette.js")
    if code.strip():
        assets[PAGE_JS] = code + "\n"
        text = text.replace("</header>", f'<script src="../../{PAGE_JS}"></script></header>', 1)
    text = re.sub(r'\s+data-md-component="[^"]*"', "", text)   # only the theme's bundle reads these
    text = re.sub(r">\n<(?!/?(a|span|code|em|strong|b|i)\b)", "><", text)
    text = re.sub(r"\s*\n\s*", "\n", text)
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
    vocab: list[str]
    group_size: int = page_data.GROUP
    """Features per shared data file (page_data.group_size of the shard size)."""
    suite: SuiteFacts | None = None
    """In a suite's site: the member these pages belong to, the other members and the cross-SAE links."""
    steering: bool = False
    """The site has the steering web file (export.steering): pages carry the steer box."""


@dataclass
class SuiteFacts:
    """A suite member's place in the suite, for its feature pages (atlas/links.py's rows, with labels)."""

    sae: str
    """This member's id (the folder its pages are in: site/<sae>/)."""
    members: list[tuple[str, str]]
    """Every member of the suite: (id, "layer 8, 24,576 features"), in suite order."""
    links: dict[int, dict[str, list[dict]]]
    """Feature id -> relation -> its links, most similar first: {"sae", "id", "cosine", "label"} (links/<sae>.parquet)."""


# ---------------------------------------------------------------- view models


def fmt_value(a: float) -> str:
    """An activation as few characters as reads well: .53, 3.4, 12, 140 (never needs attribute quotes)."""
    if a >= 99.5:
        return f"{a:.0f}"
    s = f"{a:.2g}"
    return s[1:] if s.startswith("0.") else s


def token_markup(vocab_html: list[str], token_ids, acts, max_act: float, mark: int) -> Markup:
    """A token window as HTML (the notable page's case studies): zero tokens as plain text, active ones as
    <i class=aN data-v=VALUE>, the marked (peak) one also with class pk. Feature pages draw theirs in
    site_src/js/feature.js, with the same classes."""
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
    rule = Rule.from_json(rule_json) if rule_json else None
    if rule is None:
        return ""
    full = rule.text(vocab, limit=None)
    return full if full != label else ""


DOMINATED_BY = {"special-token": "Fires mostly on special tokens (BOS, separators, padding)",
                "position": "Fires mostly by position in the context, not by content"}
"""What the `dominated_by` column's values mean (atlas/analyze marks such features)."""


def feature_view(row: dict, facts: SiteFacts) -> dict:
    """Exactly the values feature.html shows for one feature (the static part of its page)."""
    fid = row["feature_id"]
    n = facts.n_features
    dominated = row.get("dominated_by") or ""
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
        "group": row.get("group"),
        "dominated_by": dominated,
        "dominated_help": DOMINATED_BY.get(dominated, ""),
        "data_group": fid // facts.group_size,
        "prev": fid - 1 if fid > 0 else None,
        "next": fid + 1 if fid + 1 < n else None,
        "random": random_neighbour(fid, n),
        "root": "../.." if facts.suite is None else "../../..",
        "suite": suite_view(fid, facts.suite) if facts.suite is not None else None,
        "steering": facts.steering,
    }


LINK_TITLES = {"prev": "Previous layer", "next": "Next layer", "parent": "Parent (narrower SAE)",
               "child": "Children (wider SAE)"}


def suite_view(fid: int, suite: SuiteFacts) -> dict:
    """The suite parts of a feature page: the member switcher and the cross-SAE links by relation."""
    by_relation = suite.links.get(fid, {})
    groups = [{"title": title, "rows": [dict(r, cosine=f"{r['cosine']:.2f}") for r in by_relation[rel]]}
              for rel, title in LINK_TITLES.items() if by_relation.get(rel)]
    return {"sae": suite.sae, "members": suite.members, "links": groups}


def random_neighbour(fid: int, n: int) -> int:
    """A fixed pseudo-random other feature (the page is static, so 'random' is chosen at build time)."""
    if n < 2:
        return fid
    j = (fid * 2654435761 + 40503) % n
    return j if j != fid else (j + 1) % n


# ---------------------------------------------------------------- rendering

OPTIONAL_COLUMNS = ("group", "dominated_by")
"""Feature columns that analysis may add (Matryoshka level; special-token/position features): shown when present."""
_STATE: dict = {}
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _load(skeleton: Skeleton, facts: SiteFacts, site: str):
    env = jinja_env()
    _STATE.update(skeleton=skeleton, facts=facts, site=Path(site), template=env.get_template("feature.html"))


def _init_worker(skeleton: Skeleton, facts: SiteFacts, site: str):
    # a forked worker inherits the command's SIGTERM handler (raise Terminated); the parent handles Ctrl-C and
    # SIGTERM and ends the pool, so a worker just goes quietly, never with a traceback of its own. The signals
    # were blocked across the fork (see render_all) and are let through only once the worker's own handlers are set
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _load(skeleton, facts, site)


def read_features(path: Path) -> pa.Table:
    """A features shard with the schema's columns and whichever OPTIONAL_COLUMNS it has."""
    table = shards.read_table(path, shards.FEATURES_SCHEMA)
    extra = [c for c in OPTIONAL_COLUMNS if c in pq.read_schema(path).names and c not in table.column_names]
    for name in extra:
        table = table.append_column(name, pq.read_table(path, columns=[name]).column(name))
    return table


def render_shard(features_path: str) -> dict:
    """Render every page of one shard and its shared data files; returns what the search indexes need."""
    st = _STATE
    facts: SiteFacts = st["facts"]
    fpath = Path(features_path)
    table = read_features(fpath)
    epath = fpath.with_name(fpath.name.replace("features-", "examples-", 1))
    examples = (shards.read_table(epath, shards.EXAMPLES_SCHEMA) if epath.exists()
                else shards.EXAMPLES_SCHEMA.empty_table())
    n = facts.n_features
    neighbour_labels = [[facts.labels[i] if 0 <= i < n else "" for i in ids]
                        for ids in table.column("neighbour_ids").to_pylist()]
    page_table = table.append_column("neighbour_labels", pa.array(neighbour_labels, pa.list_(pa.string())))
    page_data.write_shard(st["site"], page_table, page_data.site_examples(examples), facts.group_size)

    out = st["site"] / "features"
    for row in table.to_pylist():
        fid = row["feature_id"]
        view = feature_view(row, facts)
        page = st["skeleton"].page(fid, f"#{fid} {view['label']}".strip(), st["template"].render(f=view))
        d = out / str(fid)
        d.mkdir(exist_ok=True)
        (d / "index.html").write_text(page, encoding="utf-8")

    # the token search index: every token a feature fires on in any shown window (top and sampled),
    # not only the peaks; a feature's top token: the commonest marked token of its top examples
    ids = table.column("feature_id").to_numpy()
    tok_t = np.zeros(0, np.int32)
    tok_f, tok_a = tok_t, np.zeros(0, np.float32)
    shown = examples.combine_chunks()
    if shown.num_rows:
        windows, acts = shown.column("token_ids").chunk(0), shown.column("acts").chunk(0)
        lengths = np.diff(windows.offsets.to_numpy()).astype(np.int64)
        flat_t, flat_a = windows.flatten().to_numpy(), acts.flatten().to_numpy().astype(np.float32)
        feature = np.repeat(shown.column("feature_id").to_numpy(), lengths)
        on = flat_a > 0
        tok_t, tok_f, tok_a = flat_t[on].astype(np.int32), feature[on].astype(np.int32), flat_a[on]
    top = examples.filter(pc.equal(examples["kind"], "top")).combine_chunks()
    mark_t = mark_f = np.zeros(0, np.int32)
    if top.num_rows:
        windows = top.column("token_ids").chunk(0)
        starts = windows.offsets.to_numpy()[:-1].astype(np.int64)
        lengths = np.diff(windows.offsets.to_numpy()).astype(np.int64)
        mark = (top.column("offset").to_numpy() - top.column("window_start").to_numpy()).astype(np.int64)
        ok = (mark >= 0) & (mark < lengths)
        mark_t = windows.flatten().to_numpy()[(starts + mark)[ok]].astype(np.int32)
        mark_f = top.column("feature_id").to_numpy()[ok].astype(np.int32)
    top_token = np.full(len(ids), -1, np.int32)
    consistency = np.zeros(len(ids), np.float32)
    if len(mark_t):
        pairs, counts = np.unique(np.stack([mark_f, mark_t], 1), axis=0, return_counts=True)
        per_feature = np.bincount(mark_f, minlength=int(ids.max()) + 1)
        order = np.lexsort((-counts, pairs[:, 0]))                # per feature: most common token first
        first = order[np.unique(pairs[order, 0], return_index=True)[1]]
        sorter = np.argsort(ids)
        where = sorter[np.searchsorted(ids, pairs[first, 0], sorter=sorter)]
        top_token[where] = pairs[first, 1]
        consistency[where] = counts[first] / per_feature[pairs[first, 0]]
    tok_t, tok_f, tok_a = search_index.strongest_tokens(tok_t, tok_f, tok_a)
    return {"ids": ids.astype(np.int32), "top_token": top_token, "consistency": consistency,
            "tok_token": tok_t, "tok_feature": tok_f, "tok_act": tok_a}


def render_all(features_dir: Path, site: Path, skeleton: Skeleton, facts: SiteFacts, workers: int | None = None,
               progress=None):
    """Render all shards into site/features/<id>/index.html and site/data/pages/; yields each shard's
    search-index data."""
    paths = sorted(str(p) for p in Path(features_dir).glob("features-*.parquet"))
    (site / "features").mkdir(parents=True, exist_ok=True)
    workers = workers or min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        _load(skeleton, facts, str(site))
        for p in paths:
            yield render_shard(p)
            progress and progress()
        return
    # a SIGTERM that lands mid-fork runs the handler inside the fork hooks, which swallow its exception, and the
    # build would go on; blocked here, it waits and is raised in this thread as soon as the pool stands
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pool = get_context("fork").Pool(workers, _init_worker, (skeleton, facts, str(site)))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with pool:
        for result in pool.imap_unordered(render_shard, paths):
            yield result
            progress and progress()
        pool.close()  # let idle workers exit by themselves: leaving the block terminates (SIGTERMs) them
        pool.join()
