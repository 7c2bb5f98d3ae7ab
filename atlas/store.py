"""Activation store: the residual-stream activations of a run, with the tokens they came from.

`activations.h5` holds, for one run (every hook of a suite, collected from the same contexts)
  tokens    int32 [n_contexts, ctx_len]; every context starts with BOS
  acts      float16|float32 [n_tokens, d_model], chunked; row = context * ctx_len + offset:
            the one hook of a run of one layer, or
  acts/L<l> the same for layer l of a suite, one dataset per hook (`acts_key`)
and attributes naming the model, revision, the layers (`layers`, a JSON list; `layer` and
`hook_name` name the hook of a one-layer store), context length, tokenizer hash, dtype, the
held-out evaluation contexts and the collect stage's fingerprint. Row r of every hook's dataset
is the same token, so a suite's SAEs see the same contexts. A store written before suites (no
`layers` attribute) is a one-layer store and reads as before.

`ActivationStore(path, collect, layer=L)` reads one hook: its `acts` and `info.layer`/`info.hook_name`
are that hook's, so every reader (training, evaluation, analysis) is written for one hook.

Crash safety: `atlas collect` writes the store as part files (`activations.parts/part-NNNNN.h5`,
each written under a temporary name and renamed when complete), and only when every part is there
writes `activations.h5` itself, whose `acts` and `tokens` are HDF5 virtual datasets over the parts.
A kill at any moment loses at most the part being written; a store file that exists is complete.
Several writers (torchrun ranks) can fill the same parts folder, each with its own part numbers.

Content: each part records the sha256 of its arrays when it is written; activations.h5 lists
every part (file, rows, size, digest) and the store's digest over them, which is what later
stages fingerprint (hashing a 30 GB store on every check would not do). A part that is missing or
of another size makes the store unfinished, so `atlas collect` recomputes just that part, and
reading rows that are not finite stops with the part to rewrite.

Reading: the parts are written uncompressed, so each chunk of rows is one run of bytes in its
part file. `ActivationStore.read_into` finds those runs once (HDF5's chunk index) and reads rows
with `os.preadv` straight into the caller's array: no copy through h5py's buffers, and the GIL is
released for the whole read, so a reader thread overlaps with the trainer. On a 262,144-row float16
part in the page cache that is 0.07 s against h5py's 0.17 s. A dataset laid out any other way
(compressed, say, by another tool) is read through h5py as before.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from atlas.config import hook_name
from atlas.errors import AtlasError

PARTS_DIR_SUFFIX = ".parts"
_PART = re.compile(r"part-(\d{5})\.h5$")


@dataclass
class StoreInfo:
    """What a store was made from; written as HDF5 attributes of activations.h5."""

    model: str
    revision: str
    layer: int
    hook_name: str
    ctx_len: int
    d_model: int
    dtype: str
    tokenizer_hash: str
    n_contexts: int
    n_eval_contexts: int
    bos_token_id: int
    fingerprint: str
    layers: tuple[int, ...] = ()
    """Every hook the store holds (one layer each); `layer`/`hook_name` above: the one being read."""


def acts_key(layers: tuple[int, ...], layer: int) -> str:
    """The dataset of `layer`'s activations in a store (and in each part) holding `layers`."""
    return "acts" if len(layers) == 1 else f"acts/L{layer}"


