"""How good is a label? Every label scored on held-out tokens its explainer never saw.

A label with a rule (atlas/labels/rules.py) is scored on the score split (contexts held out
from labelling, atlas/labels/data.py), treating the rule as a prediction "the feature fires
here". For feature f with activation a_t at held-out position t, and M the positions the rule
matches:

    precision = |{t in M : a_t > 0}| / |M|           how often the rule's tokens make f fire
    recall    = sum_{t in M} a_t / sum_t a_t          how much of f's activation the rule covers
    F1        = 2 * precision * recall / (precision + recall)

Recall is activation-weighted, so a label that explains f's strong firings scores higher than
one that covers the same number of weak ones. A feature that never fires on the score split
has no recall and no score (NaN). A free-text label (an LLM's) has no rule; its explainer scores
it by detection instead (atlas/labels/llm.py), with the same columns counted over held-out
contexts rather than tokens (`label_scoring` says which).

`label_all` runs an explainer over evidence chunks and scores its answers: the columns
`atlas analyze` writes into the feature shards (atlas/shards.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from atlas.errors import AtlasError
from atlas.labels.data import LabelData, Split
from atlas.labels.interface import NAN, UNSCORED, Evidence, Explainer, Explanation, Score, as_explanation
from atlas.labels.rules import Rule, f1, rule_counts

def score_rule(rule: Rule, split: Split, f: int) -> Score:
    """The score of `rule` as a label of feature f on `split` (see the module docstring)."""
    c = rule_counts(rule, split, f)
    precision = c.hits / c.matched if c.matched else NAN
    recall = c.covered / c.mass if c.mass > 0 else NAN
    score = f1(0.0 if math.isnan(precision) else precision, recall) if c.mass > 0 else NAN
    return Score(precision, recall, score, c.matched, c.fired, "rule")


def detection_score(said_fires: list[bool], activations: list[float]) -> Score:
    """Detection: contexts shown to a judge, which said for each whether the feature fires there.
    `activations` is the feature's max activation in each context (0: it does not fire)."""
    said = np.asarray(said_fires, bool)
    act = np.asarray(activations, np.float64)
    fires = act > 0
    matched, hits = int(said.sum()), int((said & fires).sum())
    precision = hits / matched if matched else NAN
    recall = float(act[said].sum() / act.sum()) if act.sum() > 0 else NAN
    score = f1(0.0 if math.isnan(precision) else precision, recall) if act.sum() > 0 else NAN
    return Score(precision, recall, score, matched, int(fires.sum()), "detection")


@dataclass
class Labelled:
    """Every feature's label and score, as the shard columns they become."""

    label: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    def add(self, e: Explanation, s: Score) -> None:
        self.label.append(e.label)
        self.source.append(e.source)
        self.rule.append(e.rule.to_json() if e.rule is not None else "")
        self.scores.append(s)

    def columns(self, f0: int, f1_: int) -> dict:
        """The label and score columns of features [f0, f1_) (names as in atlas/shards.py)."""
        s = self.scores[f0:f1_]

        def value(name: str) -> pa.Array:      # undefined (NaN) is written as null
            v = np.array([getattr(x, name) for x in s], np.float32)
            return pa.array(v, pa.float32(), mask=np.isnan(v))

        return {
            "label": self.label[f0:f1_], "label_source": self.source[f0:f1_], "label_rule": self.rule[f0:f1_],
            "label_precision": value("precision"), "label_recall": value("recall"), "label_f1": value("f1"),
            "label_matched": np.array([x.matched for x in s], np.int64),
            "heldout_fired": np.array([x.fired for x in s], np.int64),
            "label_scoring": [x.method for x in s],
        }

    def summary(self) -> dict:
        """The manifest's `label_scores`: how many labels were scored, their median F1 and the share >= 0.5."""
        f = np.array([x.f1 for x in self.scores], np.float64)
        f = f[~np.isnan(f)]
        return {"n_scored": int(len(f)), "median_f1": round(float(np.median(f)), 4) if len(f) else None,
                "share_f1_at_least_0.5": round(float((f >= 0.5).mean()), 4) if len(f) else None}


def score_all(explainer: Explainer, evidence: list[Evidence], answers: list[Explanation],
              data: LabelData | None, vocab: list[str]) -> list[Score]:
    """Held-out scores of one chunk's answers: rules by counting, free text by the explainer's detection."""
    if data is None or data.score.n == 0:
        return [UNSCORED] * len(answers)
    out = [score_rule(x.rule, data.score, e.feature_id) if x.rule is not None and not e.is_dead else UNSCORED
           for e, x in zip(evidence, answers)]
    free = [i for i, (e, x) in enumerate(zip(evidence, answers)) if x.rule is None and x.label and not e.is_dead]
    if free:
        detected = explainer.detect([evidence[i] for i in free], [answers[i] for i in free], data, vocab)
        if detected is not None:
            for i, s in zip(free, detected):
                out[i] = s
    return out


def label_all(explainer: Explainer, chunks: Iterable[list[Evidence]], vocab: list[str],
              data: LabelData | None) -> Labelled:
    """Ask `explainer` for every chunk's labels and score each on the score split."""
    result = Labelled()
    for evidence in chunks:
        got = explainer.explain(evidence, vocab)
        if len(got) != len(evidence):
            raise AtlasError(f"explainer '{explainer.name}' returned {len(got)} labels for {len(evidence)} features")
        answers = [as_explanation(x, explainer.name) for x in got]
        for x, s in zip(answers, score_all(explainer, evidence, answers, data, vocab)):
            result.add(x, s)
    return result
