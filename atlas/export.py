"""`atlas export`: the model's blocks up to the hook plus the SAE encoder as one ONNX graph.

    input_ids int32 [batch, seq]  ->  top_ids int32 [batch, seq, k], top_acts float32 [batch, seq, k]

`runs/X/onnx/` holds (written atomically, stamped like every stage):

- `encoder.onnx` — full precision, for checks (weights over 95 MB are split, see `_save`);
- `encoder.web.onnx` — the file the browser runs with onnxruntime-web's wasm backend, weights
  quantised (`export.quantization`, see `QUANTIZATIONS`): the default "int8-emb4" keeps every
  MatMul on the fast int8 path and stores the token-embedding table in 4 bits (a
  com.microsoft GatherBlockQuantized node dequantises only the prompt's rows, so it costs
  nothing at run time); "int8" = int8 dynamic quantisation of MatMul and Gather weights;
  "int4" = 4-bit blockwise MatMulNBits for every MatMul plus an int8 embedding table (smallest,
  about 2x slower in the browser);
- `tokenizer.json` — the model's own fast tokenizer;
- `model.json` — what the browser needs to know (inputs, outputs, BOS, max length); its "files"
  are exactly the files the browser downloads (the site copies those and nothing else), their
  sizes in "bytes" and the sum in "total_bytes";
- `parity.json` — full-precision ORT and the web file against PyTorch on held-out text. The
  export fails when the web file's top-1 agreement is below `export.min_top1_agreement`.

The web download should stay within `WEB_BUDGET_BYTES` (100 MB): a larger one is reported
with a warning, not an error, since models legitimately differ in size.

No file is over 95 MB (GitHub's limit is 100 MB): a larger initializer is cut into row blocks
joined by a Concat node, and weights go to external-data files of at most 90 MB each.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.stage import atomic_dir, fingerprint, is_current, upstream_fingerprint

MAX_FILE_BYTES = 90 * 2**20
"""Largest file written (below GitHub's 100 MB hard limit and the 95 MB the design allows)."""
MIN_EXPORT_OPSET = 18
"""torch.onnx's dynamo exporter emits opset 18 ops (e.g. Split with num_outputs)."""
INT4_BLOCK = 32
EMBED_BLOCK = 64
"""Block length (along d_model) of the 4-bit token-embedding table: one float16 scale and one
4-bit zero point per 64 values (0.31 bits/value overhead). Block 32 cuts the error by ~11% but
costs GPT-2 Small 1.8 MB more, which with its 1.4 MB tokenizer.json leaves no room under 100 MB."""
QUANTIZATIONS = ("int8-emb4", "int8", "int4")
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


class EncoderGraph(nn.Module):
    """What the ONNX file computes: token ids -> residual before block L -> SAE -> top-k latents."""

    def __init__(self, truncated: nn.Module, sae: nn.Module, top_k: int):
        super().__init__()
        self.truncated = truncated
        self.sae = sae
        self.top_k = top_k

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        resid = self.truncated(input_ids.long()).to(self.sae.W_enc.dtype)
        if hasattr(self.sae, "encode_topk"):  # atlas.saes: no dense [seq, d_sae] scatter in the graph
            top_acts, top_ids = self.sae.encode_topk(resid, self.top_k)
        else:
            top_acts, top_ids = self.sae.encode(resid).topk(self.top_k, dim=-1)
        return top_ids.to(torch.int32), top_acts.float()


def run(cfg, force: bool = False) -> Path:
    """Export `runs/X/onnx/` from the run's model and `sae/`; skipped when already current."""
    from atlas.saes import load_sae

    out = cfg.run_dir / "onnx"
    sae_dir = cfg.run_dir / "sae"
    fp = fingerprint(cfg.section_hash("export", "model"), upstream_fingerprint(sae_dir, "train"))
    if not force and is_current(out, fp):
        print(f"export: {out} is up to date")
        return out
    sae = load_sae(sae_dir).float().eval().requires_grad_(False)
    from atlas.model import check_layer, load_model

    loaded = load_model(cfg.model.name, cfg.model.revision, device="cpu", dtype="float32")
    check_layer(cfg.path, cfg.model.layer, loaded)
    with atomic_dir(out, fp, stage="export") as tmp:
        export_dir(tmp, loaded, sae, cfg, fp, parity_contexts(cfg, loaded))
    print(f"export: wrote {out}")
    return out


def export_dir(out: Path, loaded, sae: nn.Module, cfg, fp: str, contexts: list[list[int]]) -> dict:
    """Write every file of `onnx/` into `out`; return the parity report."""
    import onnx

    out = Path(out)
    top_k = min(cfg.export.top_k, int(sae.W_enc.shape[1]))
    graph = EncoderGraph(loaded.truncated(cfg.model.layer), sae, top_k).eval()
    max_len = max_tokens(loaded)
    opset = max(cfg.export.opset, MIN_EXPORT_OPSET)

    t0 = time.time()
    model = _to_onnx(graph, max_len, opset)
    _gemm_to_matmul(model)
    _save(model, out / "encoder.onnx")
    print(f"export: traced and saved encoder.onnx in {time.time() - t0:.1f}s")
    t0 = time.time()
    web = quantize(model, cfg.export.quantization)
    web_files = _save(web, out / "encoder.web.onnx")
    print(f"export: quantised ({cfg.export.quantization}) in {time.time() - t0:.1f}s")
    loaded.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    del model, web

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
        "quantization": cfg.export.quantization,
        "input": {"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]},
        "outputs": {"ids": "top_ids", "acts": "top_acts"},
        "onnx": "encoder.web.onnx",
        "external_data": [f for f in web_files if f != "encoder.web.onnx"],
        "tokenizer": "tokenizer.json",
        "files": web_files + ["tokenizer.json"],
    }
    meta["bytes"] = {f: (out / f).stat().st_size for f in meta["files"]}
    meta["total_bytes"] = sum(meta["bytes"].values())
    meta["budget_bytes"] = WEB_BUDGET_BYTES
    (out / "model.json").write_text(json.dumps(meta, indent=2))

    report = parity(out, graph, contexts, cfg.export.min_top1_agreement)
    report["quantization"] = cfg.export.quantization
    report["total_bytes"] = report["web_bytes"] = meta["total_bytes"]
    report["budget_bytes"] = WEB_BUDGET_BYTES
    report["within_budget"] = meta["total_bytes"] <= WEB_BUDGET_BYTES
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    print(f"export: parity full {report['full']['ids_match']:.4f} ids, rel err {report['full']['max_rel_err']:.2e}; "
          f"web top-1 {report['web']['top1_agreement']:.3f}, overlap {report['web']['topk_overlap']:.3f}; "
          f"web download {meta['total_bytes'] / 1e6:.1f} MB")
    if not report["within_budget"]:
        print(f"export: WARNING: the web download is {meta['total_bytes'] / 1e6:.1f} MB, over the "
              f"{WEB_BUDGET_BYTES / 1e6:.0f} MB budget ({cfg.export.quantization}; "
              f"{', '.join(f'{f} {b / 1e6:.1f} MB' for f, b in meta['bytes'].items())}). "
              f"export.quantization = int4 makes it smaller at some speed cost")
    if not report["full"]["ok"]:
        raise AtlasError(f"{out}/parity.json: full-precision ONNX disagrees with PyTorch "
                         f"(ids match {report['full']['ids_match']:.4f}, max rel err {report['full']['max_rel_err']:.2e})")
    if not report["web"]["ok"]:
        raise AtlasError(f"{out}/parity.json: web file top-1 agreement {report['web']['top1_agreement']:.3f} is below "
                         f"export.min_top1_agreement = {cfg.export.min_top1_agreement}")
    return report


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
            output_names=["top_ids", "top_acts"], dynamic_shapes=({0: torch.export.Dim("batch", max=64), 1: seq},),
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


def quantize(model, mode: str):
    """The web file for `mode` (one of `QUANTIZATIONS`, see the module docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if mode not in QUANTIZATIONS:
        raise AtlasError(f"export.quantization = {mode!r}: must be one of {', '.join(QUANTIZATIONS)}")

    model = onnx.ModelProto.FromString(model.SerializeToString())
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        if mode == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=False,
                                     op_types_to_quantize=("MatMul",))
            q.process()
            model = q.model.model
            ops = ["Gather"]
        else:
            ops = ["MatMul", "Gather"]
            if mode == "int8-emb4":
                _embedding_to_4bit(model, EMBED_BLOCK)  # before int8: its Gather is then no longer one
        onnx.save(model, src, save_as_external_data=model.ByteSize() > 1.8e9)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its "consider pre-processing" hint is for static quantisation
        try:
            # Per-channel weight scales: the residual stream's few large dimensions otherwise set one
            # scale for a whole matrix (all-MiniLM-L6-v2 demo: top-1 agreement 0.83 per-tensor, 0.93 per-channel).
            quantize_dynamic(src, dst, op_types_to_quantize=ops, weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True}, use_external_data_format=False)
        finally:
            root.setLevel(level)
        return onnx.load(dst)


def quantize_4bit_rows(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit blockwise quantisation of a [rows, cols] table along its rows, packed the way
    GatherBlockQuantized (uint8 data, MatMulNBits' convention) reads it: value = (q - zp) * scale.

    Returns data uint8 [rows, cols/2] (element 2j in the low nibble), scales float16
    [rows, ceil(cols/block)] and zero points uint8 [rows, ceil(n_blocks/2)] (packed the same way).
    """
    rows, cols = w.shape
    n_blocks = -(-cols // block)
    padded = np.zeros((rows, n_blocks * block), np.float32)
    padded[:, :cols] = w
    padded[:, cols:] = w[:, -1:] if cols % block else 0  # pad with a value already in the block's range
    b = padded.reshape(rows, n_blocks, block)
    lo, hi = np.minimum(b.min(axis=2), 0), np.maximum(b.max(axis=2), 0)  # 0 stays exact
    scale = ((hi - lo) / 15).astype(np.float16)  # rounded first: the values are quantised with it
    scale[scale == 0] = 1.0
    scale32 = scale.astype(np.float32)
    zp = np.clip(np.round(-lo / scale32), 0, 15).astype(np.uint8)
    q = np.clip(np.round(b / scale32[..., None]) + zp[..., None], 0, 15).astype(np.uint8).reshape(rows, -1)[:, :cols]
    data = q[:, 0::2] | (q[:, 1::2] << 4)
    zp_pad = np.zeros((rows, n_blocks + n_blocks % 2), np.uint8)
    zp_pad[:, :n_blocks] = zp
    zps = zp_pad[:, 0::2] | (zp_pad[:, 1::2] << 4)
    return data, scale, zps


def dequantize_4bit_rows(data: np.ndarray, scale: np.ndarray, zps: np.ndarray, block: int) -> np.ndarray:
    """The inverse of `quantize_4bit_rows` (what GatherBlockQuantized computes per gathered row)."""
    rows = data.shape[0]
    q = np.stack([data & 15, data >> 4], axis=2).reshape(rows, -1).astype(np.float32)
    zp = np.stack([zps & 15, zps >> 4], axis=2).reshape(rows, -1)[:, :scale.shape[1]].astype(np.float32)
    blk = np.arange(q.shape[1]) // block
    return ((q - zp[:, blk]) * scale[:, blk].astype(np.float32)).astype(np.float16).astype(np.float32)


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


def _embedding_to_4bit(model, block: int) -> int:
    """Replace each Gather of a token-embedding table (a 2-D initializer used by that Gather only,
    indexed by the token ids) with com.microsoft GatherBlockQuantized over a 4-bit copy (float16
    scales, so its output is float16 and a Cast follows). Returns the number replaced."""
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
        data, scale, zps = quantize_4bit_rows(numpy_helper.to_array(table), block)
        base = table.name
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([numpy_helper.from_array(data, base + "_q4"),
                                        numpy_helper.from_array(scale, base + "_q4_scale"),
                                        numpy_helper.from_array(zps, base + "_q4_zp")])
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [base + "_q4", node.input[1], base + "_q4_scale", base + "_q4_zp"],
            [node.output[0] + "_f16"], name=node.name + "_q4", domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=block))
        nodes.append(helper.make_node("Cast", [node.output[0] + "_f16"], [node.output[0]], to=TensorProto.FLOAT,
                                      name=node.name + "_q4_cast"))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced


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


