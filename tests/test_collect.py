import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from atlas.cli import main
from atlas.config import load_config
from atlas.errors import AtlasError
from atlas.model import load_model
from atlas.store import ActivationStore, finished_parts, part_path

ATLAS = [sys.executable, "-m", "atlas.cli"]


def collect(config, *sets):
    return main(["collect", "--config", str(config), *[a for s in sets for a in ("--set", s)]])


def test_truncated_forward_equals_hidden_states(tiny_world):
    m = load_model(str(tiny_world / "model"))
    ids = m.tokenizer("Once upon a time, there was a little dog named Tom.", return_tensors="pt")["input_ids"]
    full = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(m.n_layers):
        truncated = m.truncated(layer)
        assert len(truncated.base.h) == layer  # blocks after the hook are not run at all
        torch.testing.assert_close(truncated(ids), full[layer], rtol=0, atol=0)
    assert len(m.model.base_model.h) == m.n_layers  # the full model keeps its blocks


def test_collect_writes_the_store_contract(tiny_config, tiny_world):
    assert collect(tiny_config) == 0
    cfg = load_config(tiny_config)
    with ActivationStore(cfg.run_dir / "activations.h5") as store:
        assert store.n_contexts == cfg.corpus.n_tokens // cfg.corpus.ctx_len
        assert store.tokens.shape == (store.n_contexts, 32) and store.tokens.dtype == np.int32
        assert store.acts.shape == (store.n_contexts * 32, 64)
        assert (store.tokens[:, 0] == store.info.bos_token_id).all()
        assert store.info.hook_name == "blocks.2.hook_resid_pre" and store.info.layer == 2
        assert len(store.eval_rows) == store.info.n_eval_contexts * 32 > 0
        # Independent check: rerun the full model on stored tokens, compare with hidden_states[2].
        m = load_model(str(tiny_world / "model"))
        for c in (0, 7, store.n_contexts - 1):
            ids = torch.from_numpy(store.tokens[c:c + 1]).long()
            want = m.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
            got = store.read(c * 32, (c + 1) * 32)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
            assert store.position(c * 32 + 5) == (c, 5)
    # The text round-trips: the stored stream decodes to the corpus' words.
    text = m.tokenizer.decode(store.tokens[0, 1:])
    assert "Once upon a time" in text


def test_second_run_is_skipped(tiny_config, capsys):
    assert collect(tiny_config) == 0
    mtime = os.path.getmtime("runs/tiny/activations.h5")
    assert collect(tiny_config) == 0
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime("runs/tiny/activations.h5") == mtime


def test_kill_9_then_resume_equals_uninterrupted(tiny_config, tmp_path):
    small_parts = ["--set", "corpus.chunk_contexts=4", "--set", "corpus.batch_size=2"]
    store = Path("runs/tiny/activations.h5")
    proc = subprocess.Popen([*ATLAS, "collect", "--config", str(tiny_config), *small_parts],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(finished_parts(store)) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(finished_parts(store))
    assert not store.exists() and 5 <= done < 128, "the kill must land mid-collection"
    assert subprocess.run([*ATLAS, "collect", "--config", str(tiny_config), *small_parts],
                          capture_output=True).returncode == 0
    resumed = ActivationStore(store)
    # The uninterrupted reference, in another folder.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    os.chdir(ref_dir)
    assert subprocess.run([*ATLAS, "collect", "--config", str(tiny_config), *small_parts],
                          capture_output=True).returncode == 0
    reference = ActivationStore(ref_dir / store)
    assert resumed.n_tokens == reference.n_tokens == 16384
    np.testing.assert_array_equal(resumed.tokens, reference.tokens)
    np.testing.assert_array_equal(resumed.acts[:], reference.acts[:])


def test_truncated_part_is_a_clear_error(tiny_config):
    assert collect(tiny_config) == 0
    part = part_path(Path("runs/tiny/activations.h5"), 3)
    part.write_bytes(part.read_bytes()[:5000])
    with pytest.raises(AtlasError, match="part-00003.h5: truncated or changed part of the store"):
        ActivationStore(Path("runs/tiny/activations.h5"))


def run_cli(config, *args, env=None):
    return subprocess.run([*ATLAS, "collect", "--config", str(config), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize("args, code, message", [
    (["--set", "model.layer=14"], 2, "'model.layer' = 14: "),
    (["--set", "corpus.dataset=missing.jsonl"], 1, "missing.jsonl: no such corpus file"),
    (["--set", "corpus.ctx_len=many"], 2, "'corpus.ctx_len' must be int"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_config, args, code, message):
    r = run_cli(tiny_config, *args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not Path("runs/tiny/activations.h5").exists()


def test_bad_input_keeps_an_earlier_finished_store(tiny_config):
    assert collect(tiny_config) == 0
    assert run_cli(tiny_config, "--set", "model.layer=14").returncode == 2
    ActivationStore(Path("runs/tiny/activations.h5"))  # still there and readable


def test_empty_corpus(tiny_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli(tiny_config, "--set", f"corpus.dataset={empty}")
    assert r.returncode == 1 and "yielded no text" in r.stderr
    assert not Path("runs/tiny/activations.h5").exists()


def test_malformed_jsonl_names_the_line(tiny_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no field"}\n')
    r = run_cli(tiny_config, "--set", f"corpus.dataset={bad}")
    assert r.returncode == 1 and "bad.jsonl:2: expected a JSON object with a 'text' string" in r.stderr


def test_unreachable_hub_fails_fast_naming_alternatives(tiny_config, tmp_path):
    t0 = time.time()
    r = run_cli(tiny_config, "--set", "model.name=gpt2-not-cached-anywhere",
                env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://127.0.0.1:9"})
    assert r.returncode == 1
    assert "cannot reach the Hugging Face hub" in r.stderr and "make demo" in r.stderr and "MODEL=" in r.stderr
    assert time.time() - t0 < 30
