"""`atlas export`: the trunk and encoder files against PyTorch for a tiny suite (three layers, a width
family at one), the web files' gate, file splitting, and the browser tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from atlas import export
from atlas.export.quantization import (EMBED_BLOCK, RARE_EMBED_BLOCK, _quantize_embedding, dequantize_blocks,
                                       dequantize_table, dequantized_weight, quantize_blocks, quantize_table)
from atlas.config import WEB_QUANTIZATIONS, RunConfig
from atlas.errors import AtlasError
from atlas.model import load_model
from support import D_SAE, LAYER, SUITE, corpus_frequency, export_tiny, make_sae, single, suite_saes, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
TRICKY = ["Hello world", " leading space", "  two spaces", "new\nline", "\n\ntwo newlines\n", "tab\there",
          "café naïve résumé", "日本語のテキスト", "emoji 🙂👍🏽 and flags 🇫🇷", "<|endoftext|>", "a<|endoftext|>b",
          "<script>alert(1)</script>", "numbers 12345 3.14", "don't won't it's", "", " "]


@pytest.fixture(scope="module")
def loaded(tiny_world):
    return load_model(str(tiny_world / "model"))


@pytest.fixture(scope="module")
def exported(tiny_suite_onnx):
    """The tiny suite's onnx/ folder."""
    return tiny_suite_onnx


def torch_topk(loaded, ids: list[int], sae_id: str = "L2-256", k: int = 32) -> export.Encoded:
    """PyTorch's top k for SAE `sae_id` of the tiny suite: its own truncated model, not the trunk."""
    s = next(s for s in suite_saes(loaded.d_model) if s.id == sae_id)
    graph = export.EncoderGraph(loaded.truncated(s.layer), s.sae, k).eval()
    return export.torch_outputs(graph, [ids])


def run_files(folder: Path, sae_id: str, ids: list[int], web: bool = False) -> export.Encoded:
    """The trunk then SAE `sae_id`'s encoder, full precision or web files, on one sequence."""
    layer = next(layer for i, layer, _ in SUITE + [(f"L{LAYER}", LAYER, D_SAE)] if i == sae_id)
    ext = ".web.onnx" if web else ".onnx"
    return export.run_split(export.session(folder / f"trunk{ext}"),
                            export.session(folder / f"{export.encoder_name(sae_id)}{ext}"), layer, ids)


def hook_residual(loaded, ids: list[int], layer: int = LAYER) -> torch.Tensor:
    """The residual before block `layer` from the full model's hidden states (not TruncatedModel)."""
    with torch.no_grad():
        return loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]


def test_files_and_metadata(exported):
    meta = json.loads((exported / "model.json").read_text())
    for f in meta["files"] + ["trunk.onnx", "parity.json", "model.json"] + [f"encoder-{i}.onnx" for i, _, _ in SUITE]:
        assert (exported / f).is_file(), f
    assert meta["format"] == 2 and meta["max_tokens"] == 128 and meta["prepend_bos"] is True
    assert meta["ctx_len"] == RunConfig().corpus.ctx_len    # tiny_cfg keeps the default training context length
    trunk = meta["trunk"]
    assert trunk["onnx"] == "trunk.web.onnx" and trunk["files"] == ["trunk.web.onnx", *trunk["external_data"], "tokenizer.json"]
    assert trunk["outputs"] == {"1": "resid_1", "2": "resid_2", "3": "resid_3"}  # one per hook layer, not per SAE
    assert [(s["id"], s["layer"], s["d_sae"]) for s in meta["saes"]] == SUITE
    for s in meta["saes"]:
        assert s["onnx"] == f"encoder-{s['id']}.web.onnx" and s["top_k"] == 32
        assert s["input"] == {"name": "resid", "from": f"resid_{s['layer']}"}
        assert s["outputs"] == {"ids": "top_ids", "acts": "top_acts", "n_active": "n_active"}
        assert s["bytes"] == sum((exported / f).stat().st_size for f in s["files"])
    assert meta["total_bytes"] == sum((exported / f).stat().st_size for f in meta["files"])
    assert all((exported / f).stat().st_size <= export.files.MAX_FILE_BYTES for f in meta["files"])