def compare(ref_ids, ref_acts, ids, acts, tol: float = 1e-4) -> dict:
    """Per-token top-k agreement of (ids, acts) with the reference, arrays [n_tokens, k].

    A rank whose reference value is within `tol` (relative to the token's largest activation)
    of a neighbouring rank is a near-tie: its id may legitimately swap, so it is not counted.
    Ranks with zero activation carry no id and are not counted either.
    """
    scale = np.maximum(np.abs(ref_acts).max(axis=1, keepdims=True), 1e-6)
    rel = np.abs(acts - ref_acts) / scale
    gaps = np.abs(np.diff(ref_acts, axis=1)) / scale
    tie = np.zeros_like(ref_acts, dtype=bool)
    tie[:, 1:] |= gaps < tol
    tie[:, :-1] |= gaps < tol
    counted = (ref_acts > 0) & ~tie
    ids_match = float((ids == ref_ids)[counted].mean()) if counted.any() else 1.0
    k = ref_ids.shape[1]
    overlap = [len(set(a[r > 0]) & set(b[r > 0])) / max(1, int((r > 0).sum()))
               for a, b, r in zip(ref_ids, ids, ref_acts)]
    active = ref_acts[:, 0] > 0
    top1 = float((ids[:, 0] == ref_ids[:, 0])[active].mean()) if active.any() else 1.0
    return {"n_tokens": int(len(ref_ids)), "k": int(k), "ids_match": ids_match, "max_rel_err": float(rel.max()),
            "mean_rel_err": float(rel.mean()), "top1_agreement": top1, "topk_overlap": float(np.mean(overlap))}


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    top_ids, top_acts = sess.run(None, {"input_ids": np.asarray([ids], dtype=np.int32)})
    return top_ids[0], top_acts[0]


