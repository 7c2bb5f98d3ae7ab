"""Named regions of the feature map: k-means over the map's 2-D points, each cluster named by the
words its features' labels share more than the rest of the map's do.

The map (map_x/map_y, written by analysis) places features by their decoder directions; a reader
needs landmarks on it. A region's name is its two or three most distinctive label words, scored
as the share of the cluster's labels that hold the word times the word's inverse document
frequency over all labels (tf-idf with a document per feature), so a word every label shares
(a separator, "after") names nothing and a region without labelled features is left unnamed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

MAX_REGIONS = 40
FEATURES_PER_REGION = 8   # k grows as sqrt(n / this): ~24 regions for 4,608 features, 40 from ~13k on
WORDS_PER_NAME = 3
_WORD = re.compile(r"[^\W\d_]{3,}")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>|<[a-z_]+>|\[[A-Z]+\]")  # <|endoftext|>, <s>, [CLS]: where, not what
_STOP = frozenset(
    "the and for are but not you all any can had her was one our out has his how its may new now old see "
    "way who did get let put say she too use after more than from into with this that then them they what "
    "when where which while will would there their these those been have some such only also very each".split())


@dataclass(frozen=True)
class Region:
    """One named cluster of the map: its label, centre (map coordinates) and how many features it holds."""

    name: str
    x: float
    y: float
    n: int


def region_count(n_points: int) -> int:
    return int(min(MAX_REGIONS, max(1, round(math.sqrt(n_points / FEATURES_PER_REGION)))))


def kmeans(points: np.ndarray, k: int, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Cluster of each point (k-means++ start, Lloyd steps; deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    n = len(points)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        if d.sum() <= 0:
            break
        centres.append(points[rng.choice(n, p=d / d.sum())])
    centres = np.array(centres)
    assign = np.zeros(n, np.int64)
    for step in range(iters):
        d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        new = d.argmin(1)
        if step and (new == assign).all():
            break
        assign = new
        for c in range(len(centres)):
            members = points[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    return assign


def label_words(label: str) -> set[str]:
    """The distinct lower-case words (3+ letters, no stop words) of a label."""
    return {w for w in (m.lower() for m in _WORD.findall(_SPECIAL.sub(" ", label))) if w not in _STOP}


def name_regions(x: np.ndarray, y: np.ndarray, labels: list[str], keep: np.ndarray) -> list[Region]:
    """Regions of the points where `keep` is true (live features), largest first; unnamed ones dropped."""
    idx = np.flatnonzero(keep & np.isfinite(x) & np.isfinite(y))
    if len(idx) < 2:
        return []
    points = np.stack([x[idx], y[idx]], 1).astype(np.float64)
    assign = kmeans(points, region_count(len(idx)))
    words = [label_words(labels[i]) for i in idx]
    df = Counter(w for ws in words for w in ws)
    total = len(idx)
    regions = []
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        tf = Counter(w for m in members for w in words[m])
        scored = sorted(((count / len(members)) * math.log(total / df[w]), w) for w, count in tf.items()
                        if count >= 2 and df[w] < total)
        name = " · ".join(w for _, w in reversed(scored[-WORDS_PER_NAME:]))
        if name:
            cx, cy = points[members].mean(0)
            regions.append(Region(name, float(cx), float(cy), len(members)))
    return sorted(regions, key=lambda r: -r.n)
