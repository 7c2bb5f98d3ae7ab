"""How every stage writes its output, decides whether it is current, and keeps to one writer.

A stage's output folder is written under a temporary name and renamed into place when complete,
with `stamp.json` written last inside it:

    fingerprint  what the output was made from: the config sections the stage reads and the
                 content digests of its inputs (an upstream output's digest, a corpus file's or
                 a local model's sha256)
    inputs       those digests by name, so a later stage can tell what an output was made from
    files        every file of the output: relative path -> [size, sha256]
    digest       the output's own content digest (a hash of `files`): what downstream stages
                 put in their fingerprints
    rerun        the command that regenerates the output

A stage skips itself only when the stamp's fingerprint is the one it would write now *and* every
recorded file is there with the recorded content, so a new SAE, an edited corpus or a forced
rerun flows downstream, a deleted or damaged file is regenerated, and nothing else reruns. The
activation store is the one output too large to rehash: its parts carry a digest of their
arrays taken when each was written, and a check compares their sizes (atlas/store.py).

One writer per run: the CLI holds `run_lock` on runs/<name>/ for the whole command, so two
commands on one run take turns and never interleave their temporary folders. Under torchrun the
ranks of one command are one writer: rank 0 takes the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError

STAMP = "stamp.json"
LOCK = ".lock"


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def source_digest(name: str) -> str:
    """What a model or corpus named in the config is, by content when it is local: a file's
    sha256, a folder's digest over its files; a hub id stands for itself (its revision is in
    the config)."""
    path = Path(name)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return fingerprint(*(f"{p.name}:{sha256_file(p)}" for p in files))
    return f"id:{name}"


PER_SAE_STAGES = ("train", "analyze", "import-sae")
"""Stages that take `--sae ID` to work on one member of a suite (collect and build take the run)."""


def rerun(stage: str, cfg, *args: str) -> str:
    """The command that runs `stage` of this run again, with the same config and overrides (and,
    for a member of a suite, `--sae ID` where the stage works on one SAE)."""
    member = ["--sae", cfg.member] if cfg.member and stage in PER_SAE_STAGES else []
    words = ["atlas", stage, *args, "--config", cfg.path, *member,
             *(w for s in cfg.overrides for w in ("--set", s))]
    return shlex.join(words)


# ---- the opening every stage shares ----------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    """A stage's output, what it is made from, and whether it is already current."""

    stage: str
    out: Path
    fp: str
    """fingerprint(the config sections the stage reads, the digests in `inputs`)."""
    inputs: dict
    current: bool
    """The output is there, made from exactly these inputs, and intact: nothing to do."""
    rerun: str

    def write(self, **info):
        """Context manager: a temporary folder to fill, stamped and renamed to `out` on success
        (`atomic_dir`); `info` adds to or replaces what the stamp records."""
        return atomic_dir(self.out, self.fp, **{"stage": self.stage, "inputs": self.inputs, "rerun": self.rerun,
                                                **info})


def open_stage(stage: str, cfg, out: Path, sections: tuple[str, ...], inputs: dict, force: bool = False) -> Opening:
    """Fingerprint `out` from the config `sections` and the content digests `inputs`; when it is
    current (and not `force`d) say "<stage>: <out> is up to date". The caller returns early if
    `.current`, else writes its output with `.write()`. A current output's leftovers (OUT.tmp,
    OUT.partial, …) are removed."""
    fp = fingerprint(cfg.section_hash(*sections), *inputs.values())
    current = not force and is_current(out, fp)
    if current:
        print(f"{stage}: {out} is up to date")
        remove_leftovers(out)  # what an interrupted or failed run of the stage left beside it
    return Opening(stage, Path(out), fp, inputs, current, rerun(stage, cfg))


# ---- stamps --------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, list]:
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STAMP}


def write_stamp(folder: Path, fp: str, **info) -> dict:
    """Record `folder`'s files and what it was made from; returns the stamp."""
    folder = Path(folder)
    files = _files(folder)
    stamp = {"fingerprint": fp, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info, "files": files,
             "digest": fingerprint(json.dumps(files, sort_keys=True))}
    tmp = folder / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2))
    os.replace(tmp, folder / STAMP)
    return stamp


