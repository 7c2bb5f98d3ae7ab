"""The data feature pages draw their examples, histogram, logits and neighbours from.

One file per group of GROUP consecutive features, `data/pages/<g>.js`, holding those features'
rows of the features table and the examples the site keeps, as two column tables. It is a
script calling `Atlas.loaded("pages/<g>", {...})` (site_src/js/atlas-data.js), so the page loads
it with a <script> tag, which also works from file://. A page's static HTML carries its label,
score and statistics (readable without JavaScript); site_src/js/feature.js renders the rest.

Why a shared file and not markup in each page: examples, histogram, logits and neighbours as
markup were ~12 KB of every 15 KB page; as typed columns (token ids in 2 bytes), deflated together
with the other features of their group and written in base 85, the whole feature record takes
~2.8 KB, and a group file is one request per page (tests/bench/bench_pages.py measures both
formats: bytes, files, first paint).

Payload (deflated, then base 85 as Python's `base64.b85encode` writes it, whose alphabet needs no
escaping in a JS string): a little-endian uint32 n, n bytes of JSON header, then the column
buffers in header order. Header: {"tables": {"features": TABLE, "examples": TABLE}} where TABLE
is {"n": rows, "columns": [[name, dtype, list?, inline values or null], …]}: a numeric column
is a buffer of `n` values of its dtype (u1 u2 u4 i1 i2 i4 f2 f4; NaN where null, an integer column
with nulls travelling as f4); a list
column is a u2 buffer of n lengths, then the values; strings, lists of strings and bools travel
inline in the header. A float list column whose every row is a geometric (`hist_edges`) or linear
(`interval_edges`) progression from its first to its last value, exactly as analysis computes it
(float64, then float32), stores only those two per row (dtype "geo" or "lin"; the browser
recomputes the rest). Each integer column gets the narrowest dtype its values fit. Examples'
activations are float16 (three significant digits; pages show two or three); every other float is
float32, so a feature's row decodes exactly.

Which examples the site keeps: every top example, and per interval of the activation range the
first INTERVAL_SAMPLES samples trimmed to INTERVAL_WINDOW tokens around the marked one. The
Parquet shards keep everything.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


GROUP = 64                       # features per data file: ~180 KB for GPT-2 shapes, one request per page
INTERVAL_WINDOW = (8, 4)         # tokens kept left and right of the marked one in interval samples
INTERVAL_SAMPLES = 1             # samples kept per interval (by rank)
HALF_FLOAT = {"acts", "activation"}  # example columns stored as float16 (the page shows 2-3 digits)
DATA_DIR = "data/pages"


def group_size(shard_size: int) -> int:
    """Features per data file: the largest divisor of the shard size up to GROUP, so that a group never
    straddles two shards (each shard's worker writes its own groups)."""
    return max(d for d in range(1, min(GROUP, shard_size) + 1) if shard_size % d == 0)


def site_examples(examples: pa.Table) -> pa.Table:
    """The examples the site keeps (see the module docstring), interval windows trimmed, in the page's order:
    by feature, top examples by rank, then samples by interval and rank."""
    keep = examples.filter(pc.or_(pc.equal(examples["kind"], "top"), pc.less(examples["rank"], INTERVAL_SAMPLES)))
    keep = keep.combine_chunks()
    if keep.num_rows:
        tokens, acts = keep.column("token_ids").chunk(0), keep.column("acts").chunk(0)
        length = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(length)[:-1]])
        mark = (keep.column("offset").to_numpy() - keep.column("window_start").to_numpy()).astype(np.int64)
        sample = (keep.column("kind").to_numpy(zero_copy_only=False) != "top")
        lo = np.where(sample, np.clip(mark - INTERVAL_WINDOW[0], 0, length), 0)
        hi = np.where(sample, np.clip(mark + INTERVAL_WINDOW[1] + 1, 0, length), length)
        hi = np.maximum(hi, lo)
        new_len = hi - lo
        index = np.repeat(start + lo - np.cumsum(np.concatenate([[0], new_len[:-1]])), new_len) + np.arange(new_len.sum())
        offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
        flat_t = tokens.flatten().to_numpy(zero_copy_only=False)[index]
        flat_a = acts.flatten().to_numpy(zero_copy_only=False)[index]
        keep = keep.set_column(keep.schema.get_field_index("token_ids"), "token_ids",
                               pa.ListArray.from_arrays(offsets, pa.array(flat_t, pa.int32())))
        keep = keep.set_column(keep.schema.get_field_index("acts"), "acts",
                               pa.ListArray.from_arrays(offsets, pa.array(flat_a, pa.float32())))
        keep = keep.set_column(keep.schema.get_field_index("window_start"), "window_start",
                               pa.array(keep.column("window_start").to_numpy() + lo.astype(np.int32), pa.int32()))
        order = np.lexsort((keep.column("rank").to_numpy(), keep.column("interval").to_numpy(), sample,
                            keep.column("feature_id").to_numpy()))
        keep = keep.take(pa.array(order))
    return keep.cast(examples.schema)


