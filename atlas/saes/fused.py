"""The one performance trick of training: a sparse encoder whose backward pass is sparse.

TopK and BatchTopK SAEs keep a few of d_sae latents per token, so only those columns of the
encoder receive a gradient from each token. Autograd through `x @ W_enc` would compute the
full dense gradient (as costly as the forward matmul); `SparseEncode.backward` builds it from
the chosen entries instead, as a sparse matrix product. Which entries are chosen is the
architecture's rule, passed in as `select`: the k largest per row for TopK, the n*k largest of
the batch for BatchTopK, which gives rows different counts, so chosen entries travel in
compressed-row form (`Active`). The decoder side uses `embedding_bag`, which gathers the chosen
rows of W_dec per token in the forward and scatters into them in the backward. Together only
the encoder forward is dense, which makes a CPU training step several times cheaper than the
plain formulation (see tests/bench/bench_train.py).
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Active(NamedTuple):
    """A batch's chosen latents in compressed-row form: row i's are `values[offsets[i]:offsets[i+1]]`
    at latent ids `ids[offsets[i]:offsets[i+1]]`. A value <= 0 counts as not active."""

    values: Tensor
    """[nnz]"""
    ids: Tensor
    """[nnz] int64"""
    offsets: Tensor
    """[n + 1] int64, offsets[0] = 0 and offsets[n] = nnz"""


Select = Callable[[Tensor], Active]
"""pre-activations [n, d_sae] -> the entries a training step keeps (raw; the ReLU comes after)."""


def fixed_width(values: Tensor, ids: Tensor) -> Active:
    """[n, width] values and ids (the same number per row) as `Active`."""
    n, width = ids.shape
    return Active(values.reshape(-1), ids.reshape(-1), torch.arange(n + 1, device=ids.device) * width)


class SparseEncode(torch.autograd.Function):
    """relu of the `select`ed entries of pre = (x - b_dec) @ W_enc + b_enc, plus optionally the
    top aux_k per row among latents in `aux_mask` (the AuxK loss for dead latents), as the fields
    of two `Active`s. `x` gets no gradient; `b_dec` may be None (not subtracted) and gets no
    gradient from the AuxK entries, so the dense AuxK path (`TopKSAE._dense_aux`) and this one
    train the same parameters."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select: Select, aux_mask, aux_k: int):
        x_in = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, x_in, W_enc)
        main = select(pre)
        values = main.values.relu()
        if aux_mask is not None and aux_k > 0:
            masked = pre.masked_fill_(~aux_mask, -torch.inf)  # pre is not needed any more
            aux = fixed_width(*masked.topk(aux_k, dim=1, sorted=False))
        else:
            aux = fixed_width(x_in.new_zeros(x_in.shape[0], 0), x_in.new_zeros(x_in.shape[0], 0, dtype=torch.long))
        aux_values = aux.values.relu()
        ctx.save_for_backward(x_in, W_enc, values, main.ids, main.offsets, aux_values, aux.ids, aux.offsets)
        ctx.mark_non_differentiable(main.ids, main.offsets, aux.ids, aux.offsets)
        return values, main.ids, main.offsets, aux_values, aux.ids, aux.offsets

    @staticmethod
    def backward(ctx, grad_values, _gi, _go, grad_aux, _gai, _gao):
        x_in, W_enc, values, ids, offsets, aux_values, aux_ids, aux_offsets = ctx.saved_tensors
        grad = grad_values * (values > 0)
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, ids, grad)
        # x_in = x - b_dec in every row; b_dec's gradient comes from the chosen entries alone
        grad_b_dec = -(W_enc @ grad_b) if ctx.needs_input_grad[3] else None
        parts = [(offsets, ids, grad)]
        if aux_ids.numel() and grad_aux is not None:
            aux_grad = grad_aux * (aux_values > 0)
            grad_b.index_add_(0, aux_ids, aux_grad)
            parts.append((aux_offsets, aux_ids, aux_grad))
        grad_W = None
        if ctx.needs_input_grad[1]:  # [d_in, d_sae]: only the chosen entries contribute
            grad_W = sum(_sparse_t_matmul(x_in, *p, W_enc.shape[1]) for p in parts)
        return None, grad_W, grad_b, grad_b_dec, None, None, None


def _sparse_t_matmul(x_in: Tensor, offsets: Tensor, ids: Tensor, grad: Tensor, d_sae: int) -> Tensor:
    """x_in^T @ G for G [n, d_sae] given in compressed-row form."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        sparse = torch.sparse_csr_tensor(offsets, ids, grad.contiguous(), (x_in.shape[0], d_sae),
                                         check_invariants=False)
    out = x_in.t() @ sparse
    return out.to_dense() if out.layout != torch.strided else out


def sparse_encode(x, W_enc, b_enc, b_dec, select: Select, aux_mask=None, aux_k: int = 0) -> tuple[Active, Active]:
    """(the chosen latents, the AuxK latents; empty without aux_mask) of x, via `SparseEncode`."""
    v, i, o, av, ai, ao = SparseEncode.apply(x, W_enc, b_enc, b_dec, select, aux_mask, aux_k)
    return Active(v, i, o), Active(av, ai, ao)


def sparse_decode(active: Active, W_dec: Tensor) -> Tensor:
    """Row i: sum of active values times their W_dec rows, without materialising [n, d_sae]."""
    n = active.offsets.numel() - 1
    if active.ids.numel() == 0:
        return W_dec.new_zeros(n, W_dec.shape[1])
    return F.embedding_bag(active.ids, W_dec, active.offsets[:-1], per_sample_weights=active.values, mode="sum")
