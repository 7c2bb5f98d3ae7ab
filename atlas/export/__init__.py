"""`atlas export`: the model's blocks up to the deepest hook as one ONNX file (the trunk), and one
small ONNX file per SAE of the run (its encoder). The browser downloads the trunk once and each
encoder when it first needs that SAE; a single-SAE run is a suite of one and has the same layout.

    trunk:    input_ids int32 [batch, seq]  ->  resid_<L> float32 [batch, seq, d_model], one per hook layer L
    encoder:  resid float32 [batch, seq, d_model]  ->  top_ids   int32   [batch, seq, k]  the k strongest latents, strongest first
                                                       top_acts  float32 [batch, seq, k]  their activations
                                                       n_active  int32   [batch, seq]     how many of all d_sae latents are > 0

The browser sees only the top k; `n_active` tells it whether a latent missing from them may still
fire (ReLU, JumpReLU and BatchTopK SAEs can have more than k active latents on a token).

`runs/X/onnx/` holds (written atomically, stamped like every stage):

- `trunk.onnx`, `encoder-<id>.onnx` — full precision, for checks (weights over 95 MB are split,
  see `files.py`); `<id>` is the SAE's id in the suite (`L8`, or `L8-24576` in a width family);
- `trunk.web.onnx`, `encoder-<id>.web.onnx` — the files the browser runs with onnxruntime-web's
  wasm backend. Only weights are quantised (`export.quantization`, see `QUANTIZATIONS` and
  `quantize`), one mode for all files; activations stay float32. Real language models carry a
  few residual dimensions with huge ("massive") activations (SmolLM2-135M before block 25:
  ~20,000 in dimension 507 on the first token and ~16,000 on others, against a median of ~7);
  dynamic int8 quantisation of activations, one scale per tensor, rounds the rest towards zero
  (top-1 agreement with PyTorch there: 0.13);
- `tokenizer.json` — the model's own fast tokenizer;
- `model.json` — what the browser needs to know (the trunk's inputs and outputs, each SAE's
  encoder, BOS, max length); its "files" are exactly the files the browser may download (the
  site copies those and nothing else), "trunk"."files" the ones it downloads first and each
  SAE's "files" the ones it fetches for that SAE, their sizes in "bytes";
- `parity.json` — per SAE, the full-precision files and every web mode tried against PyTorch on
  held-out contexts (`parity`). Each SAE's web files must agree with PyTorch on the top-1
  latent of at least `export.min_top1_agreement` of the tokens and share
  `export.min_topk_overlap` of their top-k ids (the gate, `passes`); below that the analyser
  would often show other features than the pages describe. A mode passes when every SAE
  passes; `export.quantization: auto` keeps the smallest mode that passes.

A visitor's first analysis (trunk, tokenizer and the largest encoder) should stay within
`WEB_BUDGET_BYTES` (100 MB): a larger one is reported with a warning, not an error, since models
legitimately differ in size.

No file is over 95 MB (GitHub's limit is 100 MB): a larger initializer is cut into row blocks
joined by a Concat node, and weights go to external-data files of at most 90 MB each.

In reading order: `tracing.py` (the graphs and their ONNX export), `quantization.py` (the web
files' weights), `files.py` (saving under the size limit), `parity.py` (the files against
PyTorch and the pages); this module writes the folder and applies the gate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch import nn

from atlas.errors import AtlasError, ConfigError
from atlas.export.files import save_model
from atlas.export.parity import (FALLBACK_TEXTS, PagesReference, check_split, compare, encode_with_bos,
                                 encoder_outputs, frequent_tokens, pages_agreement, pages_reference, parity_contexts,
                                 run_split, session, torch_outputs, trunk_outputs)
from atlas.export.quantization import AUTO, QUANTIZATIONS, quantize
from atlas.export.steering import export_steering
from atlas.export.tracing import (MIN_EXPORT_OPSET, RESIDUAL_INPUT, Encoded, EncoderGraph, encoder_onnx, max_tokens,
                                  residual_name, trunk_onnx)
from atlas.stage import input_digest, open_stage, require_finite, rerun, sae_digest, source_digest
from atlas.store import acts_key
from atlas.suite import configs, members

__all__ = ["run", "export_dir", "write_web_files", "passes", "SaeToExport", "WEB_BUDGET_BYTES", "AUTO", "QUANTIZATIONS",
           "TRUNK", "encoder_name", "Encoded", "EncoderGraph", "FALLBACK_TEXTS", "check_split", "compare",
           "encode_with_bos", "encoder_outputs", "frequent_tokens", "PagesReference", "pages_agreement",
           "pages_reference", "parity_contexts", "residual_name", "run_split", "session", "torch_outputs",
           "trunk_outputs"]

WEB_BUDGET_BYTES = 100_000_000
"""A visitor's first analysis should not exceed this (GPT-2 Small to layer 8 + a 24,576-latent SAE fits)."""
FULL_PRECISION_REL_ERR = 1e-3
"""Largest error of the full-precision files' activations against PyTorch, relative to the token's largest
activation. float32 error grows with depth: 1.2e-4 at SmolLM2's block 19, 1.6e-5 at block 11 and
8.7e-6 at block 3 (configs/demo-suite.yaml); an export bug is off by far more, and the ids must match as well."""
TRUNK = "trunk"
"""The trunk files' stem: trunk.onnx (full precision), trunk.web.onnx (the browser's)."""


