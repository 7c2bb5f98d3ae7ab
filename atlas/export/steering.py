"""The steering web file (`export.steering`): the whole model with a steering vector added to the
residual at the hook, the next token's logits out, and a KV cache, so each generated token costs
one token's work in the browser.

    steer.web.onnx   inputs:  input_ids int32 [1, seq]        the new tokens (the prompt, then one at a time)
                              steer     float32 [d_model]     added at every position before block L
                              past      float32 [2*n_layers, n_kv_heads, past, head_dim]
                                                              keys and values of the earlier tokens,
                                                              layer by layer (keys, values); past = 0 at first
                     outputs: logits    float32 [1, vocab]    the last new token's next-token logits
                              present   float32 [2*n_layers, n_kv_heads, past + seq, head_dim]
    steer.decoder.bin        float16 [d_sae, d_model]: the SAE's decoder rows W_dec (row-major), from
                             which the page builds S * max_act * W_dec[i] (atlas/steer.py's units)
    steering.json            shapes, files, bytes and the gate's figures

Caching past keys and values is exact: a steered token's keys and values already include the
vector, which is added again to every new token. The past is one stacked tensor (not one per
layer) so the browser passes two tensors around, whatever the depth.

The file stands alone: the analyser's file stops at the hook and has no KV cache, so sharing its
blocks would need a trunk with cache inputs that the analyser does not use; the extra bytes are
reported (`steering.json`, README).

Weights are quantised by the analyser's modes (atlas/export/quantization.py) and the smallest mode
that passes the gate is kept: on held-out prompts (the first `STEER_PROMPT_TOKENS` tokens of the
parity contexts), greedy continuations of `GATE_TOKENS` tokens from the file (Python onnxruntime,
with the cache) must equal PyTorch's (`atlas.steer.generate`, the full model, no cache) token for
token on at least `export.min_steer_agreement` of the tokens, unsteered and steered at
`GATE_STRENGTHS` along the decoder direction of the feature most active on the prompts. Position-wise:
after a first disagreement the two continuations usually part ways, so an early slip costs the rest.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from atlas import steer
from atlas.errors import AtlasError
from atlas.export.files import save_model
from atlas.export.quantization import AUTO, QUANTIZATIONS, quantize

WEB_FILE = "steer.web.onnx"
DECODER_FILE = "steer.decoder.bin"
META_FILE = "steering.json"
GATE_TOKENS = 20
"""Generated tokens per continuation the gate compares."""
GATE_PROMPTS = 6
"""Held-out prompts the gate continues (each unsteered and at every `GATE_STRENGTHS`)."""
STEER_PROMPT_TOKENS = 16
"""Tokens of each held-out context used as a prompt."""
GATE_STRENGTHS = (4.0, 12.0)
"""The gate's steering strengths, in units of the feature's largest activation on the prompts
(as `atlas steer`'s, with the prompts standing in for the analysed tokens)."""


class SteeringGraph(nn.Module):
    """What the steering file computes (see the module docstring), batch of one."""

    def __init__(self, loaded, layer: int):
        super().__init__()
        self.loaded, self.layer = loaded, layer
        self.model = loaded.model  # registered, so its weights are the graph's
        self.n_layers = loaded.n_layers

    def forward(self, input_ids: torch.Tensor, steer_vector: torch.Tensor,
                past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i][None], past[2 * i + 1][None], i)
        with self.loaded.splice(self.layer, steer.add_vector(steer_vector)):
            out = self.model(input_ids=input_ids.long(), past_key_values=cache, use_cache=True, logits_to_keep=1)
        present = [t[0] for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return out.logits[:, -1].float(), torch.stack(present)


class CacheShape(NamedTuple):
    """The per-token shape of the KV cache: `past` is [2 * n_layers, n_kv_heads, tokens, head_dim]."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


def cache_shape(loaded) -> CacheShape:
    """The cache's dimensions, read off one cached forward pass (whatever the config calls them)."""
    with torch.no_grad():
        out = loaded.model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    return CacheShape(len(out.past_key_values.layers), int(keys.shape[1]), int(keys.shape[3]))


def to_onnx(loaded, layer: int, max_len: int, opset: int):
    """The steering graph as an ONNX model with dynamic `seq` and `past` lengths."""
    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    shape = cache_shape(loaded)
    graph = SteeringGraph(loaded, layer).eval()
    example = (torch.zeros((1, 3), dtype=torch.int32), torch.zeros(loaded.d_model),
               torch.zeros((2 * shape.n_layers, shape.n_kv_heads, 4, shape.head_dim)))
    dims = ({1: torch.export.Dim("seq", min=1, max=max_len)}, None,
            {2: torch.export.Dim("past", min=0, max=max_len - 1)})
    with torch.no_grad():
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=opset,
                                    input_names=["input_ids", "steer", "past"], output_names=["logits", "present"],
                                    dynamic_shapes=dims, verbose=False, optimize=True)
    model = program.model_proto
    onnx.checker.check_model(model, full_check=False)
    return model