def read_stamp(path: Path) -> dict | None:
    """The stamp of a finished output folder (or of the store file), or None."""
    path = Path(path)
    if path.suffix == ".h5":
        from atlas.store import read_store_stamp

        return read_store_stamp(path)
    try:
        stamp = json.loads((path / STAMP).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else None


def damage(path: Path, stamp: dict) -> str | None:
    """The first way an output differs from what its stamp records ("FILE: missing", …), or None."""
    path = Path(path)
    if path.suffix == ".h5":
        from atlas.store import store_damage

        return store_damage(path, stamp)
    for rel, (size, digest) in stamp["files"].items():
        p = path / rel
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != size or sha256_file(p) != digest:
            return f"{p}: changed since it was written"
    return None


def is_current(path: Path, fp: str) -> bool:
    """The output exists, was made from inputs with fingerprint `fp`, and is intact."""
    stamp = read_stamp(path)
    return stamp is not None and stamp.get("fingerprint") == fp and damage(path, stamp) is None


def input_digest(path: Path, stage: str, cfg, only: tuple[str, ...] = ()) -> str:
    """The content digest of an upstream output (or of `only` these files of it), after checking
    that it is finished and intact; otherwise a one-line error naming the file and the command
    that regenerates it."""
    stamp = read_stamp(path)
    if stamp is None:
        raise AtlasError(f"{path}: missing or unfinished; run `{rerun(stage, cfg)}` first")
    problem = damage(path, stamp)
    if problem is not None:
        raise AtlasError(f"{problem}; run `{stamp.get('rerun') or rerun(stage, cfg)}` to regenerate it")
    if only:
        return fingerprint(json.dumps({name: stamp["files"].get(name) for name in only}, sort_keys=True))
    return stamp["digest"]


def sae_digest(cfg) -> str:
    """The run's SAE itself (cfg.json + weights), checked: what features and the encoder are made
    of. Its metrics are not part of it, so a retrain to the same weights re-exports nothing."""
    from atlas.saes.base import CFG_FILE, WEIGHTS_FILE

    return input_digest(cfg.sae_dir, "train", cfg, only=(CFG_FILE, WEIGHTS_FILE))


@contextmanager
def atomic_dir(out: Path, fp: str, **info):
    """Yield a temporary folder to fill; on success it replaces `out`, stamped with `fp` and `info`.

    On any failure the temporary folder is removed and `out` is left as it was; a failed write
    (disk full, no permission) becomes a one-line error naming the file.
    """
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if out.exists() and not (out.is_dir() and ((out / STAMP).exists() or not any(out.iterdir()))):
        raise AtlasError(f"{out}: exists and is not an output of atlas (no {STAMP} in it); it is left alone: "
                         f"move it away, then run the command again")
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        write_stamp(tmp, fp, **info)
        _remove(old)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        _remove(old)
    except OSError as e:
        _remove(tmp, quiet=True)
        raise AtlasError(f"{os_error(e, tmp)}; {out} was left as it was") from None
    except BaseException:
        _remove(tmp, quiet=True)
        raise


def remove_leftovers(out: Path) -> None:
    """Remove what an interrupted or failed run left beside the finished output `out`: OUT.tmp*,
    OUT.old, OUT.partial (a resume state it no longer needs) and temporary files in OUT.parts/.
    Called once `out` is known to be current, so nothing removed is still needed."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f"{glob_escape(out.name)}.*"):
        rest = p.name[len(out.name) + 1:]
        if rest.startswith("tmp") or rest in ("old", "partial"):
            _remove(p, quiet=True)
    parts = out.with_name(out.name + ".parts")
    for p in parts.glob("*.tmp*") if parts.is_dir() else ():
        _remove(p, quiet=True)


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _remove(path: Path, quiet: bool = False) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        if not quiet:
            raise


def os_error(e: OSError, where: Path | str = "") -> str:
    """An OSError as "FILE: reason" on one line (libraries often leave the file name out)."""
    name = e.filename2 if getattr(e, "filename2", None) else e.filename
    reason = e.strerror or (str(e).splitlines() or ["input/output error"])[0]
    return f"{name or where}: {reason}"


# ---- one writer per run ----------------------------------------------------------------------


@contextmanager
def run_lock(run_dir: Path, command: str):
    """Hold runs/<name>/.lock while a command writes the run; a second command waits its turn.

    flock is released by the kernel when its holder exits, so a killed command never leaves a
    stale lock. Only rank 0 of a torchrun job locks; the other ranks are part of the same writer.
    """
    from atlas import distributed

    if not distributed.is_main():
        distributed.barrier()  # until rank 0 holds the lock
        yield
        return
    run_dir = Path(run_dir)
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        what = "cannot write in the run folder" if existed else "cannot create the run folder"
        raise AtlasError(f"{os_error(e, run_dir)}: {what} {run_dir}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another atlas command"
            print(f"atlas {command}: {run_dir} is being written by {holder}; waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"`atlas {command}` (pid {os.getpid()})\n")
        f.flush()
        distributed.barrier()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- finite numbers at stage boundaries ------------------------------------------------------


def require_finite(tensors: dict, where: Path, advice: str) -> None:
    """Stop with one line when any named tensor holds NaN or inf."""
    import torch

    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise AtlasError(f"{where}: tensor '{name}' has {bad:,} NaN/inf values; {advice}")
