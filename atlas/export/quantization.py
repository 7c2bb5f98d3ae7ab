"""The web file's weights in 8 or 4 bits (`export.quantization`, see `QUANTIZATIONS` and
`quantize`); activations stay float32 (atlas/export/__init__.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlas.errors import AtlasError

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
    weight is 8-bit (float16 in mode f16), turned back into float32 once when the session opens
    (`quantize`)."""

    embedding_bits: int
    """The token-embedding table, 4 or 8 bits, behind GatherBlockQuantized (reads only the prompt's rows);
    `HALF`: the f16 mode, every weight and the table in float16."""
    frequent_tokens: int
    """With a 4-bit table: how many of the corpus's most frequent tokens keep 8-bit rows."""
    weight_block: int
    """MatMul weights: one scale per this many input rows of each output column (0: per column)."""


HALF = 16
"""`embedding_bits` of the float16 mode: every weight, the embedding table included, in float16."""

QUANTIZATIONS = {
    "w8-emb4": Quantization(embedding_bits=4, frequent_tokens=FREQUENT_TOKENS, weight_block=0),
    "w8": Quantization(embedding_bits=8, frequent_tokens=0, weight_block=WEIGHT_BLOCK),
    "f16": Quantization(embedding_bits=HALF, frequent_tokens=0, weight_block=0),
}
"""Web modes, smallest first; `auto` tries them in this order. w8-emb4 is what fits GPT-2 Small to
layer 8 + 24,576 latents in 100 MB (4 bits for the rare tokens' embedding rows, the cheapest
place: measured on SmolLM2-135M, 4-bit MatMul blocks or a 4-bit SAE encoder cost more agreement);
w8 is the faithful one, for models whose SAE the 4-bit rows still move too much (see README).
f16 (float16 weights, twice w8's bytes) is for what 8 bits cannot hold: the steering file's greedy
continuations over SmolLM2-135M's 30 blocks agree with PyTorch on 0.811 of the tokens at w8 and
0.967 at f16 (gate 0.95)."""
AUTO = "auto"


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
    if q.embedding_bits != HALF:
        keep = np.asarray(frequent[:q.frequent_tokens], np.int64) if frequent is not None else None
        _quantize_embedding(model, q.embedding_bits, keep)  # first: its table then no longer feeds a Gather
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    weights |= {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    for name in sorted(weights):  # a fixed order: the same weights give the same file
        t = inits[name]
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            if q.embedding_bits == HALF:
                _half_at_load(model, t)
            else:
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


def _half_at_load(model, init) -> None:
    """Replace float initializer `init` by a float16 copy and a Cast back to float32 under its name
    (folded once when the session opens, as the 8-bit modes' nodes are)."""
    from onnx import TensorProto, helper, numpy_helper

    name = init.name
    half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name + "_f16")
    model.graph.initializer.remove(init)
    model.graph.initializer.append(half)
    kept = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=name + "_cast16"),
                             *kept])


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


def _quantize_embedding(model, bits: int, frequent: np.ndarray | None = None) -> int:
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
        keep = np.zeros(0, np.int64)
        if bits == 4 and frequent is not None:
            keep = np.unique(frequent[frequent < len(w)][:len(w) // FREQUENT_SHARE])
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
