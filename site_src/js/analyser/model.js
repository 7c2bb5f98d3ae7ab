// Loading the exported encoder in the browser: model.json, the quantised ONNX file(s) and
// tokenizer.json from <site>/onnx/, downloaded once with progress and kept in the Cache API
// so later visits (and offline use) need no network. Runtime libraries are the site's own
// copies under assets/vendor/ (from npm at build time), resolved relative to this module, so
// the site works at any sub-path.
import * as ort from "../../assets/vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "../../assets/vendor/tokenizers/tokenizers.min.mjs";

export const SITE_ROOT = new URL("../../", import.meta.url);
const MODEL_DIR = new URL("onnx/", SITE_ROOT); // atlas build copies runs/X/onnx/ here
const CACHE_PREFIX = "feature-atlas-model-";

/** Why analysis cannot run here, or null. */
export function unsupportedReason() {
  if (location.protocol === "file:") {
    return "Prompt analysis needs the site to be served over http: browsers block loading the model " +
      "from file://. From the site folder run `python -m http.server 8000`, then open " +
      "http://localhost:8000/ in your browser.";
  }
  if (typeof WebAssembly !== "object") return "Prompt analysis needs WebAssembly, which this browser does not offer.";
  return null;
}

async function openCache(fingerprint) {
  if (typeof caches === "undefined") return null; // not a secure context: plain downloads
  try {
    for (const name of await caches.keys()) {
      if (name.startsWith(CACHE_PREFIX) && name !== CACHE_PREFIX + fingerprint) await caches.delete(name);
    }
    return await caches.open(CACHE_PREFIX + fingerprint);
  } catch {
    return null;
  }
}

async function fetchMeta() {
  const url = new URL("model.json", MODEL_DIR);
  try {
    const r = await fetch(url, { cache: "no-cache" });
    if (!r.ok) throw new Error(`${url.pathname}: HTTP ${r.status}`);
    return await r.json();
  } catch (err) {
    // Offline: use the model.json kept with the cached model, if any.
    if (typeof caches !== "undefined") {
      const hit = await caches.match(url.href);
      if (hit) return await hit.json();
    }
    throw err;
  }
}

/** Bytes of `file` from the cache, else downloaded (reporting progress) and cached. */
async function getFile(cache, file, onBytes) {
  const url = new URL(file, MODEL_DIR).href;
  const hit = cache && (await cache.match(url));
  if (hit) {
    const buf = new Uint8Array(await hit.arrayBuffer());
    onBytes(buf.length);
    return buf;
  }
  const r = await fetch(url);
  if (!r.ok) throw new Error(`cannot download ${file}: HTTP ${r.status}`);
  const chunks = [];
  let n = 0;
  const reader = r.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    n += value.length;
    onBytes(value.length);
  }
  const buf = new Uint8Array(n);
  let off = 0;
  for (const c of chunks) { buf.set(c, off); off += c.length; }
  if (cache) {
    try { await cache.put(url, new Response(buf)); } catch { /* quota: still works, just not cached */ }
  }
  return buf;
}

let loading = null;

/** The model, loaded once per page: { meta, session, tokenizer }. onProgress(loaded, total, phase). */
export function loadModel(onProgress = () => {}) {
  loading ??= load(onProgress).catch((err) => { loading = null; throw err; });
  return loading;
}

async function load(onProgress) {
  const meta = await fetchMeta();
  const cache = await openCache(meta.fingerprint);
  const total = meta.total_bytes || 0;
  let done = 0;
  const tick = (n) => { done += n; onProgress(done, total, "download"); };
  const files = {};
  await Promise.all(meta.files.map(async (f) => { files[f] = await getFile(cache, f, tick); }));
  if (cache) {
    await cache.put(new URL("model.json", MODEL_DIR).href, new Response(JSON.stringify(meta)));
  }
  onProgress(total, total, "init");
  ort.env.wasm.wasmPaths = new URL("assets/vendor/onnxruntime-web/", SITE_ROOT).href;
  // GitHub Pages sends no COOP/COEP headers, so threads are only possible when isolated.
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  ort.env.wasm.proxy = false;
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  if (meta.external_data?.length) {
    options.externalData = meta.external_data.map((f) => ({ path: f, data: files[f] }));
  }
  const session = await ort.InferenceSession.create(files[meta.onnx], options);
  const tokenizerJson = JSON.parse(new TextDecoder().decode(files[meta.tokenizer]));
  const tokenizer = new Tokenizer(tokenizerJson, {});
  return { meta, session, tokenizer };
}