def encoder_name(sae_id: str) -> str:
    """The stem of SAE `sae_id`'s encoder files: encoder-<id>.onnx, encoder-<id>.web.onnx."""
    return f"encoder-{sae_id}"


class SaeToExport(NamedTuple):
    """One SAE of the run as the export needs it."""

    id: str
    """Its id in the suite (`L8`, `L8-24576`): names its files."""
    layer: int
    """Its hook: the residual before block `layer`."""
    hook: str
    sae: nn.Module
    architecture: str


def run(cfg, force: bool = False) -> Path:
    """Export `runs/X/onnx/` from the run's model and every SAE of the run (`atlas.suite.members`):
    one trunk to the deepest hook, one encoder per SAE; skipped when already current."""
    from atlas.saes import load_sae

    ids, views = [m.id for m in members(cfg)], configs(cfg)  # a view per SAE: its layer, hook and sae/ folder
    out, store = cfg.onnx_dir, cfg.store_path
    # a run of one SAE records its digest under "sae", as every stage does (build checks it)
    inputs = {("sae" if len(views) == 1 else f"sae:{i}"): sae_digest(v) for i, v in zip(ids, views)}
    inputs |= {"model": source_digest(cfg.model.name),
               # the parity report's contexts: the store's held-out ones, else corpus texts
               "parity": input_digest(store, "collect", cfg) if store.exists() else source_digest(cfg.corpus.dataset)}
    opening = open_stage("export", cfg, out, ("export", "model"), inputs, force)
    if opening.current:
        return out
    saes = []
    for sae_id, v in zip(ids, views):
        sae = load_sae(v.sae_dir).float().eval().requires_grad_(False)
        require_finite(sae.state_dict(), v.sae_dir / "sae_weights.safetensors",
                       f"run `{rerun('train', v)} --force` to retrain it, or import a finite SAE")
        saes.append(SaeToExport(sae_id, v.model.layer, v.hook_name, sae, v.sae.architecture))
    for s in saes:
        if cfg.export.top_k > s.sae.d_sae:  # the SAE's own width: after import-sae it may not be the config's
            raise ConfigError(f"{cfg.path}: 'export.top_k' = {cfg.export.top_k}: SAE {s.id} has {s.sae.d_sae:,} "
                              f"latents; set export.top_k to at most {s.sae.d_sae:,}")
    from atlas.model import check_layer, load_model

    loaded = load_model(cfg.model.name, cfg.model.revision, device="cpu", dtype="float32",
                        gguf_file=cfg.model.gguf_file)
    for s in saes:
        check_layer(cfg.path, s.layer, loaded)
    with opening.write() as tmp:
        contexts = parity_contexts(cfg, loaded)  # the store's last ones when there is a store
        pages = ({s.id: pages_reference(store, s.sae, len(contexts), cfg.analyze.skip_bos, acts_key(cfg.layers, s.layer))
                  for s in saes} if store.exists() else None)
        export_dir(tmp, loaded, saes, cfg, opening.fp, contexts, frequent_tokens(cfg), pages)
    print(f"export: wrote {out}")
    return out