def tokenizer_hash(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normalisation, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def parts_dir(store_path: Path) -> Path:
    return Path(store_path).with_name(Path(store_path).name + PARTS_DIR_SUFFIX)


def part_path(store_path: Path, index: int) -> Path:
    return parts_dir(store_path) / f"part-{index:05d}.h5"


def finished_parts(store_path: Path) -> dict[int, Path]:
    """Part files that were completely written (temporary files are ignored)."""
    d = parts_dir(store_path)
    if not d.exists():
        return {}
    return {int(m.group(1)): p for p in d.iterdir() if (m := _PART.search(p.name))}


def write_part(store_path: Path, index: int, tokens: np.ndarray, acts: dict[int, np.ndarray], dtype: str) -> None:
    """Write one part atomically: `tokens` [c, ctx_len] int32, `acts` {layer: [c * ctx_len, d_model]}."""
    path = part_path(store_path, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    layers = tuple(sorted(acts))
    tokens = tokens.astype(np.int32)
    arrays = [acts[layer].astype(dtype, copy=False) for layer in layers]
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=tokens)
            for layer, a in zip(layers, arrays):
                f.create_dataset(acts_key(layers, layer), data=a, chunks=(min(len(a), 1024), a.shape[1]))
            f.attrs["digest"] = _array_digest(tokens, arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _array_digest(tokens: np.ndarray, acts: list[np.ndarray]) -> str:
    """A part's content: its arrays (hooks by rising layer), not its HDF5 bytes (which vary with
    library versions). One hook's digest is the one a store written before suites recorded."""
    h = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    for a in acts:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def finalize(store_path: Path, info: StoreInfo, n_parts: int) -> None:
    """Write activations.h5 as virtual datasets over parts 0..n_parts-1 (atomically). `info.layers`:
    every hook the parts hold; for a one-layer store, `info.layer`/`info.hook_name` name it."""
    store_path = Path(store_path)
    layers = tuple(info.layers) or (info.layer,)
    keys = [acts_key(layers, layer) for layer in layers]
    parts = [part_path(store_path, i) for i in range(n_parts)]
    shapes, listed = [], []
    for p in parts:
        with h5py.File(p, "r") as f:
            shapes.append((f["tokens"].shape[0], f[keys[0]].shape[0]))
            digest = _plain(f.attrs.get("digest", "")) or _array_digest(f["tokens"][:], [f[k][:] for k in keys])
        listed.append({"file": os.path.relpath(p, store_path.parent), "rows": shapes[-1][1],
                       "bytes": p.stat().st_size, "sha256": digest})
    n_ctx, n_rows = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
    dtype = np.dtype(info.dtype)
    acts = {k: h5py.VirtualLayout(shape=(n_rows, info.d_model), dtype=dtype) for k in keys}
    toks = h5py.VirtualLayout(shape=(n_ctx, info.ctx_len), dtype=np.int32)
    c = r = 0
    for p, (pc, pr) in zip(parts, shapes):
        rel = os.path.relpath(p, store_path.parent)  # relative, so the run folder can move
        for k in keys:
            acts[k][r:r + pr] = h5py.VirtualSource(rel, k, shape=(pr, info.d_model))
        toks[c:c + pc] = h5py.VirtualSource(rel, "tokens", shape=(pc, info.ctx_len))
        c, r = c + pc, r + pr
    info.n_contexts = n_ctx
    tmp = store_path.with_name(store_path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        for k in keys:
            f.create_virtual_dataset(k, acts[k])
        f.create_virtual_dataset("tokens", toks)
        attrs = {k: v for k, v in asdict(info).items() if k != "layers"}
        if len(layers) > 1:  # no one hook: each reader names the one it reads
            attrs.update(layer=-1, hook_name="", layers=json.dumps(list(layers)))
        f.attrs.update(attrs)
        f.attrs["n_parts"] = n_parts
        f.attrs["parts"] = json.dumps(listed)
        # a one-layer store's digest is the same as before suites (no "layers" in it)
        described = {k: v for k, v in attrs.items() if k != "fingerprint"}
        f.attrs["digest"] = hashlib.sha256(json.dumps([described, [p["sha256"] for p in listed]],
                                                      sort_keys=True).encode()).hexdigest()[:16]
    os.replace(tmp, store_path)


def read_store_stamp(path: Path) -> dict | None:
    """The store's stamp (fingerprint, digest, parts), in the shape of a stage folder's."""
    try:
        with h5py.File(path, "r") as f:
            return {"fingerprint": _plain(f.attrs["fingerprint"]), "digest": _plain(f.attrs["digest"]),
                    "parts": json.loads(_plain(f.attrs["parts"]))}
    except (OSError, KeyError, ValueError):
        return None


def store_damage(path: Path, stamp: dict) -> str | None:
    """The first part that is missing or not the size it was written with, or None."""
    for part in stamp["parts"]:
        p = Path(path).parent / part["file"]
        if not p.is_file():
            return f"{p}: missing part of the store"
        if p.stat().st_size != part["bytes"]:
            return f"{p}: truncated or changed part of the store"
    return None


class ActivationStore:
    """Read access to a finished activation store; `collect` is the command that rewrites it."""

    def __init__(self, path: Path, collect: str = "atlas collect", layer: int | None = None):
        """Open the store for reading the hook at `layer` (None: the store's only hook)."""
        self.path = Path(path)
        self.collect = collect
        if not self.path.exists():
            hint = " (collection unfinished: run it again to resume)" if parts_dir(self.path).exists() else ""
            raise AtlasError(f"{self.path}: no activation store{hint}; run `{collect}`")
        stamp = read_store_stamp(self.path)
        if stamp is None:
            raise AtlasError(f"{self.path}: not a readable activation store; run `{collect} --force`")
        problem = store_damage(self.path, stamp)
        if problem:
            raise AtlasError(f"{problem}; run `{collect}` to rewrite it (only missing parts are recomputed)")
        self._part_starts = np.cumsum([0] + [p["rows"] for p in stamp["parts"]])
        self._extents: list[RowExtents] = []
        """Per part, where its rows lie in its file (`read_into`); found when the parts are checked."""
        self._raw = False
        """Whether every part's rows can be read as plain bytes (else `read_into` goes through h5py)."""
        try:
            self._file = h5py.File(self.path, "r")
            attrs = {k: _plain(v) for k, v in self._file.attrs.items()}
            layers = tuple(json.loads(attrs["layers"])) if "layers" in attrs else (attrs["layer"],)
            self.info = StoreInfo(**{k: attrs[k] for k in StoreInfo.__dataclass_fields__ if k != "layers"},
                                  layers=layers)
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise AtlasError(f"{self.path}: not a readable activation store ({str(e).splitlines()[0]})") from None
        if layer is None and len(layers) > 1:
            raise AtlasError(f"{self.path}: holds layers {', '.join(map(str, layers))}; say which to read")
        layer = layers[0] if layer is None else layer
        if layer not in layers:
            raise AtlasError(f"{self.path}: holds layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}, "
                             f"not layer {layer}; run `{collect}` for the config's layers")
        self.info.layer, self.info.hook_name = layer, hook_name(layer)
        self._check_parts(int(attrs.get("n_parts", 0)), acts_key(layers, layer))
        try:
            self.acts = self._file[acts_key(layers, layer)]
            self.tokens = self._file["tokens"][:]
        except (OSError, KeyError) as e:
            raise AtlasError(f"{self.path}: not a readable activation store ({str(e).splitlines()[0]})") from None
        self.ctx_len = self.info.ctx_len
        self.d_model = self.info.d_model
        self.n_contexts = self.tokens.shape[0]
        self.n_tokens = self.acts.shape[0]
        if self.n_tokens != self.n_contexts * self.ctx_len:
            raise AtlasError(f"{self.path}: {self.n_tokens} activation rows for {self.n_contexts} contexts "
                             f"of {self.ctx_len} tokens; the store is inconsistent, collect it again")
        n_train = self.n_contexts - self.info.n_eval_contexts
        self.train_rows = range(0, n_train * self.ctx_len)
        self.eval_rows = range(n_train * self.ctx_len, self.n_tokens)
        self.chunk_rows = 1024

    def _check_parts(self, n_parts: int, key: str) -> None:
        """Open every part once: a virtual dataset reads missing sources as zeros, so a truncated part
        must not pass silently; and note where each part's rows lie (`read_into`)."""
        dtype = np.dtype(self.info.dtype)
        for i in range(n_parts):
            p = part_path(self.path, i)
            try:
                with h5py.File(p, "r") as f:
                    f[key].id.get_storage_size()
                    self._extents.append(RowExtents.of(p, f[key], dtype, self.info.d_model))
            except OSError as e:
                raise AtlasError(f"{p}: missing or unreadable part of the store ({str(e).splitlines()[0]}); "
                                 f"delete it and run `{self.collect}` to rewrite it") from None
        self._raw = len(self._extents) == len(self._part_starts) - 1 and all(e.raw for e in self._extents)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Activation rows [start, stop), as stored (no conversion, no NaN check), written into
        `out`, a C-contiguous array [stop - start, d_model] of the store's dtype."""
        if not self._raw:
            self.acts.read_direct(out, np.s_[start:stop])
            return
        first = int(np.searchsorted(self._part_starts, start, side="right")) - 1
        for i in range(first, len(self._extents)):
            p0 = int(self._part_starts[i])
            if p0 >= stop:
                break
            a, b = max(start, p0), min(stop, int(self._part_starts[i + 1]))
            self._extents[i].read(a - p0, b - p0, out[a - start:b - start])

    def read(self, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Activation rows [start, stop) as `dtype`; stops on NaN/inf, naming the part to rewrite."""
        start, stop = max(0, start), min(stop, self.n_tokens)
        x = np.empty((max(0, stop - start), self.d_model), self.acts.dtype)
        if len(x):
            self.read_into(start, stop, x)
        finite = np.isfinite(x)
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0, 0])
            part = part_path(self.path, int(np.searchsorted(self._part_starts, row, side="right")) - 1)
            raise AtlasError(f"{part}: NaN/inf activations (store row {row:,}); delete it and run "
                             f"`{self.collect}` to rewrite it")
        return x.astype(dtype, copy=False)

    def position(self, row: int) -> tuple[int, int]:
        return divmod(int(row), self.ctx_len)

    def iter_batches(self, batch_tokens: int, rows: range | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Sequential batches over `rows` (default all): (first row, float32 tensor [n, d_model])."""
        rows = rows if rows is not None else range(self.n_tokens)
        for start in range(rows.start, rows.stop, batch_tokens):
            stop = min(start + batch_tokens, rows.stop)
            yield start, torch.from_numpy(self.read(start, stop))

    def close(self) -> None:
        self._file.close()
        for e in self._extents:
            e.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RowExtents:
    """Where one part's rows of one hook lie in its file: runs of whole rows, each at a byte
    offset (`raw`), or nothing when the dataset is not stored as plain bytes (then `raw` is False
    and the store reads through h5py)."""

    def __init__(self, path: Path, starts: list[int], offsets: list[int], row_bytes: int):
        self.path, self.starts, self.offsets, self.row_bytes = path, starts, offsets, row_bytes
        self.raw = bool(starts)
        self._fd: int | None = None

    @classmethod
    def of(cls, path: Path, ds: h5py.Dataset, dtype: np.dtype, d_model: int) -> RowExtents:
        """The extents of `ds`, the hook's dataset in the part file at `path` (open)."""
        row_bytes = d_model * dtype.itemsize
        plist = ds.id.get_create_plist()
        if (ds.dtype != dtype or not ds.dtype.isnative or ds.ndim != 2 or ds.shape[1] != d_model
                or plist.get_nfilters() or ds.shape[0] == 0):
            return cls(path, [], [], row_bytes)
        if plist.get_layout() == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            return cls(path, [0] if offset is not None else [], [offset] if offset is not None else [], row_bytes)
        if plist.get_layout() != h5py.h5d.CHUNKED or ds.chunks[1] != d_model:
            return cls(path, [], [], row_bytes)
        chunk_rows = ds.chunks[0]
        infos = sorted((ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())),
                       key=lambda c: c.chunk_offset[0])
        if ([c.chunk_offset[0] for c in infos] != list(range(0, ds.shape[0], chunk_rows))
                or any(c.size != chunk_rows * row_bytes or c.byte_offset is None for c in infos)):
            return cls(path, [], [], row_bytes)  # unallocated or filtered chunks: h5py knows what they hold
        starts, offsets = [], []
        for c in infos:  # one run for chunks that follow each other in the file
            if not offsets or offsets[-1] + (c.chunk_offset[0] - starts[-1]) * row_bytes != c.byte_offset:
                starts.append(c.chunk_offset[0])
                offsets.append(c.byte_offset)
        return cls(path, starts, offsets, row_bytes)

    def read(self, a: int, b: int, out: np.ndarray) -> None:
        """This part's rows [a, b) into `out`."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out).cast("B")
        run = bisect.bisect_right(self.starts, a) - 1
        pos = 0
        while a < b:
            end = min(b, self.starts[run + 1] if run + 1 < len(self.starts) else b)
            offset = self.offsets[run] + (a - self.starts[run]) * self.row_bytes
            stop = pos + (end - a) * self.row_bytes
            while pos < stop:  # a read may return less than asked (over 2 GB, or a signal)
                got = os.preadv(self._fd, [view[pos:stop]], offset)
                if got == 0:
                    raise AtlasError(f"{self.path}: truncated part of the store; delete it and run "
                                     f"`atlas collect` to rewrite it")
                pos, offset = pos + got, offset + got
            a, run = end, run + 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v
