"""Parity: what the exported files compute against PyTorch (and against the pages), on held-out
token contexts, run by Python onnxruntime as the browser runs onnxruntime-web: the trunk file
once per context, then each SAE's encoder file on the residual at its hook (`run_split`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from atlas.export.tracing import RESIDUAL_INPUT, Encoded, max_tokens, residual_name

FALLBACK_TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "The quick brown fox jumps over the lazy dog.\nIt was a sunny day, and everyone was happy.",
    "def add(a, b):\n    return a + b  # numbers, 12345 and 3.14159",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "\"Can I have some cake?\" asked Tom. His mother smiled and said, \"Yes, after dinner!\"",
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes it boils at lower temperatures.",
    "Café, naïve, résumé — unicode text with accents, and an emoji 🙂 too.",
    "The Federal Reserve raised interest rates by a quarter of a percentage point on Wednesday.",
]


def frequent_tokens(cfg) -> np.ndarray | None:
    """Token ids by falling frequency in the store's training contexts (the parity contexts are
    the held-out ones, so the web file is not tuned to them); None without a store."""
    store = cfg.store_path
    if not store.exists():
        return None
    import h5py

    with h5py.File(store, "r") as f:
        n_train = len(f["tokens"]) - int(f.attrs.get("n_eval_contexts", 0))
        tokens = np.asarray(f["tokens"][:max(n_train, 0)]).ravel()
    counts = np.bincount(tokens) if tokens.size else np.zeros(0, np.int64)
    return np.argsort(-counts, kind="stable")[:int((counts > 0).sum())]


def parity_contexts(cfg, loaded) -> list[list[int]]:
    """Held-out token contexts: the store's last (eval) contexts when a store exists, else texts."""
    n = cfg.export.parity_texts
    store = cfg.store_path
    if store.exists():
        import h5py

        with h5py.File(store, "r") as f:
            tokens = f["tokens"]
            return [list(map(int, row)) for row in tokens[max(0, len(tokens) - n):]]
    texts = _corpus_texts(cfg, n) or FALLBACK_TEXTS[:n]
    return [encode_with_bos(loaded, t, min(cfg.corpus.ctx_len, max_tokens(loaded))) for t in texts]


class PagesReference(NamedTuple):
    """What the pages show for the store's last contexts: the SAE on the stored activations
    (float16 when the store is), not a fresh float32 forward."""

    contexts: list[list[int]]
    """The contexts' token ids."""
    best: np.ndarray
    """int64 [n_tokens]: each token's strongest latent."""
    shown: np.ndarray
    """bool [n_tokens]: tokens a page can show: some latent fires, and not BOS when the pages skip it."""


def pages_reference(store_path: Path, sae: nn.Module, n_contexts: int, skip_bos: bool,
                    acts_key: str = "acts") -> PagesReference:
    """The pages' strongest latent on each token of the store's last `n_contexts` contexts, from
    the store's dataset `acts_key` (the SAE's hook)."""
    import h5py

    contexts, best, shown = [], [], []
    with h5py.File(store_path, "r") as f, torch.no_grad():
        tokens, L = f["tokens"], int(f.attrs["ctx_len"])
        for c in range(max(0, len(tokens) - n_contexts), len(tokens)):
            dense = sae.encode(torch.from_numpy(np.asarray(f[acts_key][c * L:(c + 1) * L], np.float32)))
            fires = (dense > 0).any(-1).numpy()
            fires[0] &= not skip_bos
            contexts.append([int(t) for t in tokens[c]])
            best.append(dense.argmax(-1).numpy())
            shown.append(fires)
    return PagesReference(contexts, np.concatenate(best), np.concatenate(shown))


def pages_top1(pages: PagesReference, got: Encoded) -> float:
    """Share of the tokens a page can show whose strongest latent in `got` is the pages'."""
    same = (got.top_ids[:, 0] == pages.best) & (got.top_acts[:, 0] > 0)
    return float(same[pages.shown].sum() / max(int(pages.shown.sum()), 1))


def pages_agreement(trunk: Path, encoder: Path, layer: int, store_path: Path, sae: nn.Module, n_contexts: int,
                    skip_bos: bool, acts_key: str = "acts") -> float:
    """`pages_top1` of the ONNX files `trunk` + `encoder` (at `layer`) on the store's last
    `n_contexts` contexts."""
    pages = pages_reference(store_path, sae, n_contexts, skip_bos, acts_key)
    trunk_sess, enc = session(trunk), session(encoder)
    return pages_top1(pages, _concat([run_split(trunk_sess, enc, layer, ids) for ids in pages.contexts]))