/** Token ids as the store makes contexts: BOS first, then the text's tokens, truncated. */
export function tokenize(model, text) {
  const { meta, tokenizer } = model;
  const ids = tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
  const all = meta.prepend_bos ? [meta.bos_token_id, ...ids] : ids;
  const truncated = all.length > meta.max_tokens;
  return { ids: truncated ? all.slice(0, meta.max_tokens) : all, truncated, nTokens: all.length };
}

/**
 * Display text of each token with the spacing it has in running text, as the feature pages show
 * it (atlas/analyze.py vocab_texts): each token is decoded after a probe token whose text is then
 * cut off, so WordPiece shows "the" as " the" and "##ing" as "ing". Byte-split characters show as �.
 */
export function tokenTexts(model, ids) {
  const opts = { skip_special_tokens: false };
  const probe = model.tokenizer.encode("a", { add_special_tokens: false }).ids.map(Number).slice(0, 1);
  const prefix = model.tokenizer.decode(probe, opts);
  return ids.map((id) => {
    const joined = model.tokenizer.decode([...probe, id], opts);
    return probe.length && joined.startsWith(prefix) ? joined.slice(prefix.length) : model.tokenizer.decode([id], opts);
  });
}

/**
 * Run the encoder on `text`. Returns { ids, texts, truncated, nTokens, k, topIds, topActs }
 * where topIds/topActs are flat [seq * k] arrays (token t, rank r at t * k + r), strongest first.
 */
export async function analyse(model, text) {
  const tok = tokenize(model, text);
  const input = new ort.Tensor("int32", Int32Array.from(tok.ids), [1, tok.ids.length]);
  const out = await model.session.run({ [model.meta.input.name]: input });
  const topIds = out[model.meta.outputs.ids].data;
  const topActs = out[model.meta.outputs.acts].data;
  const bos = Boolean(model.meta.prepend_bos);
  return { ...tok, bos, texts: tokenTexts(model, tok.ids), k: model.meta.top_k, topIds, topActs };
}

/** Activation of `feature` at each token (0 where it is not among the token's top k). */
export function featureActs(result, feature) {
  const { k, topIds, topActs } = result;
  const acts = new Float32Array(result.ids.length);
  for (let t = 0; t < acts.length; t++) {
    for (let r = 0; r < k; r++) {
      if (topIds[t * k + r] === feature) { acts[t] = topActs[t * k + r]; break; }
    }
  }
  return acts;
}

/** Top features of token t: [{ id, act }] with act > 0, strongest first. */
export function tokenFeatures(result, t, n = result.k) {
  const { k, topIds, topActs } = result;
  const out = [];
  for (let r = 0; r < Math.min(k, n); r++) {
    if (topActs[t * k + r] > 0) out.push({ id: topIds[t * k + r], act: topActs[t * k + r] });
  }
  return out;
}

/**
 * The prompt's strongest features: max activation over tokens, strongest first. The BOS
 * position is skipped: its residual is the same for every prompt and not about the text.
 */
export function promptFeatures(result, n = 20) {
  const best = new Map();
  const start = result.bos && result.ids.length > 1 ? 1 : 0;
  for (let t = start; t < result.ids.length; t++) {
    for (const { id, act } of tokenFeatures(result, t)) {
      const b = best.get(id);
      if (!b || act > b.act) best.set(id, { id, act, token: t });
    }
  }
  return [...best.values()].sort((a, b) => b.act - a.act).slice(0, n);
}