def export_dir(out: Path, loaded, saes: list[SaeToExport], cfg, fp: str, contexts: list[list[int]],
               frequent: np.ndarray | None = None, pages: dict[str, PagesReference] | None = None) -> dict:
    """Write every file of `onnx/` for `saes` into `out`; return the parity report. `frequent`:
    token ids by falling corpus frequency (`frequent_tokens`), for the web trunk's embedding table;
    `pages`: SAE id -> what its pages show for `contexts`, which every web file is also compared with."""
    out = Path(out)
    ex = cfg.export
    max_len, opset = max_tokens(loaded), max(ex.opset, MIN_EXPORT_OPSET)
    layers = sorted({s.layer for s in saes})
    top_k = {s.id: min(ex.top_k, int(s.sae.W_enc.shape[1])) for s in saes}
    # PyTorch's reference first, each SAE on its own truncated model (not the trunk's code path);
    # tracing may leave the shared modules changed for a later eager call (seen with hidden states)
    reference = {s.id: torch_outputs(EncoderGraph(loaded.truncated(s.layer), s.sae, top_k[s.id]).eval(), contexts)
                 for s in saes}

    t0 = time.time()
    trunk = trunk_onnx(loaded, layers, max_len, opset)
    save_model(trunk, out / f"{TRUNK}.onnx")
    encoders = {s.id: encoder_onnx(s.sae, top_k[s.id], loaded.d_model, max_len, opset) for s in saes}
    for sae_id, model in encoders.items():
        save_model(model, out / f"{encoder_name(sae_id)}.onnx")
    loaded.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    print(f"export: traced and saved {TRUNK}.onnx (layers {', '.join(map(str, layers))}) and {len(encoders)} "
          f"encoder file(s) in {time.time() - t0:.1f}s")

    layer_of = {s.id: s.layer for s in saes}
    full = check_split(out / f"{TRUNK}.onnx", {i: (out / f"{encoder_name(i)}.onnx", layer_of[i]) for i in encoders},
                       contexts, reference)
    for sae_id, r in full.items():
        # n_active: float rounding may flip latents that sit at 0 (a ReLU SAE with 24,576 latents has
        # some on most tokens), so the count may differ by a latent or two per thousand active
        n_active_tol = 1 + 1e-3 * float(reference[sae_id].n_active.max(initial=0))
        r["ok"] = (r["ids_match"] >= 0.999 and r["max_rel_err"] <= FULL_PRECISION_REL_ERR
                   and r["n_active_max_err"] <= n_active_tol)
        if not r["ok"]:
            raise AtlasError(f"{out}/{encoder_name(sae_id)}.onnx: full-precision ONNX (with {TRUNK}.onnx) disagrees "
                             f"with PyTorch (ids match {r['ids_match']:.4f}, max rel err {r['max_rel_err']:.2e} "
                             f"> {FULL_PRECISION_REL_ERR:g}, "
                             f"n_active off by up to {r['n_active_max_err']}); this is a bug in the export, please report it")
    mode, web_files, modes = write_web_files(trunk, encoders, layer_of, out, contexts, reference, ex, frequent, pages)
    del trunk, encoders

    sae_meta = [{
        "id": s.id,
        "layer": s.layer,
        "hook": s.hook,
        "d_sae": int(s.sae.W_enc.shape[1]),
        "architecture": s.architecture,
        "top_k": top_k[s.id],
        "input": {"name": RESIDUAL_INPUT, "from": residual_name(s.layer)},
        "outputs": {"ids": "top_ids", "acts": "top_acts", "n_active": "n_active"},
        "onnx": web_files[s.id][0],
        "external_data": web_files[s.id][1:],
        "files": web_files[s.id],
    } for s in saes]
    trunk_files = web_files[TRUNK] + ["tokenizer.json"]
    meta = {
        "format": 2,
        "fingerprint": fp,
        "model": loaded.name,
        "revision": loaded.revision,
        "d_model": loaded.d_model,
        "max_tokens": max_len,
        "ctx_len": cfg.corpus.ctx_len,      # the SAEs' training contexts (the analyser notes longer prompts)
        "bos_token_id": loaded.bos_token_id,
        "prepend_bos": True,
        "quantization": mode,
        "tokenizer": "tokenizer.json",
        "trunk": {"onnx": web_files[TRUNK][0], "external_data": web_files[TRUNK][1:], "files": trunk_files,
                  "input": {"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]},
                  "outputs": {str(layer): residual_name(layer) for layer in layers}},
        "saes": sae_meta,
        "files": trunk_files + [f for s in sae_meta for f in s["files"]],
    }
    meta["bytes"] = {f: (out / f).stat().st_size for f in meta["files"]}
    meta["total_bytes"] = sum(meta["bytes"].values())
    meta["trunk"]["bytes"] = sum(meta["bytes"][f] for f in trunk_files)
    for s in sae_meta:
        s["bytes"] = sum(meta["bytes"][f] for f in s["files"])
    first = meta["trunk"]["bytes"] + max(s["bytes"] for s in sae_meta)
    meta["budget_bytes"] = WEB_BUDGET_BYTES
    (out / "model.json").write_text(json.dumps(meta, indent=2))

    report = {"n_contexts": len(contexts), "n_tokens": int(len(next(iter(reference.values())).top_ids)),
              "gate": {"min_top1_agreement": ex.min_top1_agreement, "min_topk_overlap": ex.min_topk_overlap},
              "requested": ex.quantization, "quantization": mode, "modes_tried": list(modes),
              "trunk_bytes": meta["trunk"]["bytes"], "total_bytes": meta["total_bytes"],
              "first_analysis_bytes": first, "budget_bytes": WEB_BUDGET_BYTES, "within_budget": first <= WEB_BUDGET_BYTES,
              "saes": {s["id"]: {"layer": s["layer"], "hook": s["hook"], "encoder_bytes": s["bytes"], "full": full[s["id"]],
                                 "web": modes[mode][s["id"]], "modes": {m: r[s["id"]] for m, r in modes.items()}}
                       for s in sae_meta}}
    if ex.steering and len(saes) == 1:
        report["steering"] = export_steering(out, loaded, saes[0].sae, cfg, contexts, max_len, opset, frequent)["gate"]
    elif ex.steering:
        print("export: export.steering: steering files are made for runs of one SAE so far; this suite gets none")
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    for sae_id, r in report["saes"].items():
        web = r["web"]
        print(f"export: {sae_id}: full precision matches PyTorch (ids {r['full']['ids_match']:.4f}, rel err "
              f"{r['full']['max_rel_err']:.1e}); web files {mode}: top-1 {web['top1_agreement']:.3f}, overlap "
              f"{web['topk_overlap']:.3f}" + (f"; the pages' strongest feature on {web['pages_top1_agreement']:.1%} of "
                                              f"the held-out tokens" if "pages_top1_agreement" in web else ""))
    encoder_sizes = ", ".join(f"{s['id']} {s['bytes'] / 1e6:.1f} MB" for s in sae_meta)
    print(f"export: download: trunk and tokenizer {meta['trunk']['bytes'] / 1e6:.1f} MB once, encoders "
          f"{encoder_sizes} when first needed")
    if not report["within_budget"]:
        print(f"export: WARNING: a first analysis downloads {first / 1e6:.1f} MB, over the "
              f"{WEB_BUDGET_BYTES / 1e6:.0f} MB budget ({mode}; "
              f"{', '.join(f'{f} {b / 1e6:.1f} MB' for f, b in meta['bytes'].items())})")
    return report


def write_web_files(trunk, encoders: dict, layer_of: dict[str, int], out: Path, contexts: list[list[int]],
                    reference: dict[str, Encoded], ex, frequent: np.ndarray | None = None,
                    pages: dict[str, PagesReference] | None = None) -> tuple[str, dict[str, list[str]], dict]:
    """Write `trunk.web.onnx` and each SAE's `encoder-<id>.web.onnx` in mode `ex.quantization`, or
    for "auto" in the smallest mode in which every SAE passes the gate. Returns the mode, the files
    written ({TRUNK: [...], id: [...]}, the .onnx first) and, per mode tried, each SAE's parity figures.

    A named mode that fails the gate stops the export; the modes after it are tried so that the
    message can name one that passes."""
    modes = list(QUANTIZATIONS)
    first = 0 if ex.quantization == AUTO else modes.index(ex.quantization)
    tried: dict[str, dict] = {}
    for mode in modes[first:]:
        t0 = time.time()
        files = {TRUNK: save_model(quantize(trunk, mode, frequent), out / f"{TRUNK}.web.onnx")}
        for sae_id, model in encoders.items():
            files[sae_id] = save_model(quantize(model, mode), out / f"{encoder_name(sae_id)}.web.onnx")
        per = tried[mode] = check_split(out / f"{TRUNK}.web.onnx",
                                        {i: (out / f"{encoder_name(i)}.web.onnx", layer_of[i]) for i in encoders},
                                        contexts, reference, pages)
        for sae_id, r in per.items():
            r["bytes"] = sum((out / f).stat().st_size for f in files[sae_id])
            r["ok"] = passes(r, ex)
        ok = all(r["ok"] for r in per.values())
        figures = "; ".join(f"{i} top-1 {r['top1_agreement']:.3f}, overlap {r['topk_overlap']:.3f}" for i, r in per.items())
        print(f"export: web files {mode}: {figures}: {'pass' if ok else 'fail'} the gate ({time.time() - t0:.1f}s)")
        if ok and ex.quantization in (AUTO, mode):
            return mode, files, tried
        for f in (f for names in files.values() for f in names):
            (out / f).unlink()
        if ok:
            raise AtlasError(f"export.quantization = {ex.quantization}: {_shortfall(tried[ex.quantization], ex)} "
                             f"on {len(contexts)} held-out contexts; {mode} passes (lowest top-1 "
                             f"{min(r['top1_agreement'] for r in per.values()):.3f}, lowest overlap "
                             f"{min(r['topk_overlap'] for r in per.values()):.3f}): set export.quantization to "
                             f"{mode} or {AUTO}")
    raise AtlasError(f"export.quantization = {ex.quantization}: no web mode passes the gate on {len(contexts)} "
                     f"held-out contexts ({'; '.join(f'{m}: {_shortfall(r, ex)}' for m, r in tried.items())}); an SAE is "
                     f"unusually sensitive to weight rounding: lower export.min_top1_agreement / "
                     f"export.min_topk_overlap to publish it anyway")


def passes(r: dict, ex) -> bool:
    """The gate one SAE's web files must pass (see the module docstring)."""
    return r["top1_agreement"] >= ex.min_top1_agreement and r["topk_overlap"] >= ex.min_topk_overlap


def _shortfall(per_sae: dict[str, dict], ex) -> str:
    return ", ".join(f"{i}: top-1 agreement {r['top1_agreement']:.3f} (export.min_top1_agreement "
                     f"{ex.min_top1_agreement}), top-k overlap {r['topk_overlap']:.3f} (export.min_topk_overlap "
                     f"{ex.min_topk_overlap})" for i, r in per_sae.items() if not r["ok"])
