"""How every stage writes its output: atomically, stamped with what it was made from.

A stage's output folder is written under a temporary name and renamed into place when complete,
so a folder that exists is a finished one. Its `stamp.json` records a fingerprint: a hash of the
config sections the stage reads and of the upstream stages' fingerprints. A stage whose output
carries the fingerprint it would write now is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

STAMP = "stamp.json"


def fingerprint(config_hash: str, *upstream: str) -> str:
    return hashlib.sha256("|".join((config_hash, *upstream)).encode()).hexdigest()[:16]


def read_stamp(path: Path) -> dict | None:
    """The stamp of a finished output folder (or of the store file), or None."""
    path = Path(path)
    if path.suffix == ".h5":
        from atlas.store import read_store_stamp

        return read_store_stamp(path)
    try:
        return json.loads((path / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def upstream_fingerprint(path: Path, stage: str) -> str:
    from atlas.errors import AtlasError

    stamp = read_stamp(path)
    if stamp is None:
        raise AtlasError(f"{path}: missing or unfinished; run `atlas {stage}` first")
    return stamp["fingerprint"]


def is_current(path: Path, fp: str) -> bool:
    stamp = read_stamp(path)
    return stamp is not None and stamp.get("fingerprint") == fp


@contextmanager
def atomic_dir(out: Path, fp: str, **info):
    """Yield a temporary folder to fill; on success it replaces `out`, stamped with `fp`.

    On an exception the temporary folder is left for inspection and `out` is untouched.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    (tmp / STAMP).write_text(json.dumps({"fingerprint": fp, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info},
                                        indent=2))
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
