"""The store's raw reader (`ActivationStore.read_into`: os.preadv at the chunks' byte offsets)
against h5py's own reading of the same rows."""

import h5py
import numpy as np
import pytest

from atlas.errors import AtlasError
from atlas.store import ActivationStore, StoreInfo, finalize, part_path, write_part

CTX, D = 16, 24


def _store(path, part_contexts=(70, 3, 66), layers=(2, 5), dtype="float16"):
    """Parts of uneven size (chunks of 1,024 rows, the last of each part partial), `layers` hooks."""
    rng = np.random.default_rng(0)
    for i, c in enumerate(part_contexts):
        acts = {layer: rng.standard_normal((c * CTX, D)).astype(dtype) for layer in layers}
        write_part(path, i, rng.integers(0, 50, (c, CTX)), acts, dtype)
    _finalize(path, layers, dtype, len(part_contexts))


def _finalize(path, layers, dtype, n_parts):
    info = StoreInfo(model="m", revision="main", layer=layers[0], hook_name="", ctx_len=CTX, d_model=D, dtype=dtype,
                     tokenizer_hash="", n_contexts=0, n_eval_contexts=10, bos_token_id=0, fingerprint="f",
                     layers=tuple(layers))
    finalize(path, info, n_parts)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_raw_reads_equal_h5py_across_chunks_parts_and_hooks(tmp_path, dtype):
    path = tmp_path / "activations.h5"
    _store(path, dtype=dtype)
    rng = np.random.default_rng(1)
    for layer in (2, 5):
        with ActivationStore(path, layer=layer) as store:
            n = store.n_tokens
            store.read_into(0, 1, np.empty((1, D), dtype))
            assert all(e.raw for e in store._extents)
            cuts = [(0, n), (1023, 1025), (70 * CTX - 5, 73 * CTX + 7), (n - 3, n)]
            cuts += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(20)]
            for a, b in cuts:
                out = np.full((b - a, D), np.nan, dtype)
                store.read_into(a, b, out)
                np.testing.assert_array_equal(out, store.acts[a:b])
            np.testing.assert_array_equal(store.read(5, 2000), store.acts[5:2000].astype(np.float32))


def test_compressed_parts_are_read_through_h5py(tmp_path):
    path = tmp_path / "activations.h5"
    _store(path, layers=(2,))
    for i in range(3):  # what another tool may write: the same rows, gzip-compressed
        p = part_path(path, i)
        with h5py.File(p, "a") as f:
            data = f["acts"][:]
            del f["acts"]
            f.create_dataset("acts", data=data, chunks=(min(256, len(data)), D), compression="gzip")
    _finalize(path, (2,), "float16", 3)
    with ActivationStore(path) as store:
        out = np.empty((2100, D), np.float16)
        store.read_into(100, 2200, out)
        assert not any(e.raw for e in store._extents)
        np.testing.assert_array_equal(out, store.acts[100:2200])


def test_part_truncated_after_opening_is_named(tmp_path):
    path = tmp_path / "activations.h5"
    _store(path, layers=(2,))
    with ActivationStore(path) as store:
        store.read_into(0, 1, np.empty((1, D), np.float16))  # the extents are found
        p = part_path(path, 0)
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
        with pytest.raises(AtlasError, match="part-00000.h5: truncated part of the store"):
            store.read_into(0, 70 * CTX, np.empty((70 * CTX, D), np.float16))
