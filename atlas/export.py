"""`atlas export`: the model's blocks up to the hook plus the SAE encoder as one ONNX graph.

    input_ids int32 [batch, seq]  ->  top_ids   int32   [batch, seq, k]   the k strongest latents, strongest first
                                      top_acts  float32 [batch, seq, k]   their activations
                                      n_active  int32   [batch, seq]      how many of all d_sae latents are > 0

The browser sees only the top k; `n_active` tells it whether a latent missing from them may still
fire (ReLU, JumpReLU and BatchTopK SAEs can have more than k active latents on a token).

`runs/X/onnx/` holds (written atomically, stamped like every stage):

- `encoder.onnx` — full precision, for checks (weights over 95 MB are split, see `_save`);
- `encoder.web.onnx` — the file the browser runs with onnxruntime-web's wasm backend. Only
  weights are quantised (`export.quantization`, see `QUANTIZATIONS` and `quantize`); activations
  stay float32. Real language models carry a few residual dimensions with huge ("massive")
  activations (SmolLM2-135M: ~22,000 in one dimension on the first token, ~1,600 and ~800 in two
  others on every token, against ~1 elsewhere); dynamic int8 quantisation of activations, one
  scale per tensor, rounds everything else to zero there (top-1 agreement with PyTorch 0.03);
- `tokenizer.json` — the model's own fast tokenizer;
- `model.json` — what the browser needs to know (inputs, outputs, BOS, max length); its "files"
  are exactly the files the browser downloads (the site copies those and nothing else), their
  sizes in "bytes" and the sum in "total_bytes";
- `parity.json` — the full-precision file and every web mode tried against PyTorch on held-out
  contexts (`parity`). A web file must agree with PyTorch on the top-1 latent of at least
  `export.min_top1_agreement` of the tokens and share `export.min_topk_overlap` of their top-k
  ids (the gate, `passes`); below that the analyser would often show other features than the
  pages describe. `export.quantization: auto` keeps the smallest mode that passes.

The web download should stay within `WEB_BUDGET_BYTES` (100 MB): a larger one is reported
with a warning, not an error, since models legitimately differ in size.

No file is over 95 MB (GitHub's limit is 100 MB): a larger initializer is cut into row blocks
joined by a Concat node, and weights go to external-data files of at most 90 MB each.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.stage import (atomic_dir, fingerprint, input_digest, is_current, require_finite, rerun, sae_digest,
                         source_digest)

MAX_FILE_BYTES = 90 * 2**20
"""Largest file written (below GitHub's 100 MB hard limit and the 95 MB the design allows)."""
MIN_EXPORT_OPSET = 18
"""torch.onnx's dynamo exporter emits opset 18 ops (e.g. Split with num_outputs)."""
EMBED_BLOCK = 64
"""Block length (along d_model) of the quantised token-embedding table: one float16 scale and one
zero point per 64 values."""
RARE_EMBED_BLOCK = 128
"""The same for the 4-bit rows of the rare tokens (mode w8-emb4): 0.16 bits/value of overhead.
Block 64 is a little more faithful (SmolLM2-135M layer 11: top-1 agreement +0.002) but costs
GPT-2 Small 0.7 MB, which puts GPT-2 Small to layer 8 + 24,576 latents over 100 MB."""
FREQUENT_TOKENS = 2048
"""In mode w8-emb4, the rows of the corpus's this many most frequent tokens stay at 8 bits. A
4-bit embedding row adds noise that the blocks up to the hook amplify: on SmolLM2-135M, layer 11,
an all-4-bit table costs 5 points of top-1 agreement with PyTorch (0.95), and 8 bits for the
2,048 most frequent tokens (90% of the demo corpus) win back 3.5 of them, for 0.4 bytes a value
on 4% of the rows. At most 1/`FREQUENT_SHARE` of the vocabulary, so the mode stays small for small
vocabularies too."""
FREQUENT_SHARE = 16
WEIGHT_BLOCK = 32
"""Block length (along the input dimension) of 8-bit MatMul weights in mode w8: one float16 scale
and one zero point per 32 values (0.75 bits/value). SmolLM2-135M, layer 25: top-1 agreement 0.971
with one scale per output column, 0.980 with blocks of 32."""


@dataclass(frozen=True)
class Quantization:
    """How the web file stores its weights. Activations are never quantised, and every MatMul
    weight is 8-bit, dequantised once when the session opens (`quantize`)."""

    embedding_bits: int
    """The token-embedding table, 4 or 8 bits, behind GatherBlockQuantized (reads only the prompt's rows)."""
    frequent_tokens: int
    """With a 4-bit table: how many of the corpus's most frequent tokens keep 8-bit rows."""
    weight_block: int
    """MatMul weights: one scale per this many input rows of each output column (0: per column)."""


QUANTIZATIONS = {
    "w8-emb4": Quantization(embedding_bits=4, frequent_tokens=FREQUENT_TOKENS, weight_block=0),
    "w8": Quantization(embedding_bits=8, frequent_tokens=0, weight_block=WEIGHT_BLOCK),
}
"""Web modes, smallest first; `auto` tries them in this order. w8-emb4 is what fits GPT-2 Small to
layer 8 + 24,576 latents in 100 MB (4 bits for the rare tokens' embedding rows, the cheapest
place: measured on SmolLM2-135M, 4-bit MatMul blocks or a 4-bit SAE encoder cost more agreement);
w8 is the faithful one, for models whose SAE the 4-bit rows still move too much (see README)."""
AUTO = "auto"
WEB_BUDGET_BYTES = 100_000_000
"""The web download a visitor should not exceed (GPT-2 Small to layer 8 + a 24,576-latent SAE fits)."""
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


class Encoded(NamedTuple):
    """The graph's outputs for one or more token sequences (leading dims [..., seq])."""

    top_ids: np.ndarray
    """int32 [..., k]: the k strongest latents of each token, strongest first."""
    top_acts: np.ndarray
    """float32 [..., k]: their activations (0 past the active ones)."""
    n_active: np.ndarray
    """int32 [...]: how many latents have activation > 0, over all d_sae."""


class EncoderGraph(nn.Module):
    """What the ONNX file computes: token ids -> residual before block L -> SAE -> top-k latents
    and the number of active latents."""

    def __init__(self, truncated: nn.Module, sae: nn.Module, top_k: int):
        super().__init__()
        self.truncated = truncated
        self.sae = sae
        self.top_k = top_k

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        resid = self.truncated(input_ids.long()).to(self.sae.W_enc.dtype)
        if getattr(self.sae, "architecture", "") == "topk":
            # At most sae.k latents are active: count them among the top max(k, sae.k), with no
            # dense [seq, d_sae] scatter in the graph.
            acts, ids = self.sae.encode_topk(resid, max(self.top_k, int(self.sae.k)))
            n_active = (acts > 0).sum(-1)
            acts, ids = acts[..., :self.top_k], ids[..., :self.top_k]
        else:
            dense = self.sae.encode(resid)
            acts, ids = dense.topk(self.top_k, dim=-1)
            n_active = (dense > 0).sum(-1)
        return ids.to(torch.int32), acts.float(), n_active.to(torch.int32)


def run(cfg, force: bool = False) -> Path:
    """Export `runs/X/onnx/` from the run's model and `sae/`; skipped when already current."""
    from atlas.saes import load_sae

    out = cfg.run_dir / "onnx"
    sae_dir, store = cfg.run_dir / "sae", cfg.run_dir / "activations.h5"
    inputs = {"sae": sae_digest(cfg), "model": source_digest(cfg.model.name),
              # the parity report's contexts: the store's held-out ones, else corpus texts
              "parity": input_digest(store, "collect", cfg) if store.exists() else source_digest(cfg.corpus.dataset)}
    fp = fingerprint(cfg.section_hash("export", "model"), *inputs.values())
    if not force and is_current(out, fp):
        print(f"export: {out} is up to date")
        return out
    sae = load_sae(sae_dir).float().eval().requires_grad_(False)
    require_finite(sae.state_dict(), sae_dir / "sae_weights.safetensors",
                   f"run `{rerun('train', cfg)} --force` to retrain it, or import a finite SAE")
    from atlas.model import check_layer, load_model

    loaded = load_model(cfg.model.name, cfg.model.revision, device="cpu", dtype="float32",
                        gguf_file=cfg.model.gguf_file)
    check_layer(cfg.path, cfg.model.layer, loaded)
    with atomic_dir(out, fp, stage="export", inputs=inputs, rerun=rerun("export", cfg)) as tmp:
        contexts = parity_contexts(cfg, loaded)
        report = export_dir(tmp, loaded, sae, cfg, fp, contexts, frequent_tokens(cfg))
        if store.exists():
            report["web"]["pages_top1_agreement"] = agreement = pages_agreement(tmp / "encoder.web.onnx", store, sae,
                                                                                len(contexts), cfg.analyze.skip_bos)
            (tmp / "parity.json").write_text(json.dumps(report, indent=2))
            print(f"export: the web file's strongest feature is the pages' (the SAE on the stored activations) "
                  f"on {agreement:.1%} of the held-out tokens")
    print(f"export: wrote {out}")
    return out


def export_dir(out: Path, loaded, sae: nn.Module, cfg, fp: str, contexts: list[list[int]],
               frequent: np.ndarray | None = None) -> dict:
    """Write every file of `onnx/` into `out`; return the parity report. `frequent`: token ids by
    falling corpus frequency (`frequent_tokens`), for the web file's embedding table."""
    out = Path(out)
    ex = cfg.export
    top_k = min(ex.top_k, int(sae.W_enc.shape[1]))
    graph = EncoderGraph(loaded.truncated(cfg.model.layer), sae, top_k).eval()
    max_len = max_tokens(loaded)

    t0 = time.time()
    model = _to_onnx(graph, max_len, max(ex.opset, MIN_EXPORT_OPSET))
    _gemm_to_matmul(model)
    _save(model, out / "encoder.onnx")
    loaded.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    print(f"export: traced and saved encoder.onnx in {time.time() - t0:.1f}s")

    reference = torch_outputs(graph, contexts)
    report = {"n_contexts": len(contexts), "n_tokens": int(len(reference.top_ids)),
              "gate": {"min_top1_agreement": ex.min_top1_agreement, "min_topk_overlap": ex.min_topk_overlap},
              "full": check_file(out / "encoder.onnx", contexts, reference)}
    full = report["full"]
    # n_active: float rounding may flip latents that sit at 0 (a ReLU SAE with 24,576 latents has
    # some on most tokens), so the count may differ by a latent or two per thousand active
    n_active_tol = 1 + 1e-3 * float(reference.n_active.max(initial=0))
    full["ok"] = full["ids_match"] >= 0.999 and full["max_rel_err"] <= 1e-4 and full["n_active_max_err"] <= n_active_tol
    if not full["ok"]:
        raise AtlasError(f"{out}/encoder.onnx: full-precision ONNX disagrees with PyTorch (ids match "
                         f"{full['ids_match']:.4f}, max rel err {full['max_rel_err']:.2e}, n_active off by up to "
                         f"{full['n_active_max_err']}); this is a bug in the export, please report it")
    mode, web_files, report["modes"] = write_web_file(model, out, contexts, reference, ex, frequent)
    report["requested"], report["quantization"] = ex.quantization, mode
    report["web"] = report["modes"][mode]
    del model

    meta = {
        "format": 1,
        "fingerprint": fp,
        "model": loaded.name,
        "revision": loaded.revision,
        "layer": cfg.model.layer,
        "hook": cfg.hook_name,
        "d_model": loaded.d_model,
        "d_sae": int(sae.W_enc.shape[1]),
        "architecture": cfg.sae.architecture,
        "top_k": top_k,
        "max_tokens": max_len,
        "bos_token_id": loaded.bos_token_id,
        "prepend_bos": True,
        "quantization": mode,
        "input": {"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]},
        "outputs": {"ids": "top_ids", "acts": "top_acts", "n_active": "n_active"},
        "onnx": "encoder.web.onnx",
        "external_data": web_files[1:],
        "tokenizer": "tokenizer.json",
        "files": web_files + ["tokenizer.json"],
    }
    meta["bytes"] = {f: (out / f).stat().st_size for f in meta["files"]}
    meta["total_bytes"] = sum(meta["bytes"].values())
    meta["budget_bytes"] = WEB_BUDGET_BYTES
    (out / "model.json").write_text(json.dumps(meta, indent=2))

    report["total_bytes"] = report["web_bytes"] = meta["total_bytes"]
    report["budget_bytes"] = WEB_BUDGET_BYTES
    report["within_budget"] = meta["total_bytes"] <= WEB_BUDGET_BYTES
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    print(f"export: full precision matches PyTorch (ids {full['ids_match']:.4f}, rel err {full['max_rel_err']:.1e}); "
          f"web file {mode}: top-1 {report['web']['top1_agreement']:.3f}, overlap {report['web']['topk_overlap']:.3f}, "
          f"download {meta['total_bytes'] / 1e6:.1f} MB")
    if not report["within_budget"]:
        print(f"export: WARNING: the web download is {meta['total_bytes'] / 1e6:.1f} MB, over the "
              f"{WEB_BUDGET_BYTES / 1e6:.0f} MB budget ({mode}; "
              f"{', '.join(f'{f} {b / 1e6:.1f} MB' for f, b in meta['bytes'].items())})")
    return report


def write_web_file(model, out: Path, contexts: list[list[int]], reference: Encoded, ex,
                   frequent: np.ndarray | None = None) -> tuple[str, list[str], dict]:
    """Write `encoder.web.onnx` in mode `ex.quantization`, or for "auto" in the smallest mode that
    passes the gate. Returns the mode, its files and the parity figures of every mode tried.

    A named mode that fails the gate stops the export; the modes after it are tried so that the
    message can name one that passes."""
    modes = list(QUANTIZATIONS)
    first = 0 if ex.quantization == AUTO else modes.index(ex.quantization)
    tokenizer_bytes = (out / "tokenizer.json").stat().st_size
    tried: dict[str, dict] = {}
    for mode in modes[first:]:
        t0 = time.time()
        files = _save(quantize(model, mode, frequent), out / "encoder.web.onnx")
        r = tried[mode] = check_file(out / "encoder.web.onnx", contexts, reference)
        r["bytes"] = sum((out / f).stat().st_size for f in files) + tokenizer_bytes
        r["ok"] = passes(r, ex)
        print(f"export: web file {mode}: top-1 {r['top1_agreement']:.3f}, top-k overlap {r['topk_overlap']:.3f}, "
              f"{r['bytes'] / 1e6:.1f} MB: {'passes' if r['ok'] else 'fails'} the gate ({time.time() - t0:.1f}s)")
        if r["ok"] and ex.quantization in (AUTO, mode):
            return mode, files, tried
        for f in files:
            (out / f).unlink()
        if r["ok"]:
            raise AtlasError(f"export.quantization = {ex.quantization}: {_shortfall(tried[ex.quantization], ex)} "
                             f"on {len(reference.top_ids):,} held-out tokens; {mode} passes (top-1 "
                             f"{r['top1_agreement']:.3f}, overlap {r['topk_overlap']:.3f}, {r['bytes'] / 1e6:.1f} MB): "
                             f"set export.quantization to {mode} or {AUTO}")
    raise AtlasError(f"export.quantization = {ex.quantization}: no web mode passes the gate on "
                     f"{len(reference.top_ids):,} held-out tokens ("
                     f"{'; '.join(f'{m}: {_shortfall(r, ex)}' for m, r in tried.items())}); the SAE is unusually "
                     f"sensitive to weight rounding: lower export.min_top1_agreement / export.min_topk_overlap "
                     f"to publish it anyway")


def passes(r: dict, ex) -> bool:
    """The gate a web file must pass (see the module docstring)."""
    return r["top1_agreement"] >= ex.min_top1_agreement and r["topk_overlap"] >= ex.min_topk_overlap


def _shortfall(r: dict, ex) -> str:
    return (f"top-1 agreement {r['top1_agreement']:.3f} (export.min_top1_agreement {ex.min_top1_agreement}), "
            f"top-k overlap {r['topk_overlap']:.3f} (export.min_topk_overlap {ex.min_topk_overlap})")


def max_tokens(loaded) -> int:
    c = loaded.model.config
    return int(getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None) or 512)


# ---------------------------------------------------------------- tracing


def _to_onnx(graph: nn.Module, max_len: int, opset: int):
    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = torch.zeros((1, min(8, max_len)), dtype=torch.int32)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=opset, input_names=["input_ids"],
            output_names=list(Encoded._fields), dynamic_shapes=({0: torch.export.Dim("batch", max=64), 1: seq},),
            verbose=False, optimize=True,
        )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=False)
    return model


