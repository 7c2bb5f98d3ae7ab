"""`atlas export`: the model's blocks up to the hook plus the SAE encoder as one ONNX graph.

    input_ids int32 [batch, seq]  ->  top_ids   int32   [batch, seq, k]   the k strongest latents, strongest first
                                      top_acts  float32 [batch, seq, k]   their activations
                                      n_active  int32   [batch, seq]      how many of all d_sae latents are > 0

The browser sees only the top k; `n_active` tells it whether a latent missing from them may still
fire (ReLU, JumpReLU and BatchTopK SAEs can have more than k active latents on a token).

`runs/X/onnx/` holds (written atomically, stamped like every stage):

- `encoder.onnx` — full precision, for checks (weights over 95 MB are split, see `files.py`);
- `encoder.web.onnx` — the file the browser runs with onnxruntime-web's wasm backend. Only
  weights are quantised (`export.quantization`, see `QUANTIZATIONS` and `quantize`); activations
  stay float32. Real language models carry a few residual dimensions with huge ("massive")
  activations (SmolLM2-135M before block 25: ~20,000 in dimension 507 on the first token and
  ~16,000 on others, against a median of ~7); dynamic int8 quantisation of activations, one scale
  per tensor, rounds the rest towards zero (top-1 agreement with PyTorch there: 0.13);
- `tokenizer.json` — the model's own fast tokenizer;
- `model.json` — what the browser needs to know (inputs, outputs, BOS, max length); its "files"
  are exactly the files the browser downloads (the site copies those and nothing else), their
  sizes in "bytes" and the sum in "total_bytes";
- `parity.json` — the full-precision file and every web mode tried against PyTorch on held-out
  contexts (`parity`). A web file must agree with PyTorch on the top-1 latent of at least
  `export.min_top1_agreement` of the tokens and share `export.min_topk_overlap` of their top-k
  ids (the gate, `passes`); below that the analyser would often show other features than the
  pages describe. `export.quantization: auto` keeps the smallest mode that passes.

The web download should stay within `WEB_BUDGET_BYTES` (100 MB): a larger one is reported
with a warning, not an error, since models legitimately differ in size.

No file is over 95 MB (GitHub's limit is 100 MB): a larger initializer is cut into row blocks
joined by a Concat node, and weights go to external-data files of at most 90 MB each.

In reading order: `tracing.py` (the graph and its ONNX export), `quantization.py` (the web
file's weights), `files.py` (saving under the size limit), `parity.py` (the files against
PyTorch and the pages); this module writes the folder and applies the gate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from torch import nn

from atlas.errors import AtlasError, ConfigError
from atlas.export.files import save_model
from atlas.export.parity import (FALLBACK_TEXTS, PagesReference, check_file, compare, encode_with_bos,
                                 frequent_tokens, pages_agreement, pages_reference, parity_contexts, run_session,
                                 session, torch_outputs)
from atlas.export.steering import export_steering
from atlas.export.quantization import AUTO, QUANTIZATIONS, quantize
from atlas.export.tracing import MIN_EXPORT_OPSET, Encoded, EncoderGraph, gemm_to_matmul, max_tokens, to_onnx
from atlas.stage import input_digest, open_stage, require_finite, rerun, sae_digest, source_digest
from atlas.suite import is_suite

__all__ = ["run", "export_dir", "write_web_file", "passes", "WEB_BUDGET_BYTES", "AUTO", "QUANTIZATIONS",
           "Encoded", "EncoderGraph", "FALLBACK_TEXTS", "check_file", "compare", "encode_with_bos", "frequent_tokens",
           "PagesReference", "pages_agreement", "pages_reference", "parity_contexts", "run_session", "session", "torch_outputs"]

WEB_BUDGET_BYTES = 100_000_000
"""The web download a visitor should not exceed (GPT-2 Small to layer 8 + a 24,576-latent SAE fits)."""


def run(cfg, force: bool = False) -> Path:
    """Export `runs/X/onnx/` from the run's model and `sae/`; skipped when already current."""
    if is_suite(cfg):
        raise AtlasError(f"{cfg.path}: `atlas export` of a suite of several SAEs is not supported yet; "
                         f"its SAEs are trained and analysed under {cfg.run_dir / 'saes'}")
    from atlas.saes import load_sae

    out, sae_dir, store = cfg.onnx_dir, cfg.sae_dir, cfg.store_path
    inputs = {"sae": sae_digest(cfg), "model": source_digest(cfg.model.name),
              # the parity report's contexts: the store's held-out ones, else corpus texts
              "parity": input_digest(store, "collect", cfg) if store.exists() else source_digest(cfg.corpus.dataset)}
    opening = open_stage("export", cfg, out, ("export", "model"), inputs, force)
    if opening.current:
        return out
    fp = opening.fp
    sae = load_sae(sae_dir).float().eval().requires_grad_(False)
    require_finite(sae.state_dict(), sae_dir / "sae_weights.safetensors",
                   f"run `{rerun('train', cfg)} --force` to retrain it, or import a finite SAE")
    if cfg.export.top_k > sae.d_sae:  # the SAE's own width: after import-sae it may not be the config's
        raise ConfigError(f"{cfg.path}: 'export.top_k' = {cfg.export.top_k}: the SAE in {sae_dir} has "
                          f"{sae.d_sae:,} latents; set export.top_k to at most {sae.d_sae:,}")
    from atlas.model import check_layer, load_model

    loaded = load_model(cfg.model.name, cfg.model.revision, device="cpu", dtype="float32",
                        gguf_file=cfg.model.gguf_file)
    check_layer(cfg.path, cfg.model.layer, loaded)
    with opening.write() as tmp:
        contexts = parity_contexts(cfg, loaded)  # the store's last ones when there is a store
        pages = pages_reference(store, sae, len(contexts), cfg.analyze.skip_bos) if store.exists() else None
        export_dir(tmp, loaded, sae, cfg, fp, contexts, frequent_tokens(cfg), pages)
    print(f"export: wrote {out}")
    return out


