"""The `atlas` command: one subcommand per pipeline stage, each reading a run config.

Every failure the user can cause or meet (bad input, a damaged run, a full disk) ends as one line
on stderr and a non-zero exit; a command holds the run's lock while it writes (atlas/stage.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

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
    args = parser.parse_args(argv)

    from atlas import distributed
    from atlas.config import load_config
    from atlas.stage import os_error, run_lock

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "steer":  # reads the run, writes nothing: no lock
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

                import_sae.run(cfg, args.path, force=args.force, only=args.sae)
            for name in {"all": list(STAGES), "import-sae": ["analyze", "links", "export", "build"]}.get(args.command,
                                                                                              [args.command]):
                t0 = time.perf_counter()
                stage = importlib.import_module(STAGES[name])
                for view in (suite.configs(cfg, getattr(args, "sae", None)) if name in PER_SAE_STAGES else [cfg]):
                    stage.run(view, force=args.force)
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
    except KeyboardInterrupt:
        print(f"atlas {args.command}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    return 0


def _close_progress_bars() -> None:
    """End the bars a failed stage left open, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
