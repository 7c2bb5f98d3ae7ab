"""`train.source: model`: training rows computed by the model on the fly (atlas/train/model_source.py).

The tiny world's store holds 512 contexts of 32 tokens (51 held out for evaluation); its corpus
gives 807, so the on-the-fly source can train on 756 contexts, 295 of them past the store.
"""

import copy
import dataclasses
import json
from collections import Counter

import pytest
import torch

from atlas.cli import main
from atlas.collect import corpus_contexts
from atlas.config import load_config
from atlas.errors import AtlasError, ConfigError
from atlas.model import load_model
from atlas.store import ActivationStore
from atlas.train.model_source import model_stream
from atlas.train.trainer import CKPT_FILE, train_sae
from support import tiny_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"corpus": {"store_dtype": "float16"}, "train": {"n_tokens": 0, "batch_size": 128, "checkpoint_every": 20}}
"""The tiny run with a float16 store (the default dtype) and one pass over its training split: 115 steps."""
PAST_THE_STORE = 700 * 31
"""train.n_tokens that needs 700 training contexts (31 trained tokens each, BOS left out): 239 past the store."""


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """The tiny run collected (float16 store): its config file, beside the run's runs/ folder."""
    import os

    work = tmp_path_factory.mktemp("train-source")
    path = tiny_yaml(tiny_world, work, **RUN)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["collect", "--config", str(path)]) == 0
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture(scope="module")
def loaded(run):
    cfg = load_config(run)
    return load_model(cfg.model.name)


def _stream(run, loaded, store, *overrides):
    return model_stream(load_config(run, list(overrides)), loaded, store)


def _store(run) -> ActivationStore:
    cfg = load_config(run)
    return ActivationStore(run.parent / cfg.store_path, layer=cfg.model.layer)


def test_model_source_trains_as_well_as_the_store(run, capsys, monkeypatch):
    """Same config but for train.source: the same held-out quality (explained variance, FVU =
    1 - EV, on the store's eval contexts). Tolerance 0.005: over seeds 0-3 the store's own EV
    spread over 0.0017 (0.9681-0.9698) and the two sources differed by at most 0.0008."""
    monkeypatch.chdir(run.parent)
    metrics = {}
    for source in ("store", "model"):
        assert main(["train", "--config", str(run), "--set", f"train.source={source}"]) == 0
        metrics[source] = json.loads((run.parent / "runs" / "tiny" / "sae" / "metrics.json").read_text())
    store, model = metrics["store"], metrics["model"]
    assert (model["steps"], model["tokens"], model["eval_tokens"]) == (store["steps"], store["tokens"],
                                                                       store["eval_tokens"])
    assert store["explained_variance"] > 0.9
    assert model["explained_variance"] == pytest.approx(store["explained_variance"], abs=0.005)
    assert model["l0"] == pytest.approx(store["l0"])
    capsys.readouterr()
    assert main(["train", "--config", str(run), "--set", "train.source=model"]) == 0  # a second run: nothing to do
    assert "up to date" in capsys.readouterr().out


@torch.inference_mode()
def test_rows_are_the_models_activations_of_the_training_contexts(run, loaded):
    """Row r of the source is offset r % 32 of training context r // 32: the store's training contexts
    (their stored rows, to float16 rounding), then the corpus' contexts after the store's held-out
    ones (checked against the full model's hidden_states, not the truncated model collect runs)."""
    cfg = load_config(run)
    with _store(run) as store:
        stream = _stream(run, loaded, store, f"train.n_tokens={PAST_THE_STORE}")
        n_train, n_eval, ctx = store.n_contexts - store.info.n_eval_contexts, store.info.n_eval_contexts, store.ctx_len
        assert stream.n_rows == 700 * ctx and stream.d_in == store.d_model
        # the store's part, over several chunks and one cut short (a probe of a few rows)
        got = stream.read(0, n_train * ctx)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), torch.from_numpy(store.read(0, n_train * ctx)), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(stream.read(5 * ctx + 3, 5 * ctx + 7).float(),
                                   torch.from_numpy(store.read(5 * ctx + 3, 5 * ctx + 7)), rtol=1e-3, atol=1e-3)
        # past the store: training context n_train + j is the corpus' context store.n_contexts + j
        contexts = list(corpus_contexts(cfg.corpus, loaded))
        for j in (0, 17, 700 - n_train - 1):
            ids = torch.from_numpy(contexts[n_train + n_eval + j]).long()[None]
            want = loaded.model(ids, output_hidden_states=True).hidden_states[cfg.model.layer][0]
            row = (n_train + j) * ctx
            torch.testing.assert_close(stream.read(row, row + ctx).float(), want, rtol=1e-3, atol=2e-3)


