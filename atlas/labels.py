"""Feature labels: a short readable name for each feature, written by a pluggable explainer.

An explainer turns a feature's evidence (its top examples' tokens and activations, its logit
effects) into a label. `atlas analyze` calls the one named by `analyze.explainer`. Adding one
(say, an LLM that reads the examples) is one class and one decorator line; the pipeline does not
change:

    @register("my-llm")
    class MyLLMExplainer(Explainer):
        def explain(self, evidence, vocab):
            return [ask_llm(e, vocab) for e in evidence]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from atlas.errors import ConfigError


@dataclass
class Evidence:
    """What is known about one feature when it is labelled."""

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


class Explainer:
    """Base class of explainers: `explain` labels a batch of features (batched for LLM calls)."""

    name = "base"

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[str]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str):
    def deco(cls: type[Explainer]) -> type[Explainer]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_explainer(name: str) -> Explainer:
    if name not in _REGISTRY:
        raise ConfigError(f"'analyze.explainer' = {name!r}: unknown explainer (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]()


def show(text: str) -> str:
    """A token's text made visible in a label: whitespace trimmed, newlines and blanks named."""
    t = text.replace("\n", "\\n").replace("\t", "\\t").strip()
    return t if t else "␣"


@register("top-tokens")
class TopTokens(Explainer):
    """Label from the tokens the feature fires on most strongly.

    If one token is the max token of at least `share` of the top examples, the label is that
    token, or the two-token n-gram ending in it when the preceding token is as consistent;
    otherwise the three most common max tokens joined by " / ".
    """

    share = 0.5
    max_len = 60

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[str]:
        return [self._one(e, vocab) for e in evidence]

    def _one(self, e: Evidence, vocab: list[str]) -> str:
        if e.is_dead or not e.top_token_ids:
            return "dead feature"

        def text(t: int) -> str:
            return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"

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
                    return label[: self.max_len]
            return best[: self.max_len]
        return " / ".join(tok for tok, _ in counts.most_common(3))[: self.max_len]