def test_trunk_runs_the_blocks_once(exported):
    """The trunk emits every hook's residual from one pass: the MatMuls of blocks 0..2 (4 each in
    GPT-2), once, however many SAEs and layers read it; an encoder holds only its SAE."""
    import onnx

    def weight_matmuls(model) -> int:
        weights = {t.name for t in model.graph.initializer}
        return sum(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)

    trunk = onnx.load(exported / "trunk.onnx")
    assert weight_matmuls(trunk) == 3 * 4
    assert [o.name for o in trunk.graph.output] == ["resid_1", "resid_2", "resid_3"]
    enc = onnx.load(exported / "encoder-L2-512.onnx")
    assert [i.name for i in enc.graph.input] == ["resid"] and weight_matmuls(enc) == 1


def test_parity_report_records_the_choice(exported):
    report = json.loads((exported / "parity.json").read_text())
    assert report["requested"] == "auto" and report["quantization"] in export.QUANTIZATIONS
    modes = report["modes_tried"]
    assert modes == list(export.QUANTIZATIONS)[:len(modes)] and modes[-1] == report["quantization"]
    assert list(report["saes"]) == [i for i, _, _ in SUITE]
    for sae_id, r in report["saes"].items():
        assert r["full"]["ok"] and r["full"]["ids_match"] >= 0.999 and r["full"]["max_rel_err"] <= 1e-4, sae_id
        assert list(r["modes"]) == modes and r["web"] == r["modes"][modes[-1]]
        assert r["web"]["ok"] and r["web"]["top1_agreement"] >= 0.97 and r["web"]["topk_overlap"] >= 0.95, sae_id
        assert r["web"]["bytes"] == r["encoder_bytes"]
    for m in modes[:-1]:  # a mode passes only when every SAE passes
        assert not all(r["modes"][m]["ok"] for r in report["saes"].values())
    assert report["n_contexts"] == 16 and report["n_tokens"] > 100
    meta = json.loads((exported / "model.json").read_text())
    assert report["first_analysis_bytes"] == meta["trunk"]["bytes"] + max(s["bytes"] for s in meta["saes"])


def test_config_names_every_mode():
    assert set(WEB_QUANTIZATIONS) == {export.AUTO, *export.QUANTIZATIONS}
    assert RunConfig().export.quantization == export.AUTO


@pytest.mark.parametrize("n", [1, 2, 37, 128])
def test_full_precision_matches_torch_at_any_length(exported, loaded, n):
    rng = np.random.default_rng(n)
    ids = [loaded.bos_token_id] + rng.integers(0, loaded.tokenizer.vocab_size, n - 1).tolist()
    for sae_id, _, _ in SUITE:
        got = run_files(exported, sae_id, ids)
        assert got.top_ids.shape == (n, 32) and got.top_ids.dtype == np.int32
        assert got.n_active.shape == (n,) and got.n_active.dtype == np.int32
        r = export.compare(torch_topk(loaded, ids, sae_id), got)
        assert r["ids_match"] == 1.0 and r["max_rel_err"] < 1e-4 and r["n_active_match"] == 1.0, sae_id


def test_n_active_counts_all_latents(exported, loaded):
    """n_active is the dense count of latents > 0, checked against the full model's hidden states
    and a dense PyTorch encode; these ReLU SAEs have far more than k active latents."""
    ids = export.encode_with_bos(loaded, "Once upon a time, there was a little dog named Max.", 128)
    for s in suite_saes(loaded.d_model):
        dense = (s.sae.encode(hook_residual(loaded, ids, s.layer)) > 0).sum(-1).numpy()
        assert dense.min() > 32  # more active latents than the top k shows
        assert np.array_equal(run_files(exported, s.id, ids).n_active, dense), s.id
        web = run_files(exported, s.id, ids, web=True)
        assert np.abs(web.n_active - dense).mean() < 0.02 * dense.mean(), s.id