def export_dir(out: Path, loaded, sae: nn.Module, cfg, fp: str, contexts: list[list[int]],
               frequent: np.ndarray | None = None, pages: PagesReference | None = None) -> dict:
    """Write every file of `onnx/` into `out`; return the parity report. `frequent`: token ids by
    falling corpus frequency (`frequent_tokens`), for the web file's embedding table; `pages`: what
    the pages show for `contexts`, which every web file is also compared with."""
    out = Path(out)
    ex = cfg.export
    top_k = min(ex.top_k, int(sae.W_enc.shape[1]))
    graph = EncoderGraph(loaded.truncated(cfg.model.layer), sae, top_k).eval()
    max_len = max_tokens(loaded)

    t0 = time.time()
    model = to_onnx(graph, max_len, max(ex.opset, MIN_EXPORT_OPSET))
    gemm_to_matmul(model)
    save_model(model, out / "encoder.onnx")
    loaded.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    print(f"export: traced and saved encoder.onnx in {time.time() - t0:.1f}s")

    reference = torch_outputs(graph, contexts)
    report = {"n_contexts": len(contexts), "n_tokens": int(len(reference.top_ids)),
              "gate": {"min_top1_agreement": ex.min_top1_agreement, "min_topk_overlap": ex.min_topk_overlap},
              "full": check_file(out / "encoder.onnx", contexts, reference)}
    full = report["full"]
    # n_active: float rounding may flip latents that sit at 0 (a ReLU SAE with 24,576 latents has
    # some on most tokens), so the count may differ by a latent or two per thousand active
    n_active_tol = 1 + 1e-3 * float(reference.n_active.max(initial=0))
    full["ok"] = full["ids_match"] >= 0.999 and full["max_rel_err"] <= 1e-4 and full["n_active_max_err"] <= n_active_tol
    if not full["ok"]:
        raise AtlasError(f"{out}/encoder.onnx: full-precision ONNX disagrees with PyTorch (ids match "
                         f"{full['ids_match']:.4f}, max rel err {full['max_rel_err']:.2e}, n_active off by up to "
                         f"{full['n_active_max_err']}); this is a bug in the export, please report it")
    mode, web_files, report["modes"] = write_web_file(model, out, contexts, reference, ex, frequent, pages)
    report["requested"], report["quantization"] = ex.quantization, mode
    report["web"] = report["modes"][mode]
    del model

    meta = {
        "format": 1,
        "fingerprint": fp,
        "model": loaded.name,
        "revision": loaded.revision,
        "layer": cfg.model.layer,
        "hook": cfg.hook_name,
        "d_model": loaded.d_model,
        "d_sae": int(sae.W_enc.shape[1]),
        "architecture": sae.architecture,
        "top_k": top_k,
        "max_tokens": max_len,
        "bos_token_id": loaded.bos_token_id,
        "prepend_bos": True,
        "quantization": mode,
        "input": {"name": "input_ids", "dtype": "int32", "shape": ["batch", "seq"]},
        "outputs": {"ids": "top_ids", "acts": "top_acts", "n_active": "n_active"},
        "onnx": "encoder.web.onnx",
        "external_data": web_files[1:],
        "tokenizer": "tokenizer.json",
        "files": web_files + ["tokenizer.json"],
    }
    meta["bytes"] = {f: (out / f).stat().st_size for f in meta["files"]}
    meta["total_bytes"] = sum(meta["bytes"].values())
    meta["budget_bytes"] = WEB_BUDGET_BYTES
    (out / "model.json").write_text(json.dumps(meta, indent=2))

    if ex.steering:
        report["steering"] = export_steering(out, loaded, sae, cfg, contexts, max_len, max(ex.opset, MIN_EXPORT_OPSET),
                                             frequent)["gate"]
    report["total_bytes"] = report["web_bytes"] = meta["total_bytes"]
    report["budget_bytes"] = WEB_BUDGET_BYTES
    report["within_budget"] = meta["total_bytes"] <= WEB_BUDGET_BYTES
    (out / "parity.json").write_text(json.dumps(report, indent=2))
    print(f"export: full precision matches PyTorch (ids {full['ids_match']:.4f}, rel err {full['max_rel_err']:.1e}); "
          f"web file {mode}: top-1 {report['web']['top1_agreement']:.3f}, overlap {report['web']['topk_overlap']:.3f}, "
          f"download {meta['total_bytes'] / 1e6:.1f} MB")
    if "pages_top1_agreement" in report["web"]:
        print(f"export: the web file's strongest feature is the pages' (the SAE on the stored activations) on "
              f"{report['web']['pages_top1_agreement']:.1%} of the held-out tokens")
    if not report["within_budget"]:
        print(f"export: WARNING: the web download is {meta['total_bytes'] / 1e6:.1f} MB, over the "
              f"{WEB_BUDGET_BYTES / 1e6:.0f} MB budget ({mode}; "
              f"{', '.join(f'{f} {b / 1e6:.1f} MB' for f, b in meta['bytes'].items())})")
    return report


