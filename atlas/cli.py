"""The `atlas` command: one subcommand per pipeline stage, each reading a run config.

Every failure the user can cause or meet (bad input, a damaged run, a full disk) ends as one line
on stderr and a non-zero exit; a command holds the run's lock while it writes (atlas/stage.py).
Anything else (a library's own exception, a bug) ends as one line too, naming the stage and the log
file in the run folder that holds the full trace; ATLAS_DEBUG=1 lets it through as a traceback.
SIGTERM ends a command like Ctrl-C: the stage under way leaves its previous output as it was.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from atlas import suite
from atlas.errors import AtlasError
from atlas.stage import PER_SAE_STAGES

# Pipeline order; each module exposes run(cfg, force) -> Path. The stages in PER_SAE_STAGES run
# once per SAE of a suite (atlas/suite.py), with the member's view of the config.
STAGES = {
    "collect": "atlas.collect",
    "train": "atlas.train",
    "analyze": "atlas.analyze",
    "links": "atlas.links",
    "export": "atlas.export",
    "build": "atlas.build",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas", description="Train SAEs and publish their features as a static atlas.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*STAGES, "all", "import-sae", "steer"]:
        helps = {"all": "run every stage in order",
                 "import-sae": "publish an SAE trained elsewhere (SAELens format), then analyze, export, build",
                 "steer": "continue a prompt with a feature added to the residual stream, beside the unsteered text"}
        p = sub.add_parser(name, help=helps.get(name, f"run the {name} stage"))
        if name == "import-sae":
            p.add_argument("path", help="folder with cfg.json + sae_weights.safetensors, or a folder of such "
                                        "folders (one per hook/width of a suite)")
        if name == "steer":
            from atlas import steer

            steer.add_arguments(p)
        if name in (*PER_SAE_STAGES, "all", "steer"):
            p.add_argument("--sae", metavar="ID", help="only this SAE of a suite, e.g. L8 or L8-24576")
        p.add_argument("--config", required=True, help="run config, e.g. configs/gpt2-small.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
        p.add_argument("--force", action="store_true", help="redo the stage even if its output is up to date")
        if name in ("build", "all", "import-sae"):
            p.add_argument("--no-analyser", dest="analyser", action="store_false",
                           help="build the site without the in-browser prompt analyser (no export needed)")
    args = parser.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _run(args)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from atlas import distributed
    from atlas.config import load_config
    from atlas.stage import os_error, run_lock

    cfg, stage, finished = None, args.command, []
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "steer":  # reads the run, writes nothing: no lock
            from atlas import steer

            views = suite.configs(cfg, args.sae)
            if len(views) > 1:
                raise AtlasError(f"{cfg.path} holds several SAEs; say which to steer with: --sae "
                                 f"{' | '.join(v.member for v in views)}")
            steer.run(views[0], args)
            return 0
        distributed.init()
        with run_lock(cfg.run_dir, args.command):
            if args.command == "import-sae":
                from atlas import import_sae

                stage = "import-sae"
                import_sae.run(cfg, args.path, force=args.force, only=args.sae)
            for name in {"all": list(STAGES), "import-sae": ["analyze", "links", "export", "build"]}.get(args.command,
                                                                                              [args.command]):
                stage = name
                t0 = time.perf_counter()
                module = importlib.import_module(STAGES[name])
                kw = {"analyser": args.analyser} if name == "build" else {}
                for view in (suite.configs(cfg, getattr(args, "sae", None)) if name in PER_SAE_STAGES else [cfg]):
                    module.run(view, force=args.force, **kw)
                finished.append(name)
                if distributed.rank_and_world()[0] == 0:
                    print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    except AtlasError as e:
        _close_progress_bars()
        print(f"atlas {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a folder we may not write, a file that vanished under us
        if os.environ.get("ATLAS_DEBUG"):
            raise
        _close_progress_bars()
        print(f"atlas {args.command}: error: {os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        _close_progress_bars()
        how = "terminated" if isinstance(e, Terminated) else "interrupted"
        kept = f"finished and kept: {', '.join(finished)}; " if finished else ""
        print(f"atlas {args.command}: {how} during {stage}; {kept}{stage}'s previous output was left as it was; "
              f"run it again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # the last resort: a library's own exception or a bug, never a bare traceback
        if os.environ.get("ATLAS_DEBUG"):
            raise
        _close_progress_bars()
        log = _write_trace(cfg, args.command)
        where = f"the full trace is in {log}" if log else "rerun with ATLAS_DEBUG=1 for the full trace"
        print(f"atlas {args.command}: error: unexpected failure in {stage}: {type(e).__name__}: "
              f"{_first_line(e)}; {where}", file=sys.stderr)
        return 1
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so stages unwind as they do for Ctrl-C."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _first_line(e: BaseException, limit: int = 300) -> str:
    line = (str(e).strip().splitlines() or ["(no message)"])[0]
    return line if len(line) <= limit else line[:limit] + "…"


def _write_trace(cfg, command: str) -> Path | None:
    """Write the current exception's trace to runs/<name>/atlas-error.log; its path, or None."""
    if cfg is None or not cfg.run_dir.is_dir():
        return None
    log = cfg.run_dir / "atlas-error.log"
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} atlas {command} --config {cfg.path}\n")
            f.write(traceback.format_exc(limit=200))
    except OSError:
        return None
    return log


def _close_progress_bars() -> None:
    """End the bars a failed stage left open, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