def _int_dtype(values: np.ndarray) -> str:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for name, (a, b) in (("u1", (0, 255)), ("u2", (0, 65535)), ("i1", (-128, 127)), ("i2", (-32768, 32767)),
                         ("u4", (0, 2**32 - 1))):
        if a <= lo and hi <= b:
            return name
    return "i4"


def _numbers(arr: pa.Array, name: str) -> tuple[str, bytes]:
    """A numeric Arrow array as (dtype, little-endian bytes); floats keep nulls as NaN."""
    if arr.null_count and not pa.types.is_floating(arr.type):   # a nullable integer (e.g. `group`): float32, NaN for null
        arr = arr.cast(pa.float32())                               # exact for |values| < 2**24, which such columns are
    if pa.types.is_floating(arr.type):
        values = pc.fill_null(arr.cast(pa.float32()), float("nan")).to_numpy(zero_copy_only=False)
        dtype = "f2" if name in HALF_FLOAT else "f4"
    else:
        values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
        dtype = _int_dtype(values)
    return dtype, np.asarray(values).astype("<" + dtype).tobytes()


def _progression(col: pa.Array) -> tuple[str, bytes] | None:
    """("geo" | "lin", the first and last value of each non-empty row as float32) when every row of a float
    list column is that progression exactly as `expand` recomputes it; else None."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    flat = pc.fill_null(col.flatten().cast(pa.float32()), float("nan")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    rows = [flat[e - k:e] for k, e in zip(lengths, ends) if k]
    for kind in ("geo", "lin"):
        if all(np.array_equal(expand(kind, r[0], r[-1], len(r)), r) for r in rows):
            return kind, np.array([(r[0], r[-1]) for r in rows], "<f4").tobytes()
    return None


def expand(kind: str, first: float, last: float, n: int) -> np.ndarray:
    """The n float32 values of a progression from first to last (site_src/js/feature.js computes the same)."""
    t = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    lo, hi = np.float64(np.float32(first)), np.float64(np.float32(last))
    if kind == "geo":
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.exp(np.log(lo) + t * (np.log(hi) - np.log(lo)))
    else:
        values = lo + t * (hi - lo)
    values = values.astype(np.float32)
    values[0], values[-1] = np.float32(first), np.float32(last)
    return values


def encode_table(table: pa.Table) -> tuple[dict, list[bytes]]:
    """A table as the header entry and buffers described in the module docstring."""
    columns, buffers = [], []
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        typ = col.type
        if pa.types.is_list(typ) and pa.types.is_string(typ.value_type):
            columns.append([name, "s", True, col.to_pylist()])
        elif pa.types.is_list(typ):
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype("<u2")
            progression = _progression(col) if pa.types.is_floating(typ.value_type) and name not in HALF_FLOAT else None
            dtype, data = progression or _numbers(col.flatten(), name)
            columns.append([name, dtype, True, None])
            buffers += [lengths.tobytes(), data]
        elif pa.types.is_string(typ) or pa.types.is_boolean(typ):
            columns.append([name, "s" if pa.types.is_string(typ) else "b", False, col.to_pylist()])
        else:
            dtype, data = _numbers(col, name)
            columns.append([name, dtype, False, None])
            buffers.append(data)
    return {"n": table.num_rows, "columns": columns}, buffers


def encode(tables: dict[str, pa.Table]) -> str:
    """Tables -> the base-85 text of the deflated payload."""
    header, buffers = {"tables": {}}, []
    for name, table in tables.items():
        header["tables"][name], bufs = encode_table(table)
        buffers += bufs
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    payload = struct.pack("<I", len(head)) + head + b"".join(buffers)
    return b85encode(zlib.compress(payload, 6))


_B85 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~", np.uint8)


def b85encode(data: bytes) -> str:
    """base64.b85encode(data), vectorised (the standard library's is pure Python and was a third of the build)."""
    pad = -len(data) % 4
    words = np.frombuffer(data + b"\0" * pad, ">u4").astype(np.int64)
    digits = np.empty((len(words), 5), np.int64)
    for k in range(4, -1, -1):
        words, digits[:, k] = np.divmod(words, 85)
    text = _B85[digits.ravel()].tobytes()
    return text[:len(text) - pad].decode("ascii")


def decode(text: str) -> dict[str, list[dict]]:
    """The inverse of `encode`, as rows (for tests and tools; the browser's is site_src/js/feature.js)."""
    payload = zlib.decompress(base64.b85decode(text))
    (n,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + n])
    pos, out = 4 + n, {}

    def take(dtype, count):
        nonlocal pos
        arr = np.frombuffer(payload, "<" + dtype, count, pos)
        pos += arr.nbytes
        return arr

    for tname, spec in header["tables"].items():
        rows = [{} for _ in range(spec["n"])]
        for name, dtype, is_list, inline in spec["columns"]:
            if inline is not None:
                values = inline
            elif is_list and dtype in ("geo", "lin"):
                lengths = take("u2", spec["n"]).tolist()
                pairs = iter(take("f4", 2 * sum(k > 0 for k in lengths)).tolist())
                values = [expand(dtype, next(pairs), next(pairs), k).tolist() if k else [] for k in lengths]
            elif is_list:
                lengths = take("u2", spec["n"])
                flat = take(dtype, int(lengths.sum())).tolist()
                ends = np.cumsum(lengths).tolist()
                values = [flat[e - k:e] for k, e in zip(lengths.tolist(), ends)]
            else:
                values = take(dtype, spec["n"]).tolist()
            for r, v in zip(rows, values):
                r[name] = v
        out[tname] = rows
    return out


