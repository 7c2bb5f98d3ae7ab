"""The tokens labels are chosen on and scored on: two disjoint splits of the activation store.

A label must be scored on tokens its explainer never saw, or the score measures memory, not
explanation. The store's contexts are cut into blocks of `BLOCK` contexts that alternate between
two splits (each thinned to evenly spaced blocks of at most `analyze.label_tokens` tokens):

- **choose**: rule explainers search their rules here (atlas/labels/rules.py);
- **score**: every label is scored here (atlas/labels/scores.py). Explainers never see it: the
  examples from its contexts are left out of their evidence (`LabelData.hidden`).

Alternating blocks, rather than the store's evaluation split (its last contexts), because a
corpus in document order puts a few documents at its end: the demo's last 5% is three Python
modules. Both splits are drawn from the whole corpus, so a score says how well a label predicts
the feature on text like the rest of the atlas.

`atlas analyze` encodes both splits a second time, separately from its streaming passes. Each
split keeps, per position (BOS left out with `analyze.skip_bos`): the token, the one and two
tokens before it and a bitmask of character/position classes; and, per feature, the positions it
fires on with their activations (CSR, by feature). The encoder runs batch by batch and only the
nonzero codes are kept: memory is positions x L0 entries (12 bytes each), never positions x
d_sae. Rules need "how many positions match" counts; `Split` builds the tables for them
(unigram, previous-token, bigram, trigram and word-prefix counts) on first use.

Cost: one encoder pass over at most 2 x label_tokens tokens, whatever the corpus size. For the
GPT-2 Small config (20M tokens, 24,576 latents, k 32): 524,288 tokens, 2.6% of the analysis'
encoding, and 524,288 x 32 entries x 12 bytes = 200 MB.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# Character and position classes of a token; each is one bit of Split.classes. The names are
# what labels show (atlas/labels/rules.py), so they read as "fires on <name>".
CLASSES = {
    "a word start": "a token that starts a word (a space, then a letter)",
    "inside a word": "a token that continues the word before it",
    "a capitalised word": "an upper-case first letter",
    "an all-caps word": "two or more letters, all upper case",
    "a number": "digits only",
    "punctuation": "no letter, digit or space",
    "whitespace": "spaces, tabs or line breaks only",
    "a line break": "contains a line break",
    "a line's first token": "the token after a line break",
}
CLASS_BITS = {name: 1 << i for i, name in enumerate(CLASSES)}
BLOCK = 16
"""Contexts per block; blocks alternate between the choose and the score split."""


def token_classes(vocab: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vocabulary entry: its class bits from its own text, whether it begins with a letter or
    digit (no space), and whether it ends with one (for "inside a word", which needs the previous
    token)."""
    bits = np.zeros(len(vocab), np.uint16)
    starts_alnum = np.zeros(len(vocab), bool)
    ends_alnum = np.zeros(len(vocab), bool)
    for i, t in enumerate(vocab):
        s = t.strip()
        b = 0
        if re.match(r"[ \t]+[^\W\d_]", t):
            b |= CLASS_BITS["a word start"]
        if s[:1].isupper():
            b |= CLASS_BITS["a capitalised word"]
        letters = [c for c in s if c.isalpha()]
        if len(letters) >= 2 and all(c.isupper() for c in letters):
            b |= CLASS_BITS["an all-caps word"]
        if s.isdigit():
            b |= CLASS_BITS["a number"]
        if s and not any(c.isalnum() for c in s):
            b |= CLASS_BITS["punctuation"]
        if t and not s:
            b |= CLASS_BITS["whitespace"]
        if "\n" in t:
            b |= CLASS_BITS["a line break"]
        bits[i] = b
        starts_alnum[i] = t[:1].isalnum()
        ends_alnum[i] = t[-1:].isalnum()
    return bits, starts_alnum, ends_alnum


class PrefixIndex:
    """The vocabulary sorted by word key (a token's text without surrounding spaces, lower case),
    so "every token whose word starts with 'call'" is one contiguous range."""

    MIN = 3
    """Shortest prefix a rule may use (shorter ones name too many words to mean anything)."""

    def __init__(self, vocab: list[str]):
        keys = [t.strip().lower() for t in vocab]
        self.order = np.array(sorted(range(len(keys)), key=keys.__getitem__), np.int64)
        self.sorted_keys = [keys[i] for i in self.order]
        self.keys = keys

    def ids(self, prefix: str) -> np.ndarray:
        """Token ids whose word key starts with `prefix`."""
        lo = bisect.bisect_left(self.sorted_keys, prefix)
        hi = bisect.bisect_left(self.sorted_keys, prefix + "\U0010ffff")
        return self.order[lo:hi]