@pytest.mark.parametrize("stem, n_weights", [("trunk", 3 * 4), ("encoder-L2-512", 1)])
def test_web_weights_are_dequantised_once_at_load(exported, tmp_path, stem, n_weights):
    """The web files store weights as integers; onnxruntime folds the nodes that rebuild them when
    the session opens, leaving float MatMuls on float activations with exactly the weights
    `dequantized_weight` computes (nothing is quantised per call)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    q = export.QUANTIZATIONS[json.loads((exported / "parity.json").read_text())["quantization"]]
    web = onnx.load(exported / f"{stem}.web.onnx")
    ops = [n.op_type for n in web.graph.node]
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "DequantizeLinear"} & set(ops)
    bits = sorted({a.name: a.i for a in n.attribute}["bits"] for n in web.graph.node if n.op_type == "GatherBlockQuantized")
    if stem == "trunk":
        assert bits == ([4, 8] if q.embedding_bits == 4 and q.frequent_tokens else [q.embedding_bits])
    else:
        assert bits == []  # no token embedding in an encoder
    assert not any(t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 4096 for t in web.graph.initializer)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(exported / f"{stem}.web.onnx"), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not {"Cast", "Sub"} & {n.op_type for n in optimized.graph.node if n.input[0].endswith(("_q_int", "_q_zp"))}
    folded = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    full = onnx.load(exported / f"{stem}.onnx")
    weights = {n.input[1] for n in full.graph.node if n.op_type == "MatMul"}
    checked = [t.name for t in full.graph.initializer if t.name in weights]
    assert len(checked) == n_weights
    for t in full.graph.initializer:
        if t.name in weights:
            assert np.array_equal(folded[t.name], dequantized_weight(numpy_helper.to_array(t), q.weight_block)), t.name


def test_f16_mode_stores_half_weights_restored_once_at_load(exported, tmp_path):
    """Mode f16: every MatMul weight and gathered table is stored in float16 and cast back when the
    session opens; the folded weights are exactly the float16 roundings of the full-precision ones."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from atlas.export.files import save_model
    from atlas.export.quantization import quantize

    full = onnx.load(exported / "trunk.onnx")
    save_model(quantize(full, "f16"), tmp_path / "trunk.f16.onnx")
    web = onnx.load(tmp_path / "trunk.f16.onnx")
    assert not any(t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 4096 for t in web.graph.initializer)
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in web.graph.initializer) >= 3 * 4 + 1
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "trunk.f16.onnx"), opts, providers=["CPUExecutionProvider"])
    folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "optimized.onnx").graph.initializer}
    weights = {n.input[1] for n in full.graph.node if n.op_type == "MatMul"}
    weights |= {n.input[0] for n in full.graph.node if n.op_type == "Gather"}
    checked = 0
    for t in full.graph.initializer:
        if t.name in weights and len(t.dims) == 2:
            w = numpy_helper.to_array(t)
            assert np.array_equal(folded[t.name], w.astype(np.float16).astype(np.float32)), t.name
            checked += 1
    assert checked >= 3 * 4 + 1


@pytest.mark.parametrize("block", [0, 32])
def test_dequantized_weight_error_is_half_a_step(block):
    """8-bit blocks along the input dimension: the error is half a step, plus what rounding the
    scale to float16 (relative error <= 2**-11) adds at the block's edge."""
    w = np.random.default_rng(block).normal(size=(96, 40)).astype(np.float32)
    deq = dequantized_weight(w, block)
    blocks = w.reshape(-1, block or 96, 40)
    step = (np.maximum(blocks.max(1), 0) - np.minimum(blocks.min(1), 0)) / 255  # [n_blocks, cols]
    bound = np.repeat(step * (0.5 + 255 * 2**-11), block or 96, axis=0) + 1e-7
    assert (np.abs(deq - w) <= bound).all() and np.abs(deq - w).max() > 0.3 * step.min()


