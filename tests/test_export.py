"""`atlas export`: the ONNX encoder against PyTorch, file splitting, and the browser tokenizer."""

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
from atlas.config import RunConfig
from atlas.model import load_model

ROOT = Path(__file__).resolve().parent.parent
LAYER, D_SAE = 2, 256
TRICKY = ["Hello world", " leading space", "  two spaces", "new\nline", "\n\ntwo newlines\n", "tab\there",
          "café naïve résumé", "日本語のテキスト", "emoji 🙂👍🏽 and flags 🇫🇷", "<|endoftext|>", "a<|endoftext|>b",
          "<script>alert(1)</script>", "numbers 12345 3.14", "don't won't it's", "", " "]


class StandInSAE(nn.Module):
    """A ReLU SAE encoder with fixed random weights, the shape `atlas.saes` SAEs have."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(self.W_enc.data.T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


def make_sae(d_in: int, d_sae: int = D_SAE) -> nn.Module:
    return StandInSAE(d_in, d_sae).eval().requires_grad_(False)


def export_tiny(world: Path, out: Path, quantization: str = "int8-emb4", min_top1: float = 0.9) -> Path:
    """Export the tiny world's model (layer 2) plus a stand-in SAE into `out`; returns `out`."""
    cfg = RunConfig()
    cfg.model.name, cfg.model.layer = str(world / "model"), LAYER
    cfg.corpus.dataset = str(world / "corpus.jsonl")
    cfg.export.quantization, cfg.export.min_top1_agreement = quantization, min_top1
    loaded = load_model(cfg.model.name)
    out.mkdir(parents=True, exist_ok=True)
    export.export_dir(out, loaded, make_sae(loaded.d_model), cfg, "test", export.parity_contexts(cfg, loaded))
    return out


