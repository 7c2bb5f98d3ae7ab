"""Benchmark: `atlas analyze` streaming throughput versus the SAE encoder matmul alone.

    python tests/bench/bench_analyze.py [n_tokens] [--umap]   # default 262,144 tokens (32 batches)

A TopK SAE (d_in 768, d_sae 24,576, k 32) with random weights, on random activations held in
memory (so disk speed is not measured). Both sides see the same batches on the same machine in
one run: the peer is `(x - b_dec) @ W_enc + b_enc` per batch, timed before and after the
analysis and averaged (both are kept in the JSON, with process CPU times, which a shared
machine disturbs less than wall time); analysis is the three streaming
passes of atlas.analyze (encode + statistics + top-k + spill, histograms + interval reservoirs,
example windows). The per-feature work after streaming (logit effects against a 50,257-token
W_U, decoder neighbours, the PCA map, writing shards) does not grow with the tokens and is
timed separately; with --umap so is the UMAP map of the 24,576 decoder rows. Peak memory is
the process' max RSS. Writes runs/bench/analyze.json ({title, columns, rows, notes}, raw numbers
under details).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atlas import analyze
from atlas.config import AnalyzeConfig, SAEConfig
from atlas.saes import build_sae

D_IN, D_SAE, K, VOCAB, CTX = 768, 24576, 32, 50257, 128


class MemoryStore:
    """The part of ActivationStore that analysis reads, over a tensor in memory."""

    def __init__(self, acts: torch.Tensor, ctx_len: int):
        self.acts, self.ctx_len = acts, ctx_len
        self.n_tokens = acts.shape[0]
        self.n_contexts = self.n_tokens // ctx_len
        self.tokens = np.random.default_rng(0).integers(0, VOCAB, (self.n_contexts, ctx_len), dtype=np.int32)

    def iter_batches(self, batch_tokens, rows=None):
        rows = rows if rows is not None else range(self.n_tokens)
        for s in range(rows.start, rows.stop, batch_tokens):
            yield s, self.acts[s:min(s + batch_tokens, rows.stop)]


def main(n_tokens: int = 262144, with_umap: bool = False) -> dict:
    torch.manual_seed(0)
    n_tokens -= n_tokens % CTX
    sae = build_sae(SAEConfig(architecture="topk", d_sae=D_SAE, k=K), D_IN).eval().requires_grad_(False)
    acts = torch.randn(n_tokens, D_IN) * 3
    store = MemoryStore(acts, CTX)
    a = AnalyzeConfig(map_method="pca")
    batches = [x for _, x in store.iter_batches(a.batch_tokens)]

    def matmul_seconds() -> tuple[float, float]:
        with torch.inference_mode():
            sae.encode_pre(batches[0][:256])  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            for x in batches:
                sae.encode_pre(x)
            return time.perf_counter() - t0, time.process_time() - c0

    t_before, c_before = matmul_seconds()

    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        res = analyze.analyze_stream(store, analyze.sparse_encoder(sae), D_SAE, a, Path(tmp) / "partial", "bench")
        t_stream, c_stream = time.perf_counter() - t0, time.process_time() - c0
        t_after, c_after = matmul_seconds()  # the peer before and after: load drift shows, and averages out
        t_matmul, c_matmul = (t_before + t_after) / 2, (c_before + c_after) / 2
        w_u = torch.randn(D_IN, VOCAB) / D_IN ** 0.5
        vocab = [f"t{i}" for i in range(VOCAB)]
        out = Path(tmp) / "features"
        out.mkdir()
        t0 = time.perf_counter()
        manifest = analyze.write_features(out, res, sae.W_dec.detach(), w_u, vocab, a, store.tokens)
        t_post = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.iterdir())

    t_umap = None
    if with_umap:  # the default map of a real run; timed apart, it does not depend on the tokens
        from atlas.featuremap import map_coordinates

        t0 = time.perf_counter()
        map_coordinates(sae.W_dec.detach(), "umap", 0)
        t_umap = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "n_tokens": n_tokens, "d_in": D_IN, "d_sae": D_SAE, "k": K, "batch_tokens": a.batch_tokens,
        "device": "cpu", "threads": torch.get_num_threads(),
        "matmul_tok_s": n_tokens / t_matmul, "analyze_tok_s": n_tokens / t_stream,
        "ratio": t_matmul / t_stream, "stream_s": t_stream, "matmul_s": t_matmul,
        "matmul_before_s": t_before, "matmul_after_s": t_after,
        "cpu_ratio": c_matmul / c_stream, "stream_cpu_s": c_stream, "matmul_cpu_s": c_matmul,
        "matmul_cpu_before_s": c_before, "matmul_cpu_after_s": c_after,
        "pass_s": {k: round(v, 2) for k, v in res.seconds.items()},
        "per_feature_s": t_post, "per_feature_postprocess_s": manifest["postprocess_seconds"],
        "umap_s": t_umap, "peak_rss_gb": peak_gb, "features_mb": size / 2**20, "n_examples": manifest["n_examples"],
    }
    ps = result["pass_s"]
    table = {
        "title": f"Analysis (TopK SAE d_in {D_IN}, d_sae {D_SAE:,}, k {K}; {n_tokens:,} random tokens in memory, CPU, "
                 f"{result['threads']} threads)",
        "columns": ["measure", "ours", "peer", "ratio", "goal"],
        "rows": [
            ["atlas analyze streaming passes vs SAE encoder matmul alone, tok/s by CPU time",
             f"{n_tokens / c_stream:,.0f}", f"{n_tokens / c_matmul:,.0f}", f"{result['cpu_ratio']:.2f}×", "≥ 0.7×"],
            ["the same, tok/s by wall time", f"{result['analyze_tok_s']:,.0f}", f"{result['matmul_tok_s']:,.0f}",
             f"{result['ratio']:.2f}×", "≥ 0.7×"],
            ["passes, wall s: encode / sample / windows",
             f"{ps.get('encode', 0):.1f} / {ps.get('sample', 0):.1f} / {ps.get('windows', 0):.1f}",
             f"{t_matmul:.1f} (matmul)", "", ""],
            ["per-feature stage (logits, neighbours, PCA map, shards), s", f"{t_post:.1f}", "", "", "fixed in tokens"],
            *([["UMAP map of the decoder rows, s", f"{t_umap:.1f}", "", "", ""]] if t_umap is not None else []),
            ["peak memory (max RSS), GB", f"{peak_gb:.2f}", "", "", ""],
            ["features/ size, MB", f"{size / 2**20:.1f}", "", "", ""],
        ],
        "notes": (f"Peer: `(x - b_dec) @ W_enc + b_enc` per {a.batch_tokens:,}-token batch, timed before and after the "
                  f"analysis and averaged ({t_before:.1f} s / {t_after:.1f} s wall). CPU time (process time) is "
                  "the fairer ratio on a shared machine; wall time is reported too."),
        "details": result,
    }
    print(json.dumps(table["rows"], indent=1, ensure_ascii=False))
    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    Path("runs/bench/analyze.json").write_text(json.dumps(table, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--umap"]
    main(int(args[0]) if args else 262144, "--umap" in sys.argv)