def encode_with_bos(loaded, text: str, max_len: int) -> list[int]:
    """What the browser does: BOS, then the text's tokens without special-token handling, truncated."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([loaded.bos_token_id] + ids)[:max_len]


def _corpus_texts(cfg, n: int) -> list[str]:
    path = Path(cfg.corpus.dataset)
    if not path.is_file():
        return []
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return [json.loads(line)[cfg.corpus.text_field] for line in lines[-n:] if line.strip()]
    if path.suffix == ".txt":
        return [p for p in path.read_text().split("\n\n") if p.strip()][-n:]
    return []


def _concat(parts: list[Encoded]) -> Encoded:
    return Encoded(*(np.concatenate(x) for x in zip(*parts)))


def torch_outputs(graph: nn.Module, contexts: list[list[int]]) -> Encoded:
    """What PyTorch computes for each context, concatenated over the tokens."""
    with torch.no_grad():
        return _concat([Encoded(*(t[0].numpy() for t in graph(torch.tensor([ids], dtype=torch.int32))))
                        for ids in contexts])


def check_split(trunk: Path, encoders: dict[str, tuple[Path, int]], contexts: list[list[int]],
                references: dict[str, Encoded], pages: dict[str, PagesReference | None] | None = None) -> dict[str, dict]:
    """`compare` of each SAE's files -- the trunk file at `trunk`, then its encoder file, from
    `encoders`: id -> (path, layer) -- run by Python onnxruntime, with PyTorch's `references[id]`;
    with `pages[id]` (for the same contexts) also `pages_top1_agreement`. The trunk runs once per
    context for all SAEs, as in the browser."""
    t0 = time.time()
    trunk_sess = session(trunk)
    resids = [trunk_outputs(trunk_sess, ids) for ids in contexts]
    trunk_seconds = time.time() - t0
    report = {}
    for sae_id, (path, layer) in encoders.items():
        enc = session(path)
        t0 = time.time()
        got = _concat([encoder_outputs(enc, r[residual_name(layer)]) for r in resids])
        r = report[sae_id] = compare(references[sae_id], got)
        r["seconds"] = round(trunk_seconds + time.time() - t0, 3)
        if pages and pages.get(sae_id) is not None:
            r["pages_top1_agreement"] = pages_top1(pages[sae_id], got)
    return report


def compare(ref: Encoded, got: Encoded, tol: float = 1e-4) -> dict:
    """Per-token agreement of `got` with the reference, both over n tokens ([n, k] and [n]).

    ids_match: share of ranks with the reference's id. A rank whose reference value is within `tol`
    (relative to the token's largest activation) of a neighbouring rank is a near-tie: its id may
    legitimately swap, so it is not counted; ranks with zero activation carry no id and are not
    counted either. top1_agreement: tokens whose strongest latent is the reference's (over tokens
    with an active latent). topk_overlap: the share of the reference's active top-k ids that `got`
    has among its active top k, averaged over tokens. n_active_match: tokens with the same active count.
    """
    ref_ids, ref_acts = ref.top_ids, ref.top_acts
    scale = np.maximum(np.abs(ref_acts).max(axis=1, keepdims=True), 1e-6)
    rel = np.abs(got.top_acts - ref_acts) / scale
    gaps = np.abs(np.diff(ref_acts, axis=1)) / scale
    tie = np.zeros_like(ref_acts, dtype=bool)
    tie[:, 1:] |= gaps < tol
    tie[:, :-1] |= gaps < tol
    counted = (ref_acts > 0) & ~tie
    ids_match = float((got.top_ids == ref_ids)[counted].mean()) if counted.any() else 1.0
    overlap = [len(set(a[r > 0]) & set(b[g > 0])) / max(1, int((r > 0).sum()))
               for a, r, b, g in zip(ref_ids, ref_acts, got.top_ids, got.top_acts)]
    active = ref_acts[:, 0] > 0
    top1 = float((got.top_ids[:, 0] == ref_ids[:, 0])[active].mean()) if active.any() else 1.0
    return {"n_tokens": int(len(ref_ids)), "k": int(ref_ids.shape[1]), "ids_match": ids_match,
            "max_rel_err": float(rel.max()), "mean_rel_err": float(rel.mean()), "top1_agreement": top1,
            "topk_overlap": float(np.mean(overlap)), "n_active_match": float((got.n_active == ref.n_active).mean()),
            "n_active_mean_abs_err": float(np.abs(got.n_active.astype(np.int64) - ref.n_active).mean()),
            "n_active_max_err": int(np.abs(got.n_active.astype(np.int64) - ref.n_active).max(initial=0))}


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def trunk_outputs(sess, ids: list[int]) -> dict[str, np.ndarray]:
    """The trunk file's residuals for one token sequence (batch of one): output name -> [1, seq, d_model]."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input_ids": np.asarray([ids], dtype=np.int32)})))


def encoder_outputs(sess, resid: np.ndarray) -> Encoded:
    """An encoder file's outputs for one residual [1, seq, d_model] (leading dims [seq])."""
    out = sess.run(list(Encoded._fields), {RESIDUAL_INPUT: resid})
    return Encoded(*(o[0] for o in out))


def run_split(trunk_sess, encoder_sess, layer: int, ids: list[int]) -> Encoded:
    """What the browser computes for one token sequence and one SAE: the trunk, then the encoder
    on the residual at `layer` (leading dims [seq])."""
    return encoder_outputs(encoder_sess, trunk_outputs(trunk_sess, ids)[residual_name(layer)])
