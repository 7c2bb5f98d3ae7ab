"""`atlas import-sae`: an SAE written in SAELens' format by someone else becomes a run's SAE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from atlas.cli import main
from atlas.saes import load_sae

ATLAS = [sys.executable, "-m", "atlas.cli"]


def write_saelens_folder(path: Path, architecture: str, d_in: int, d_sae: int, hook: str, **extra) -> dict:
    """Write cfg.json + sae_weights.safetensors the way SAELens 6 lays them out (independently of atlas)."""
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    tensors = {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec, "b_dec": torch.zeros(d_in)}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((d_sae,), 0.05)
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny-gpt2", "hook_name": hook, "context_size": 32, "prepend_bos": True,
                        "sae_lens_version": "6.5.0"}, **extra}
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return tensors


@pytest.mark.parametrize("architecture, extra", [("topk", {"k": 8}), ("jumprelu", {}), ("standard", {})])
def test_imported_sae_becomes_the_runs_sae(tiny_config, tmp_path, architecture, extra):
    source = tmp_path / "elsewhere"
    tensors = write_saelens_folder(source, architecture, 64, 128, "blocks.2.hook_resid_pre", **extra)
    assert main(["collect", "--config", str(tiny_config)]) == 0
    from atlas import import_sae
    from atlas.config import load_config

    cfg = load_config(tiny_config)
    (out,) = import_sae.run(cfg, source)
    sae = load_sae(out)
    assert sae.d_sae == 128 and sae.d_in == 64
    x = torch.randn(5, 64)
    # Independent reference: the SAELens encoder formula on the raw tensors.
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    if architecture == "topk":
        vals, idx = pre.topk(8, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif architecture == "jumprelu":
        want = pre * (pre > tensors["threshold"])
    else:
        want = pre.relu()
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "explained_variance" in metrics and metrics["imported_from"].endswith("elsewhere")
    # The train stage now counts the run's SAE as done and leaves it alone.
    assert main(["train", "--config", str(tiny_config)]) == 0
    assert json.loads((out / "stamp.json").read_text())["stage"] == "import-sae"


def test_import_sae_runs_the_rest_of_the_chain(tiny_config, tmp_path):
    source = tmp_path / "elsewhere"
    write_saelens_folder(source, "topk", 64, 64, "blocks.2.hook_resid_pre", k=4)
    assert main(["import-sae", str(source), "--config", str(tiny_config)]) == 0
    assert len(list(Path("runs/tiny/site/features").glob("*/index.html"))) == 64
    assert json.loads(Path("runs/tiny/features/manifest.json").read_text())["n_features"] == 64


@pytest.mark.parametrize("d_in, hook, message", [
    (32, "blocks.2.hook_resid_pre", "d_in = 32, but"),
    (64, "blocks.3.hook_resid_pre", "hook_name = 'blocks.3.hook_resid_pre', but"),
])
def test_mismatched_sae_is_a_clear_error(tiny_config, tmp_path, d_in, hook, message):
    source = tmp_path / "elsewhere"
    write_saelens_folder(source, "topk", d_in, 64, hook, k=4)
    r = subprocess.run([*ATLAS, "import-sae", str(source), "--config", str(tiny_config)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not Path("runs/tiny/sae").exists()


def test_missing_weights_is_a_clear_error(tiny_config, tmp_path):
    source = tmp_path / "elsewhere"
    write_saelens_folder(source, "topk", 64, 64, "blocks.2.hook_resid_pre", k=4)
    (source / "sae_weights.safetensors").unlink()
    r = subprocess.run([*ATLAS, "import-sae", str(source), "--config", str(tiny_config)], capture_output=True, text=True)
    assert r.returncode == 1 and "sae_weights.safetensors: missing" in r.stderr
