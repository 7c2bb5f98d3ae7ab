"""Tracing: the model's blocks up to the deepest hook, emitting each hook's residual
(`TrunkGraph`), and one SAE's encoder on a residual (`SaeEncoderGraph`), each exported to ONNX by
torch.onnx's dynamo exporter with a dynamic batch and sequence length, Gemm nodes rewritten as
MatMul for the weight quantisers. `EncoderGraph` (blocks up to one hook plus its SAE, in PyTorch)
is the reference both files together are checked against.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from torch import nn


MIN_EXPORT_OPSET = 18
"""torch.onnx's dynamo exporter emits opset 18 ops (e.g. Split with num_outputs)."""


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
        top = self.sae.encode_top(resid, self.top_k)
        return top.ids.to(torch.int32), top.values.float(), top.n_active.to(torch.int32)


class TrunkGraph(nn.Module):
    """What the trunk file computes: token ids -> the residual before each block in `layers`
    (one output per layer, in the order given), running the blocks up to the deepest one once."""

    def __init__(self, truncated: nn.Module, layers: list[int]):
        super().__init__()
        self.truncated = truncated  # TruncatedModel to max(layers): its final norm is an identity
        self.layers = list(layers)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ids = input_ids.long()
        out = self.truncated.base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                                  output_hidden_states=True)
        return tuple(out.hidden_states[layer].float() for layer in self.layers)


class SaeEncoderGraph(nn.Module):
    """What an encoder file computes: a residual [batch, seq, d_model] -> the SAE's top-k latents
    and the number of active latents (the outputs of `Encoded`)."""

    def __init__(self, sae: nn.Module, top_k: int):
        super().__init__()
        self.sae = sae
        self.top_k = top_k

    def forward(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top = self.sae.encode_top(resid.to(self.sae.W_enc.dtype), self.top_k)
        return top.ids.to(torch.int32), top.values.float(), top.n_active.to(torch.int32)


RESIDUAL_INPUT = "resid"
"""The encoder files' input: the residual at the SAE's hook, float32 [batch, seq, d_model]."""


def residual_name(layer: int) -> str:
    """The trunk file's output holding the residual before block `layer`."""
    return f"resid_{layer}"


def max_tokens(loaded) -> int:
    """The longest input the model takes (its position embeddings' length)."""
    c = loaded.model.config
    return int(getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None) or 512)


def to_onnx(graph: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str], max_len: int,
            opset: int):
    """`graph` as an ONNX model taking `input_name` shaped like `example`, [batch <= 64, seq <=
    max_len, ...], and giving `output_names`."""
    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=opset, input_names=[input_name],
            output_names=output_names, dynamic_shapes=({0: torch.export.Dim("batch", max=64), 1: seq},),
            verbose=False, optimize=True,
        )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=False)
    return model


def trunk_onnx(loaded, layers: list[int], max_len: int, opset: int):
    """The trunk file's model: input_ids -> `residual_name(layer)` for each of `layers`."""
    graph = TrunkGraph(loaded.truncated(max(layers)), layers).eval()
    example = torch.zeros((1, min(8, max_len)), dtype=torch.int32)
    model = to_onnx(graph, example, "input_ids", [residual_name(layer) for layer in layers], max_len, opset)
    gemm_to_matmul(model)
    return model


def encoder_onnx(sae: nn.Module, top_k: int, d_model: int, max_len: int, opset: int):
    """An encoder file's model: `RESIDUAL_INPUT` [batch, seq, d_model] -> the `Encoded` outputs."""
    example = torch.zeros((1, min(8, max_len), d_model), dtype=torch.float32)
    model = to_onnx(SaeEncoderGraph(sae, top_k).eval(), example, RESIDUAL_INPUT, list(Encoded._fields), max_len, opset)
    gemm_to_matmul(model)
    return model



def gemm_to_matmul(model) -> None:
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
