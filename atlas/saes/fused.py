"""The one performance trick of training: a TopK encoder whose backward pass is sparse.

A TopK SAE keeps k of d_sae latents per token, so only k columns of the encoder receive a
gradient from each token. Autograd through `x @ W_enc` would compute the full dense gradient
(as costly as the forward matmul); `TopKEncode.backward` builds the gradient from the k chosen
entries per token instead, as a sparse matrix product. The decoder side uses `embedding_bag`,
which gathers the k rows of W_dec per token in the forward and scatters into them in the
backward. Together only the encoder forward is dense, which makes a CPU training step several
times cheaper than the plain formulation (see tests/bench/bench_train.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


class TopKEncode(torch.autograd.Function):
    """relu(top-k of (x - b_dec) @ W_enc + b_enc) per row, plus optionally the top aux_k among
    masked latents (the AuxK loss for dead latents); returns (values, indices, aux_values,
    aux_indices). `x` gets no gradient; `b_dec` may be None (not subtracted)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, aux_mask, aux_k: int):
        x_in = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, x_in, W_enc)
        values, indices = pre.topk(k, dim=1, sorted=False)
        values = values.relu()
        if aux_mask is not None and aux_k > 0:
            masked = pre.masked_fill_(~aux_mask, -torch.inf)  # pre is not needed any more
            aux_values, aux_indices = masked.topk(aux_k, dim=1, sorted=False)
            aux_values = aux_values.relu()
        else:
            aux_values = aux_indices = x_in.new_zeros(x_in.shape[0], 0)
            aux_indices = aux_indices.long()
        ctx.save_for_backward(x_in, W_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):
        x_in, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        grad = grad_values * (values > 0)
        idx = indices
        if aux_indices.shape[1] and grad_aux is not None:
            grad = torch.cat([grad, grad_aux * (aux_values > 0)], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        n, width = idx.shape
        d_sae = W_enc.shape[1]
        grad_W = grad_b = grad_b_dec = None
        grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, idx.flatten(), grad.flatten())
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ grad_b)  # x_in = x - b_dec for every row
        if ctx.needs_input_grad[1]:
            crow = torch.arange(0, n * width + 1, width, device=idx.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                sparse = torch.sparse_csr_tensor(crow, idx.flatten(), grad.flatten().contiguous(), (n, d_sae),
                                                 check_invariants=False)
            grad_W = x_in.t() @ sparse  # [d_in, d_sae]: only the chosen entries contribute
            if grad_W.layout != torch.strided:
                grad_W = grad_W.to_dense()
        return None, grad_W, grad_b, grad_b_dec, None, None, None


def topk_encode(x, W_enc, b_enc, b_dec, k: int, aux_mask=None, aux_k: int = 0):
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k, aux_mask, aux_k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]] without materialising [n, d_sae]."""
    if indices.shape[1] == 0:
        return values.new_zeros(values.shape[0], W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