def session_of(model, threads: int = 0):
    """An onnxruntime CPU session of an in-memory model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_generate(sess, prompt: list[int], vector: np.ndarray, n_new: int, shape: CacheShape) -> list[int]:
    """Greedy continuation from the steering file with its KV cache: the prompt in one call, then
    one token per call (what the browser does)."""
    past = np.zeros((2 * shape.n_layers, shape.n_kv_heads, 0, shape.head_dim), np.float32)
    feed, out = list(prompt), []
    for _ in range(n_new):
        logits, past = sess.run(None, {"input_ids": np.asarray([feed], np.int32),
                                       "steer": vector.astype(np.float32), "past": past})
        out.append(int(np.argmax(logits[0])))
        feed = [out[-1]]
    return out


class GateCase(NamedTuple):
    """One continuation the gate compares: a prompt under one steering vector, and PyTorch's tokens."""

    prompt: list[int]
    condition: str
    vector: np.ndarray
    reference: list[int]


def gate_cases(loaded, sae, layer: int, contexts: list[list[int]]) -> list[GateCase]:
    """PyTorch's greedy continuations of the held-out prompts, unsteered and steered at
    `GATE_STRENGTHS` along the decoder direction of the feature most active on the prompts."""
    prompts = [c[:STEER_PROMPT_TOKENS] for c in contexts[:GATE_PROMPTS]]
    with torch.no_grad():
        acts = torch.cat([sae.encode(loaded.truncated(layer)(torch.tensor([p]))[0, 1:].float()) for p in prompts])
    feature = int(acts.sum(0).argmax())
    unit = float(acts[:, feature].max())
    vectors = {"unsteered": torch.zeros(loaded.d_model)}
    for s in GATE_STRENGTHS:
        vectors[f"feature {feature} x{s:g}"] = steer.steering_vector(sae, feature, s, unit)
    return [GateCase(p, name, v.numpy(), steer.generate(loaded, layer, p, steer.add_vector(v), GATE_TOKENS).token_ids)
            for name, v in vectors.items() for p in prompts]


def check(sess, cases: list[GateCase], shape: CacheShape) -> dict:
    """Position-wise agreement of the file's greedy continuations with PyTorch's, overall and per condition."""
    t0 = time.time()
    same: dict[str, list[bool]] = {}
    for c in cases:
        got = onnx_generate(sess, c.prompt, c.vector, len(c.reference), shape)
        same.setdefault(c.condition, []).extend(a == b for a, b in zip(got, c.reference))
    every = [x for v in same.values() for x in v]
    return {"agreement": float(np.mean(every)), "n_tokens": len(every),
            "by_condition": {k: float(np.mean(v)) for k, v in same.items()}, "seconds": round(time.time() - t0, 1)}


