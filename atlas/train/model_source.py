"""Training rows computed on the fly (`train.source: model`), for training budgets larger than the disk.

As EleutherAI's sparsify trains: the model runs up to the hook over the corpus' contexts as
training asks for them, nothing is stored, and each training token costs a forward pass. The
contexts are the ones `atlas collect` takes, in the same order (`corpus_contexts`), less the
store's held-out ones (its last `n_eval_contexts`, which evaluation reads from the store), and go
on past the store for as many as `train.n_tokens` needs. The rows come from collect's own forward
pass (`activation_rows`) in the store's dtype, so where the two overlap they are the store's rows.

The source is a plain `RowStream` whose reads run the model. A chunk is `corpus.batch_size` whole
contexts (one forward pass), so the stream's shuffle, its background reader and its seed-based
skipping work unchanged: a resumed run computes nothing for the buffers before its step and sees
exactly the batches an uninterrupted one would (the forward pass is deterministic on the CPU). The
contexts are tokenised once up front (4 bytes a token), so reading any chunk is a lookup and a
forward pass. The trainer's first sample (input scale, b_dec) is drawn from this stream too, which
costs a buffer or two of forward passes before the first step. Under torchrun every rank computes
every buffer and keeps its slice of each batch, as every rank reads every buffer of the store.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from tqdm import tqdm

from atlas import distributed
from atlas.collect import activation_rows, corpus_contexts
from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.model import LoadedModel
from atlas.resources import require_memory
from atlas.stage import rerun
from atlas.store import ActivationStore
from atlas.train.data import RowStream


def model_stream(cfg: RunConfig, loaded: LoadedModel, store: ActivationStore) -> RowStream:
    """The training rows of `cfg` computed by `loaded` (on its device); `store` names the layer, the
    dtype and the held-out contexts to skip. Row r is offset r % ctx_len of training context
    r // ctx_len: the store's training contexts first, then the corpus' contexts after the store."""
    c, tc = cfg.corpus, cfg.train
    ctx_len, layer, n_eval = c.ctx_len, store.info.layer, store.info.n_eval_contexts
    n_train = store.n_contexts - n_eval
    tokens, n_contexts = _training_tokens(cfg, loaded, store)
    model = loaded.truncated(layer)
    device = next(model.parameters()).device

    def read_into(a: int, b: int, out: np.ndarray) -> None:
        first, last = a // ctx_len, -(-b // ctx_len)
        ids = np.arange(first, last)
        ids[ids >= n_train] += n_eval  # the held-out contexts lie between the store's training ones and the rest
        where = f"training contexts {first}:{last}"
        whole = (a, b) == (first * ctx_len, last * ctx_len)  # every chunk is: computed straight into `out`
        rows = activation_rows(model, (layer,), tokens[ids], c.batch_size, store.info.dtype, device, where,
                               out={layer: out} if whole else None)[layer]
        if not whole:  # a few rows (RowStream's probe of the shape)
            out[:] = rows[a - first * ctx_len:b - first * ctx_len]

    def read(a: int, b: int) -> torch.Tensor:
        out = torch.empty(b - a, store.d_model, dtype=getattr(torch, store.info.dtype))
        read_into(a, b, out.numpy())
        return out

    keep = (lambda ids: ids % ctx_len != 0) if tc.exclude_bos else None
    # buffers as the store streams them (store_stream): the shuffle's reach is the same
    return RowStream(read, n_contexts * ctx_len, chunk_rows=c.batch_size * ctx_len,
                     buffer_rows=max(64 * tc.batch_size, 1 << 18), keep=keep, seed=tc.seed, read_into=read_into)


def _training_tokens(cfg: RunConfig, loaded: LoadedModel, store: ActivationStore) -> tuple[np.ndarray, int]:
    """The corpus' first contexts [n, ctx_len] (int32): the store's, then as many as training needs;
    and how many contexts training uses. A corpus with too few contexts, or one that no longer gives
    the store's, is refused before any training."""
    c, tc = cfg.corpus, cfg.train
    n_eval = store.info.n_eval_contexts
    n_train = store.n_contexts - n_eval
    per_context = c.ctx_len - 1 if tc.exclude_bos else c.ctx_len
    need = math.ceil(tc.n_tokens / per_context) if tc.n_tokens else n_train  # 0: one pass, as from the store
    want = max(need, n_train) + n_eval  # every context the store holds is read, to check them against it
    require_memory(want * c.ctx_len * 4, f"train.n_tokens = {tc.n_tokens:,} from the model (its contexts' tokens)",
                   "lower train.n_tokens")
    tokens = np.empty((want, c.ctx_len), np.int32)
    have = 0
    contexts = itertools.islice(corpus_contexts(c, loaded), want)
    for have, context in enumerate(tqdm(contexts, total=want, unit="ctx", desc="tokenise the training contexts",
                                        leave=False, disable=not distributed.is_main()), 1):
        tokens[have - 1] = context
    # the held-out contexts are found by position: the corpus must still give the store's contexts
    if have < store.n_contexts or not np.array_equal(tokens[:store.n_contexts], store.tokens):
        raise AtlasError(f"corpus '{c.dataset}' no longer gives the contexts the store holds, so its held-out "
                         f"ones cannot be skipped; run `{rerun('collect', cfg, '--force')}`")
    if have < want:
        raise AtlasError(f"'train.n_tokens' = {tc.n_tokens:,} needs {need:,} training contexts of {c.ctx_len} "
                         f"tokens from the model, but corpus '{c.dataset}' has {have - n_eval:,} ({have:,} less the "
                         f"store's {n_eval:,} held-out ones); lower train.n_tokens or use a larger corpus")
    return tokens, need
