"""Labels as checkable rules, and the explainers that search for the best rule of each feature.

A rule says on which tokens a feature fires. Five kinds, each a set of disjoint atoms:

| kind       | an atom             | the label reads                      |
| ---------- | ------------------- | ------------------------------------ |
| `tokens`   | a token             | `' upon' / ' Upon'`                  |
| `bigrams`  | previous + token    | `' upon' after 'Once'`               |
| `trigrams` | two before + token  | `' a' after 'Once upon'`             |
| `after`    | the previous token  | `any token after ' def'`             |
| `class`    | a character/position class (atlas/labels/data.py CLASSES) | `a number` |

A rule matches a position when any of its atoms does. On a split (atlas/labels/data.py) a rule
has three counts for feature f: `matched` (positions it matches), `hits` (of those, positions f
fires on) and `covered` (f's activation on the matched positions); precision = hits / matched,
recall = covered / f's whole activation (atlas/labels/scores.py).

Each rule explainer searches one kind on the *choose* split: the candidate atoms are the
feature's own firing positions there; atoms are added greedily, each time the one that raises
F1 most, while it raises F1 by more than `TERM_PENALTY` (so a label stays short, at most
`MAX_TERMS[kind]` atoms). Precision on the choose split is shrunk towards 0 by `PRIOR` extra
non-firing matches, so a bigram seen once is not a "perfect" rule. `best-rule` (the default
explainer) runs every rule explainer, and top-tokens, and keeps per feature the rule with the
best `fit` (F1 on the choose split minus the term penalty). None of this sees the score split.
`top-tokens` (the tokens a feature fires on most strongly, stated as a rule) is here too.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from atlas.labels.data import CLASS_BITS, CLASSES, Split
from atlas.labels.interface import REGISTRY, Evidence, Explainer, Explanation, register, show

KINDS = ("tokens", "prefixes", "bigrams", "trigrams", "after", "class")
MAX_TERMS = {"tokens": 8, "prefixes": 4, "bigrams": 4, "trigrams": 3, "after": 3, "class": 1}
TERM_PENALTY = 0.01
"""F1 an extra atom must add (on the choose split) to be kept."""
PRIOR = 1.0
"""Pseudo-matches that do not fire, added to every rule's matches on the choose split."""
MAX_LABEL = 80
"""Characters of a label; atoms past it are summarised as "+N more"."""


