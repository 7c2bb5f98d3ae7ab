"""Data-parallel analysis under torchrun (gloo on the CPU, 2 processes): the same tables as one process.

Rank r streams a contiguous run of whole batches; partial statistics, top-k buffers, interval
reservoirs, histograms and windows are merged exactly, so every column of the features and
examples tables equals the single-process run's. The in-process run (torch.multiprocessing +
gloo) interrupts both ranks in the encode pass and again in the sample pass, and resumes from
the per-rank checkpoints.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from atlas.cli import main
from atlas.stage import write_stamp

ROOT = Path(__file__).resolve().parent.parent
D_SAE, K = 96, 6
SETTINGS = ["--set", "analyze.batch_tokens=1000", "--set", "analyze.checkpoint_every=1"]  # batches straddle contexts


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_sae(sae_dir: Path, d_in: int) -> None:
    """A random TopK SAE in SAELens format (three dead features, two near-duplicate pairs)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(D_SAE, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_dec[:2] = w_dec[2:4] + 0.05 * w_dec[:2]
    b_enc = torch.zeros(D_SAE)
    b_enc[-3:] = -1e4
    sae_dir.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": w_dec.T.contiguous() * 2, "b_enc": b_enc, "W_dec": w_dec, "b_dec": torch.zeros(d_in)},
              sae_dir / "sae_weights.safetensors")
    (sae_dir / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": d_in, "d_sae": D_SAE, "k": K}))
    write_stamp(sae_dir, "sae-0")


def _copy_run(src: Path, dst: Path) -> Path:
    (dst / "runs").mkdir(parents=True)
    shutil.copytree(src / "runs" / "tiny", dst / "runs" / "tiny", ignore=shutil.ignore_patterns("features*"))
    shutil.copy(src / "tiny.yaml", dst / "tiny.yaml")
    return dst


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    read = lambda kind: pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob(f"{kind}-*.parquet"))],  # noqa: E731
                                  ignore_index=True)
    return read("features"), read("examples")


def _assert_same(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names == sorted(p.name for p in b.glob("*.parquet")) and len(names) > 2
    for name in names:  # every column, bit for bit (Parquet tables compare values exactly)
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        assert ta.schema.equals(tb.schema) and ta.equals(tb), name


def _analyze(folder: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args, "-m", "atlas", "analyze", "--config", "tiny.yaml", *SETTINGS],
                          env=_env(), cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """Both ranks interrupted after 3 encode batches, then after 2 sample batches, then resumed."""
    import atlas.analyze as analyze
    from atlas.config import load_config
    from atlas.store import ActivationStore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    os.chdir(folder)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config("tiny.yaml", [s for s in SETTINGS if s != "--set"])

        from support import interrupting

        real_iter, real_batches = ActivationStore.iter_batches, analyze.spill.Spill.batches
        mine = Path(folder) / "runs" / "tiny" / "features.partial" / f"rank{rank}-of-{world}" / "state.pt"
        states = []
        for patch in ((ActivationStore, "iter_batches", interrupting(real_iter, 3)),
                      (analyze.spill.Spill, "batches", interrupting(real_batches, 2))):
            setattr(*patch)
            try:
                analyze.run(cfg)
                raise AssertionError("not interrupted")
            except KeyboardInterrupt:
                pass
            finally:
                ActivationStore.iter_batches, analyze.spill.Spill.batches = real_iter, real_batches
            s = torch.load(mine, weights_only=True)
            states.append((s["phase"], s["tokens_done"], s.get("sample_tokens")))
            dist.barrier()
        analyze.run(cfg)
        torch.save(states, Path(folder) / f"states{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_torchrun_analyze_equals_single_process(tiny_config, tmp_path):
    raw = yaml.safe_load(tiny_config.read_text())
    raw["corpus"]["n_tokens"] = 8192
    tiny_config.write_text(yaml.safe_dump(raw))
    assert main(["collect", "--config", str(tiny_config)]) == 0
    _write_sae(tmp_path / "runs" / "tiny" / "sae", 64)
    one, two, resumed = (_copy_run(tmp_path, tmp_path / name) for name in ("one", "two", "resumed"))

    _analyze(one)
    proc = _analyze(two, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()))
    assert proc.stdout.count("analyze: wrote") == 1 and "2 processes" in proc.stdout  # rank 0 writes
    features = Path("runs/tiny/features")
    _assert_same(one / features, two / features)
    f, e = _tables(two / features)
    assert len(e) > D_SAE * 10 and f.is_dead.sum() >= 3  # a real comparison: many examples, some dead features
    assert json.loads((two / features / "manifest.json").read_text())["processes"] == 2
    assert not (two / "runs" / "tiny" / "features.partial").exists()

    # Killed twice under torchrun; every rank resumes from its own checkpoint, to the same tables.
    mp.spawn(_worker, args=(2, _free_port(), str(resumed)), nprocs=2, join=True)
    _assert_same(one / features, resumed / features)
    s0, s1 = (torch.load(resumed / f"states{r}.pt") for r in (0, 1))
    assert s0 == [("encode", 3000, None), ("sample", 4000, 2000)]  # rows 0..3999 (batches 0-3)
    assert s1 == [("encode", 7000, None), ("sample", 8192, 6000)]  # rows 4000..8191 (batches 4-8)
