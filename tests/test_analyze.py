"""`atlas analyze` on a tiny run: every streamed result against a brute-force computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import atlas.analyze as analyze
from atlas.analyze.selection import _rng, merge_topk
from atlas.analyze.spill import Spill
from atlas.cli import main
from atlas.config import load_config
from atlas.errors import AtlasError, ConfigError
from atlas.labels import Evidence, Explainer, get_explainer, register
from atlas.saes import load_sae
from atlas.shards import read_feature, read_manifest, read_vocab
from atlas.stage import write_stamp
from atlas.store import ActivationStore
from support import interrupting, tiny_yaml, write_sae

_REAL_ITER, _REAL_BATCHES = ActivationStore.iter_batches, Spill.batches
D_SAE, K = 96, 6


# ---------------------------------------------------------------------------------------------
# A tiny run: `atlas collect` on configs/tiny.yaml, plus a random TopK SAE written in SAELens format.


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory):
    """A folder with tiny.yaml, runs/tiny/activations.h5 (collected) and runs/tiny/sae/."""
    import os


    root = tmp_path_factory.mktemp("analyze")
    tiny_yaml(tiny_world, root, corpus={"n_tokens": 8192}, sae={"d_sae": D_SAE, "k": K},
              analyze={"batch_tokens": 1000, "checkpoint_every": 1})  # batches that straddle contexts
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["collect", "--config", "tiny.yaml"]) == 0
        write_sae(root / "runs" / "tiny" / "sae", 64, D_SAE, K)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def analyzed(tiny_run):
    """Run analyze once; return (cfg, features dir, brute-force dense codes [n_tokens, d_sae])."""
    import os

    cwd = os.getcwd()
    os.chdir(tiny_run)
    try:
        cfg = load_config("tiny.yaml")
        out = analyze.run(cfg)
        with ActivationStore(cfg.run_dir / "activations.h5") as store:
            x = torch.from_numpy(store.read(0, store.n_tokens))
            tokens = store.tokens.copy()
        dense = load_sae(cfg.run_dir / "sae").encode(x)
        dense[:: tokens.shape[1]] = 0  # BOS positions are left out (analyze.skip_bos)
        return cfg, tiny_run / out, dense, tokens
    finally:
        os.chdir(cwd)


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    f = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("features-*.parquet"))], ignore_index=True)
    e = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("examples-*.parquet"))], ignore_index=True)
    return f, e


# ---------------------------------------------------------------------------------------------
# Exactness


def distinct_windows(rows: np.ndarray, tokens: np.ndarray, a) -> list[int]:
    """Which of a feature's top rows (strongest first) its page shows: each one whose window (context_left
    tokens before, context_right after, within the context) and marked place differ from every earlier one's."""
    L, seen, keep = tokens.shape[1], set(), []
    for i, r in enumerate(rows.tolist()):
        c, o = divmod(r, L)
        lo, hi = max(0, o - a.context_left), min(L, o + a.context_right + 1)
        key = (tuple(np.asarray(tokens[c, lo:hi]).tolist()), o - lo)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def test_statistics_and_top_examples_equal_brute_force(analyzed):
    cfg, out, dense, tokens = analyzed
    feats, ex = tables(out)
    assert list(feats.feature_id) == list(range(D_SAE))
    fired = (dense > 0).sum(0)
    np.testing.assert_array_equal(feats.n_fired, fired.numpy())
    n_tokens = dense.shape[0] - tokens.shape[0]
    np.testing.assert_allclose(feats.density, fired.numpy() / n_tokens, rtol=1e-6)
    np.testing.assert_allclose(feats.max_act, dense.max(0).values.numpy(), rtol=1e-6)
    mean = np.where(fired > 0, dense.sum(0).double() / fired.clamp_min(1), 0)
    np.testing.assert_allclose(feats.mean_act, mean, rtol=1e-5)
    assert feats.is_dead.sum() >= 3 and list(feats.is_dead) == list(fired.numpy() == 0)
    assert list(feats.is_dense) == list(fired.numpy() / n_tokens > cfg.analyze.dense_threshold)

    L = tokens.shape[1]
    top = ex[ex.kind == "top"]
    for f in range(D_SAE):
        col = dense[:, f]
        n = min(cfg.analyze.n_top, int((col > 0).sum()))
        vals, rows = col.sort(descending=True, stable=True)
        got = top[top.feature_id == f].sort_values("rank")
        keep = distinct_windows(rows[:n].numpy(), tokens, cfg.analyze)
        assert list(got["rank"]) == list(range(len(keep)))
        np.testing.assert_array_equal(got.context * L + got.offset, rows[:n].numpy()[keep])
        np.testing.assert_array_equal(got.activation, vals[:n].numpy()[keep])