def test_web_files_are_close_to_torch(exported, loaded):
    ids = export.encode_with_bos(loaded, "Once upon a time, there was a little dog named Max.", 128)
    for sae_id, _, _ in SUITE:
        assert export.compare(torch_topk(loaded, ids, sae_id), run_files(exported, sae_id, ids, web=True))["topk_overlap"] > 0.9


def test_files_hold_no_local_paths(exported):
    """torch's exporter records each node's source location; the published files must not carry
    the paths of the machine that exported them."""
    root = str(Path(__file__).resolve().parent.parent).encode()
    for f in [*exported.glob("encoder*.onnx*"), *exported.glob("trunk*.onnx*")]:
        data = f.read_bytes()
        assert root not in data and b"site-packages" not in data and b".py:" not in data, f.name


def test_model_json_lists_only_what_the_browser_loads(exported):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["files"] == meta["trunk"]["files"] + [f for s in meta["saes"] for f in s["files"]]
    assert all(s["files"] == [s["onnx"], *s["external_data"]] for s in meta["saes"])
    assert not {f for f in meta["files"] if not f.endswith((".web.onnx", "tokenizer.json")) and ".web.onnx.data" not in f}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols, block", [(64, 64), (768, 64), (100, 32), (48, 16)])
def test_quantized_table_is_what_onnxruntime_gathers(cols, block, bits):
    """`quantize_table` lays out what GatherBlockQuantized reads; error within half a step per block."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(cols).normal(size=(300, cols)).astype(np.float32)
    w[7] = 0.0
    data, scale, zps = quantize_table(w, bits, block)
    deq = dequantize_table(data, scale, zps, bits, block)
    blk = np.arange(cols) // block
    step = scale.astype(np.float32)[:, blk]
    assert scale.dtype == np.float16 and (np.abs(deq - w) <= step / 2 + 2e-3 * np.abs(w) + 1e-6).all()
    assert (deq[7] == 0).all()
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s", "z"], ["y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((data, "d"), (scale, "s"), (zps, "z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    idx = np.array([[0, 7, 299], [5, 5, 150]], np.int64)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"i": idx})
    assert y.dtype == np.float16 and np.array_equal(y.astype(np.float32), deq[idx])


def test_frequent_tokens_keep_8_bit_rows():
    """w8-emb4's table: the rows of the frequent tokens at 8 bits, the others at 4, each token's row
    found in the graph (the first and last ids among both kinds, and ids repeated)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 100)).astype(np.float32)
    gather = helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)
    graph = helper.make_graph([gather], "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    frequent = np.array([5, 299, 0, 17, 42])
    assert _quantize_embedding(model, 4, frequent) == 1
    ids = np.array([[0, 1, 5, 6, 299, 298], [17, 18, 42, 43, 100, 17]], np.int32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})

    kept, rare = np.sort(frequent), np.setdiff1d(np.arange(300), frequent)
    row8 = dequantize_blocks(*quantize_blocks(w[kept], EMBED_BLOCK, 8), EMBED_BLOCK)
    row4 = dequantize_blocks(*quantize_blocks(w[rare], RARE_EMBED_BLOCK, 4), RARE_EMBED_BLOCK)
    want = np.stack([[row8[np.searchsorted(kept, i)] if i in kept else row4[np.searchsorted(rare, i)] for i in r] for r in ids])
    # onnxruntime may compute the float16 graph in float32 (it inserts casts where a kernel has no
    # float16 version), so values agree up to float16 rounding
    assert np.allclose(y, want, rtol=2**-10, atol=1e-6)
    step8 = np.abs(w[kept]).max() / 127
    assert np.abs(y[np.isin(ids, kept)] - w[ids[np.isin(ids, kept)]]).max() < step8  # 8-bit rows are finer
    assert np.abs(y - w[ids]).max() > step8


