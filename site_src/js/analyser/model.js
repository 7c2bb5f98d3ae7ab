// Loading the exported model in the browser: model.json, then the trunk (the model's blocks up
// to the deepest hook, one residual output per hook layer) and tokenizer.json from <site>/onnx/,
// and each SAE's small encoder file when it is first needed; every file is downloaded once with
// progress and kept in the Cache API so later visits (and offline use) need no network. A
// single-SAE atlas has the same layout: a trunk and one encoder. Runtime libraries are the site's own
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

/**
 * The model, loaded once per page: { meta, trunk, tokenizer, encoders, cache } — `trunk` the
 * trunk's session, `encoders` a Map from SAE id to its session, filled by `loadEncoder`.
 * onProgress(loaded, total, phase).
 */
export function loadModel(onProgress = () => {}) {
  loading ??= load(onProgress).catch((err) => { loading = null; throw err; });
  return loading;
}

function sessionOptions(externalData, files) {
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  if (externalData?.length) options.externalData = externalData.map((f) => ({ path: f, data: files[f] }));
  return options;
}

/** Download `names` (cache first), reporting progress against `total` bytes. */
async function getFiles(cache, names, total, onProgress) {
  let done = 0;
  const tick = (n) => { done += n; onProgress(done, total, "download"); };
  const files = {};
  await Promise.all(names.map(async (f) => { files[f] = await getFile(cache, f, tick); }));
  onProgress(total, total, "init");
  return files;
}

async function load(onProgress) {
  const meta = await fetchMeta();
  const cache = await openCache(meta.fingerprint);
  const files = await getFiles(cache, meta.trunk.files, meta.trunk.bytes || 0, onProgress);
  if (cache) {
    await cache.put(new URL("model.json", MODEL_DIR).href, new Response(JSON.stringify(meta)));
  }
  ort.env.wasm.wasmPaths = new URL("assets/vendor/onnxruntime-web/", SITE_ROOT).href;
  // GitHub Pages sends no COOP/COEP headers, so threads are only possible when isolated.
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  ort.env.wasm.proxy = false;
  const trunk = await ort.InferenceSession.create(files[meta.trunk.onnx], sessionOptions(meta.trunk.external_data, files));
  const tokenizerJson = JSON.parse(new TextDecoder().decode(files[meta.tokenizer]));
  const tokenizer = new Tokenizer(tokenizerJson, {});
  return { meta, trunk, tokenizer, encoders: new Map(), cache };
}

/** The SAE `id` of model.json (the first one when `id` is empty or unknown). */
export function saeMeta(model, id = "") {
  return model.meta.saes.find((s) => s.id === id) ?? model.meta.saes[0];
}

/** SAE `id`'s encoder session, downloaded (or read from the cache) the first time it is asked for. */
export function loadEncoder(model, id, onProgress = () => {}) {
  const sae = saeMeta(model, id);
  if (!model.encoders.has(sae.id)) {
    const loadingEncoder = (async () => {
      const files = await getFiles(model.cache, sae.files, sae.bytes || 0, onProgress);
      return ort.InferenceSession.create(files[sae.onnx], sessionOptions(sae.external_data, files));
    })();
    model.encoders.set(sae.id, loadingEncoder.catch((err) => { model.encoders.delete(sae.id); throw err; }));
  }
  return model.encoders.get(sae.id);
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
 * The trunk on `text`: { ...tokenize(), texts, bos, residuals } where residuals maps each trunk
 * output name ("resid_<layer>") to its tensor [1, seq, d_model]. Run once per prompt, whatever
 * number of SAEs then read it.
 */
export async function runTrunk(model, text) {
  const tok = tokenize(model, text);
  const { trunk } = model.meta;
  const input = new ort.Tensor("int32", Int32Array.from(tok.ids), [1, tok.ids.length]);
  const residuals = await model.trunk.run({ [trunk.input.name]: input });
  return { ...tok, bos: Boolean(model.meta.prepend_bos), texts: tokenTexts(model, tok.ids), residuals };
}

/**
 * SAE `id`'s encoder on the trunk's output `run` (from runTrunk). Returns { ids, texts,
 * truncated, nTokens, bos, sae, k, topIds, topActs, nActive } where sae is the SAE's model.json
 * entry, topIds/topActs are flat [seq * k] arrays (token t, rank r at t * k + r), strongest
 * first, and nActive[t] is the number of features that fire on token t over the whole SAE (the
 * export's `n_active` output). The browser sees only the k strongest (`export.top_k`): where
 * nActive[t] > k, a feature missing from the top k may still fire there.
 */
export async function runEncoder(model, id, run, onProgress = () => {}) {
  const sae = saeMeta(model, id);
  const session = await loadEncoder(model, sae.id, onProgress);
  const out = await session.run({ [sae.input.name]: run.residuals[sae.input.from] });
  const { outputs } = sae;
  const nActive = outputs.n_active && out[outputs.n_active] ? Int32Array.from(out[outputs.n_active].data) : null;
  const { residuals, ...tokens } = run;
  return { ...tokens, sae, k: sae.top_k, topIds: out[outputs.ids].data, topActs: out[outputs.acts].data, nActive };
}

/** One SAE (`id`, default the first) on `text`: runEncoder's result. */
export async function analyse(model, text, id = "", onProgress = () => {}) {
  return runEncoder(model, id, await runTrunk(model, text), onProgress);
}

/**
 * Every SAE of the atlas on `text`, the trunk run once: an array of runEncoder results in
 * model.json's order (by layer, then width). Encoders not yet loaded are fetched one after
 * another; onSae(result, index) is called as each is ready.
 */
export async function analyseAll(model, text, onProgress = () => {}, onSae = () => {}) {
  const run = await runTrunk(model, text);
  const results = [];
  for (const sae of model.meta.saes) {
    results.push(await runEncoder(model, sae.id, run, onProgress));
    onSae(results.at(-1), results.length - 1);
  }
  return results;
}

/**
 * The site folder holding SAE `sae`'s pages (features/N/, data/): the site root for a single-SAE
 * atlas, `<id>/` (e.g. "L8/") for each SAE of a suite.
 */
export function saePages(model, sae) {
  return model.meta.saes.length > 1 ? `${sae.id}/` : "";
}