@pytest.fixture(scope="module")
def exported(tiny_world, tmp_path_factory):
    return export_tiny(tiny_world, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def loaded(tiny_world):
    return load_model(str(tiny_world / "model"))


def torch_topk(loaded, ids: list[int], k: int = 32):
    graph = export.EncoderGraph(loaded.truncated(LAYER), make_sae(loaded.d_model), k).eval()
    with torch.no_grad():
        i, a = graph(torch.tensor([ids], dtype=torch.int32))
    return i[0].numpy(), a[0].numpy()


def test_files_and_metadata(exported):
    meta = json.loads((exported / "model.json").read_text())
    for f in meta["files"] + ["encoder.onnx", "parity.json", "model.json"]:
        assert (exported / f).is_file(), f
    assert meta["onnx"] == "encoder.web.onnx" and "tokenizer.json" in meta["files"]
    assert meta["top_k"] == 32 and meta["d_sae"] == D_SAE and meta["layer"] == LAYER
    assert meta["max_tokens"] == 128 and meta["prepend_bos"] is True
    assert meta["total_bytes"] == sum((exported / f).stat().st_size for f in meta["files"])
    assert all((exported / f).stat().st_size <= export.MAX_FILE_BYTES for f in meta["files"])


def test_parity_report(exported):
    report = json.loads((exported / "parity.json").read_text())
    assert report["full"]["ok"] and report["full"]["ids_match"] >= 0.999 and report["full"]["max_rel_err"] <= 1e-4
    assert report["web"]["ok"] and report["web"]["top1_agreement"] >= 0.9
    assert report["n_contexts"] == 16 and report["full"]["n_tokens"] > 100


@pytest.mark.parametrize("n", [1, 2, 37, 128])
def test_full_precision_matches_torch_at_any_length(exported, loaded, n):
    rng = np.random.default_rng(n)
    ids = [loaded.bos_token_id] + rng.integers(0, loaded.tokenizer.vocab_size, n - 1).tolist()
    ref_ids, ref_acts = torch_topk(loaded, ids)
    got_ids, got_acts = export.run_session(export.session(exported / "encoder.onnx"), ids)
    assert got_ids.shape == (n, 32) and got_ids.dtype == np.int32
    r = export.compare(ref_ids, ref_acts, got_ids, got_acts)
    assert r["ids_match"] == 1.0 and r["max_rel_err"] < 1e-4


def test_web_file_is_close_to_torch(exported, loaded):
    ids = export.encode_with_bos(loaded, "Once upon a time, there was a little dog named Max.", 128)
    r = export.compare(*torch_topk(loaded, ids), *export.run_session(export.session(exported / "encoder.web.onnx"), ids))
    assert r["topk_overlap"] > 0.8


def test_default_web_file_is_int8_with_a_4bit_embedding(exported, loaded):
    """The default: every constant-weight MatMul int8, the token table 4-bit, nothing else 4-bit."""
    import onnx

    assert RunConfig().export.quantization == "int8-emb4"
    model = onnx.load(exported / "encoder.web.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "MatMulNBits" not in ops and "MatMulInteger" in ops
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    data = next(t for t in model.graph.initializer if t.name == node.input[0])
    assert node.domain == "com.microsoft" and data.data_type == onnx.TensorProto.UINT8
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    assert list(data.dims) == [vocab, loaded.d_model // 2]  # the token table, two values a byte


@pytest.mark.parametrize("mode, op", [("int4", "MatMulNBits"), ("int8", "MatMulInteger")])
def test_other_modes_export_and_the_budget_warns(tiny_world, tmp_path, exported, monkeypatch, capsys, mode, op):
    import onnx

    monkeypatch.setattr(export, "WEB_BUDGET_BYTES", 100_000)  # the tiny model's files are larger
    out = export_tiny(tiny_world, tmp_path / mode, mode, min_top1=0.0)
    ops = {n.op_type for n in onnx.load(out / "encoder.web.onnx").graph.node}
    assert op in ops and "GatherBlockQuantized" not in ops
    report, meta = (json.loads((out / f).read_text()) for f in ("parity.json", "model.json"))
    assert report["total_bytes"] == meta["total_bytes"] > 100_000 and report["within_budget"] is False
    assert f"web download is {meta['total_bytes'] / 1e6:.1f} MB, over the 0 MB budget" in capsys.readouterr().out
    default = json.loads((exported / "parity.json").read_text())
    assert default["within_budget"] is True and default["quantization"] == "int8-emb4"


def test_model_json_lists_only_what_the_browser_loads(exported):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["files"] == [meta["onnx"], *meta["external_data"], meta["tokenizer"]]
    assert not {"encoder.onnx", "parity.json", "model.json", "stamp.json"} & set(meta["files"])


@pytest.mark.parametrize("cols, block", [(64, 64), (768, 64), (100, 32), (48, 16)])
def test_4bit_table_is_what_onnxruntime_gathers(cols, block):
    """`quantize_4bit_rows` packs what GatherBlockQuantized reads; error within half a step per block."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(cols).normal(size=(300, cols)).astype(np.float32)
    w[7] = 0.0
    data, scale, zps = export.quantize_4bit_rows(w, block)
    deq = export.dequantize_4bit_rows(data, scale, zps, block)
    blk = np.arange(cols) // block
    step = scale.astype(np.float32)[:, blk]
    assert scale.dtype == np.float16 and (np.abs(deq - w) <= step / 2 + 2e-3 * np.abs(w) + 1e-6).all()
    assert (deq[7] == 0).all()
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s", "z"], ["y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((data, "d"), (scale, "s"), (zps, "z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    idx = np.array([[0, 7, 299], [5, 5, 150]], np.int64)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"i": idx})
    assert y.dtype == np.float16 and np.array_equal(y.astype(np.float32), deq[idx])


def test_low_agreement_fails_the_export(tiny_world, tmp_path):
    from atlas.errors import AtlasError

    with pytest.raises(AtlasError, match="min_top1_agreement"):
        export_tiny(tiny_world, tmp_path / "strict", "int4", min_top1=1.01)


def test_large_weights_are_split(exported, loaded, monkeypatch, tmp_path):
    """With a 64 KiB file limit the embedding is cut into parts and weights spread over data files."""
    import onnx

    monkeypatch.setattr(export, "MAX_FILE_BYTES", 64 * 1024)
    files = export._save(onnx.load(exported / "encoder.onnx"), tmp_path / "encoder.onnx")
    assert len(files) > 3 and all((tmp_path / f).stat().st_size <= 64 * 1024 + 4096 for f in files[1:])
    ids = export.encode_with_bos(loaded, "Tom met Lily in the park.", 128)
    a = export.run_session(export.session(tmp_path / "encoder.onnx"), ids)
    b = export.run_session(export.session(exported / "encoder.onnx"), ids)
    assert (a[0] == b[0]).all() and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


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
    """`export.run` end to end: a topk SAE from atlas.saes in runs/X/sae/, stamped; a second run is skipped."""
    saes = pytest.importorskip("atlas.saes")
    from atlas.stage import atomic_dir, read_stamp

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(path=str(tmp_path / "t.yaml"))
    cfg.model.name, cfg.model.layer = str(tiny_world / "model"), LAYER
    cfg.corpus.dataset = str(tiny_world / "corpus.jsonl")
    cfg.sae.architecture, cfg.sae.d_sae, cfg.sae.k = "topk", 256, 8
    with atomic_dir(cfg.run_dir / "sae", "sae-fingerprint") as d:
        saes.build_sae(cfg.sae, 64).save(d)
    out = export.run(cfg)
    report = json.loads((out / "parity.json").read_text())
    assert report["full"]["ok"] and report["web"]["ok"], report
    assert read_stamp(out)["fingerprint"] and not (tmp_path / "runs/t/onnx.tmp").exists()
    export.run(cfg)
    assert "up to date" in capsys.readouterr().out
