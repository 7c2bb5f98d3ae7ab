"""Tracing: the model's blocks up to the hook plus the SAE encoder as one `nn.Module`
(`EncoderGraph`), exported to ONNX by torch.onnx's dynamo exporter with a dynamic batch and
sequence length, its Gemm nodes rewritten as MatMul for the weight quantisers.
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


def max_tokens(loaded) -> int:
    """The longest input the model takes (its position embeddings' length)."""
    c = loaded.model.config
    return int(getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None) or 512)


def to_onnx(graph: nn.Module, max_len: int, opset: int):
    """`graph` as an ONNX model taking input_ids [batch <= 64, seq <= max_len]."""
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