def test_histograms_sum_to_firing_counts(analyzed):
    cfg, out, dense, _ = analyzed
    feats, _ = tables(out)
    for r in feats.itertuples():
        if r.is_dead:
            assert len(r.hist_counts) == 0 and len(r.hist_edges) == 0
            continue
        assert len(r.hist_counts) == cfg.analyze.histogram_bins and len(r.hist_edges) == cfg.analyze.histogram_bins + 1
        assert sum(r.hist_counts) == r.n_fired
        e = np.asarray(r.hist_edges)
        assert (np.diff(np.log(e.astype(np.float64))) > 0).all()  # log-spaced, increasing
        np.testing.assert_allclose(np.diff(np.log(e.astype(np.float64))), np.log(e[-1] / e[0]) / len(r.hist_counts),
                                   rtol=1e-3)
        # Brute force: the same bins from all activations of the feature.
        col = dense[:, r.feature_id].numpy()
        col = col[col > 0]
        want = np.clip(np.searchsorted(e, col, side="right") - 1, 0, len(e) - 2)
        np.testing.assert_array_equal(np.bincount(want, minlength=len(e) - 1), r.hist_counts)


def test_interval_samples_lie_in_their_intervals(analyzed):
    cfg, out, dense, tokens = analyzed
    feats, ex = tables(out)
    L = tokens.shape[1]
    iv = ex[ex.kind == "interval"]
    assert len(iv) > 0
    per = cfg.analyze.per_interval
    for r in feats.itertuples():
        got = iv[iv.feature_id == r.feature_id]
        if r.is_dead:
            assert len(got) == 0
            continue
        e = np.asarray(r.interval_edges)
        assert len(e) == cfg.analyze.n_intervals + 1 and e[0] == 0 and e[-1] == r.max_act
        col = dense[:, r.feature_id].numpy()
        for i in range(cfg.analyze.n_intervals):
            members = np.nonzero((col > e[i]) & (col <= e[i + 1]))[0]
            sample = got[got.interval == i]
            assert len(sample) == min(per, len(members))  # full reservoirs, no more than the members
            assert list(sample["rank"]) == list(range(len(sample)))
            assert (np.diff(sample.activation.to_numpy()) <= 0).all()  # shown strongest first
            rows = (sample.context * L + sample.offset).to_numpy()
            assert len(set(rows)) == len(rows) and set(rows) <= set(members)
            np.testing.assert_array_equal(sample.activation, col[rows])


def test_windows_show_tokens_and_per_token_activations(analyzed):
    cfg, out, dense, tokens = analyzed
    _, ex = tables(out)
    L, a = tokens.shape[1], cfg.analyze
    for r in ex.sample(200, random_state=0).itertuples():
        lo, hi = max(0, r.offset - a.context_left), min(L, r.offset + a.context_right + 1)
        assert r.window_start == lo
        np.testing.assert_array_equal(r.token_ids, tokens[r.context, lo:hi])
        np.testing.assert_array_equal(r.acts, dense[r.context * L + lo: r.context * L + hi, r.feature_id].numpy())
        assert r.acts[r.offset - lo] == r.activation > 0  # the marked (max) token


