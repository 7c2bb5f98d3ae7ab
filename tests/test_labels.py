"""Label scores and rule explainers (atlas/labels/data.py, label_rules.py, label_scores.py) and how the
site shows them: every score in the shards against a brute-force count on the tiny world, rules on
hand-made splits, and the pages, indexes, explorer and notable page built from scored shards."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import synthetic_shards
from atlas import analyze, build
from atlas.cli import main
from atlas.config import RunConfig, load_config
from atlas.errors import ConfigError
from atlas.labels import Evidence, Explainer, get_explainer, register
from atlas.labels import data as label_data
from atlas.labels import rules as label_rules
from atlas.labels.data import CLASS_BITS, PrefixIndex, Split
from atlas.labels.rules import Rule, search
from atlas.labels.scores import score_rule
from atlas.saes import load_sae
from atlas.shards import read_vocab
from atlas.store import ActivationStore
from support import tiny_yaml, write_sae

D_SAE, K = 96, 6
BLOCK = label_data.BLOCK


# ---------------------------------------------------------------------------------------------
# The tiny world, analysed with the default explainer (best-rule)

_SEEN: dict[int, int] = {}


@register("test-spy")
class _Spy(Explainer):
    """Records how many top examples each feature's evidence holds, and labels with best-rule."""

    def explain(self, evidence, vocab):
        for e in evidence:
            _SEEN[e.feature_id] = len(e.windows)
        return get_explainer("best-rule").explain(evidence, vocab)


@pytest.fixture(scope="module")
def scored(tiny_world, tmp_path_factory):
    """(features dataframe, vocab, dense codes [n_tokens, d_sae] with BOS rows zeroed, store tokens, examples)."""

    root = tmp_path_factory.mktemp("labels")
    tiny_yaml(tiny_world, root, corpus={"n_tokens": 8192}, sae={"d_sae": D_SAE, "k": K},
              analyze={"batch_tokens": 1000})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["collect", "--config", "tiny.yaml"]) == 0
        write_sae(root / "runs" / "tiny" / "sae", 64, D_SAE, K)
        out = analyze.run(load_config("tiny.yaml", ["analyze.explainer=test-spy"]))
        with ActivationStore(Path("runs/tiny/activations.h5")) as store:
            dense = load_sae(Path("runs/tiny/sae")).encode(torch.from_numpy(store.read(0, store.n_tokens)))
            tokens = store.tokens.copy()
        dense[:: tokens.shape[1]] = 0
        feats = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("features-*.parquet"))], ignore_index=True)
        ex = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("examples-*.parquet"))], ignore_index=True)
        manifest = json.loads((out / "manifest.json").read_text())
        return feats, read_vocab(out), dense.numpy(), tokens, ex, manifest
    finally:
        os.chdir(cwd)


def brute_match(rule: dict, vocab: list[str], tok: int, prev: int, prev2: int) -> bool:
    """Whether a rule (its JSON) matches a position, written out plainly, independently of Rule.match."""
    kind, atoms = rule["kind"], rule["atoms"]
    if kind == "tokens":
        return tok in atoms
    if kind == "prefixes":
        return any(vocab[tok].strip().lower().startswith(p) for p in atoms)
    if kind == "bigrams":
        return [prev, tok] in atoms
    if kind == "trigrams":
        return [prev2, prev, tok] in atoms
    if kind == "after":
        return prev in atoms
    raise AssertionError(f"no brute force for {kind}")