# --------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """Where a feature should fire: positions matching any atom. Atoms are token ids, tuples of
    token ids (bigrams: (previous, token); trigrams: (two before, previous, token)) or a class name."""

    kind: str
    atoms: tuple

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "atoms": [list(a) if isinstance(a, tuple) else a for a in self.atoms]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Rule | None":
        if not text:
            return None
        d = json.loads(text)
        return cls(d["kind"], tuple(tuple(a) if isinstance(a, list) else a for a in d["atoms"]))

    def _keys(self, split: Split, idx) -> np.ndarray:
        """Each position's key in this rule's space (-1 where the kind does not apply)."""
        return {"tokens": lambda: split.tokens[idx], "after": lambda: split.prev[idx],
                "bigrams": lambda: split.bigram_keys(idx), "trigrams": lambda: split.trigram_keys(idx)}[self.kind]()

    def _atom_keys(self, V: int) -> np.ndarray:
        if self.kind == "bigrams":
            return np.array([p * V + t for p, t in self.atoms], np.int64)
        if self.kind == "trigrams":
            return np.array([(a * V + b) * V + t for a, b, t in self.atoms], np.int64)
        return np.array(self.atoms, np.int64)

    def match(self, split: Split, idx) -> np.ndarray:
        """Whether the rule matches each position `idx` of `split`."""
        if self.kind == "prefixes":
            return np.isin(split.tokens[idx], np.concatenate([split.prefixes.ids(p) for p in self.atoms]))
        if self.kind == "class":
            bits = sum(CLASS_BITS[c] for c in self.atoms)
            return (split.classes[idx] & bits) != 0
        return np.isin(self._keys(split, idx), self._atom_keys(split.vocab_size))

    def n_matched(self, split: Split) -> int:
        """Positions of `split` the rule matches (from the split's count tables; atoms are disjoint)."""
        if self.kind == "prefixes":
            return sum(split.prefix_count(p) for p in self.atoms)
        if self.kind == "class":
            if len(self.atoms) == 1:
                return split.class_counts[self.atoms[0]]
            return int(self.match(split, slice(None)).sum())
        count_kind = {"tokens": "token", "after": "prev", "bigrams": "bigram", "trigrams": "trigram"}[self.kind]
        return int(split.count(count_kind, np.unique(self._atom_keys(split.vocab_size))).sum())

    def text(self, vocab: list[str], limit: int | None = MAX_LABEL) -> str:
        """The label: readable, exactly the rule, atoms past `limit` characters counted ("+N more")."""
        def tok(t: int) -> str:
            return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"

        if self.kind == "class":
            return " / ".join(self.atoms)
        if self.kind == "tokens":
            terms = [quote(tok(t)) for t in self.atoms]
        elif self.kind == "prefixes":
            terms = [quote(p + "…") for p in self.atoms]
        elif self.kind == "bigrams":
            terms = [f"{quote(tok(t))} after {quote(tok(p))}" for p, t in self.atoms]
        elif self.kind == "trigrams":
            terms = [f"{quote(tok(t))} after {quote(tok(a) + tok(b))}" for a, b, t in self.atoms]
        else:
            terms = [quote(tok(p)) for p in self.atoms]
        text = join_terms(terms, limit)
        return f"any token after {text}" if self.kind == "after" else text


def quote(text: str) -> str:
    """A token in a label: in quotes with its spaces, line breaks and tabs made visible."""
    return "'" + text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t") + "'"


def join_terms(terms: list[str], limit: int | None = MAX_LABEL) -> str:
    """Terms joined by " / ", the ones past `limit` characters (None: no limit) counted instead of shown."""
    shown = [terms[0]]
    for t in terms[1:]:
        if limit is not None and len(" / ".join(shown + [t])) > limit:
            break
        shown.append(t)
    rest = len(terms) - len(shown)
    return " / ".join(shown) + (f" +{rest} more" if rest else "")


@dataclass
class Counts:
    """A rule's counts for one feature on one split."""

    matched: int
    """Positions the rule matches."""
    hits: int
    """Matched positions the feature fires on."""
    covered: float
    """The feature's activation on matched positions."""
    fired: int
    """Positions the feature fires on."""
    mass: float
    """The feature's whole activation."""


def rule_counts(rule: Rule, split: Split, f: int) -> Counts:
    """Rule `rule` against feature `f` on `split`: only f's firing positions are looked at, and the
    matches come from the split's count tables, so this costs O(f's firings + atoms)."""
    pos, act = split.codes(f)
    hit = rule.match(split, pos)
    return Counts(rule.n_matched(split), int(hit.sum()), float(act[hit].sum(dtype=np.float64)), len(pos),
                  float(act.sum(dtype=np.float64)))


def f1(precision, recall):
    """Harmonic mean, 0 where both are 0 (numpy-friendly)."""
    p, r = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return out if out.ndim else float(out)


def fit(rule: Rule, split: Split, f: int) -> float:
    """How well `rule` fits feature f on the choose split: F1 with shrunk precision, minus the term penalty."""
    c = rule_counts(rule, split, f)
    if c.mass <= 0 or c.hits == 0:
        return 0.0
    return f1(c.hits / (c.matched + PRIOR), c.covered / c.mass) - TERM_PENALTY * (len(rule.atoms) - 1)


# --------------------------------------------------------------------------------------------
# Search


def greedy(n: np.ndarray, k: np.ndarray, m: np.ndarray, mass: float, max_terms: int, conflicts=None) -> list[int]:
    """Indices of candidate atoms (n matches, k of them firing, m activation each) chosen greedily
    for F1 (precision shrunk by PRIOR); an atom is kept while it adds more than TERM_PENALTY.
    `conflicts(j)`, when given, names the candidates that overlap candidate j (dropped once j is chosen)."""
    chosen: list[int] = []
    K = N = C = 0.0
    best = 0.0
    free = k > 0
    for _ in range(max_terms):
        if not free.any():
            break
        score = f1((K + k) / (N + n + PRIOR), (C + m) / mass)
        score = np.where(free, score, -1.0)
        j = int(np.argmax(score))
        if score[j] - (TERM_PENALTY if chosen else 0.0) <= best:
            break
        chosen.append(j)
        K, N, C, best = K + k[j], N + n[j], C + m[j], float(score[j])
        free[j] = False
        if conflicts is not None:
            free[conflicts(j)] = False
    return chosen


def search(kind: str, split: Split, f: int) -> Rule | None:
    """The best rule of `kind` for feature f on `split` (None when f never fires there)."""
    pos, act = split.codes(f)
    mass = float(act.sum(dtype=np.float64))
    if mass <= 0:
        return None
    if kind == "class":
        names = list(CLASSES)
        hit = [(split.classes[pos] & CLASS_BITS[c]) != 0 for c in names]
        k = np.array([h.sum() for h in hit])
        m = np.array([act[h].sum(dtype=np.float64) for h in hit])
        n = np.array([split.class_counts[c] for c in names])
        chosen = greedy(n, k, m, mass, MAX_TERMS[kind])
        return Rule(kind, tuple(names[j] for j in chosen)) if chosen else None
    if kind == "prefixes":
        return _search_prefixes(split, pos, act, mass)
    if kind == "trigrams" and split.vocab_size ** 3 >= 2 ** 63:
        return None                                   # trigram keys would overflow int64 (a 2M-token vocabulary)
    keys = Rule(kind, ())._keys(split, pos)
    ok = keys >= 0
    uniq, inv = np.unique(keys[ok], return_inverse=True)
    if not len(uniq):
        return None
    k = np.bincount(inv, minlength=len(uniq))
    m = np.bincount(inv, weights=act[ok].astype(np.float64), minlength=len(uniq))
    count_kind = {"tokens": "token", "after": "prev", "bigrams": "bigram", "trigrams": "trigram"}[kind]
    n = split.count(count_kind, uniq)
    chosen = greedy(n, k, m, mass, MAX_TERMS[kind])
    if not chosen:
        return None
    V = split.vocab_size
    atoms = [int(uniq[j]) for j in chosen]
    if kind == "bigrams":
        atoms = [(a // V, a % V) for a in atoms]
    elif kind == "trigrams":
        atoms = [(a // (V * V), (a // V) % V, a % V) for a in atoms]
    return Rule(kind, tuple(atoms))


def _search_prefixes(split: Split, pos: np.ndarray, act: np.ndarray, mass: float) -> Rule | None:
    """The best set of word prefixes ("every word starting with 'call'"): candidates are the
    prefixes (PrefixIndex.MIN characters or more) of the words the feature fires on; chosen
    prefixes never nest, so their matches are disjoint."""
    index = split.prefixes
    tok, inv = np.unique(split.tokens[pos], return_inverse=True)
    k_tok = np.bincount(inv, minlength=len(tok))
    m_tok = np.bincount(inv, weights=act.astype(np.float64), minlength=len(tok))
    words = [index.keys[t] for t in tok.tolist()]
    # longest first: of prefixes that match the same tokens, the greedy's first best is the most specific
    cands = sorted({w[:j] for w in words for j in range(index.MIN, len(w) + 1)}, key=lambda c: (-len(c), c))
    if not cands:
        return None
    # per candidate: the feature's firings and activation on words starting with it
    order = sorted(range(len(words)), key=words.__getitem__)
    sw = [words[i] for i in order]
    ck, cm = np.concatenate([[0], np.cumsum(k_tok[order])]), np.concatenate([[0.0], np.cumsum(m_tok[order])])
    lo = np.array([bisect.bisect_left(sw, c) for c in cands])
    hi = np.array([bisect.bisect_left(sw, c + "\U0010ffff") for c in cands])
    k, m = ck[hi] - ck[lo], cm[hi] - cm[lo]
    n = np.array([split.prefix_count(c) for c in cands])

    def nested(j: int) -> np.ndarray:
        c = cands[j]
        return np.array([i for i, d in enumerate(cands) if d.startswith(c) or c.startswith(d)], np.int64)

    chosen = greedy(n, k, m, mass, MAX_TERMS["prefixes"], nested)
    return Rule("prefixes", tuple(cands[j] for j in chosen)) if chosen else None


# --------------------------------------------------------------------------------------------
# Explainers


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


class RuleExplainer(Explainer):
    """Searches rules of one kind on the choose split (see the module docstring)."""

    kind = ""

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[Explanation]:
        return [self.one(e, vocab) for e in evidence]

    def one(self, e: Evidence, vocab: list[str]) -> Explanation:
        if e.is_dead:
            return Explanation("dead feature", source=self.name)
        rule = search(self.kind, e.choose, e.feature_id) if e.choose is not None else None
        if rule is None:
            return Explanation("", source=self.name)
        return Explanation(rule.text(vocab), rule, self.name)


@register("token-set")
class TokenSet(RuleExplainer):
    """A set of tokens."""

    kind = "tokens"


@register("word-prefix")
class WordPrefix(RuleExplainer):
    """Words starting with given letters: "'call…'" covers ' call', ' called', 'Calls'."""

    kind = "prefixes"


@register("bigram")
class Bigram(RuleExplainer):
    """Tokens after given previous tokens: "' upon' after 'Once'"."""

    kind = "bigrams"


@register("trigram")
class Trigram(RuleExplainer):
    """Tokens after given two-token prefixes."""

    kind = "trigrams"


@register("after-token")
class AfterToken(RuleExplainer):
    """Any token after given tokens."""

    kind = "after"


@register("char-class")
class CharClass(RuleExplainer):
    """A character or position class: numbers, punctuation, a word's inside, a line's first token."""

    kind = "class"


@register("best-rule")
class BestRule(Explainer):
    """Per feature, the best-fitting rule of every rule explainer and top-tokens (on the choose split)."""

    SOURCES = ("top-tokens", "token-set", "word-prefix", "bigram", "trigram", "after-token", "char-class")

    def explain(self, evidence: list[Evidence], vocab: list[str]) -> list[Explanation]:
        sources = [REGISTRY[n]() for n in self.SOURCES]  # all defined above, in this module
        answers = [s.explain(evidence, vocab) for s in sources]
        out = []
        for i, e in enumerate(evidence):
            cands = [a[i] for a in answers]
            if e.is_dead or e.choose is None:
                out.append(cands[0])           # top-tokens: it needs no split
                continue
            fits = [fit(c.rule, e.choose, e.feature_id) if c.rule is not None else -1.0 for c in cands]
            out.append(cands[int(np.argmax(fits))])    # ties: the earlier, simpler explainer
        return out
