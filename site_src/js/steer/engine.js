// The steering model in the browser: onnx/steering.json, the steering web file (the whole model with
// a steering vector added at the hook and a KV cache, atlas/export/steering.py), the SAE's decoder
// rows and the analyser's tokenizer.json, downloaded once and kept in the Cache API, so a second
// visit -- or an offline one -- needs no network. Runs in the steer box's Web Worker (worker.js).
import * as ort from "../../assets/vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "../../assets/vendor/tokenizers/tokenizers.min.mjs";

export const SITE_ROOT = new URL("../../", import.meta.url);
const MODEL_DIR = new URL("onnx/", SITE_ROOT);
// One cache per site path (GitHub Pages puts a user's project sites on one origin) and file set.
const CACHE_SITE = `feature-atlas-steer:${encodeURIComponent(SITE_ROOT.pathname)}:`;

async function fetchMeta() {
  const url = new URL("steering.json", MODEL_DIR);
  try {
    const r = await fetch(url, { cache: "no-cache" });
    if (r.status === 404) throw new Error("this atlas was exported without the steering file (export.steering: true)");
    if (!r.ok) throw new Error(`${url.pathname}: HTTP ${r.status}`);
    return await r.json();
  } catch (err) {
    if (typeof caches !== "undefined") { // offline: the steering.json kept with the cached files
      for (const name of await caches.keys()) {
        const hit = name.startsWith(CACHE_SITE) && (await (await caches.open(name)).match(url.href));
        if (hit) return await hit.json();
      }
    }
    throw err;
  }
}

async function openCache(meta) {
  if (typeof caches === "undefined") return null;
  const name = CACHE_SITE + meta.quantization + ":" + meta.total_bytes;
  try {
    for (const other of await caches.keys()) if (other.startsWith(CACHE_SITE) && other !== name) await caches.delete(other);
    return await caches.open(name);
  } catch {
    return null;
  }
}

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
    try { await cache.put(url, new Response(buf)); } catch { /* quota: works, just not cached */ }
  }
  return buf;
}

/** Load the steering model: { meta, session, tokenizer, decoder (Uint16Array of float16) }. */
export async function loadSteering(onProgress = () => {}) {
  const meta = await fetchMeta();
  const cache = await openCache(meta);
  const names = [...meta.files, "tokenizer.json"];
  let done = 0;
  const tick = (n) => { done += n; onProgress(done, meta.total_bytes, "download"); };
  const files = {};
  await Promise.all(names.map(async (f) => { files[f] = await getFile(cache, f, tick); }));
  if (cache) await cache.put(new URL("steering.json", MODEL_DIR).href, new Response(JSON.stringify(meta)));
  onProgress(meta.total_bytes, meta.total_bytes, "init");
  ort.env.wasm.wasmPaths = new URL("assets/vendor/onnxruntime-web/", SITE_ROOT).href;
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  ort.env.wasm.proxy = false;
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  if (meta.external_data?.length) options.externalData = meta.external_data.map((f) => ({ path: f, data: files[f] }));
  const session = await ort.InferenceSession.create(files[meta.onnx], options);
  const tokenizer = new Tokenizer(JSON.parse(new TextDecoder().decode(files["tokenizer.json"])), {});
  const dec = files[meta.decoder];
  const decoder = new Uint16Array(dec.buffer, dec.byteOffset, dec.byteLength / 2);
  return { meta, session, tokenizer, decoder };
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

/** strength * maxAct * W_dec[feature] (atlas/steer.py's units), float32 [d_model]. */
export function featureVector(model, feature, strength, maxAct) {
  const d = model.meta.d_model;
  if (!(feature >= 0 && feature < model.meta.d_sae)) throw new Error(`no feature ${feature} (0..${model.meta.d_sae - 1})`);
  const v = new Float32Array(d);
  const scale = strength * maxAct;
  for (let i = 0; i < d; i++) v[i] = halfToFloat(model.decoder[feature * d + i]) * scale;
  return v;
}

/** A random direction (seeded Gaussian, so the same each time) with the norm of `vector`. */
export function randomControl(vector, seed = 0) {
  let s = (seed + 0x9e3779b9) >>> 0;
  const uniform = () => { // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297;
  };
  const r = new Float32Array(vector.length);
  for (let i = 0; i < r.length; i++) r[i] = Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
  const norm = (a) => Math.sqrt(a.reduce((acc, x) => acc + x * x, 0));
  const k = norm(vector) / (norm(r) || 1);
  return r.map((x) => x * k);
}

/** Token ids of the prompt as the export's gate makes them: BOS, then the text's tokens. */
export function promptIds(model, text) {
  const ids = model.tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
  return [model.meta.bos_token_id, ...ids].slice(0, model.meta.max_tokens - 1);
}

/**
 * A greedy generator: each call of `step()` runs one forward (the prompt first, then the last
 * token through the KV cache) and returns the next token id; null once `maxTokens` is reached.
 */
export function generator(model, ids, vector) {
  const { meta, session } = model;
  let past = new ort.Tensor("float32", new Float32Array(0), [2 * meta.n_layers, meta.n_kv_heads, 0, meta.head_dim]);
  const steer = new ort.Tensor("float32", vector, [meta.d_model]);
  let feed = ids;
  let length = ids.length;
  return async function step() {
    if (length >= meta.max_tokens) return null;
    const out = await session.run({ input_ids: new ort.Tensor("int32", Int32Array.from(feed), [1, feed.length]), steer, past });
    past.dispose?.();
    past = out.present;
    const logits = out.logits.data;
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    out.logits.dispose?.();
    feed = [best];
    length += 1;
    return best;
  };
}

/** Display text of a token id. */
export function tokenText(model, id) {
  return model.tokenizer.decode([id], { skip_special_tokens: false });
}
