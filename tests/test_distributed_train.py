"""Data-parallel training under torchrun (gloo on the CPU, 2 processes).

The CLI run compares a 2-process `atlas train` with a single-process one of the same config; the
in-process run (torch.multiprocessing + gloo) checks resuming after a kill and the per-step
synchronisation of every architecture (train_sae checks at the end that all ranks hold
bit-identical weights, buffers included, and raises otherwise), and that BatchTopK's selection
is the global batch's.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atlas.cli import main
from atlas.config import SAEConfig
from atlas.errors import AtlasError
from atlas.saes.batchtopk import batch_topk
from atlas.train.data import tensor_stream
from atlas.train.trainer import CKPT_FILE, LOG_FILE, train_sae


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_repo_root()), env.get("PYTHONPATH")]))
    return env


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_train_matches_single_process(tiny_config, tmp_path):
    assert main(["collect", "--config", str(tiny_config)]) == 0
    sae_dir = tmp_path / "runs" / "tiny" / "sae"

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "atlas", "train", "--config", str(tiny_config)]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 ranks finished with identical weights" in proc.stdout
    assert proc.stdout.count('"explained_variance"') == 1  # only rank 0 evaluates and reports
    ddp = json.loads((sae_dir / "metrics.json").read_text())
    ddp_log = [json.loads(line) for line in (sae_dir / LOG_FILE).read_text().splitlines()]
    assert ddp["processes"] == 2 and ddp["finished"]

    proc = subprocess.run([sys.executable, "-m", "atlas", "train", "--config", str(tiny_config), "--force"],
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((sae_dir / "metrics.json").read_text())
    one_log = [json.loads(line) for line in (sae_dir / LOG_FILE).read_text().splitlines()]
    assert "processes" not in one

    # same schedule: global batch = train.batch_size, so the same steps and tokens
    assert (ddp["steps"], ddp["tokens"]) == (one["steps"], one["tokens"])
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log]  # one writer, no duplicated lines
    assert ddp["input_scale"] == pytest.approx(one["input_scale"])
    # same quality
    assert ddp["explained_variance"] == pytest.approx(one["explained_variance"], abs=0.02)
    assert ddp["explained_variance"] > 0.5
    assert ddp["l0"] == pytest.approx(one["l0"], abs=0.05) and ddp["l0"] <= 8 + 1e-6
    assert ddp["dead_fraction"] == pytest.approx(one["dead_fraction"], abs=0.05)
    assert ddp["train_dead_fraction"] == pytest.approx(one["train_dead_fraction"], abs=0.05)
    assert ddp_log[-1]["fvu"] == pytest.approx(one_log[-1]["fvu"], abs=0.02)


# ---- in-process: resume, and every architecture's per-step state ----------------------------

from support import TRAIN_CFG as TC, TRAIN_SAE as TOPK, train_data as _data  # noqa: E402  the single-process tests' setup
OTHERS = {
    "batchtopk": SAEConfig(architecture="batchtopk", d_sae=64, k=4, aux_k=16),
    "relu": SAEConfig(architecture="relu", d_sae=64, l1_coefficient=5.0, resample_dead=True),  # revives latents
    "jumprelu": SAEConfig(architecture="jumprelu", d_sae=64, l1_coefficient=0.01),
}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out, x = Path(out_dir), _data()
        full, _ = train_sae(TOPK, TC, tensor_stream(x), ckpt_dir=out / "a", fp="f", progress=False)
        # "killed" after 30 steps: the checkpoint at step 20 survives
        _, s = train_sae(TOPK, TC, tensor_stream(x), ckpt_dir=out / "b", fp="f", progress=False, max_steps=30)
        assert not s["finished"]
        resumed, s = train_sae(TOPK, TC, tensor_stream(x), ckpt_dir=out / "b", fp="f", progress=False)
        assert s["finished"] and s["steps"] == 60
        results = {"full": full.state_dict(), "resumed": resumed.state_dict()}
        for name, cfg in OTHERS.items():  # raises if the ranks' weights or buffers diverge
            tc = TC if name != "relu" else dataclasses.replace(TC, dead_after_tokens=640)
            sae, s = train_sae(cfg, tc, tensor_stream(x), progress=False)
            results[name] = (sae.state_dict(), s)
        # BatchTopK selects over the global batch: each rank's share of the undivided batch's choice
        g = torch.Generator().manual_seed(3)
        pre = torch.randn(8, 12, generator=g) * torch.rand(8, 1, generator=g).pow(-2)  # uneven rows
        mine, _, cut = batch_topk(pre[rank * 4:(rank + 1) * 4], 3)
        results["selection"] = (mine, float(cut))
        sae, _ = train_sae(OTHERS["batchtopk"], dataclasses.replace(TC, n_tokens=TC.batch_size),
                           tensor_stream(x), progress=False)
        results["batchtopk_threshold"] = float(sae.threshold)
        try:
            train_sae(TOPK, dataclasses.replace(TC, batch_size=127), tensor_stream(x), progress=False)
        except AtlasError as e:
            results["odd_batch_error"] = str(e)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_ranks_resume_and_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key in ("full", "resumed", *OTHERS):
        a, b = (r[key] if key in ("full", "resumed") else r[key][0] for r in (r0, r1))
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    for name, t in r0["full"].items():  # resuming under DDP reproduces the uninterrupted run
        assert torch.allclose(r0["resumed"][name], t, atol=1e-5), name
    # only rank 0 wrote; the log has each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert torch.load(tmp_path / "b" / CKPT_FILE, weights_only=True)["step"] == 60
    assert "multiple of 2" in r0["odd_batch_error"]
    assert r0["batchtopk"][0]["threshold"] > 0

    # the ranks' BatchTopK selections together are the undivided batch's: top 8 * 3 of all entries
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(8, 12, generator=g) * torch.rand(8, 1, generator=g).pow(-2)
    want = torch.zeros(96).scatter(0, pre.flatten().topk(24).indices, pre.flatten().topk(24).values).view(8, 12)
    for rank, r in enumerate((r0, r1)):
        active, cut = r["selection"]
        got = torch.zeros(4, 12)
        got[torch.repeat_interleave(torch.arange(4), active.offsets.diff()), active.ids] = active.values
        assert torch.equal(got, want[rank * 4:(rank + 1) * 4]) and cut == pre.flatten().topk(24).values[-1]
    # ... so the threshold the first global batch sets is the one a single process sets on it
    single, _ = train_sae(OTHERS["batchtopk"], dataclasses.replace(TC, n_tokens=TC.batch_size),
                          tensor_stream(_data()), progress=False)
    assert r0["batchtopk_threshold"] == pytest.approx(float(single.threshold), rel=1e-6)

    # the same global batches in one process: close to the 2-rank run
    single, _ = train_sae(TOPK, TC, tensor_stream(_data()), progress=False)
    x = _data()
    fvu = lambda sd: ((_load(sd).reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()  # noqa: E731
    assert fvu(r0["full"]) == pytest.approx(fvu(single.state_dict()), abs=0.02)


def _load(state):
    from atlas.saes import build_sae

    sae = build_sae(TOPK, 16)
    sae.load_state_dict(state)
    return sae.eval()