def parity(out: Path, graph: nn.Module, contexts: list[list[int]], min_top1: float) -> dict:
    """Full-precision and web ONNX against PyTorch on `contexts`.

    Full precision must give the same top-k ids (near-ties aside) with activations within 1e-4
    of the token's largest activation. The web file is judged on top-1 agreement (a token's
    strongest feature is what the analyser shows first): the export fails below `min_top1`
    (default 0.9: 4-bit weights typically keep ~95-99% of argmaxes on a trained model; below 90%
    the heatmap would often show a different feature than the feature page describes).
    """
    ref_ids, ref_acts = [], []
    with torch.no_grad():
        for ids in contexts:
            i, a = graph(torch.tensor([ids], dtype=torch.int32))
            ref_ids.append(i[0].numpy())
            ref_acts.append(a[0].numpy())
    ref_ids, ref_acts = np.concatenate(ref_ids), np.concatenate(ref_acts)
    report = {"n_contexts": len(contexts), "min_top1_agreement": min_top1}
    for name, file in (("full", "encoder.onnx"), ("web", "encoder.web.onnx")):
        sess = session(out / file)
        t0 = time.time()
        got = [run_session(sess, ids) for ids in contexts]
        elapsed = time.time() - t0
        r = compare(ref_ids, ref_acts, np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]))
        r["seconds"] = round(elapsed, 3)
        r["ok"] = (r["ids_match"] >= 0.999 and r["max_rel_err"] <= 1e-4) if name == "full" else r["top1_agreement"] >= min_top1
        report[name] = r
    return report
