"""Feature shards: the data contract between `atlas analyze` and everything that shows features.

`features/` holds, for shard s covering feature ids [s*shard_size, (s+1)*shard_size):

- `features-SSSSS.parquet`: one row per feature (FEATURES_SCHEMA);
- `examples-SSSSS.parquet`: one row per shown example (EXAMPLES_SCHEMA), sorted by feature id;
- `vocab.parquet`: token id -> display text (VOCAB_SCHEMA), so readers need no tokenizer;
- `manifest.json`: the run's metadata, metrics and the shard index (written last).

A page's data is one small read: `read_feature(features_dir, i)`. Files are zstd-compressed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from atlas.errors import AtlasError

SCHEMA_VERSION = 2

FEATURES_SCHEMA = pa.schema([
    ("feature_id", pa.int32()),
    ("label", pa.string()),                      # short readable label from the evidence
    ("label_source", pa.string()),               # which explainer wrote it, e.g. "bigram"
    ("label_rule", pa.string()),                 # the label as a checkable rule (JSON, atlas/labels/rules.py); "" for free text
    ("label_precision", pa.float32()),           # held-out: share of the label's matches on which the feature fires
    ("label_recall", pa.float32()),              # held-out: share of the feature's activation on the label's matches
    ("label_f1", pa.float32()),                  # their harmonic mean; null: not scored (never fired on held-out data)
    ("label_matched", pa.int64()),               # held-out tokens (contexts, for detection) the label matches
    ("heldout_fired", pa.int64()),               # held-out tokens (contexts, for detection) the feature fires on
    ("label_scoring", pa.string()),              # "rule" (over tokens), "detection" (over contexts) or "" (not scored)
    ("n_fired", pa.int64()),                     # tokens on which activation > 0
    ("density", pa.float32()),                   # n_fired / n_tokens
    ("mean_act", pa.float32()),                  # mean activation over firing tokens
    ("max_act", pa.float32()),
    ("hist_edges", pa.list_(pa.float32())),      # log-spaced, histogram_bins + 1 edges
    ("hist_counts", pa.list_(pa.int64())),       # counts of firing activations per bin
    ("interval_edges", pa.list_(pa.float32())),  # n_intervals + 1 edges of the interval samples
    ("top_logit_ids", pa.list_(pa.int32())),     # empty when the model has no output embedding
    ("top_logit_values", pa.list_(pa.float32())),
    ("bottom_logit_ids", pa.list_(pa.int32())),
    ("bottom_logit_values", pa.list_(pa.float32())),
    ("neighbour_ids", pa.list_(pa.int32())),     # nearest features by decoder cosine
    ("neighbour_cosines", pa.list_(pa.float32())),
    ("map_x", pa.float32()),
    ("map_y", pa.float32()),
    ("is_dead", pa.bool_()),                     # never fired on the analysed tokens
    ("is_dense", pa.bool_()),                    # density above analyze.dense_threshold
    ("dominated_by", pa.string()),               # "", "special-token" or "position" (atlas/analyze/dedup.py)
])
GROUP_FIELD = pa.field("group", pa.int16())
"""An optional column after FEATURES_SCHEMA's, written only for an SAE trained as nested prefixes
(Matryoshka): each feature's nesting level, 0 for the first prefix. Readers look for it."""

# Columns added after schema v2 was published: shards written before them read with this default.
OPTIONAL_COLUMNS = {"dominated_by": pa.scalar("", pa.string())}

EXAMPLES_SCHEMA = pa.schema([
    ("feature_id", pa.int32()),
    ("kind", pa.string()),                       # "top" or "interval"
    ("interval", pa.int16()),                    # interval index for kind "interval", else -1
    ("rank", pa.int16()),                        # order within (feature, kind, interval)
    ("context", pa.int32()),                     # context index in the activation store
    ("offset", pa.int32()),                      # position of the marked token in its context
    ("activation", pa.float32()),                # the feature's activation at the marked token
    ("window_start", pa.int32()),                # offset of token_ids[0] in its context
    ("token_ids", pa.list_(pa.int32())),         # the shown window of tokens
    ("acts", pa.list_(pa.float32())),            # the feature's activation on each shown token
])

VOCAB_SCHEMA = pa.schema([("token_id", pa.int32()), ("text", pa.string())])

COMPRESSION = "zstd"


def shard_name(kind: str, shard: int) -> str:
    return f"{kind}-{shard:05d}.parquet"


@dataclass
class FeatureRecord:
    """One feature as a reader sees it: its features-table row and its example rows."""

    row: dict
    examples: list[dict]


def write_table(path: Path, table: pa.Table, schema: pa.Schema) -> None:
    """Write a table with the given schema, atomically (temporary name, then rename)."""
    table = _with_optional(table, schema).select(schema.names).cast(schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression=COMPRESSION)
    tmp.replace(path)


def _with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with each of the schema's OPTIONAL_COLUMNS it lacks, filled with the column's default."""
    for name, default in OPTIONAL_COLUMNS.items():
        if name in schema.names and name not in table.column_names:
            table = table.append_column(name, pa.array([default.as_py()] * table.num_rows, default.type))
    return table


def read_table(path: Path, schema: pa.Schema, filters=None) -> pa.Table:
    """Read a shard, with a clear error when it is missing, truncated or of another schema."""
    try:
        table = pq.read_table(path, filters=filters)
    except FileNotFoundError:
        raise AtlasError(f"{path}: missing shard; run `atlas analyze` again") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise AtlasError(f"{path}: corrupt or truncated shard ({str(e).splitlines()[0]}); "
                         f"delete it and run `atlas analyze` again") from None
    table = _with_optional(table, schema)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise AtlasError(f"{path}: not a feature shard of schema v{SCHEMA_VERSION} (missing {', '.join(missing)})")
    return table.select(schema.names)


def read_manifest(features_dir: Path) -> dict:
    path = Path(features_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise AtlasError(f"{path}: missing; run `atlas analyze` first") from None
    except json.JSONDecodeError as e:
        raise AtlasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise AtlasError(f"{path}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return manifest


def read_feature(features_dir: Path, feature_id: int, manifest: dict | None = None) -> FeatureRecord:
    """Read one feature's row and examples (one small read of its shard)."""
    features_dir = Path(features_dir)
    manifest = manifest or read_manifest(features_dir)
    shard = feature_id // manifest["shard_size"]
    filt = [("feature_id", "=", feature_id)]
    rows = read_table(features_dir / shard_name("features", shard), FEATURES_SCHEMA, filt).to_pylist()
    if not rows:
        raise AtlasError(f"feature {feature_id} is not in {features_dir}")
    examples = read_table(features_dir / shard_name("examples", shard), EXAMPLES_SCHEMA, filt).to_pylist()
    return FeatureRecord(rows[0], examples)


def read_vocab(features_dir: Path) -> list[str]:
    table = read_table(Path(features_dir) / "vocab.parquet", VOCAB_SCHEMA)
    texts = [""] * (max(table.column("token_id").to_pylist(), default=-1) + 1)
    for tid, text in zip(table.column("token_id").to_pylist(), table.column("text").to_pylist()):
        texts[tid] = text
    return texts
