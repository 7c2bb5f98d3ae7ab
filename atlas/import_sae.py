"""`atlas import-sae PATH --config X`: publish an SAE (or a suite of them) trained elsewhere.

PATH is a folder in SAELens' format (cfg.json + sae_weights.safetensors; ReLU 'standard', TopK or
JumpReLU), or a folder of such folders (a release: one sub-folder per hook/width, any names),
each mapped to the run's member with its cfg.json's hook_name and d_sae (`match_members`). It is checked against the run's model and hook (and for NaN/inf weights), evaluated on
the run's activations, and written as the run's `sae/` with the fingerprint `atlas train` would
give it, so the train stage counts it as done. Its content digest is new, so analyze, export and
build redo their work for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from atlas.config import RunConfig
from atlas.errors import AtlasError
from atlas.saes import CFG_FILE, WEIGHTS_FILE, load_sae
from atlas.stage import input_digest, open_stage, require_finite, rerun, sha256_file
from atlas.suite import configs, members


def check_compatible(sae, source: Path, cfg: RunConfig, d_model: int) -> None:
    """The SAE must read the residual stream this run collects: same width, same hook."""
    if sae.d_in != d_model:
        raise AtlasError(f"{source / CFG_FILE}: d_in = {sae.d_in}, but {cfg.model.name} has d_model = {d_model} "
                         f"at {cfg.hook_name}")
    hook = sae.metadata.get("hook_name")
    if hook and hook != cfg.hook_name:
        raise AtlasError(f"{source / CFG_FILE}: hook_name = '{hook}', but {cfg.path} collects '{cfg.hook_name}' "
                         f"(set model.layer to match)")
    model = sae.metadata.get("model_name")
    if model and Path(model).name != Path(cfg.model.name).name:
        print(f"import-sae: note: the SAE was trained on '{model}', this run's model is '{cfg.model.name}'")


def sae_folders(source: Path) -> list[Path]:
    """The SAE folders under `source`: itself when it holds a cfg.json, else its sub-folders that do
    (a release laid out one sub-folder per hook/width, as SAELens saves them)."""
    source = Path(source)
    if (source / CFG_FILE).exists() or not source.is_dir():
        return [source]  # load_sae names what is missing
    found = sorted(p for p in source.iterdir() if p.is_dir() and (p / CFG_FILE).exists())
    if not found:
        raise AtlasError(f"{source}: no {CFG_FILE} in it or in any sub-folder; an SAE folder holds "
                         f"{CFG_FILE} and {WEIGHTS_FILE}")
    return found


def match_members(cfg: RunConfig, folders: list[Path], only: str | None = None) -> dict[str, Path]:
    """Each member of the run (or the one with id `only`) -> the folder holding its SAE, matched by
    the cfg.json's hook_name and d_sae. Folders for hooks or widths the config does not list are
    left out with a note; a member with no folder, or with two, is an error (before any work)."""
    views = configs(cfg, only)
    if len(folders) == 1 and len(views) == 1:
        return {views[0].member or members(cfg)[0].id: folders[0]}  # check_compatible checks its hook
    wanted = {(v.hook_name, v.sae.d_sae): v for v in views}
    chosen: dict[str, Path] = {}
    for folder in folders:
        sae = load_sae(folder)
        key = (sae.metadata.get("hook_name"), sae.d_sae)
        del sae
        view = wanted.get(key)
        if view is None:
            print(f"import-sae: note: {folder} ({key[0]}, d_sae {key[1]}) is not an SAE of {cfg.path}; left out")
            continue
        if view.member in chosen:
            raise AtlasError(f"{folder}: a second SAE for {key[0]} with d_sae {key[1]} (the first: {chosen[view.member]})")
        chosen[view.member] = folder
    missing = [f"{v.member} ({v.hook_name}, d_sae {v.sae.d_sae})" for v in views if v.member not in chosen]
    if missing:
        raise AtlasError(f"{folders[0].parent}: no SAE folder for {', '.join(missing)}; its cfg.json files must "
                         f"name these hook_name and d_sae values")
    return chosen


def run(cfg: RunConfig, source: Path, force: bool = False, only: str | None = None) -> list[Path]:
    """Import the SAE folder `source`, or each SAE of a folder of them into its member of the suite;
    returns the members' sae/ folders."""
    from atlas import collect

    chosen = match_members(cfg, sae_folders(source), only)
    store_path = collect.run(cfg)
    views = {v.member or members(cfg)[0].id: v for v in configs(cfg, only)}
    return [import_one(views[member_id], folder, store_path) for member_id, folder in chosen.items()]


def import_one(cfg: RunConfig, source: Path, store_path: Path) -> Path:
    """Import one SAE folder as the sae/ of the member whose view of the config is `cfg`."""
    from atlas.evaluate import evaluate
    from atlas.store import ActivationStore

    source = Path(source)
    sae = load_sae(source)  # one-line errors for missing files, bad JSON, wrong shapes
    require_finite(sae.state_dict(), source / WEIGHTS_FILE, "an SAE with non-finite weights cannot be published")
    out = cfg.sae_dir
    # the fingerprint `atlas train` would write, so the train stage counts the import as done
    opening = open_stage("train", cfg, out, ("sae", "train"), {"store": input_digest(store_path, "collect", cfg)},
                         force=True)
    with ActivationStore(store_path, rerun("collect", cfg), layer=cfg.model.layer) as store:
        check_compatible(sae, source, cfg, store.d_model)
        metrics = evaluate(sae, store, cfg)
    metrics["imported_from"] = str(source.resolve())
    with opening.write(stage="import-sae", rerun=rerun("import-sae", cfg, str(source.resolve())),
                       source=str(source.resolve()), weights_sha256=sha256_file(source / WEIGHTS_FILE)) as tmp:
        sae.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"import-sae: {source} -> {out} ({sae.architecture}, d_sae {sae.d_sae}); "
          f"EV {metrics.get('explained_variance', float('nan')):.3f}, L0 {metrics.get('l0', float('nan')):.1f}")
    return out
