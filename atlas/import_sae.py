"""`atlas import-sae PATH --config X`: publish an SAE trained elsewhere.

PATH is a folder in SAELens' format (cfg.json + sae_weights.safetensors; ReLU 'standard', TopK or
JumpReLU). It is checked against the run's model and hook (and for NaN/inf weights), evaluated on
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
from atlas.stage import atomic_dir, fingerprint, input_digest, require_finite, rerun, sha256_file


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


def run(cfg: RunConfig, source: Path, force: bool = False) -> Path:
    from atlas import collect
    from atlas.evaluate import evaluate
    from atlas.store import ActivationStore

    source = Path(source)
    sae = load_sae(source)  # one-line errors for missing files, bad JSON, wrong shapes
    require_finite(sae.state_dict(), source / WEIGHTS_FILE, "an SAE with non-finite weights cannot be published")
    store_path = collect.run(cfg)
    store_digest = input_digest(store_path, "collect", cfg)
    with ActivationStore(store_path, rerun("collect", cfg)) as store:
        check_compatible(sae, source, cfg, store.d_model)
        fp = fingerprint(cfg.section_hash("sae", "train"), store_digest)  # what `atlas train` would write
        metrics = evaluate(sae, store, cfg)
    metrics["imported_from"] = str(source.resolve())
    out = cfg.run_dir / "sae"
    with atomic_dir(out, fp, stage="import-sae", inputs={"store": store_digest},
                    rerun=rerun("import-sae", cfg, str(source.resolve())),
                    source=str(source.resolve()), weights_sha256=sha256_file(source / WEIGHTS_FILE)) as tmp:
        sae.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"import-sae: {source} -> {out} ({sae.architecture}, d_sae {sae.d_sae}); "
          f"EV {metrics.get('explained_variance', float('nan')):.3f}, L0 {metrics.get('l0', float('nan')):.1f}")
    return out
