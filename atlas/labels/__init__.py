"""Feature labels: a short readable name for each feature, written by a pluggable explainer.

An explainer turns a feature's evidence (its top and interval examples, its logit effects, its
firings on the choose split) into an `Explanation`: a label and, when it can say exactly where
the feature should fire, a `Rule`. `atlas analyze` calls the one named by `analyze.explainer` and
scores every label on held-out tokens. Adding an explainer is one class and one decorator line;
the pipeline does not change:

    @register("my-llm")
    class MyLLMExplainer(Explainer):
        def explain(self, evidence, vocab):
            return [ask_llm(e, vocab) for e in evidence]     # strings or Explanations

The modules, each importing only those above it:

    interface  Evidence, Explanation, Score, Explainer, register (the leaf)
    data       the two splits labels are chosen on and scored on
    rules      labels as checkable rules; the explainers top-tokens, token-set, word-prefix,
               bigram, trigram, after-token, char-class and best-rule (the default)
    scores     every label scored on held-out tokens; `label_all` for analyze
    llm        openai-compatible: an LLM writes the labels, scored by detection
"""

from __future__ import annotations

from pathlib import Path

from atlas.errors import ConfigError
from atlas.labels import llm, rules  # noqa: F401  (they register their explainers)
from atlas.labels.interface import REGISTRY, Evidence, Explainer, Explanation, Score, register

__all__ = ["Evidence", "Explainer", "Explanation", "Score", "get_explainer", "register"]


def get_explainer(name: str, a=None, cache_dir: Path | None = None) -> Explainer:
    """The explainer registered as `name`, set up from the analyze config `a` when given."""
    if name not in REGISTRY:
        raise ConfigError(f"'analyze.explainer' = {name!r}: unknown explainer (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    return cls.from_config(a, cache_dir) if a is not None else cls()