def write_group(site: Path, group: int, features: pa.Table, examples: pa.Table) -> int:
    """Write data/pages/<group>.js; returns its size in bytes."""
    text = encode({"features": features, "examples": examples})
    path = site / DATA_DIR / f"{group}.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f'Atlas.loaded("pages/{group}","{text}")\n'
    path.write_text(body, encoding="ascii")
    return len(body)


def write_shard(site: Path, features: pa.Table, examples: pa.Table, size: int) -> None:
    """Write the data files of one shard's features, `size` features a file (see `group_size`)."""
    ids = features.column("feature_id").to_numpy()
    ex_ids = examples.column("feature_id").to_numpy()
    for g in np.unique(ids // size).tolist():
        write_group(site, g, features.filter(pa.array(ids // size == g)), examples.filter(pa.array(ex_ids // size == g)))


def read_group(site: Path, group: int) -> dict[str, list[dict]]:
    """A data file's tables as rows (for tests)."""
    text = (site / DATA_DIR / f"{group}.js").read_text(encoding="ascii")
    return decode(text[text.index(",") + 2: text.rindex(")") - 1])


def write_vocab(site: Path, vocab: list[str]) -> None:
    """data/vocab.js: token id -> text, which the pages use to show example windows and logits."""
    path = site / "data" / "vocab.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    path.write_text(f'Atlas.loaded("vocab",{text})\n', encoding="utf-8")
