"""What every part of labelling shares, and nothing else: the leaf of atlas/labels/.

`Evidence` (what is known of a feature when it is labelled), `Explanation` (a label and the rule
it states, if any), `Score` (a label's held-out score), the `Explainer` base class and the
registry that `register` fills. It imports no other labelling module, so every other one can
import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Annotations name Rule (atlas/labels/rules.py), Split and LabelData (atlas/labels/data.py) without
# importing them: this module stays the leaf that those import.

NAN = float("nan")


@dataclass
class Evidence:
    """What is known about one feature when it is labelled. Examples from the score split's
    contexts are left out: that split is kept for scoring the label (atlas/labels/data.py)."""

    feature_id: int
    is_dead: bool
    density: float
    max_act: float
    top_token_ids: list[int] = field(default_factory=list)
    """The marked (max) token of each top example, best first."""
    prev_token_ids: list[int] = field(default_factory=list)
    """The token before each marked token (-1 at the start of a context)."""
    windows: list[list[int]] = field(default_factory=list)
    """Token ids of each top example's shown window."""
    window_acts: list[list[float]] = field(default_factory=list)
    """The feature's activation on each token of those windows."""
    top_logit_ids: list[int] = field(default_factory=list)
    sample_windows: list[list[int]] = field(default_factory=list)
    """Token ids of the interval samples' windows (weaker activations)."""
    sample_acts: list[list[float]] = field(default_factory=list)
    choose: "Split | None" = None
    """The choose split (shared by all features): where rule explainers look for this feature's firings."""


@dataclass
class Explanation:
    """A label, and the rule it states when it states one (free text has none)."""

    label: str
    rule: "Rule | None" = None
    source: str = ""
    """The explainer that wrote it."""


@dataclass
class Score:
    """A label's score on held-out data; NaN where a value is undefined."""

    precision: float
    recall: float
    f1: float
    matched: int
    """Held-out tokens (contexts, for detection) the label matches."""
    fired: int
    """Held-out tokens (contexts) the feature fires on."""
    method: str
    """"rule" (counted over tokens), "detection" (over contexts) or "" (not scored)."""


UNSCORED = Score(NAN, NAN, NAN, 0, 0, "")


class Explainer:
    """Base class of explainers: `explain` labels a batch of features (batched for LLM calls)."""

    name = "base"

    @classmethod
    def from_config(cls, a, cache_dir: Path | None) -> "Explainer":
        """An explainer set up from the analyze config (most need nothing from it)."""
        return cls()

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list["Explanation | str"]:
        raise NotImplementedError

    def detect(self, evidence: list[Evidence], explanations: list[Explanation], data: "LabelData",
               vocab: list[str]) -> list[Score] | None:
        """Held-out scores of free-text labels (those without a rule); None: left unscored."""
        return None


REGISTRY: dict[str, type[Explainer]] = {}
"""Explainer name -> class, filled by `register` as the modules of atlas/labels/ load."""


def register(name: str):
    def deco(cls: type[Explainer]) -> type[Explainer]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def as_explanation(x: "Explanation | str", source: str) -> Explanation:
    """An explainer's answer as an Explanation (plain strings are free-text labels)."""
    if isinstance(x, Explanation):
        return x if x.source else Explanation(x.label, x.rule, source)
    return Explanation(str(x), None, source)


def show(text: str) -> str:
    """A token's text made visible in a label: whitespace trimmed, newlines and blanks named."""
    t = text.replace("\n", "\\n").replace("\t", "\\t").strip()
    return t if t else "␣"