def test_scores_equal_a_brute_force_count(scored):
    """Each feature's precision, recall, F1 and counts in the shards, recounted token by token over the
    score split (every other block of 16 contexts, BOS left out) from the SAE's dense codes."""
    feats, vocab, dense, tokens, _, manifest = scored
    n_ctx, L = tokens.shape
    score_ctx = [c for c in range(n_ctx) if (c // BLOCK) % 2 == 1]
    assert manifest["label_scores"]["score_tokens"] == len(score_ctx) * (L - 1)
    checked = 0
    for r in feats.itertuples():
        if r.is_dead or not r.label_rule or json.loads(r.label_rule)["kind"] == "class":
            continue
        rule = json.loads(r.label_rule)
        matched = hits = 0
        covered = mass = 0.0
        fired = 0
        for c in score_ctx:
            for o in range(1, L):
                a = float(dense[c * L + o, r.feature_id])
                prev2 = int(tokens[c, o - 2]) if o >= 2 else -1
                m = brute_match(rule, vocab, int(tokens[c, o]), int(tokens[c, o - 1]), prev2)
                matched += m
                hits += m and a > 0
                covered += a if m else 0.0
                mass += a
                fired += a > 0
        assert (r.label_matched, r.heldout_fired) == (matched, fired), r.feature_id
        if fired == 0:
            assert math.isnan(r.label_f1) and math.isnan(r.label_recall)
            continue
        p = hits / matched if matched else float("nan")
        rec = covered / mass
        pp = 0.0 if math.isnan(p) else p
        f1 = 2 * pp * rec / (pp + rec) if pp + rec else 0.0
        assert (math.isnan(r.label_precision) and math.isnan(p)) or r.label_precision == pytest.approx(p, rel=1e-5)
        assert r.label_recall == pytest.approx(rec, rel=1e-4, abs=1e-6)
        assert r.label_f1 == pytest.approx(f1, rel=1e-4, abs=1e-6)
        assert r.label_scoring == "rule"
        checked += 1
    assert checked > 50


def test_labels_state_their_rules(scored):
    feats, vocab, _, _, _, manifest = scored
    live = feats[~feats.is_dead]
    assert (feats[feats.is_dead].label == "dead feature").all() and feats[feats.is_dead].label_f1.isna().all()
    for r in live.itertuples():
        rule = Rule.from_json(r.label_rule)
        assert rule is not None, r.feature_id
        if r.label_source != "top-tokens":          # top-tokens keeps its own wording of the same rule
            assert r.label == rule.text(vocab), r.feature_id
    assert set(live.label_source) <= {"top-tokens", "token-set", "word-prefix", "bigram", "trigram", "after-token",
                                      "char-class"}
    assert manifest["label_source"] == "test-spy" and manifest["label_scores"]["n_scored"] == live.label_f1.notna().sum()


def test_explainers_never_see_score_contexts(scored):
    """The evidence of each feature holds exactly its top examples from contexts outside the score split."""
    feats, _, _, tokens, ex, _ = scored
    top = ex[ex.kind == "top"]
    hidden = (top.context // BLOCK) % 2 == 1
    assert hidden.any() and (~hidden).any()
    want = top[~hidden].groupby("feature_id").size()
    for f in range(D_SAE):
        # the shards keep a feature's top examples without repeated windows, while the explainer sees
        # them before those were dropped: at least the shards' unhidden ones
        assert _SEEN[f] >= want.get(f, 0), f


# ---------------------------------------------------------------------------------------------
# Rules on hand-made splits

VOCAB = ["<s>", "Once", " upon", " a", " time", " call", " called", "Call", " 42", ",", "\n", " Upon", " x"]


def make_split(seq: list[int], fires: dict[int, float], d_sae: int = 1) -> Split:
    """One context of tokens `seq` (no BOS skipping), feature 0 firing at the given positions."""
    bits, sa, ea = label_data.token_classes(VOCAB)
    tok = np.array(seq, np.int64)
    prev = np.r_[-1, tok[:-1]]
    prev2 = np.r_[-1, -1, tok[:-2]]
    classes = bits[tok].copy()
    classes[sa[tok] & (prev >= 0) & ea[np.maximum(prev, 0)]] |= CLASS_BITS["inside a word"]
    pos = np.array(sorted(fires), np.int32)
    act = np.array([fires[p] for p in sorted(fires)], np.float32)
    return Split("t", np.arange(len(tok)), tok, prev, prev2, classes, np.array([0, len(pos)] + [len(pos)] * (d_sae - 1)),
                 pos, act, len(VOCAB), len(tok), PrefixIndex(VOCAB))


def test_rules_match_count_and_read_as_labels():
    seq = [1, 2, 3, 4, 9, 2, 3, 1, 2, 12, 5, 6, 7, 10, 8]
    s = make_split(seq, {2: 1.0, 8: 3.0})                 # fires on ' upon' after 'Once' (positions 1? no: 2, 8)
    cases = {
        Rule("tokens", (2,)): ([1, 5, 8], "' upon'"),
        Rule("bigrams", ((1, 2),)): ([1, 8], "' upon' after 'Once'"),
        Rule("trigrams", ((1, 2, 3),)): ([2], "' a' after 'Once upon'"),
        Rule("after", (2,)): ([2, 6, 9], "any token after ' upon'"),
        Rule("prefixes", ("call",)): ([10, 11, 12], "'call…'"),
        Rule("class", ("a number",)): ([14], "a number"),
        Rule("class", ("a line's first token",)): ([], "a line's first token"),
    }
    for rule, (where, label) in cases.items():
        got = np.flatnonzero(rule.match(s, np.arange(len(seq)))).tolist()
        assert got == where, rule
        assert rule.n_matched(s) == len(where), rule
        assert rule.text(VOCAB) == label
        assert Rule.from_json(rule.to_json()) == rule


def test_search_finds_the_rule_that_explains_a_feature():
    # the feature fires on ' upon' after 'Once' only: a token rule has precision 1/2, the bigram 1
    seq = [1, 2, 3, 4, 9, 12, 2, 3] * 6
    fires = {i: 2.0 for i in range(len(seq)) if seq[i] == 2 and i and seq[i - 1] == 1}
    s = make_split(seq, fires)
    assert search("bigrams", s, 0) == Rule("bigrams", ((1, 2),))
    assert search("tokens", s, 0) == Rule("tokens", (2,))
    assert label_rules.fit(Rule("bigrams", ((1, 2),)), s, 0) > label_rules.fit(Rule("tokens", (2,)), s, 0)
    e = Evidence(0, False, 0.1, 2.0, choose=s)
    best = get_explainer("best-rule").explain([e], VOCAB)[0]
    assert best.rule == Rule("bigrams", ((1, 2),)) and best.label == "' upon' after 'Once'" and best.source == "bigram"
    sc = score_rule(best.rule, s, 0)
    assert (sc.precision, sc.recall, sc.f1, sc.matched, sc.fired) == (1.0, 1.0, 1.0, 6, 6)


def test_prefix_search_groups_word_forms_and_labels_stay_short():
    seq = [5, 3, 6, 3, 7, 3, 12, 3] * 5                   # ' call', ' called', 'Call' fire; ' a', ' x' do not
    s = make_split(seq, {i: 1.0 for i, t in enumerate(seq) if t in (5, 6, 7)})
    assert search("prefixes", s, 0) == Rule("prefixes", ("call",))
    many = Rule("tokens", tuple(range(len(VOCAB))))
    text = many.text(VOCAB)
    assert len(text) <= label_rules.MAX_LABEL + len(" +99 more") and re.search(r" \+\d+ more$", text)
    assert "more" not in many.text(VOCAB, limit=None)


def test_a_feature_silent_on_the_score_split_is_unscored():
    s = make_split([1, 2, 3], {})
    sc = score_rule(Rule("tokens", (2,)), s, 0)
    assert math.isnan(sc.f1) and math.isnan(sc.recall) and sc.precision == 0.0 and sc.matched == 1


def test_split_ranges_alternate_blocks_and_respect_the_budget():
    choose, score = label_data.split_ranges(100, 10, 10_000, block=16)
    assert [r.start // 10 for r in choose] == [0, 32, 64, 96] and [r.start // 10 for r in score] == [16, 48, 80]
    assert choose[-1] == range(960, 1000)                                  # the last block is cut at the store's end
    choose, score = label_data.split_ranges(1000, 10, 480, block=16)       # 3 blocks of 160 tokens each
    assert len(choose) == len(score) == 3
    assert not {r.start for r in choose} & {r.start for r in score}


def test_openai_compatible_needs_its_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("analyze:\n  explainer: openai-compatible\n")
    with pytest.raises(ConfigError, match="explainer_base_url"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="explainer_model"):
        load_config(cfg, ["analyze.explainer_base_url=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match="label_tokens"):
        load_config(tmp_path / "c.yaml", ["analyze.explainer=best-rule", "analyze.label_tokens=-1"])


# ---------------------------------------------------------------------------------------------
# The site: pages, indexes, home page, notable features, explorer


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("scored-site")
    synthetic_shards.write(work / "runs" / "synth", 120, shard_size=64, n_vocab=300)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return work / build.run(RunConfig(path="synth.yaml"), analyser=False)
    finally:
        os.chdir(cwd)


def _features_js(site: Path) -> dict:
    text = (site / "data" / "features.js").read_text(encoding="utf-8")
    return json.loads(text[text.index(",") + 1: text.rindex(")")])


def test_feature_pages_say_the_score_in_words(site):
    feats = pd.concat([pd.read_parquet(p) for p in sorted((site.parent / "features").glob("features-*.parquet"))])
    for r in feats.sample(30, random_state=0).itertuples():
        page = (site / "features" / str(r.feature_id) / "index.html").read_text(encoding="utf-8")
        if r.is_dead:
            assert "Label score" not in page
        elif math.isnan(r.label_f1):
            assert "Not scored" in page
        else:
            assert f"Label score {r.label_f1:.2f}" in page
            assert f"covers {100 * r.label_recall:.0f}% of the feature&#39;s activation" in page
            assert f"{100 * r.label_precision:.0f}% of its tokens there fire it" in page
    ruled = (site / "features" / "4" / "index.html").read_text(encoding="utf-8")
    assert "Rule in full: &#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;" in ruled    # escaped token texts


def test_indexes_home_and_notable_use_the_scores(site):
    feats = pd.concat([pd.read_parquet(p) for p in sorted((site.parent / "features").glob("features-*.parquet"))])
    feats = feats.set_index("feature_id").sort_index()
    data = _features_js(site)
    for i, f1 in enumerate(data["f1"]):
        assert (f1 is None) == math.isnan(feats.label_f1[i]) and (f1 is None or abs(f1 - feats.label_f1[i]) <= 0.005)

    home = (site / "index.html").read_text(encoding="utf-8")
    live = feats[~feats.is_dead].label_f1.dropna()
    assert f"Median <strong>{np.median(live):.2f}</strong>" in home
    counts = [int(x) for x in re.findall(r"<title>[\d.]+–[\d.]+: (\d+) features</title>", home)]
    assert counts == np.histogram(live, bins=10, range=(0, 1))[0].tolist()

    notable = (site / "notable.html").read_text(encoding="utf-8")
    best_part, vague_part = notable.split('id="vague"')
    ids = [int(x) for x in re.findall(r'<h2 id="f(\d+)">', best_part)]
    ok = feats[~feats.is_dead & ~feats.is_dense & feats.label_f1.notna() & (feats.heldout_fired >= build.NOTABLE_MIN_FIRED)
               & (feats.dominated_by == "")]  # special-token and position features sit behind a switch
    want = ok.assign(m=-ok.max_act).sort_values(["label_f1", "m"], ascending=[False, True]).index[:24].tolist()
    assert ids == want
    vague_part = vague_part.split('<details class="atlas-dominated"')[0]
    vague = [int(x) for x in re.findall(r'<tr><td><a href="features/(\d+)/', vague_part)]
    assert vague == ok.assign(m=-ok.max_act).sort_values(["label_f1", "m"]).index[:12].tolist()
    assert "Label score" in best_part and "This label covers" in best_part


@pytest.mark.browser
def test_explorer_sorts_and_filters_by_score(browser, site):
    from browser import serve

    data = _features_js(site)
    scores = [(f, i) for i, f in enumerate(data["f1"]) if f is not None and not data["flags"][i] & 1]
    with serve({"/s/": site}) as server:
        page = browser.new_page()
        page.goto(server.url("/s/") + "explorer.html")
        page.wait_for_selector("#atlas-rows a")
        page.click("button[data-sort=f1]")                       # highest first
        first = page.locator("#atlas-rows tr td:nth-child(3)").first.inner_text()
        assert float(first) == max(f for f, _ in scores)
        page.fill("#atlas-score-max", "0.2")
        n = sum(f <= 0.2 for f, _ in scores)
        page.wait_for_function(f"() => document.getElementById('atlas-count').textContent.startsWith('{n} ')")
        cells = page.locator("#atlas-rows tr td:nth-child(3)").all_inner_texts()
        assert cells and all(float(c) <= 0.2 for c in cells)
        assert not page.console_errors and not page.failed, (page.console_errors, page.failed)
        page.close()
