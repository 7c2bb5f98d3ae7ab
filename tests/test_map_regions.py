"""The map's named regions (atlas/map_regions.py): clusters of the live features' map points, named by
the label words that set them apart."""

from __future__ import annotations

import numpy as np

from atlas.map_regions import kmeans, label_words, name_regions, region_count


def _blobs(n_each=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal([0.1, 0.1], 0.02, (n_each, 2))
    b = rng.normal([0.9, 0.9], 0.02, (n_each, 2))
    pts = np.concatenate([a, b])
    labels = ([f"' cat' / ' kitten' / ' token{i}'" for i in range(n_each)]
              + [f"' dog' / ' puppy' / ' token{i}'" for i in range(n_each)])
    return pts[:, 0], pts[:, 1], labels


def test_regions_are_named_by_the_words_that_set_them_apart():
    x, y, labels = _blobs()
    regions = name_regions(x, y, labels, np.ones(len(x), bool))
    assert len(regions) == region_count(len(x))
    assert sum(r.n for r in regions) == len(x)
    for r in regions:
        words = set(r.name.split(" · "))
        side = "cat" if r.x < 0.5 else "dog"
        assert r.y < 0.5 if side == "cat" else r.y > 0.5        # a region's centre lies in its blob
        assert {side, {"cat": "kitten", "dog": "puppy"}[side]} <= words, r
        assert not words & {"cat", "kitten", "dog", "puppy"} - {side, {"cat": "kitten", "dog": "puppy"}[side]}
        assert "token" not in r.name                             # a word every label has names nothing


def test_dead_features_are_left_out_and_unlabelled_regions_unnamed():
    x, y, labels = _blobs()
    n = len(x)
    labels = labels[: n // 2] + [""] * (n // 2)                  # the dog blob has no labels
    x, y = np.r_[x, np.full(10, 5.0)], np.r_[y, np.full(10, 5.0)]
    labels = labels + ["' zebra' / ' stripes'"] * 10             # dead, far away: not on the map
    keep = np.r_[np.ones(n, bool), np.zeros(10, bool)]
    regions = name_regions(x, y, labels, keep)
    assert regions and all(r.x < 0.5 for r in regions)
    assert all("zebra" not in r.name and "dog" not in r.name for r in regions)
    assert name_regions(x, y, [""] * len(x), keep) == []


def test_kmeans_ends_at_a_fixed_point_and_is_deterministic():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(500, 2)) * [3, 1]
    assign = kmeans(pts, 7)
    assert (assign == kmeans(pts, 7)).all()
    clusters = np.unique(assign)
    centres = np.array([pts[assign == c].mean(0) for c in clusters])
    nearest = clusters[((pts[:, None] - centres[None]) ** 2).sum(-1).argmin(1)]
    assert (nearest == assign).all()                              # every point sits with its nearest centre


def test_label_words_leave_out_special_tokens_numbers_and_stop_words():
    assert label_words("':' after '<|endoftext|>' / ' Loop' / 'the' / '42' / '[CLS]' / '<s>' / 'x_y'") == {"loop"}