def write_web_file(model, out: Path, contexts: list[list[int]], reference: Encoded, ex,
                   frequent: np.ndarray | None = None, pages: PagesReference | None = None) -> tuple[str, list[str], dict]:
    """Write `encoder.web.onnx` in mode `ex.quantization`, or for "auto" in the smallest mode that
    passes the gate. Returns the mode, its files and the parity figures of every mode tried.

    A named mode that fails the gate stops the export; the modes after it are tried so that the
    message can name one that passes."""
    modes = list(QUANTIZATIONS)
    first = 0 if ex.quantization == AUTO else modes.index(ex.quantization)
    tokenizer_bytes = (out / "tokenizer.json").stat().st_size
    tried: dict[str, dict] = {}
    for mode in modes[first:]:
        t0 = time.time()
        files = save_model(quantize(model, mode, frequent), out / "encoder.web.onnx")
        r = tried[mode] = check_file(out / "encoder.web.onnx", contexts, reference, pages)
        r["bytes"] = sum((out / f).stat().st_size for f in files) + tokenizer_bytes
        r["ok"] = passes(r, ex)
        print(f"export: web file {mode}: top-1 {r['top1_agreement']:.3f}, top-k overlap {r['topk_overlap']:.3f}, "
              f"{r['bytes'] / 1e6:.1f} MB: {'passes' if r['ok'] else 'fails'} the gate ({time.time() - t0:.1f}s)")
        if r["ok"] and ex.quantization in (AUTO, mode):
            return mode, files, tried
        for f in files:
            (out / f).unlink()
        if r["ok"]:
            raise AtlasError(f"export.quantization = {ex.quantization}: {_shortfall(tried[ex.quantization], ex)} "
                             f"on {len(reference.top_ids):,} held-out tokens; {mode} passes (top-1 "
                             f"{r['top1_agreement']:.3f}, overlap {r['topk_overlap']:.3f}, {r['bytes'] / 1e6:.1f} MB): "
                             f"set export.quantization to {mode} or {AUTO}")
    raise AtlasError(f"export.quantization = {ex.quantization}: no web mode passes the gate on "
                     f"{len(reference.top_ids):,} held-out tokens ("
                     f"{'; '.join(f'{m}: {_shortfall(r, ex)}' for m, r in tried.items())}); the SAE is unusually "
                     f"sensitive to weight rounding: lower export.min_top1_agreement / export.min_topk_overlap "
                     f"to publish it anyway")


def passes(r: dict, ex) -> bool:
    """The gate a web file must pass (see the module docstring)."""
    return r["top1_agreement"] >= ex.min_top1_agreement and r["topk_overlap"] >= ex.min_topk_overlap


def _shortfall(r: dict, ex) -> str:
    return (f"top-1 agreement {r['top1_agreement']:.3f} (export.min_top1_agreement {ex.min_top1_agreement}), "
            f"top-k overlap {r['topk_overlap']:.3f} (export.min_topk_overlap {ex.min_topk_overlap})")
