"""The feature-shard contract (atlas/shards.py): round trips and clear errors, no analysis run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlas.errors import AtlasError
from atlas.shards import (EXAMPLES_SCHEMA, FEATURES_SCHEMA, SCHEMA_VERSION, VOCAB_SCHEMA, read_feature,
                          read_manifest, read_table, read_vocab, shard_name, write_table)


def feature_row(i: int) -> dict:
    return {
        "feature_id": i, "label": f"feature {i} <b>", "label_source": "token-set",
        "label_rule": '{"kind":"tokens","atoms":[1,2]}', "label_precision": 0.5 if i != 5 else None,
        "label_recall": 0.25 if i != 5 else None, "label_f1": 1 / 3 if i != 5 else None, "label_matched": 4 * i,
        "heldout_fired": 2 * i, "label_scoring": "rule" if i != 5 else "", "n_fired": 10 * i,
        "density": 0.001 * i, "mean_act": 1.5, "max_act": 4.0 + i,
        "hist_edges": [0.5, 1.0, 2.0], "hist_counts": [7, 3 * i], "interval_edges": [0.0, 2.0, 4.0 + i],
        "top_logit_ids": [1, 2], "top_logit_values": [0.5, 0.25], "bottom_logit_ids": [3, 4],
        "bottom_logit_values": [-0.5, -0.25], "neighbour_ids": [(i + 1) % 6], "neighbour_cosines": [0.9],
        "map_x": 0.1 * i, "map_y": 0.5, "is_dead": i == 5, "is_dense": False,
    }


def example_row(i: int, kind: str, rank: int) -> dict:
    return {"feature_id": i, "kind": kind, "interval": -1 if kind == "top" else 0, "rank": rank,
            "context": 3, "offset": 4, "activation": 2.5, "window_start": 2,
            "token_ids": [5, 6, 7, 8], "acts": [0.0, 0.0, 2.5, 0.0]}


@pytest.fixture
def features_dir(tmp_path):
    out = tmp_path / "features"
    out.mkdir()
    for shard, ids in enumerate(([0, 1, 2, 3], [4, 5])):
        write_table(out / shard_name("features", shard), pa.Table.from_pylist([feature_row(i) for i in ids]),
                    FEATURES_SCHEMA)
        ex = [example_row(i, k, r) for i in ids for k, r in (("top", 0), ("top", 1), ("interval", 0))]
        write_table(out / shard_name("examples", shard), pa.Table.from_pylist(ex), EXAMPLES_SCHEMA)
    write_table(out / "vocab.parquet", pa.table({"token_id": [0, 2, 1], "text": ["<|endoftext|>", "\n", " the"]}),
                VOCAB_SCHEMA)
    (out / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "shard_size": 4,
                                                   "n_features": 6}))
    return out


def test_round_trip_with_pyarrow_pandas_and_reader(features_dir):
    path = features_dir / "features-00000.parquet"
    assert pq.read_schema(path).equals(FEATURES_SCHEMA, check_metadata=False)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    rows = pq.read_table(path).to_pylist()
    df = pd.read_parquet(path)
    for i, want in enumerate(feature_row(i) for i in range(4)):
        assert rows[i]["label"] == want["label"] and rows[i]["hist_counts"] == want["hist_counts"]
        np.testing.assert_allclose(rows[i]["top_logit_values"], want["top_logit_values"])
        assert list(df.loc[i, "neighbour_ids"]) == want["neighbour_ids"]
        assert df.loc[i, "max_act"] == np.float32(want["max_act"])
    rec = read_feature(features_dir, 5)
    assert rec.row["feature_id"] == 5 and rec.row["is_dead"] is True
    assert [(e["kind"], e["rank"]) for e in rec.examples] == [("top", 0), ("top", 1), ("interval", 0)]
    assert rec.examples[0]["acts"] == [0.0, 0.0, 2.5, 0.0]
    assert read_vocab(features_dir) == ["<|endoftext|>", " the", "\n"]


def test_duckdb_reads_the_shards(features_dir):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    glob = str(features_dir / "features-*.parquet")
    assert con.execute(f"select count(*) from read_parquet('{glob}')").fetchone()[0] == 6
    query = f"select label, len(hist_counts) from read_parquet('{glob}') where feature_id = 4"
    label, n = con.execute(query).fetchone()
    assert (label, n) == ("feature 4 <b>", 2)


def test_truncated_or_foreign_shard_is_a_clear_error(features_dir, tmp_path):
    p = features_dir / "examples-00001.parquet"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 20])
    with pytest.raises(AtlasError, match="examples-00001.parquet: corrupt or truncated shard"):
        read_feature(features_dir, 4)
    p.write_bytes(b"not parquet at all")
    with pytest.raises(AtlasError, match="corrupt or truncated"):
        read_table(p, EXAMPLES_SCHEMA)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"feature_id": [1]}), other)
    with pytest.raises(AtlasError, match=f"not a feature shard of schema v{SCHEMA_VERSION} \\(missing label"):
        read_table(other, FEATURES_SCHEMA)
    (features_dir / "features-00000.parquet").unlink()
    with pytest.raises(AtlasError, match="features-00000.parquet: missing shard"):
        read_feature(features_dir, 1)


def test_manifest_errors_and_unknown_feature(features_dir):
    with pytest.raises(AtlasError, match="feature 7 is not in"):
        read_feature(features_dir, 7)
    m = features_dir / "manifest.json"
    m.write_text('{"schema_version": 1,')
    with pytest.raises(AtlasError, match="manifest.json: not valid JSON"):
        read_manifest(features_dir)
    m.write_text(json.dumps({"schema_version": 99, "shard_size": 4}))
    with pytest.raises(AtlasError, match=f"schema version 99, expected {SCHEMA_VERSION}"):
        read_manifest(features_dir)
    m.unlink()
    with pytest.raises(AtlasError, match="manifest.json: missing; run `atlas analyze` first"):
        read_manifest(features_dir)


def test_write_table_casts_to_the_schema_and_leaves_no_temporary(tmp_path):
    t = pa.table({"token_id": pa.array([0, 1], pa.int64()), "text": ["a", "b"], "extra": [1, 2]})
    write_table(tmp_path / "vocab.parquet", t, VOCAB_SCHEMA)
    assert pq.read_schema(tmp_path / "vocab.parquet").equals(VOCAB_SCHEMA, check_metadata=False)
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.parquet"]
