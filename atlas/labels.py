"""Feature labels: a short readable name for each feature, written by a pluggable explainer.

An explainer turns a feature's evidence (its top and interval examples, its logit effects, its
firings on the choose split) into an `Explanation`: a label and, when it can say exactly where
the feature should fire, a `Rule` (atlas/label_rules.py). `atlas analyze` calls the one named by
`analyze.explainer` and scores every label on held-out tokens (atlas/label_scores.py). Adding an
explainer is one class and one decorator line; the pipeline does not change:

    @register("my-llm")
    class MyLLMExplainer(Explainer):
        def explain(self, evidence, vocab):
            return [ask_llm(e, vocab) for e in evidence]     # strings or Explanations

Registered here: `top-tokens`; in atlas/label_rules.py the rule explainers (`token-set`,
`word-prefix`, `bigram`, `trigram`, `after-token`, `char-class`) and `best-rule` (the default),
which keeps each feature's best rule; in atlas/llm_explainer.py `openai-compatible`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from atlas.errors import ConfigError

if TYPE_CHECKING:
    from atlas.label_data import LabelData, Split
    from atlas.label_rules import Rule
    from atlas.label_scores import Score


@dataclass
class Evidence:
    """What is known about one feature when it is labelled. Examples from the score split's
    contexts are left out: that split is kept for scoring the label (atlas/label_data.py)."""

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
               vocab: list[str]) -> "list[Score] | None":
        """Held-out scores of free-text labels (those without a rule); None: left unscored."""
        return None


_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str):
    def deco(cls: type[Explainer]) -> type[Explainer]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_explainer(name: str, a=None, cache_dir: Path | None = None) -> Explainer:
    """The explainer registered as `name`, set up from the analyze config `a` when given."""
    import atlas.label_rules  # noqa: F401  (registers the rule explainers)
    import atlas.llm_explainer  # noqa: F401  (registers openai-compatible)

    if name not in _REGISTRY:
        raise ConfigError(f"'analyze.explainer' = {name!r}: unknown explainer (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    return cls.from_config(a, cache_dir) if a is not None else cls()


def as_explanation(x: "Explanation | str", source: str) -> Explanation:
    """An explainer's answer as an Explanation (plain strings are free-text labels)."""
    if isinstance(x, Explanation):
        return x if x.source else Explanation(x.label, x.rule, source)
    return Explanation(str(x), None, source)


def show(text: str) -> str:
    """A token's text made visible in a label: whitespace trimmed, newlines and blanks named."""
    t = text.replace("\n", "\\n").replace("\t", "\\t").strip()
    return t if t else "␣"


@register("top-tokens")
class TopTokens(Explainer):
    """Label from the tokens the feature fires on most strongly.

    If one token is the max token of at least `share` of the top examples, the label is that
    token, or the two-token n-gram ending in it when the preceding token is as consistent;
    otherwise the three most common max tokens joined by " / ". Its rule: the bigram, or every
    token whose shown text is one of the label's.
    """

    share = 0.5
    max_len = 60

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[Explanation]:
        by_text: dict[str, list[int]] = {}
        for i, t in enumerate(vocab):
            by_text.setdefault(show(t), []).append(i)
        return [self._one(e, vocab, by_text) for e in evidence]

    def _one(self, e: Evidence, vocab: list[str], by_text: dict[str, list[int]]) -> Explanation:
        from atlas.label_rules import Rule

        if e.is_dead or not e.top_token_ids:
            return Explanation("dead feature" if e.is_dead else "", source=self.name)

        def text(t: int) -> str:
            return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"

        def tokens_rule(texts: list[str]) -> Rule:
            return Rule("tokens", tuple(sorted(i for s in texts for i in by_text.get(s, []))))

        n = len(e.top_token_ids)
        counts = Counter(show(text(t)) for t in e.top_token_ids)
        (best, best_n), = counts.most_common(1)
        if best_n >= self.share * n:
            pairs = Counter((p, t) for p, t in zip(e.prev_token_ids, e.top_token_ids)
                            if p >= 0 and show(text(t)) == best)
            if pairs:
                (p, t), pair_n = pairs.most_common(1)[0]
                if pair_n >= self.share * n:
                    label = (text(p) + text(t)).replace("\n", "\\n").strip()
                    return Explanation(label[: self.max_len], Rule("bigrams", ((p, t),)), self.name)
            return Explanation(best[: self.max_len], tokens_rule([best]), self.name)
        top3 = [tok for tok, _ in counts.most_common(3)]
        return Explanation(" / ".join(top3)[: self.max_len], tokens_rule(top3), self.name)