def test_neighbours_and_logits_equal_brute_force(analyzed):
    from atlas.model import load_model

    cfg, out, _, _ = analyzed
    feats, _ = tables(out)
    sae = load_sae(out.parent / "sae")
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    cos = w @ w.T
    cos.fill_diagonal_(-np.inf)
    v, i = cos.topk(cfg.analyze.n_neighbours, dim=1)
    np.testing.assert_array_equal(np.stack(feats.neighbour_ids), i.numpy())
    np.testing.assert_allclose(np.stack(feats.neighbour_cosines), v.numpy(), rtol=1e-5, atol=1e-6)
    assert feats.neighbour_ids[0][0] == 4  # the planted near-duplicate

    w_u = load_model(cfg.model.name).unembedding()
    eff = sae.W_dec @ w_u
    n = cfg.analyze.n_logits
    tv, ti = eff.topk(n, dim=1)
    bv, bi = eff.topk(n, dim=1, largest=False)
    np.testing.assert_array_equal(np.stack(feats.top_logit_ids), ti.numpy())
    np.testing.assert_allclose(np.stack(feats.top_logit_values), tv.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.stack(feats.bottom_logit_ids), bi.numpy())
    np.testing.assert_allclose(np.stack(feats.bottom_logit_values), bv.numpy(), rtol=1e-4, atol=1e-5)


def test_manifest_vocab_map_and_labels(analyzed):
    from transformers import AutoTokenizer

    cfg, out, _, _ = analyzed
    m = read_manifest(out)
    assert json.loads((out / "stamp.json").read_text())["fingerprint"]
    for key in ("schema_version", "n_features", "shard_size", "n_shards", "n_tokens", "has_logits", "model",
                "layer", "hook_name", "sae_cfg", "metrics", "map_method", "label_source", "vocab_size"):
        assert key in m, key
    assert m["n_features"] == D_SAE and m["n_shards"] == 2 and m["has_logits"] is True
    assert m["metrics"]["fvu"] == 0.25 and m["sae_cfg"]["d_sae"] == D_SAE
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "examples-00000.parquet", "examples-00001.parquet", "features-00000.parquet", "features-00001.parquet",
        "vocab.parquet"]
    assert not (out.parent / "features.partial").exists()

    vocab = read_vocab(out)
    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    assert len(vocab) == len(tok)
    byte_level = [t for t, i in tok.get_vocab().items() if t.startswith("Ġ") and len(t) > 2]
    assert byte_level
    assert vocab[tok.convert_tokens_to_ids(byte_level[0])] == " " + byte_level[0][1:]

    feats, _ = tables(out)
    assert feats.map_x.between(0, 1).all() and feats.map_y.between(0, 1).all()
    assert feats[feats.is_dead].map_x.notna().all()
    assert (feats[feats.is_dead].label == "dead feature").all()
    assert (feats[~feats.is_dead].label.str.len() > 0).all()
    assert set(feats.label_source) <= {"top-tokens", "token-set", "bigram", "trigram", "after-token", "char-class"}