def _gemm_to_matmul(model) -> None:
    """Gemm(A, W, C) with a constant W -> MatMul(A, W) + Add(C), which the weight quantisers handle."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = inits[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        mm = node.output[0] + "_mm" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mm], name=node.name + "_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [mm, node.input[2]], [node.output[0]], name=node.name + "_add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)


# ---------------------------------------------------------------- quantisation


def quantize(model, mode: str, frequent: np.ndarray | None = None):
    """The web file for `mode` (a copy of `model`): the token-embedding table in
    `QUANTIZATIONS[mode].embedding_bits` bits behind GatherBlockQuantized (4-bit tables keep the
    rows of the first `frequent_tokens` ids of `frequent`, token ids by falling corpus frequency,
    at 8 bits), every other constant
    MatMul weight or gathered table (positions) in 8 bits.

    Those weights are stored as integers plus a few constant nodes that rebuild the float matrix:
    onnxruntime folds constant nodes when a session opens (Python and the browser alike), so they
    are dequantised once, every MatMul then runs in float32 on float activations, and Python
    onnxruntime computes what the browser computes. (MatMulNBits would dequantise on every call in
    the browser, whose wasm build has no packed kernels for it, and at accuracy_level 4 Python
    would quantise activations to int8 where the browser does not; DequantizeLinear is not folded.)"""
    import onnx

    if mode not in QUANTIZATIONS:
        raise AtlasError(f"export.quantization = {mode!r}: must be {AUTO} or one of {', '.join(QUANTIZATIONS)}")
    q = QUANTIZATIONS[mode]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    keep = np.zeros(0, np.int64)
    if q.embedding_bits == 4 and q.frequent_tokens:
        keep = np.asarray(frequent if frequent is not None else (), np.int64)[:q.frequent_tokens]
    _quantize_embedding(model, q.embedding_bits, keep)  # first: its table then no longer feeds a Gather
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    weights |= {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    for name in weights:
        t = inits[name]
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            _dequantize_at_load(model, t, q.weight_block)
    onnx.checker.check_model(model)
    return model


def quantize_blocks(w: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blockwise quantisation of a [rows, cols] matrix along its rows:
    value = (q - zp) * scale, q and zp in [0, 2**bits - 1], one float16 scale and one zero point
    per `block` values of a row; 0 stays exact.

    Returns q uint8 [rows, cols], scale float16 [rows, n_blocks], zp uint8 [rows, n_blocks].
    """
    levels = 2**bits - 1
    rows, cols = w.shape
    n_blocks = -(-cols // block)
    padded = np.zeros((rows, n_blocks * block), np.float32)
    padded[:, :cols] = w
    padded[:, cols:] = w[:, -1:] if cols % block else 0  # pad with a value already in the block's range
    b = padded.reshape(rows, n_blocks, block)
    lo, hi = np.minimum(b.min(axis=2), 0), np.maximum(b.max(axis=2), 0)
    scale = ((hi - lo) / levels).astype(np.float16)  # rounded first: the values are quantised with it
    scale[scale == 0] = 1.0
    scale32 = scale.astype(np.float32)
    zp = np.clip(np.round(-lo / scale32), 0, levels).astype(np.uint8)
    q = np.clip(np.round(b / scale32[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
    return q.reshape(rows, -1)[:, :cols], scale, zp


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int) -> np.ndarray:
    """The inverse of `quantize_blocks`, in float32."""
    blk = np.arange(q.shape[1]) // block
    return (q.astype(np.float32) - zp[:, blk]) * scale[:, blk].astype(np.float32)


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 values < 16, [rows, cols] -> [rows, ceil(cols/2)], element 2j in the low nibble."""
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), np.uint8)], axis=1)
    return a[:, 0::2] | (a[:, 1::2] << 4)


def quantize_table(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [rows, cols] table in 4 or 8 bits along its rows, laid out the way GatherBlockQuantized
    reads it: data uint8 [rows, cols] (4 bits: [rows, cols/2], element 2j in the low nibble),
    scales float16 [rows, n_blocks], zero points uint8 [rows, n_blocks] (4 bits: packed the same way)."""
    q, scale, zp = quantize_blocks(w, block, bits)
    return (_pack_nibbles(q), scale, _pack_nibbles(zp)) if bits == 4 else (q, scale, zp)


def dequantize_table(data: np.ndarray, scale: np.ndarray, zps: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The inverse of `quantize_table`: what GatherBlockQuantized computes per gathered row (float16)."""
    if bits == 4:
        rows = data.shape[0]
        data = np.stack([data & 15, data >> 4], axis=2).reshape(rows, -1)
        zps = np.stack([zps & 15, zps >> 4], axis=2).reshape(rows, -1)[:, :scale.shape[1]]
    return dequantize_blocks(data, scale, zps, block).astype(np.float16).astype(np.float32)


def dequantized_weight(w: np.ndarray, block: int) -> np.ndarray:
    """The float matrix the web file's nodes rebuild from weight `w` [k, n] (numpy, for checks)."""
    block = block or w.shape[0]
    return dequantize_blocks(*quantize_blocks(w.T, block, 8), block).T


def _dequantize_at_load(model, init, block: int) -> None:
    """Replace float initializer `init` [k, n] by its 8-bit copy (blocks of `block` along k per
    column, 0: one block per column) and the constant nodes that rebuild it under its name:
    (q - zp) * scale per block, reshaped to [k, n] (no transpose: it is the slowest step to fold)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.to_array(init)
    k, n = w.shape
    block = block if block and k % block == 0 else k
    q, scale, zp = quantize_blocks(w.T, block, 8)  # blocks along k, per output column
    nb = k // block
    name = init.name
    p = name + "_q"  # every new tensor and node is named after the weight
    consts = {p + "_int": q.T.reshape(nb, block, n), p + "_scale": scale.T.reshape(nb, 1, n),
              p + "_zp": zp.T.reshape(nb, 1, n), p + "_shape": np.array([k, n], np.int64)}
    nodes = [
        helper.make_node("Cast", [p + "_int"], [p + "_f"], to=TensorProto.FLOAT, name=p + "_cast"),
        helper.make_node("Cast", [p + "_zp"], [p + "_zpf"], to=TensorProto.FLOAT, name=p + "_cast_zp"),
        helper.make_node("Cast", [p + "_scale"], [p + "_scalef"], to=TensorProto.FLOAT, name=p + "_cast_scale"),
        helper.make_node("Sub", [p + "_f", p + "_zpf"], [p + "_centred"], name=p + "_sub"),
        helper.make_node("Mul", [p + "_centred", p + "_scalef"], [p + "_scaled"], name=p + "_mul"),
        helper.make_node("Reshape", [p + "_scaled", p + "_shape"], [name], name=p + "_reshape"),
    ]
    model.graph.initializer.remove(init)
    model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), nm) for nm, a in consts.items())
    kept = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + kept)  # constant nodes first: the graph stays topologically sorted


def _token_ids_derived(model, name: str) -> bool:
    """Whether tensor `name` is the graph's first input passed through shape/dtype-only ops."""
    producers = {o: n for n in model.graph.node for o in n.output}
    first_input = model.graph.input[0].name
    for _ in range(16):
        if name == first_input:
            return True
        node = producers.get(name)
        if node is None or node.op_type not in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
            return False
        name = node.input[0]
    return False


def _quantize_embedding(model, bits: int, frequent: np.ndarray = np.zeros(0, np.int64)) -> int:
    """Replace each Gather of a token-embedding table (a 2-D initializer used by that Gather only,
    indexed by the token ids) with com.microsoft GatherBlockQuantized over a `bits`-bit copy
    (float16 scales, so its output is float16 and a Cast follows). Returns the number replaced.

    With `frequent` token ids (4 bits only), their rows go to an 8-bit table and the others to a
    4-bit one; the graph finds each token's row by comparing it with the sorted frequent ids (a
    [seq, n] comparison, nothing per vocabulary entry), gathers from both and keeps one."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    replaced, nodes = 0, []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if (table is None or len(table.dims) != 2 or table.dims[1] % 2 or axis != 0 or uses[table.name] != 1
                or table.data_type != TensorProto.FLOAT or not _token_ids_derived(model, node.input[1])):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(table)
        model.graph.initializer.remove(table)
        keep = np.unique(frequent[frequent < len(w)][:len(w) // FREQUENT_SHARE]) if bits == 4 else frequent[:0]
        out16 = node.output[0] + "_f16"
        if not len(keep):
            nodes += _gather_quantized(model, w, bits, EMBED_BLOCK, table.name + f"_q{bits}", node.input[1], out16)
        else:
            nodes += _gather_mixed(model, w, keep, table.name, node.input[1], out16)
        nodes.append(helper.make_node("Cast", [out16], [node.output[0]], to=TensorProto.FLOAT,
                                      name=node.name + "_quantized_cast"))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced


def _gather_quantized(model, w: np.ndarray, bits: int, block: int, base: str, ids: str, out: str) -> list:
    """Initializers of `w` in `bits` bits and the GatherBlockQuantized node reading rows `ids` into `out` (float16)."""
    from onnx import helper, numpy_helper

    data, scale, zps = quantize_table(w, bits, block)
    model.graph.initializer.extend([numpy_helper.from_array(data, base), numpy_helper.from_array(scale, base + "_scale"),
                                    numpy_helper.from_array(zps, base + "_zp")])
    return [helper.make_node("GatherBlockQuantized", [base, ids, base + "_scale", base + "_zp"], [out],
                             name=base + "_gather", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                             block_size=block, bits=bits)]


def _gather_mixed(model, w: np.ndarray, keep: np.ndarray, name: str, ids: str, out: str) -> list:
    """Rows `keep` (sorted ids) of `w` at 8 bits, the rest at 4; `out` = row ids of the table:

        hit  = ids[..., None] == keep                       [..., n]
        row8 = argmax(hit)              (where any(hit))
        row4 = ids - count(keep < ids)  (the rest, in id order; clipped, as frequent ids reach past the end)
    """
    from onnx import TensorProto, helper, numpy_helper

    rare = np.setdiff1d(np.arange(len(w)), keep)
    p = name + "_mixed"
    model.graph.initializer.extend([numpy_helper.from_array(keep.astype(np.int64), p + "_ids"),
                                    numpy_helper.from_array(np.array([-1], np.int64), p + "_last_axis"),
                                    numpy_helper.from_array(np.array(len(rare) - 1, np.int64), p + "_max_rare")])
    n = lambda op, i, o, **kw: helper.make_node(op, i, [o], name=o + "_node", **kw)  # noqa: E731
    nodes = [
        n("Cast", [ids], p + "_id", to=TensorProto.INT64),
        n("Unsqueeze", [p + "_id", p + "_last_axis"], p + "_id_col"),
        n("Equal", [p + "_id_col", p + "_ids"], p + "_hit"),
        n("Cast", [p + "_hit"], p + "_hit_i", to=TensorProto.INT32),
        n("ArgMax", [p + "_hit_i"], p + "_row8", axis=-1, keepdims=0),
        n("ReduceMax", [p + "_hit_i", p + "_last_axis"], p + "_is8_i", keepdims=1),
        n("Cast", [p + "_is8_i"], p + "_is8", to=TensorProto.BOOL),
        n("Less", [p + "_ids", p + "_id_col"], p + "_below"),
        n("Cast", [p + "_below"], p + "_below_i", to=TensorProto.INT64),
        n("ReduceSum", [p + "_below_i", p + "_last_axis"], p + "_n_below", keepdims=0),
        n("Sub", [p + "_id", p + "_n_below"], p + "_row4_raw"),
        n("Min", [p + "_row4_raw", p + "_max_rare"], p + "_row4"),
    ]
    nodes += _gather_quantized(model, w[keep], 8, EMBED_BLOCK, name + "_q8", p + "_row8", p + "_e8")
    nodes += _gather_quantized(model, w[rare], 4, RARE_EMBED_BLOCK, name + "_q4", p + "_row4", p + "_e4")
    nodes.append(helper.make_node("Where", [p + "_is8", p + "_e8", p + "_e4"], [out], name=p + "_where"))
    return nodes


# ---------------------------------------------------------------- saving


def _split_large_initializers(model, max_bytes: int) -> None:
    """Cut each initializer larger than `max_bytes` into row blocks joined by a Concat node."""
    from onnx import helper, numpy_helper

    keep, extra_nodes = [], []
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t) if _nbytes(t) > max_bytes else None
        if arr is None or arr.ndim == 0 or arr.shape[0] < 2:
            keep.append(t)
            continue
        n = -(-arr.nbytes // max_bytes) + 1
        parts = np.array_split(arr, n, axis=0)
        names = [f"{t.name}__part{i}" for i in range(len(parts))]
        keep += [numpy_helper.from_array(p, nm) for p, nm in zip(parts, names)]
        extra_nodes.append(helper.make_node("Concat", names, [t.name], axis=0, name=f"{t.name}__concat"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = extra_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _nbytes(t) -> int:
    from onnx import helper

    n = int(np.prod(t.dims)) if t.dims else 1
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != 0 else 0


def _save(model, path: Path) -> list[str]:
    """Save `model` at `path`, moving weights to `<name>.data<i>` files of at most MAX_FILE_BYTES
    when the whole would exceed it. Returns the file names written (the .onnx first)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = Path(path)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's copy keeps its weights
    if model.ByteSize() <= MAX_FILE_BYTES:
        onnx.save(model, path)
        return [path.name]
    _split_large_initializers(model, MAX_FILE_BYTES)
    files, handle, size = [], None, 0
    for t in sorted(model.graph.initializer, key=lambda t: -len(t.raw_data)):
        data = t.raw_data
        if len(data) < 1 << 16:
            continue  # small tensors stay inline
        if handle is None or size + len(data) > MAX_FILE_BYTES:
            if handle:
                handle.close()
            files.append(f"{path.name}.data{len(files)}")
            handle, size = open(path.parent / files[-1], "wb"), 0
        set_external_data(t, location=files[-1], offset=size, length=len(data))
        t.data_location = onnx.TensorProto.EXTERNAL
        handle.write(data)
        size += len(data)
        t.ClearField("raw_data")
    if handle:
        handle.close()
    (path).write_bytes(model.SerializeToString())
    return [path.name] + files


# ---------------------------------------------------------------- parity


def frequent_tokens(cfg) -> np.ndarray | None:
    """Token ids by falling frequency in the store's training contexts (the parity contexts are
    the held-out ones, so the web file is not tuned to them); None without a store."""
    store = cfg.run_dir / "activations.h5"
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
    store = cfg.run_dir / "activations.h5"
    if store.exists():
        import h5py

        with h5py.File(store, "r") as f:
            tokens = f["tokens"]
            return [list(map(int, row)) for row in tokens[max(0, len(tokens) - n):]]
    texts = _corpus_texts(cfg, n) or FALLBACK_TEXTS[:n]
    return [encode_with_bos(loaded, t, min(cfg.corpus.ctx_len, max_tokens(loaded))) for t in texts]


def pages_agreement(web: Path, store_path: Path, sae: nn.Module, n_contexts: int, skip_bos: bool) -> float:
    """Share of the store's last `n_contexts` contexts' tokens (BOS left out with `skip_bos`, as
    the pages leave it out) whose strongest latent in the web file is the one the pages show: the
    SAE's on the stored activations (float16 when the store is), not on a fresh float32 forward."""
    import h5py

    sess = session(web)
    same = total = 0
    with h5py.File(store_path, "r") as f, torch.no_grad():
        tokens, L = f["tokens"], int(f.attrs["ctx_len"])
        for c in range(max(0, len(tokens) - n_contexts), len(tokens)):
            acts = torch.from_numpy(np.asarray(f["acts"][c * L:(c + 1) * L], np.float32))
            dense = sae.encode(acts)
            best, fires = dense.argmax(-1).numpy(), (dense > 0).any(-1).numpy()
            got = run_session(sess, [int(t) for t in tokens[c]])
            keep = fires.copy()
            keep[0] &= not skip_bos
            same += int(((got.top_ids[:, 0] == best) & (got.top_acts[:, 0] > 0))[keep].sum())
            total += int(keep.sum())
    return same / max(total, 1)


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


def check_file(path: Path, contexts: list[list[int]], reference: Encoded) -> dict:
    """`compare` of the ONNX file at `path`, run by Python onnxruntime, with PyTorch's `reference`."""
    sess = session(path)
    t0 = time.time()
    r = compare(reference, _concat([run_session(sess, ids) for ids in contexts]))
    r["seconds"] = round(time.time() - t0, 3)
    return r


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


def run_session(sess, ids: list[int]) -> Encoded:
    """The file's outputs for one token sequence (batch of one, so leading dims [seq])."""
    out = sess.run(list(Encoded._fields), {"input_ids": np.asarray([ids], dtype=np.int32)})
    return Encoded(*(o[0] for o in out))