def test_frequent_tokens_come_from_the_training_contexts(tiny_config):
    import h5py

    from atlas import collect
    from atlas.config import load_config

    cfg = load_config(tiny_config)
    assert export.frequent_tokens(cfg) is None  # no store yet
    collect.run(cfg)
    order = export.frequent_tokens(cfg)
    with h5py.File(cfg.run_dir / "activations.h5", "r") as f:
        train = np.asarray(f["tokens"][:len(f["tokens"]) - int(f.attrs["n_eval_contexts"])]).ravel()
    counts = np.bincount(train)
    assert sorted(order.tolist()) == np.flatnonzero(counts).tolist()
    assert (np.diff(counts[order]) <= 0).all()


# ---------------------------------------------------------------- the gate, and massive activations


def old_dynamic_int8(model):
    """The web file before issue #10 (`int8-emb4`): onnxruntime's dynamic int8 quantisation, which
    quantises every MatMul's activations to 8 bits with one scale per tensor."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _quantize_embedding(model, 4)
    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, f"{d}/in.onnx")
        quantize_dynamic(f"{d}/in.onnx", f"{d}/out.onnx", op_types_to_quantize=["MatMul", "Gather"],
                         weight_type=QuantType.QInt8, per_channel=True, extra_options={"MatMulConstBOnly": True})
        return onnx.load(f"{d}/out.onnx")


@pytest.fixture(scope="module")
def massive_world(tiny_world, tmp_path_factory):
    from tiny_world import build_massive

    return build_massive(tmp_path_factory.mktemp("massive-world"), tiny_world)


@pytest.fixture(scope="module")
def massive_saes(massive_world) -> list[export.SaeToExport]:
    """Stand-in SAEs at layers 1 and 2 whose b_dec is the residual's median there, as a trained
    SAE's is: the constant every-token dimensions are subtracted before the encoder, the first
    token's are not."""
    loaded = load_model(str(massive_world / "model"))
    contexts = export.parity_contexts(tiny_cfg(massive_world), loaded)
    saes = []
    for n, layer in enumerate([1, LAYER]):
        resid = torch.cat([hook_residual(loaded, ids, layer)[1:] for ids in contexts])
        sae = make_sae(loaded.d_model, b_dec=resid.median(dim=0).values, seed=n)
        saes.append(export.SaeToExport(f"L{layer}", layer, f"blocks.{layer}.hook_resid_pre", sae, "relu"))
    return saes


def old_int8_files(folder: Path, saes: list[export.SaeToExport], tmp: Path) -> dict[str, tuple[Path, int]]:
    """The old dynamic int8 quantisation applied to the trunk and to each encoder of `folder`,
    saved in `tmp`: returns `check_split`'s encoders argument; the trunk is `tmp/trunk.onnx`."""
    import onnx

    onnx.save(old_dynamic_int8(onnx.load(folder / "trunk.onnx")), tmp / "trunk.onnx")
    for s in saes:
        onnx.save(old_dynamic_int8(onnx.load(folder / f"encoder-{s.id}.onnx")), tmp / f"encoder-{s.id}.onnx")
    return {s.id: (tmp / f"encoder-{s.id}.onnx", s.layer) for s in saes}


def references(loaded, saes: list[export.SaeToExport], contexts) -> dict[str, export.Encoded]:
    return {s.id: export.torch_outputs(export.EncoderGraph(loaded.truncated(s.layer), s.sae, 32).eval(), contexts)
            for s in saes}