class _Tagged(torch.nn.Module):
    """A stand-in for the truncated model whose residual at (context, offset) spells out the context's
    tokens and the offset (small integers: exact in float16), so every row says where it came from."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device the source runs it on

    def residuals(self, ids: torch.Tensor, layers) -> dict:
        n, ctx = ids.shape
        h = torch.zeros(n, ctx, self.d_model)
        h[:, :, :ctx] = ids[:, None, :].float()
        h[:, :, ctx] = torch.arange(ctx).float()
        return {layer: h for layer in layers}


def test_never_yields_a_held_out_context(run, loaded):
    """One epoch of batches reaching past the store is every (context, offset > 0) of the store's
    training contexts and of the corpus' contexts after the store, each once: none of its held-out
    contexts, which lie between the two in the corpus."""
    tagging = copy.copy(loaded)
    tagging.truncated = lambda layer: _Tagged(loaded.d_model)
    cfg = load_config(run, [f"train.n_tokens={PAST_THE_STORE}"])
    with _store(run) as store:
        stream = model_stream(cfg, tagging, store)
        n_train, ctx, held_out = store.n_contexts - store.info.n_eval_contexts, store.ctx_len, store.tokens[-51:]
        assert store.n_contexts - n_train == 51
    batches = stream.batches(100)  # 217 batches of 100: the epoch's 700 x 31 rows
    rows = torch.cat([next(batches) for _ in range(PAST_THE_STORE // 100)]).int()
    batches.close()
    seen = Counter((tuple(r[:ctx].tolist()), int(r[ctx])) for r in rows)
    corpus = [tuple(c.tolist()) for c in corpus_contexts(cfg.corpus, loaded)]
    training = corpus[:n_train] + corpus[n_train + 51:700 + 51]
    held_out = {tuple(c.tolist()) for c in held_out}
    assert held_out == set(corpus[n_train:n_train + 51]) and held_out.isdisjoint(training)
    assert held_out.isdisjoint(c for c, _ in seen)
    assert seen == Counter((c, offset) for c in training for offset in range(1, ctx))


def test_resumed_run_matches_uninterrupted(run, loaded, tmp_path):
    """Stopped at step 110 of 115 (the checkpoint at 100 survives) and resumed: the same SAE, bit for
    bit, and the resumed run computes no forward pass for the buffers before step 100."""
    cfg = load_config(run)
    computed: list[int] = []

    def recording(stream):
        def read_into(a, b, out):
            computed.append(b - a)
            stream.read_into(a, b, out)
        # small buffers (2 chunks of 32 contexts), so that a resume has whole buffers to skip
        return dataclasses.replace(stream, buffer_rows=2048, read_into=read_into)

    with _store(run) as store:
        full, _ = train_sae(cfg.sae, cfg.train, recording(model_stream(cfg, loaded, store)), ckpt_dir=tmp_path / "a",
                            fp="f", progress=False)
        train_sae(cfg.sae, cfg.train, recording(model_stream(cfg, loaded, store)), ckpt_dir=tmp_path / "b", fp="f",
                  progress=False, max_steps=110)
        assert torch.load(tmp_path / "b" / CKPT_FILE, weights_only=True)["step"] == 100
        computed.clear()
        resumed, summary = train_sae(cfg.sae, cfg.train, recording(model_stream(cfg, loaded, store)),
                                     ckpt_dir=tmp_path / "b", fp="f", progress=False)
        rows_resumed = sum(computed)
        computed.clear()  # what the 115 batches of an uninterrupted run cost (without the trainer's first sample)
        batches = recording(model_stream(cfg, loaded, store)).batches(cfg.train.batch_size)
        for _ in range(summary["steps"]):
            next(batches)
        batches.close()
        rows_uninterrupted = sum(computed)
    assert summary["finished"] and summary["steps"] == 115
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    # 100 steps of 128 rows lie behind the resumed run: six whole buffers of 2,048 rows (1,984 trained
    # on each); reading ahead makes either count vary by at most one buffer
    assert rows_resumed <= rows_uninterrupted - 4 * 2048, (rows_resumed, rows_uninterrupted)


def test_too_few_contexts_is_one_line_before_training(run, loaded, capsys, monkeypatch):
    with _store(run) as store, pytest.raises(AtlasError) as e:
        _stream(run, loaded, store, "train.n_tokens=1000000")
    msg = str(e.value)
    assert "\n" not in msg and "'train.n_tokens' = 1,000,000" in msg and "has 756 (807 less the store's 51" in msg
    monkeypatch.chdir(run.parent)
    ckpt = run.parent / "runs" / "tiny" / "sae.ckpt" / CKPT_FILE
    ckpt.unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["train", "--config", str(run), "--set", "train.source=model", "--set", "train.n_tokens=1e6"]) != 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if ": error: " in line] == [f"atlas train: error: {msg}"]
    assert not ckpt.exists()


def test_source_is_validated(run):
    with pytest.raises(ConfigError) as e:
        load_config(run, ["train.source=disk"])
    assert "'train.source' = 'disk': must be store or model" in str(e.value) and "\n" not in str(e.value)


def test_a_corpus_that_no_longer_gives_the_stores_contexts_is_refused(run, loaded):
    """The held-out contexts are skipped by position, so the corpus must still give the store's."""
    with _store(run) as store, pytest.raises(AtlasError) as e:
        store.tokens = store.tokens.copy()
        store.tokens[300, 5] += 1
        _stream(run, loaded, store)
    assert "no longer gives the contexts the store holds" in str(e.value) and "\n" not in str(e.value)
