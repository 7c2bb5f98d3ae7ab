"""Where a model comes from: GGUF files (the tiny Llama of tests/tiny_llama.py) and local folders,
their converted-model cache, and the one-line errors of broken model sources (issue #11)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_llama import GGUF_NAME

from atlas.evaluate import downstream_scores
from atlas.model import cache_dir, load_model

ATLAS = [sys.executable, "-m", "atlas.cli"]
TEXT = "Return the number of items in a container. Raise ValueError if the value is not present."


def test_gguf_loads_as_its_reference(tiny_llama):
    gguf = load_model(str(tiny_llama / GGUF_NAME))
    ref = load_model(str(tiny_llama / "reference"))
    assert (gguf.n_layers, gguf.d_model, gguf.has_lm_head) == (4, 64, True)
    ids = gguf.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == ref.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert gguf.tokenizer.decode(ids) == TEXT
    x = torch.tensor([[0] + ids])
    # The file's Q4_1/Q8_0 blocks dequantised and its Q/K rows un-permuted give the reference's logits.
    torch.testing.assert_close(gguf.model(input_ids=x).logits, ref.model(input_ids=x).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(gguf.unembedding(), ref.unembedding())


def test_contexts_start_like_pretraining_documents(tiny_llama, tiny_world):
    """SmolLM2's BOS is <|im_start|> (a chat turn), but its tokenizer adds none and its pretraining
    packed documents after <|endoftext|>: contexts start with <|endoftext|>, documents are separated by it."""
    llama = load_model(str(tiny_llama / GGUF_NAME))
    assert llama.tokenizer.bos_token == "<|im_start|>" and llama.tokenizer.eos_token == "<|im_end|>"
    assert llama.tokenizer.convert_ids_to_tokens([llama.bos_token_id, llama.separator_token_id]) == \
        ["<|endoftext|>", "<|endoftext|>"]
    gpt2 = load_model(str(tiny_world / "model"))
    assert gpt2.bos_token_id == gpt2.separator_token_id == gpt2.tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_folder_plus_gguf_file_is_the_same_model(tiny_llama, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_llama / GGUF_NAME, folder / GGUF_NAME)
    by_file = load_model(str(tiny_llama / GGUF_NAME))
    by_folder = load_model(str(folder), gguf_file=GGUF_NAME)
    for a, b in zip(by_file.model.state_dict().values(), by_folder.model.state_dict().values()):
        assert torch.equal(a, b)


def test_converted_model_is_cached_and_never_stale(tiny_llama, tmp_path, monkeypatch, capsys):
    from gguf import GGUFReader

    monkeypatch.setenv("ATLAS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / GGUF_NAME
    shutil.copy(tiny_llama / GGUF_NAME, path)
    first = load_model(str(path))
    assert "converting" in capsys.readouterr().out
    again = load_model(str(path))
    assert "converting" not in capsys.readouterr().out  # served from the cache
    assert torch.equal(again.model.model.norm.weight, first.model.model.norm.weight)

    # Change the file in place (same name, size and path): the final norm's F32 weights, times 2.
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "output_norm.weight")
    data = path.read_bytes()
    start = tensor.data_offset
    doubled = (np.frombuffer(data[start:start + tensor.n_bytes], np.float32) * 2).tobytes()
    path.write_bytes(data[:start] + doubled + data[start + tensor.n_bytes:])
    changed = load_model(str(path))
    assert "converting" in capsys.readouterr().out
    torch.testing.assert_close(changed.model.model.norm.weight, 2 * first.model.model.norm.weight)
    assert len(list((cache_dir() / "gguf").iterdir())) == 2


def test_truncated_forward_equals_hidden_states_on_llama(tiny_llama):
    m = load_model(str(tiny_llama / GGUF_NAME))
    ids = torch.tensor([[0] + m.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    full = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(m.n_layers):
        truncated = m.truncated(layer)
        assert len(truncated.base.layers) == layer
        torch.testing.assert_close(truncated(ids), full[layer], rtol=0, atol=1e-6)
    assert len(m.model.model.layers) == m.n_layers


class Roll(torch.nn.Module):
    """A stand-in SAE whose reconstruction is x with its dimensions rotated by one (scaling would
    barely show: RMSNorm undoes it)."""

    def reconstruct(self, x):
        return x.roll(1, dims=-1)


def test_ce_and_kl_splice_into_llama_blocks(tiny_llama):
    """downstream_scores against a forward pass written out block by block, which edits the residual
    before block `layer` by hand: the hook-based splice must land in the same place on Llama blocks."""
    model = load_model(str(tiny_llama / GGUF_NAME))
    llama = model.model.model
    ids = torch.tensor([[0] + model.tokenizer(t, add_special_tokens=False)["input_ids"][:23]
                        for t in (TEXT, "Open the file and return a stream. Raise OSError upon failure.")])
    layer = 2

    @torch.no_grad()
    def logits(edit=None):
        h = llama.embed_tokens(ids)
        pos = llama.rotary_emb(h, position_ids=torch.arange(ids.shape[1])[None])
        for i, block in enumerate(llama.layers):
            if i == layer and edit is not None:
                h = torch.cat([h[:, :1], edit(h)[:, 1:]], 1)  # position 0 (BOS) kept, as keep_first does
            h = block(h, attention_mask=None, position_embeddings=pos)  # causal without a mask
        return model.model.lm_head(llama.norm(h)).double()

    clean, rolled, zero = logits(), logits(lambda h: h.roll(1, dims=-1)), logits(torch.zeros_like)
    torch.testing.assert_close(clean, model.model(input_ids=ids).logits.double(), rtol=0, atol=1e-4)

    def ce(z):
        return F.cross_entropy(z[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    def kl(z):
        p, q = clean[:, :-1].log_softmax(-1), z[:, :-1].log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    got = downstream_scores(model, layer, Roll(), ids, keep_first=True, batch_size=1)
    assert got["ce_clean"] == pytest.approx(ce(clean), rel=1e-4)
    assert got["ce_sae"] == pytest.approx(ce(rolled), rel=1e-4)
    assert got["ce_zero"] == pytest.approx(ce(zero), rel=1e-4)
    assert got["ce_sae"] > got["ce_clean"] + 0.1  # the splice changed something
    assert got["kl_score"] == pytest.approx((kl(zero) - kl(rolled)) / kl(zero), rel=1e-3)


# ---------------------------------------------------------------- broken sources, through the CLI


def run_collect(config, *sets):
    return subprocess.run([*ATLAS, "collect", "--config", str(config), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=120, env=os.environ)


def copy_model(tiny_world, tmp_path, *drop: str) -> Path:
    folder = tmp_path / "broken-model"
    shutil.copytree(tiny_world / "model", folder, ignore=shutil.ignore_patterns(*drop))
    return folder


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("case", ["no tokenizer files", "truncated safetensors", "missing folder",
                                  "truncated gguf", "folder of gguf files", "missing gguf_file"])
def test_broken_model_source_is_one_line(case, tiny_config, tiny_world, tiny_llama, tmp_path):
    if case == "no tokenizer files":
        folder = copy_model(tiny_world, tmp_path, "tokenizer*", "vocab*", "merges*", "special_tokens*")
        sets, code, message = [f"model.name={folder}"], 1, "has no usable tokenizer (it encodes text to nothing)"
    elif case == "truncated safetensors":
        folder = copy_model(tiny_world, tmp_path)
        truncate(folder / "model.safetensors", 5000)
        sets, code, message = [f"model.name={folder}"], 1, "broken-model/model.safetensors: unreadable weights"
    elif case == "missing folder":
        sets, code, message = ["model.name=runs/no-such/model"], 1, "model path 'runs/no-such/model' does not exist"
    elif case == "truncated gguf":
        path = tmp_path / "cut.gguf"
        shutil.copy(tiny_llama / GGUF_NAME, path)
        truncate(path, path.stat().st_size // 2)
        sets, code, message = [f"model.name={path}"], 1, "cut.gguf: cannot read this GGUF file"
    elif case == "folder of gguf files":
        sets, code, message = [f"model.name={tiny_llama}", "model.layer=1"], 1, \
            f"no config.json, but GGUF files ({GGUF_NAME}): set model.gguf_file"
    else:
        sets, code, message = [f"model.name={tiny_llama}", "model.gguf_file=tiny-llama"], 2, \
            "'model.gguf_file' = 'tiny-llama': must end in .gguf"
    r = run_collect(tiny_config, *sets)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and "hub" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not Path("runs/tiny/activations.h5").exists()


def test_gguf_config_collects_a_store(tiny_config, tiny_llama):
    """model.name + model.gguf_file through the CLI: a store of real token ids, every context after <|endoftext|>."""
    from atlas.store import ActivationStore

    r = run_collect(tiny_config, f"model.name={tiny_llama}", f"model.gguf_file={GGUF_NAME}", "model.layer=2")
    assert r.returncode == 0, r.stderr
    with ActivationStore(Path("runs/tiny/activations.h5")) as store:
        assert (store.tokens[:, 0] == 0).all() and store.info.bos_token_id == 0
        assert len(np.unique(store.tokens)) > 50
        ref = load_model(str(tiny_llama / "reference"))
        ids = torch.from_numpy(store.tokens[3:4]).long()
        want = ref.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        np.testing.assert_allclose(store.read(3 * 32, 4 * 32), want.numpy(), rtol=1e-4, atol=1e-4)


def test_hub_repo_plus_gguf_file_from_the_local_hub_cache(tiny_config, tiny_llama, tmp_path):
    """model.name a hub id, model.gguf_file a file of that repo: read from the hub's local cache
    (laid out as huggingface_hub writes it), so no network is needed."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(tiny_llama / GGUF_NAME, repo / "snapshots" / commit / GGUF_NAME)
    r = subprocess.run([*ATLAS, "collect", "--config", str(tiny_config), "--set", "model.name=tiny/llama",
                        "--set", f"model.gguf_file={GGUF_NAME}", "--set", "model.layer=1"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert Path("runs/tiny/activations.h5").exists()