def test_massive_world_has_massive_activations(massive_world):
    from tiny_world import MASSIVE_EVERY_TOKEN, MASSIVE_FIRST_TOKEN

    loaded = load_model(str(massive_world / "model"))
    resid = hook_residual(loaded, export.encode_with_bos(loaded, "Tom met Lily in the park.", 128)).abs()
    typical = resid.median()
    for dim in MASSIVE_FIRST_TOKEN:
        assert resid[0, dim] > 100 * typical and resid[1:, dim].max() < 10 * typical
    for dim in MASSIVE_EVERY_TOKEN:
        assert resid[1:, dim].min() > 10 * typical


def test_gate_catches_int8_activations_on_massive_activations(massive_world, massive_saes, tmp_path):
    """The test that would have caught issue #10: with massive activations, dynamic int8 activations
    fail the gate while the default web files (float activations) pass it, for each SAE."""
    out = export_tiny(massive_world, tmp_path / "onnx", saes=massive_saes)
    report = json.loads((out / "parity.json").read_text())
    for r in report["saes"].values():
        assert r["web"]["ok"] and r["web"]["top1_agreement"] >= 0.97 and r["web"]["topk_overlap"] >= 0.95

    cfg = tiny_cfg(massive_world)
    loaded = load_model(cfg.model.name)
    contexts = export.parity_contexts(cfg, loaded)
    (tmp_path / "old").mkdir()
    encoders = old_int8_files(out, massive_saes, tmp_path / "old")
    old = export.check_split(tmp_path / "old/trunk.onnx", encoders, contexts, references(loaded, massive_saes, contexts))
    for sae_id, r in old.items():
        assert not export.passes(r, cfg.export) and r["top1_agreement"] < 0.8, (sae_id, r)


def test_old_int8_passes_without_massive_activations(tiny_world, exported, loaded, tmp_path):
    """The control: on the plain tiny world the old files are close to PyTorch, so the failure above
    is the massive activations' doing."""
    cfg = tiny_cfg(tiny_world)
    contexts = export.parity_contexts(cfg, loaded)
    saes = suite_saes(loaded.d_model)
    old = export.check_split(tmp_path / "trunk.onnx", old_int8_files(exported, saes, tmp_path), contexts,
                             references(loaded, saes, contexts))
    assert all(r["topk_overlap"] > 0.9 for r in old.values()), old


def test_named_mode_that_fails_names_one_that_passes(tiny_world, tmp_path, capsys):
    """A gate the smallest mode misses: the export stops with one line naming a mode that passes."""
    first, *rest = export.QUANTIZATIONS
    report = json.loads((export_tiny(tiny_world, tmp_path / "auto", min_top1=0.0, min_overlap=0.0) / "parity.json").read_text())
    smallest = report["saes"]["L2"]["modes"][first]  # the smallest mode's figures, to set a gate it just misses
    with pytest.raises(AtlasError, match=rf"export.quantization = {first}: .* ({'|'.join(rest)}) passes .* set export.quantization to"):
        export_tiny(tiny_world, tmp_path / "named", first, min_top1=min(1.0, smallest["top1_agreement"] + 1e-9), min_overlap=0.0)


def test_no_mode_passing_stops_the_export(tiny_world, tmp_path):
    with pytest.raises(AtlasError, match="no web mode passes the gate"):
        export_tiny(tiny_world, tmp_path / "strict", min_top1=1.0, min_overlap=1.0)
    assert not (tmp_path / "strict" / "parity.json").exists()


def test_budget_warning(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "WEB_BUDGET_BYTES", 100_000)  # the tiny model's files are larger
    out = export_tiny(tiny_world, tmp_path / "onnx")
    report, meta = (json.loads((out / f).read_text()) for f in ("parity.json", "model.json"))
    first = meta["trunk"]["bytes"] + meta["saes"][0]["bytes"]
    assert report["first_analysis_bytes"] == first > 100_000 and report["within_budget"] is False
    assert f"a first analysis downloads {first / 1e6:.1f} MB, over the 0 MB budget" in capsys.readouterr().out


# ---------------------------------------------------------------- files and tokenizer