@dataclass
class Split:
    """Some store contexts: per position its tokens and classes, per feature its nonzero codes."""

    name: str
    rows: np.ndarray
    """[n] int64 store rows of the positions (context * ctx_len + offset), ascending."""
    tokens: np.ndarray
    """[n] int64 token at each position."""
    prev: np.ndarray
    """[n] int64 token before it (-1 at a context's first position)."""
    prev2: np.ndarray
    """[n] int64 token two before it (-1 where there is none)."""
    classes: np.ndarray
    """[n] uint16 bitmask of CLASSES."""
    feat_start: np.ndarray
    """[d_sae + 1] int64: feature f's codes are pos/act[feat_start[f]:feat_start[f+1]]."""
    pos: np.ndarray
    """Position index (into the arrays above) of each nonzero code, ascending within a feature."""
    act: np.ndarray
    """float32 activation of each nonzero code."""
    vocab_size: int
    ctx_len: int
    prefixes: PrefixIndex
    """The vocabulary by word key (shared by both splits), for prefix rules."""

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def d_sae(self) -> int:
        return len(self.feat_start) - 1

    def codes(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, activations) where feature f fires."""
        s, e = self.feat_start[f], self.feat_start[f + 1]
        return self.pos[s:e], self.act[s:e]

    @cached_property
    def fired(self) -> np.ndarray:
        """[d_sae] positions each feature fires on."""
        return np.diff(self.feat_start)

    @cached_property
    def mass(self) -> np.ndarray:
        """[d_sae] float64 sum of each feature's activations."""
        return np.bincount(np.repeat(np.arange(self.d_sae), self.fired), weights=self.act.astype(np.float64),
                           minlength=self.d_sae)

    # ---- keys of n-grams, and how often each occurs in this split

    def bigram_keys(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.where(self.prev[idx] >= 0, self.prev[idx] * self.vocab_size + self.tokens[idx], -1)

    def trigram_keys(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        V = self.vocab_size
        return np.where(self.prev2[idx] >= 0, (self.prev2[idx] * V + self.prev[idx]) * V + self.tokens[idx], -1)

    @cached_property
    def token_counts(self) -> np.ndarray:
        return np.bincount(self.tokens, minlength=self.vocab_size)

    @cached_property
    def prev_counts(self) -> np.ndarray:
        return np.bincount(self.prev[self.prev >= 0], minlength=self.vocab_size)

    @cached_property
    def _bigrams(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.bigram_keys()
        return np.unique(k[k >= 0], return_counts=True)

    @cached_property
    def _trigrams(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.trigram_keys()
        return np.unique(k[k >= 0], return_counts=True)

    @cached_property
    def class_counts(self) -> dict[str, int]:
        return {name: int(((self.classes & bit) != 0).sum()) for name, bit in CLASS_BITS.items()}

    def prefix_count(self, prefix: str) -> int:
        """Positions whose token's word key starts with `prefix`."""
        return int(self.token_counts[self.prefixes.ids(prefix)].sum())

    def count(self, kind: str, keys: np.ndarray) -> np.ndarray:
        """How many positions of this split have each key (a token, previous token, bigram or trigram key)."""
        keys = np.asarray(keys, np.int64)
        if kind == "token":
            return self.token_counts[keys]
        if kind == "prev":
            return self.prev_counts[keys]
        table, counts = self._bigrams if kind == "bigram" else self._trigrams
        if not len(table):
            return np.zeros(len(keys), np.int64)
        i = np.searchsorted(table, keys).clip(max=len(table) - 1)
        return np.where(table[i] == keys, counts[i], 0)


@dataclass
class LabelData:
    """The two splits, and where an explainer may cache answers (the LLM explainer does)."""

    choose: Split
    score: Split
    """Held out from labelling: every label is scored here."""
    store_tokens: np.ndarray
    """[n_contexts * ctx_len] every store token, for showing score contexts (the LLM's detection)."""
    cache_dir: Path | None = None
    seconds: dict = field(default_factory=dict)
    """Wall time of the encoding of each split."""

    def hidden(self, rows: np.ndarray) -> np.ndarray:
        """Which store rows lie in the score split's contexts (an explainer must not see them)."""
        ctx = np.unique(self.score.rows // self.score.ctx_len)
        return np.isin(np.asarray(rows) // self.score.ctx_len, ctx)


def split_ranges(n_contexts: int, ctx_len: int, n_tokens: int, block: int = BLOCK) -> tuple[list[range], list[range]]:
    """Store rows of the (choose, score) splits: blocks of `block` contexts, alternately one and the
    other, each split thinned to evenly spaced blocks when it would hold more than `n_tokens`."""
    blocks = [range(b * ctx_len, min(b + block, n_contexts) * ctx_len) for b in range(0, n_contexts, block)]
    out = []
    for parity in (0, 1):
        mine = blocks[parity::2]
        keep = min(len(mine), math.ceil(n_tokens / (block * ctx_len)))
        out.append([mine[i * len(mine) // keep] for i in range(keep)] if keep else [])
    return out[0], out[1]


def encode_split(name: str, store, encode, ranges: list[range], d_sae: int, prefixes: PrefixIndex,
                 class_bits: np.ndarray, starts_alnum: np.ndarray, ends_alnum: np.ndarray, skip_bos: bool,
                 batch_tokens: int, device: torch.device, progress: bool = True) -> Split:
    """Run the SAE encoder over `ranges` of store rows batch by batch, keeping only nonzero codes."""
    L = store.ctx_len
    flat = np.asarray(store.tokens, np.int64).reshape(-1)
    rows = np.concatenate([np.arange(r.start, r.stop, dtype=np.int64) for r in ranges]) if ranges else np.zeros(0, np.int64)
    offset = rows % L
    if skip_bos:
        rows, offset = rows[offset != 0], offset[offset != 0]
    tokens = flat[rows]
    prev = np.where(offset >= 1, flat[np.maximum(rows - 1, 0)], -1)
    prev2 = np.where(offset >= 2, flat[np.maximum(rows - 2, 0)], -1)
    classes = class_bits[tokens].copy()
    inside = starts_alnum[tokens] & (prev >= 0) & ends_alnum[np.maximum(prev, 0)]
    classes[inside] |= CLASS_BITS["inside a word"]
    first = (prev >= 0) & ((class_bits[np.maximum(prev, 0)] & CLASS_BITS["a line break"]) != 0)
    classes[first] |= CLASS_BITS["a line's first token"]

    pos_parts, feat_parts, act_parts = [], [], []
    total = sum(len(r) for r in ranges)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"analyze: label {name} split", disable=not progress)
    with torch.inference_mode():
        for r in ranges:
            for start, x in store.iter_batches(batch_tokens, r):
                tok, feat, val = encode(x.to(device))
                row = tok.cpu().numpy().astype(np.int64) + start
                p = np.searchsorted(rows, row).clip(max=max(len(rows) - 1, 0))
                keep = (len(rows) > 0) & (rows[p] == row)      # BOS rows are not positions
                pos_parts.append(p[keep].astype(np.int32))
                feat_parts.append(feat.cpu().numpy()[keep].astype(np.int32))
                act_parts.append(val.float().cpu().numpy()[keep])
                bar.update(len(x))
    bar.close()
    pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int32)
    feat = np.concatenate(feat_parts) if feat_parts else np.zeros(0, np.int32)
    act = np.concatenate(act_parts) if act_parts else np.zeros(0, np.float32)
    order = np.argsort(feat, kind="stable")                      # by feature, positions ascending within
    feat_start = np.searchsorted(feat[order], np.arange(d_sae + 1)).astype(np.int64)
    return Split(name=name, rows=rows, tokens=tokens, prev=prev, prev2=prev2, classes=classes,
                 feat_start=feat_start, pos=pos[order], act=act[order],
                 vocab_size=len(class_bits), ctx_len=L, prefixes=prefixes)


def prepare(store, encode, d_sae: int, a, vocab: list[str], device: torch.device,
            cache_dir: Path | None = None, progress: bool = True) -> LabelData:
    """Encode the choose and score splits (see the module docstring)."""
    import time

    tokens = np.asarray(store.tokens)
    vocab_size = max(len(vocab), int(tokens.max()) + 1 if tokens.size else 0)
    texts = list(vocab) + [""] * (vocab_size - len(vocab))
    bits, starts_alnum, ends_alnum = token_classes(texts)
    common = dict(d_sae=d_sae, prefixes=PrefixIndex(texts), class_bits=bits, starts_alnum=starts_alnum,
                  ends_alnum=ends_alnum, skip_bos=a.skip_bos, batch_tokens=a.batch_tokens, device=device,
                  progress=progress)
    choose_rows, score_rows = split_ranges(store.n_contexts, store.ctx_len, a.label_tokens)
    t0 = time.perf_counter()
    choose = encode_split("choose", store, encode, choose_rows, **common)
    t1 = time.perf_counter()
    score = encode_split("score", store, encode, score_rows, **common)
    t2 = time.perf_counter()
    return LabelData(choose, score, tokens.reshape(-1), cache_dir, {"choose": t1 - t0, "score": t2 - t1})