def export_steering(out: Path, loaded, sae, cfg, contexts: list[list[int]], max_len: int, opset: int,
                    frequent: np.ndarray | None = None) -> dict:
    """Write the steering files into `out` (see the module docstring); return the gate's report."""
    ex = cfg.export
    if not loaded.has_lm_head:
        raise AtlasError(f"export.steering: {loaded.name} has no LM head, so it cannot generate text; "
                         f"set export.steering to false")
    t0 = time.time()
    model = to_onnx(loaded, cfg.model.layer, max_len, opset)
    shape = cache_shape(loaded)
    print(f"export: traced the steering graph in {time.time() - t0:.1f}s")
    t0 = time.time()
    cases = gate_cases(loaded, sae, cfg.model.layer, contexts)
    print(f"export: PyTorch's {len(cases)} reference continuations in {time.time() - t0:.1f}s")
    report = {"gate": {"min_agreement": ex.min_steer_agreement, "tokens": GATE_TOKENS, "prompts": GATE_PROMPTS,
                       "prompt_tokens": STEER_PROMPT_TOKENS, "conditions": sorted({c.condition for c in cases})}}
    full = report["full"] = check(session_of(model), cases, shape)
    if full["agreement"] < ex.min_steer_agreement:
        raise AtlasError(f"{out}: the full-precision steering graph's greedy tokens agree with PyTorch's on only "
                         f"{full['agreement']:.3f} ({full['by_condition']}); this is a bug in the export, please report it")
    report["quantization"], files, report["modes"] = _write_web_file(model, out, cases, shape, ex, frequent)
    decoder = sae.W_dec.detach().float().numpy().astype("<f2")
    (out / DECODER_FILE).write_bytes(decoder.tobytes())
    meta = {
        "format": 1,
        "onnx": WEB_FILE,
        "external_data": files[1:],
        "decoder": DECODER_FILE,
        "files": files + [DECODER_FILE],
        "layer": cfg.model.layer,
        "hook": cfg.hook_name,
        "d_model": loaded.d_model,
        "d_sae": int(sae.W_dec.shape[0]),
        "vocab": int(loaded.model.get_output_embeddings().weight.shape[0]),
        "n_layers": shape.n_layers,
        "n_kv_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "max_tokens": max_len,
        "bos_token_id": loaded.bos_token_id,
        "eos_token_id": loaded.tokenizer.eos_token_id,
        "quantization": report["quantization"],
        "inputs": {"input_ids": "int32 [1, seq]", "steer": "float32 [d_model]",
                   "past": "float32 [2*n_layers, n_kv_heads, past, head_dim]"},
        "outputs": {"logits": "float32 [1, vocab]", "present": "float32 [2*n_layers, n_kv_heads, past+seq, head_dim]"},
        "strength_unit": "max_act",
        "control_seed": steer.CONTROL_SEED,
    }
    meta["bytes"] = {f: (out / f).stat().st_size for f in meta["files"]}
    meta["total_bytes"] = sum(meta["bytes"].values())
    meta["gate"] = report
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    web = report["modes"][report["quantization"]]
    print(f"export: steering file {report['quantization']}: greedy tokens agree with PyTorch on "
          f"{web['agreement']:.1%} of {web['n_tokens']}; download {meta['total_bytes'] / 1e6:.1f} MB "
          f"(with {DECODER_FILE}), on top of the analyser's file")
    return meta


def _write_web_file(model, out: Path, cases: list[GateCase], shape: CacheShape, ex,
                    frequent: np.ndarray | None) -> tuple[str, list[str], dict]:
    """The smallest quantisation mode that passes the gate (or the named one): its name, files and
    every tried mode's figures. Modes and their order are the analyser's (`QUANTIZATIONS`); a named
    mode is the only one tried."""
    tried: dict[str, dict] = {}
    for mode in list(QUANTIZATIONS) if ex.quantization == AUTO else [ex.quantization]:
        web = quantize(model, mode, frequent)
        r = tried[mode] = check(session_of(web), cases, shape)
        r["ok"] = r["agreement"] >= ex.min_steer_agreement
        print(f"export: steering file {mode}: greedy tokens agree with PyTorch on {r['agreement']:.3f} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in r['by_condition'].items())}): "
              f"{'passes' if r['ok'] else 'fails'} the gate ({r['seconds']}s)")
        if r["ok"]:
            files = save_model(web, out / WEB_FILE)
            r["bytes"] = sum((out / f).stat().st_size for f in files)
            return mode, files, tried
    which = "no web mode" if ex.quantization == AUTO else f"mode {ex.quantization}"
    figures = "; ".join(f"{m}: {r['agreement']:.3f}" for m, r in tried.items())
    raise AtlasError(f"export.steering: {which}'s greedy continuations agree with PyTorch's on "
                     f"{ex.min_steer_agreement} of the tokens ({figures}); lower export.min_steer_agreement "
                     f"to publish it anyway, or set export.steering to false")