def test_shards_read_back_same_with_pyarrow_pandas_and_reader(analyzed):
    cfg, out, _, _ = analyzed
    a = pq.read_table(out / "features-00001.parquet").to_pylist()
    b = pd.read_parquet(out / "features-00001.parquet")
    assert pq.ParquetFile(out / "features-00001.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    rec = read_feature(out, 70)
    row = next(r for r in a if r["feature_id"] == 70)
    assert rec.row == row
    assert list(b[b.feature_id == 70].iloc[0].top_logit_ids) == row["top_logit_ids"]
    ex = pq.read_table(out / "examples-00001.parquet").to_pandas()
    assert len(rec.examples) == (ex.feature_id == 70).sum()
    assert [e["activation"] for e in rec.examples if e["kind"] == "top"] == list(
        ex[(ex.feature_id == 70) & (ex.kind == "top")].activation)


def test_corrupt_shard_gives_clear_error(analyzed, tmp_path):
    _, out, _, _ = analyzed
    broken = tmp_path / "features"
    shutil.copytree(out, broken)
    p = broken / "examples-00000.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(AtlasError, match="examples-00000.parquet: corrupt or truncated"):
        read_feature(broken, 3)
    (broken / "features-00001.parquet").unlink()
    with pytest.raises(AtlasError, match="features-00001.parquet: missing shard"):
        read_feature(broken, 70)


# ---------------------------------------------------------------------------------------------
# Stage behaviour


def test_rerun_is_skipped(analyzed, monkeypatch, capsys):
    cfg, out, _, _ = analyzed
    monkeypatch.chdir(out.parent.parent.parent)
    before = (out / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(analyze, "analyze_stream", lambda *a, **k: pytest.fail("re-analysed"))
    assert analyze.run(load_config("tiny.yaml")) == Path("runs/tiny/features")
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_interrupted_run_resumes_to_the_same_result(analyzed, tiny_run, monkeypatch, tmp_path):
    cfg, out, _, _ = analyzed
    work = tmp_path / "w"
    (work / "runs" / "tiny").mkdir(parents=True)
    shutil.copy(tiny_run / "tiny.yaml", work / "tiny.yaml")
    for name in ("activations.h5", "activations.h5.parts", "sae"):
        src = tiny_run / "runs" / "tiny" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / "runs" / "tiny" / name)
    monkeypatch.chdir(work)
    cfg = load_config("tiny.yaml")
    partial = Path("runs/tiny/features.partial")

    # Killed during the encode pass, after 3 of 9 batches.
    monkeypatch.setattr(ActivationStore, "iter_batches", interrupting(_REAL_ITER, 3))
    with pytest.raises(KeyboardInterrupt):
        analyze.run(cfg)
    monkeypatch.setattr(ActivationStore, "iter_batches", _REAL_ITER)
    assert torch.load(partial / "state.pt")["tokens_done"] == 3000 and not Path("runs/tiny/features").exists()

    # Killed during the sampling pass; the encoder is then called only for the 6 missing batches.
    calls = []
    real_encoder = analyze.sparse_encoder

    def counting_encoder(sae):
        enc = real_encoder(sae)
        return lambda x: (calls.append(len(x)), enc(x))[1]

    monkeypatch.setattr(analyze, "sparse_encoder", counting_encoder)
    monkeypatch.setattr(Spill, "batches", interrupting(_REAL_BATCHES, 4))
    with pytest.raises(KeyboardInterrupt):
        analyze.run(cfg)
    assert len(calls) == 6 and sum(calls) == 8192 - 3000
    state = torch.load(partial / "state.pt")
    assert state["phase"] == "sample" and state["sample_tokens"] == 4000
    monkeypatch.setattr(Spill, "batches", _REAL_BATCHES)
    calls.clear()
    resumed = analyze.run(cfg)
    # the stream is not encoded again; only the label splits are (atlas/labels/data.py: the choose
    # split's blocks of contexts, then the score split's, each in batches of analyze.batch_tokens)
    from atlas.labels.data import split_ranges

    store = ActivationStore(Path("runs/tiny/activations.h5"))
    choose, score = split_ranges(store.n_contexts, store.ctx_len, cfg.analyze.label_tokens)
    b = cfg.analyze.batch_tokens
    assert calls == [min(b, len(r) - i) for r in choose + score for i in range(0, len(r), b)]
    for name in ("features-00000.parquet", "examples-00000.parquet", "features-00001.parquet",
                 "examples-00001.parquet"):
        assert pq.read_table(resumed / name).equals(pq.read_table(out / name)), name
    assert not partial.exists()


def test_relu_sae_and_model_without_lm_head(analyzed, tiny_run, monkeypatch, tmp_path):
    from atlas.model import LoadedModel

    work = tmp_path / "w"
    shutil.copytree(tiny_run / "runs" / "tiny", work / "runs" / "tiny", ignore=shutil.ignore_patterns("features*"))
    shutil.copy(tiny_run / "tiny.yaml", work / "tiny.yaml")
    write_sae(work / "runs" / "tiny" / "sae", 64, D_SAE, K, seed=3, architecture="standard")  # dense encode path
    monkeypatch.chdir(work)
    monkeypatch.setattr(LoadedModel, "unembedding", lambda self: None)
    cfg = load_config("tiny.yaml", ["analyze.explainer=test-echo"])
    out = analyze.run(cfg)
    with ActivationStore(cfg.run_dir / "activations.h5") as store:
        dense = load_sae(cfg.run_dir / "sae").encode(torch.from_numpy(store.read(0, store.n_tokens)))
        tokens = np.array(store.tokens)
    dense[:: store.ctx_len] = 0
    _, ex = tables(out)
    for f in (0, 10, 50):
        got = ex[(ex.feature_id == f) & (ex.kind == "top")].sort_values("rank")
        vals, rows = dense[:, f].sort(descending=True, stable=True)
        n = min(cfg.analyze.n_top, int((dense[:, f] > 0).sum()))
        assert n > 0
        keep = distinct_windows(rows[:n].numpy(), tokens, cfg.analyze)
        np.testing.assert_array_equal(got.context * store.ctx_len + got.offset, rows[:n].numpy()[keep])
    m = read_manifest(out)
    assert m["has_logits"] is False
    feats, _ = tables(out)
    assert all(len(x) == 0 for x in feats.top_logit_ids) and all(len(x) == 0 for x in feats.bottom_logit_values)
    assert (feats.label == [f"f{i}" for i in range(D_SAE)]).all() and (feats.label_source == "test-echo").all()


# ---------------------------------------------------------------------------------------------
# Units


@register("test-echo")
class _Echo(Explainer):
    def explain(self, evidence, vocab):
        return [f"f{e.feature_id}" for e in evidence]


def test_explainer_registry():
    assert get_explainer("test-echo").name == "test-echo"
    with pytest.raises(ConfigError, match="unknown explainer"):
        get_explainer("nope")
    vocab = ["<s>", " the", " park", " in", "\n"]
    top = get_explainer("top-tokens")
    e = Evidence(0, False, 0.01, 3.0, top_token_ids=[2, 2, 2, 1], prev_token_ids=[1, 1, 1, 3])
    assert top.explain([e], vocab)[0].label == "the park"
    e = Evidence(0, False, 0.01, 3.0, top_token_ids=[2, 2, 2, 1], prev_token_ids=[3, 1, 0, 3])
    assert top.explain([e], vocab)[0].label == "park"
    e = Evidence(0, False, 0.01, 3.0, top_token_ids=[1, 2, 3, 4], prev_token_ids=[-1] * 4)
    assert top.explain([e], vocab)[0].label.count(" / ") == 2
    assert top.explain([Evidence(0, True, 0.0, 0.0)], vocab)[0].label == "dead feature"


def test_merge_topk_equals_sort():
    g = torch.Generator().manual_seed(1)
    G, m = 7, 4
    buf = torch.full((G, m), float("-inf"))
    pos = torch.full((G, m), -1, dtype=torch.int64)
    allg, alls = [], []
    for b in range(5):
        n = int(torch.randint(0, 40, (1,), generator=g))
        grp, score = torch.randint(0, G, (n,), generator=g), torch.rand(n, generator=g)
        merge_topk(buf, grp, score, [pos], [torch.arange(n) + 1000 * b])
        allg.append(grp)
        alls.append(score)
    allg, alls = torch.cat(allg), torch.cat(alls)
    for grp in range(G):
        want = alls[allg == grp].sort(descending=True).values[:m]
        np.testing.assert_array_equal(buf[grp, : len(want)].numpy(), want.numpy())
        assert (pos[grp, len(want):] == -1).all()


def test_pca_map_is_deterministic_and_scaled():
    from atlas.featuremap import map_coordinates

    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    a, b = map_coordinates(w, "pca"), map_coordinates(w.clone(), "pca")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 2) and a.min() == 0 and a.max() == 1


