"""Checkpoints of the long stages (train, analyze): written atomically, read back only when made
from the same inputs.

A checkpoint is a dict of tensors and plain values saved with `torch.save` under a temporary name
and renamed into place, so a kill never leaves a torn file where the last good one was. It
carries the stage's fingerprint (its config and input digests): one made from other inputs, or
one that cannot be read, is ignored and the stage starts over.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from atlas.errors import AtlasError


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically; when the write fails the previous checkpoint is kept."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise AtlasError(f"{tmp}: cannot write the checkpoint ({str(e).splitlines()[0]}); "
                         f"the previous one is kept") from None


def load_checkpoint(path: Path, fp: str, stage: str | None = None) -> dict | None:
    """The checkpoint at `path` (tensors on the CPU) if it was made with fingerprint `fp`, else None.

    With `stage`, a checkpoint that is ignored is reported under that name (analyze's ranks each
    read their own and pass None, rather than say it once per process)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn write, or a checkpoint of an older layout
        if stage:
            print(f"{stage}: ignoring unreadable checkpoint {path} ({str(e).splitlines()[0]}); starting over")
        return None
    if state.get("fingerprint") != fp:
        if stage:
            print(f"{stage}: {path} was made with another config or store; starting over")
        return None
    return state
