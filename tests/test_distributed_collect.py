"""`torchrun --nproc_per_node 2 -m atlas collect` (gloo on the CPU) writes the same store as one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from atlas.store import ActivationStore


def test_two_ranks_write_the_single_process_store(tiny_config, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["collect", "--config", str(tiny_config), "--set", "corpus.chunk_contexts=16"]
    one = subprocess.run([sys.executable, "-m", "atlas", *args], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    single = ActivationStore(Path("runs/tiny/activations.h5"))

    work = tmp_path / "two-ranks"
    work.mkdir()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "atlas", *args],
                         capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    both = ActivationStore(work / "runs/tiny/activations.h5")
    assert both.info.n_contexts == single.info.n_contexts and both.info.n_eval_contexts == single.info.n_eval_contexts
    np.testing.assert_array_equal(both.tokens, single.tokens)
    np.testing.assert_array_equal(both.acts[:], single.acts[:])
    # Each rank wrote its own parts: 32 parts of 16 contexts, even ones by rank 0, odd by rank 1.
    assert len(list((work / "runs/tiny/activations.h5.parts").glob("part-*.h5"))) == 32