def test_bad_sae_shape_is_a_clear_error(tiny_run, monkeypatch, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(tiny_run / "runs" / "tiny", work / "runs" / "tiny", ignore=shutil.ignore_patterns("features*"))
    shutil.copy(tiny_run / "tiny.yaml", work / "tiny.yaml")
    write_sae(work / "runs" / "tiny" / "sae", 32, D_SAE, K, seed=5)
    monkeypatch.chdir(work)
    with pytest.raises(AtlasError, match="d_in 32 does not match the store's d_model 64"):
        analyze.run(load_config("tiny.yaml"))


def test_reservoir_by_random_keys_is_uniform():
    """Streaming 20 members per group in 4 batches, keep 5 by largest random key: every member is
    kept with probability 1/4 (checked over 4,000 independent groups)."""
    G, m, n, per_batch = 4000, 5, 20, 5
    key = torch.full((G, m), float("-inf"))
    pos = torch.full((G, m), -1, dtype=torch.int64)
    for b in range(n // per_batch):
        group = torch.arange(G).repeat_interleave(per_batch)
        member = torch.arange(b * per_batch, (b + 1) * per_batch).repeat(G)
        merge_topk(key, group, torch.rand(len(group), generator=_rng(0, b)), [pos], [member])
    freq = torch.bincount(pos.flatten(), minlength=n).double() / G
    assert (pos >= 0).all()
    assert ((freq - m / n).abs() < 0.03).all(), freq  # 0.03 is > 4 standard errors


def _examples(feat, row, top, windows):
    """dedup.Examples from per-example lists: windows as (start_row, tokens)."""
    from atlas.analyze.dedup import Examples
    from atlas.analyze.windows import Windows

    widths = [len(t) for _, t in windows]
    offsets = torch.tensor([0] + list(np.cumsum(widths)), dtype=torch.int64)
    flat = [x for _, t in windows for x in t]
    n = len(feat)
    interval = torch.tensor([-1 if t else 0 for t in top], dtype=torch.int16)
    return Examples(torch.tensor(feat), torch.tensor(row), torch.arange(n, 0, -1).float(), torch.tensor(top), interval,
                    torch.zeros(n, dtype=torch.int16),
                    Windows(torch.tensor([s for s, _ in windows]), offsets, torch.arange(len(flat)).float()),
                    torch.tensor(flat, dtype=torch.int32))


def test_duplicate_examples_are_dropped():
    """Among a feature's top examples, the same store row twice, or the same window marked at the same
    place in another context: the first is kept, ranks renumbered; the same window marked elsewhere,
    another feature's, or an interval sample stays."""
    from atlas.analyze.dedup import drop_duplicates

    L = 100
    ex = _examples(
        feat=[0, 0, 0, 0, 0, 1, 1],
        row=[10, 210, 310, 10, 415, 10, 510],
        top=[True, True, True, True, False, True, True],
        windows=[(8, [5, 6, 7, 8]), (208, [5, 6, 7, 8]), (308, [5, 6, 7, 8]), (8, [5, 6, 7, 8]), (414, [1, 2]),
                 (8, [5, 6, 7, 8]), (509, [5, 6, 7, 8])])
    # 0: kept; 1: same window, same mark (210 - 208 = 2) -> dropped; 2: same again -> dropped; 3: same row -> dropped;
    # 4: an interval example (never dropped); 5: another feature's; 6: the same tokens marked at 1, not 2 -> kept
    out = drop_duplicates(ex, L)
    assert out.row.tolist() == [10, 415, 10, 510]
    assert out.rank.tolist() == [0, 0, 0, 1]
    assert out.windows.offsets.tolist() == [0, 4, 6, 10, 14]
    assert out.win_tokens.tolist() == [5, 6, 7, 8, 1, 2, 5, 6, 7, 8, 5, 6, 7, 8]
    assert out.windows.acts.tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]


def test_special_token_and_position_features_are_marked():
    from atlas.analyze.dedup import dominated_by

    L, bos, sep = 10, 0, 1
    tokens = torch.arange(100, dtype=torch.int32) % 7 + 2          # ordinary tokens 2..8
    tokens[::L] = bos
    tokens[[13, 25, 37, 48]] = sep
    ex = _examples(
        feat=[0] * 5 + [1] * 5 + [2] * 5 + [3] * 2,
        # 0: 4 of 5 on separators; 1: 4 of 5 at offset 1; 2: spread out; 3: too few to say
        row=[13, 25, 37, 48, 52] + [1, 11, 21, 31, 45] + [2, 14, 26, 38, 47] + [1, 11],
        top=[True] * 17,
        windows=[(r, [int(tokens[r])]) for r in [13, 25, 37, 48, 52, 1, 11, 21, 31, 45, 2, 14, 26, 38, 47, 1, 11]])
    assert dominated_by(ex, tokens, L, 5, {bos, sep}) == ["special-token", "position", "", "", ""]
