// Loading the exported encoder in the browser: model.json, the quantised ONNX file(s) and
// tokenizer.json from <site>/onnx/, downloaded once with progress and kept in the Cache API
// so later visits (and offline use) need no network. Runtime libraries are the site's own
// copies under assets/vendor/ (from npm at build time), resolved relative to this module, so
// the site works at any sub-path.
import * as ort from "../../assets/vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "../../assets/vendor/tokenizers/tokenizers.min.mjs";

export const SITE_ROOT = new URL("../../", import.meta.url);
const MODEL_DIR = new URL("onnx/", SITE_ROOT); // atlas build copies runs/X/onnx/ here
// Cache API storage is per origin, and GitHub Pages puts every project site of a user on one
// origin (user.github.io/a/, user.github.io/b/): a cache is named by this site's own path plus the
// model's fingerprint, and only this site's stale caches are deleted. encodeURIComponent leaves no
// ":" in the path, so one site's name is never a prefix of another's.
const CACHE_PREFIX = "feature-atlas-model:";
const CACHE_SITE = `${CACHE_PREFIX}${encodeURIComponent(SITE_ROOT.pathname)}:`;
const LEGACY_PREFIX = "feature-atlas-model-"; // before caches were named by site: "feature-atlas-model-<fingerprint>"

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

/** This site's cache for the model with `fingerprint`, after deleting this site's older ones. */
async function openCache(fingerprint) {
  if (typeof caches === "undefined") return null; // not a secure context: plain downloads
  const name = CACHE_SITE + fingerprint;
  try {
    for (const other of await caches.keys()) {
      if (other !== name && (other.startsWith(CACHE_SITE) || (other.startsWith(LEGACY_PREFIX) && await holdsOurs(other)))) {
        await caches.delete(other);
      }
    }
    return await caches.open(name);
  } catch {
    return null;
  }
}

/** Whether the cache `name` (of unknown site) holds this site's model.json. */
async function holdsOurs(name) {
  const cache = await caches.open(name);
  return Boolean(await cache.match(new URL("model.json", MODEL_DIR).href));
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
      for (const name of await caches.keys()) {
        const hit = name.startsWith(CACHE_SITE) && (await (await caches.open(name)).match(url.href));
        if (hit) return await hit.json();
      }
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
 * Run the encoder on `text`. Returns { ids, texts, truncated, nTokens, bos, k, topIds, topActs, nActive }
 * where topIds/topActs are flat [seq * k] arrays (token t, rank r at t * k + r), strongest first, and
 * nActive[t] is the number of features that fire on token t over the whole SAE (the export's
 * `n_active` output; null for an export without it). The browser sees only the k strongest
 * (`export.top_k`): where nActive[t] > k, a feature missing from the top k may still fire there.
 */
export async function analyse(model, text) {
  const tok = tokenize(model, text);
  const input = new ort.Tensor("int32", Int32Array.from(tok.ids), [1, tok.ids.length]);
  const { outputs } = model.meta;
  const out = await model.session.run({ [model.meta.input.name]: input });
  const topIds = out[outputs.ids].data;
  const topActs = out[outputs.acts].data;
  const nActive = outputs.n_active && out[outputs.n_active] ? Int32Array.from(out[outputs.n_active].data) : null;
  const bos = Boolean(model.meta.prepend_bos);
  return { ...tok, bos, texts: tokenTexts(model, tok.ids), k: model.meta.top_k, topIds, topActs, nActive };
}
