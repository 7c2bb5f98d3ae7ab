"""The training data path: the trainer's batch iterator (atlas.train.data) against a bare h5py
read of the same rows, with no SAE step, on the CPU.

A float16 store of GPT-2 Small's shape (d_model 768, 128-token contexts, random values) is
written in parts, as `atlas collect` writes one. Each measurement runs in its own process:

- bare read: every training row once, `store.acts[a:b]` over the 1,024-row chunks in shuffled
  order (float16, no conversion, nothing else);
- iterator, streamed: `store_stream` with `train.in_memory_max_gb = 0`, shuffled batches of 4,096
  rows for one epoch (all training rows but each context's first), in the store's float16 as
  the trainer receives them (it converts them on its device);
- iterator, in memory: the same with the store held in RAM (the load counted separately), with
  the process's peak resident memory over the data's size.

"Cold" evicts the store's part files from the page cache first (posix_fadvise DONTNEED, which
needs no root; /proc/sys/vm/drop_caches is not writable in a container), "warm" reads them once
before. Tokens/s counts rows delivered; MB/s, their float16 bytes. Writes runs/bench/data.json.
    python tests/bench/bench_data.py [--rows N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

D_MODEL, CTX, PART_CONTEXTS, BATCH = 768, 128, 512, 4096
LATER_EPOCHS = 2
"""Epochs timed after the first: by then the reader's three buffers exist (the first epoch pays
their page faults, which cost about as much as the reads)."""
ROWS = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 2_097_152


def write_store(path: Path, n_rows: int) -> None:
    from atlas.store import StoreInfo, finalize, write_part

    rng = np.random.default_rng(0)
    n_ctx = n_rows // CTX
    n_parts = 0
    for i, c0 in enumerate(range(0, n_ctx, PART_CONTEXTS)):
        c = min(PART_CONTEXTS, n_ctx - c0)
        acts = rng.standard_normal((c * CTX, D_MODEL), dtype=np.float32).astype(np.float16)
        write_part(path, i, np.zeros((c, CTX), np.int32), {8: acts}, "float16")
        n_parts += 1
    info = StoreInfo(model="bench", revision="main", layer=8, hook_name="blocks.8.hook_resid_pre", ctx_len=CTX,
                     d_model=D_MODEL, dtype="float16", tokenizer_hash="", n_contexts=n_ctx, n_eval_contexts=0,
                     bos_token_id=0, fingerprint="bench")
    finalize(path, info, n_parts)


def evict(path: Path) -> None:
    from atlas.store import parts_dir

    for p in [path, *parts_dir(path).iterdir()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def measure(path: Path, mode: str, cache: str) -> dict:
    """One measurement in this process: {"rows", "seconds", ...}."""
    import torch

    from atlas.config import TrainConfig
    from atlas.store import ActivationStore
    from atlas.train.data import store_stream

    torch.set_num_threads(1)  # the consumer's side of a GPU trainer is one thread
    if cache == "cold":
        evict(path)
    with ActivationStore(path) as store:
        n = len(store.train_rows)
        if cache == "warm":
            for a in range(0, n, 1 << 16):
                store.acts[a:min(a + (1 << 16), n)]
        if mode == "bare":
            order = np.random.default_rng(1).permutation(n // store.chunk_rows)
            t0 = time.perf_counter()
            rows = 0
            for c in order:
                rows += len(store.acts[c * store.chunk_rows:(c + 1) * store.chunk_rows])
            return {"rows": rows, "seconds": time.perf_counter() - t0}
        tc = TrainConfig(batch_size=BATCH, in_memory_max_gb=0.0 if mode == "stream" else 1e9)
        t0 = time.perf_counter()
        data = store_stream(store, tc)
        load = time.perf_counter() - t0
        n_batches = (n - n // CTX) // BATCH  # one epoch of non-BOS rows
        batches = data.batches(BATCH)
        t0 = time.perf_counter()
        first = next(batches)
        t_first = time.perf_counter()
        for _, b in zip(range(n_batches - 1), batches):
            assert b.dtype == first.dtype == torch.float16  # converted by the trainer, on its device
        t_epoch = time.perf_counter()
        for _, b in zip(range(LATER_EPOCHS * n_batches), batches):
            pass
        t_end = time.perf_counter()
        batches.close()
        return {"rows": n_batches * BATCH, "seconds": t_epoch - t0, "first_batch_seconds": t_first - t0,
                "later_rows": LATER_EPOCHS * n_batches * BATCH, "later_seconds": t_end - t_epoch,
                "load_seconds": load, "peak_rss_gb": peak_rss_gb()}


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=ROOT / "runs" / "bench"))
    path = work / "activations.h5"
    t0 = time.perf_counter()
    write_store(path, ROWS)
    gb = ROWS * D_MODEL * 2 / 1e9
    print(f"store: {ROWS:,} rows x {D_MODEL} float16 = {gb:.2f} GB, written in {time.perf_counter() - t0:.0f} s")
    results = {}
    for cache in ("warm", "cold"):
        for mode in ("bare", "stream", "memory"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), mode, cache],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            results[(mode, cache)] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, cache, r, flush=True)
    for p in sorted(work.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    work.rmdir()

    def row(label, mode, cache):
        r, bare = results[(mode, cache)], results[("bare", cache)]
        bare_tps = bare["rows"] / bare["seconds"]
        tps = r["rows"] / r["seconds"]
        if mode == "bare":
            return [label, cache, f"{tps / 1e3:,.0f}k", f"{tps * D_MODEL * 2 / 1e6:,.0f}", "1.00", "", "", ""]
        later = r["later_rows"] / r["later_seconds"]
        extra = f"first batch after {r['first_batch_seconds']:.2f} s"
        if mode == "memory":
            extra += f"; load {r['load_seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB"
        return [label, cache, f"{tps / 1e3:,.0f}k", f"{tps * D_MODEL * 2 / 1e6:,.0f}", f"{tps / bare_tps:.2f}",
                f"{later / 1e3:,.0f}k", f"{later / bare_tps:.2f}", extra]

    rows = [row(label, mode, cache) for cache in ("warm", "cold")
            for label, mode in (("bare h5py read, shuffled 1,024-row chunks", "bare"),
                                ("iterator, streamed (background reader)", "stream"),
                                ("iterator, in memory", "memory"))]
    result = {"title": f"Training data path: the batch iterator against a bare read ({ROWS:,} tokens, "
                       f"{gb:.2f} GB float16, d_model {D_MODEL}, batches of {BATCH:,}, CPU, no SAE step)",
              "columns": ["reader", "page cache", "tokens/s, first epoch", "MB/s", "× bare", "tokens/s, next 2 epochs",
                          "× bare", "notes"], "rows": rows,
              "notes": "The first epoch includes the first batch's wait (the first buffer is read before it; later "
                       "ones while earlier ones are consumed) and the page faults of the reader's fresh buffers; "
                       "the next two epochs reuse them (the page cache is as the first epoch left it). "
                       "Cold: the store's files evicted from the page cache (posix_fadvise) before the pass. "
                       "In memory: the tokens/s are of the batches once loaded; peak RSS is the process's, "
                       f"for {gb:.2f} GB of data."}
    out = ROOT / "runs" / "bench" / "data.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if "--measure" in sys.argv:
        i = sys.argv.index("--measure")
        print(json.dumps(measure(Path(sys.argv[i + 1]), sys.argv[i + 2], sys.argv[i + 3])))
    else:
        (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
        main()