def test_large_weights_are_split(exported, loaded, monkeypatch, tmp_path):
    """With a 64 KiB file limit the embedding is cut into parts and weights spread over data files."""
    import onnx

    monkeypatch.setattr(export.files, "MAX_FILE_BYTES", 64 * 1024)
    files = export.files.save_model(onnx.load(exported / "trunk.onnx"), tmp_path / "trunk.onnx")
    assert len(files) > 3 and all((tmp_path / f).stat().st_size <= 64 * 1024 + 4096 for f in files[1:])
    ids = export.encode_with_bos(loaded, "Tom met Lily in the park.", 128)
    enc = export.session(exported / "encoder-L2-256.onnx")
    a = export.run_split(export.session(tmp_path / "trunk.onnx"), enc, LAYER, ids)
    b = export.run_split(export.session(exported / "trunk.onnx"), enc, LAYER, ids)
    assert (a.top_ids == b.top_ids).all() and np.allclose(a.top_acts, b.top_acts, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("node") is None or not (ROOT / "node_modules/@huggingface/tokenizers").exists(),
                    reason="node or node_modules missing (npm ci)")
def test_js_tokenizer_matches_python(exported, loaded):
    """@huggingface/tokenizers in node gives the ids the Python tokenizer gives (the browser's path)."""
    proc = subprocess.run(["node", str(ROOT / "tests/js/tokenize.mjs"), str(exported / "tokenizer.json")],
                          input=json.dumps(TRICKY), capture_output=True, text=True, check=True)
    js = json.loads(proc.stdout)
    py = [loaded.tokenizer(s, add_special_tokens=False)["input_ids"] for s in TRICKY]
    for s, a, b in zip(TRICKY, js, py):
        assert a == b, f"{s!r}: js {a} != python {b}"
    assert js[TRICKY.index("<|endoftext|>")] == [loaded.bos_token_id]


def test_run_with_an_atlas_sae(tiny_world, tmp_path, monkeypatch, capsys):
    """`export.run` end to end: a topk SAE from atlas.saes in runs/X/sae/, stamped, in the suite
    layout (a trunk and one encoder, id L2); a second run is skipped. Its n_active is the dense
    count (at most k for TopK)."""
    saes = pytest.importorskip("atlas.saes")
    from atlas.stage import atomic_dir, read_stamp

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(path=str(tmp_path / "t.yaml"))
    cfg.model.name, cfg.model.layer = str(tiny_world / "model"), LAYER
    cfg.corpus.dataset = str(tiny_world / "corpus.jsonl")
    cfg.sae.architecture, cfg.sae.d_sae, cfg.sae.k = "topk", 256, 8
    sae = saes.build_sae(cfg.sae, 64)
    with atomic_dir(cfg.run_dir / "sae", "sae-fingerprint") as d:
        sae.save(d)
    out = export.run(cfg)
    report = json.loads((out / "parity.json").read_text())
    assert list(report["saes"]) == ["L2"] and report["saes"]["L2"]["full"]["ok"] and report["saes"]["L2"]["web"]["ok"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["trunk"]["outputs"] == {"2": "resid_2"} and [s["onnx"] for s in meta["saes"]] == ["encoder-L2.web.onnx"]
    assert meta["saes"][0]["architecture"] == "topk" and meta["saes"][0]["top_k"] == 32
    assert read_stamp(out)["fingerprint"] and not (tmp_path / "runs/t/onnx.tmp").exists()
    loaded = load_model(cfg.model.name)
    ids = export.encode_with_bos(loaded, "Tom met Lily in the park.", 128)
    got = run_files(out, "L2", ids)
    with torch.no_grad():
        dense = (sae.eval().encode(hook_residual(loaded, ids)) > 0).sum(-1).numpy()
    assert np.array_equal(got.n_active, dense) and dense.max() <= 8
    export.run(cfg)
    assert "up to date" in capsys.readouterr().out
