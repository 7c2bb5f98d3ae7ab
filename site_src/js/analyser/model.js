// Loading the exported model and running it, inside the analyser's Web Worker (worker.js), so the
// page never waits on the tokenizer or the model: model.json, then the trunk (the model's blocks up
// to the deepest hook, one residual output per hook layer) and tokenizer.json from <site>/onnx/,
// and each SAE's small encoder file when it is first needed; every file is downloaded once with
// progress and kept in the Cache API (which workers share with their page) so later visits (and
// offline use) need no network. A single-SAE atlas has the same layout: a trunk and one encoder.
// Runtime libraries are the site's own copies under assets/vendor/ (from npm at build time),
// resolved relative to this module, so the site works at any sub-path.
import * as ort from "../../assets/vendor/onnxruntime-web/ort.wasm.min.mjs";
import { Tokenizer } from "../../assets/vendor/tokenizers/tokenizers.min.mjs";

const SITE_ROOT = new URL("../../", import.meta.url);
const MODEL_DIR = new URL("onnx/", SITE_ROOT); // atlas build copies runs/X/onnx/ here
// Cache API storage is per origin, and GitHub Pages puts every project site of a user on one
// origin (user.github.io/a/, user.github.io/b/): a cache is named by this site's own path plus the
// model's fingerprint, and only this site's stale caches are deleted. encodeURIComponent leaves no
// ":" in the path, so one site's name is never a prefix of another's.
const CACHE_PREFIX = "feature-atlas-model:";
const CACHE_SITE = `${CACHE_PREFIX}${encodeURIComponent(SITE_ROOT.pathname)}:`;
const LEGACY_PREFIX = "feature-atlas-model-"; // before caches were named by site: "feature-atlas-model-<fingerprint>"

// One run of the model sees at most WINDOW_CAP tokens: attention's memory grows with the square of
// the length, and a whole 8,192-token context does not fit in wasm's memory (std::bad_alloc).
export const WINDOW_CAP = 1024;
// Longer prompts are refused with a message: they would take minutes (the windows run one by one).
export const MAX_PROMPT_TOKENS = 8192;
// The tokenizer is asked about at most this many characters (a pasted book is refused before it).
const MAX_PROMPT_CHARS = 32 * MAX_PROMPT_TOKENS;

/** A prompt the analyser will not run, with the line the page shows. */
export class PromptTooLong extends Error {}

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

/** The prompt's token ids, without BOS; PromptTooLong above MAX_PROMPT_TOKENS. */
export function tokenize(model, text) {
  if (text.length > MAX_PROMPT_CHARS) {
    throw new PromptTooLong(`The prompt has ${text.length.toLocaleString("en")} characters; the analyser takes at ` +
      `most ${MAX_PROMPT_TOKENS.toLocaleString("en")} tokens. Shorten it and analyse again.`);
  }
  const ids = model.tokenizer.encode(text, { add_special_tokens: false }).ids.map(Number);
  if (ids.length > MAX_PROMPT_TOKENS) {
    throw new PromptTooLong(`The prompt has ${ids.length.toLocaleString("en")} tokens; the analyser takes at most ` +
      `${MAX_PROMPT_TOKENS.toLocaleString("en")}. Shorten it and analyse again.`);
  }
  return ids;
}

/**
 * How a prompt of `n` text tokens is cut: windows of at most `window` tokens (the model's context
 * length, capped at WINDOW_CAP), each starting with BOS when the export says so, as the SAEs'
 * training contexts were built (atlas/corpus.py: BOS, then the next ctx_len - 1 tokens of the
 * stream). Returns [[start, end), ...] over the text tokens.
 */
export function windowsOf(n, meta) {
  const body = windowLength(meta) - (meta.prepend_bos ? 1 : 0);
  const out = [];
  for (let s = 0; s < n; s += body) out.push([s, Math.min(n, s + body)]);
  return out.length ? out : [[0, 0]];
}

function windowLength(meta) {
  return Math.min(meta.max_tokens, WINDOW_CAP);
}

/**
 * The trunk on `text`, window by window (onWindow(i, n) before each): { ids, texts, nTokens, bos,
 * window, windows, ctxLen, parts } where ids is the whole prompt (BOS first when prepended, then
 * every text token) and parts holds each window's trunk outputs ({ residuals, skip }: residuals maps
 * each output name ("resid_<layer>") to its tensor [1, seq, d_model]; skip is 1 for a later window's
 * BOS row, which is not a token of the prompt). Run once per prompt, whatever number of SAEs then
 * read it; each window's tokens see only the text of their own window.
 */
export async function runTrunk(model, text, onWindow = () => {}) {
  const { meta } = model;
  const textIds = tokenize(model, text);
  const bos = Boolean(meta.prepend_bos);
  const cuts = windowsOf(textIds.length, meta);
  const parts = [];
  for (const [i, [s, e]] of cuts.entries()) {
    onWindow(i, cuts.length);
    const ids = bos ? [meta.bos_token_id, ...textIds.slice(s, e)] : textIds.slice(s, e);
    if (!ids.length) break;
    const input = new ort.Tensor("int32", Int32Array.from(ids), [1, ids.length]);
    parts.push({ residuals: await model.trunk.run({ [meta.trunk.input.name]: input }), skip: bos && i > 0 ? 1 : 0 });
  }
  const ids = bos ? [meta.bos_token_id, ...textIds] : textIds;
  return {
    ids, texts: tokenTexts(model, ids), nTokens: ids.length, bos,
    window: windowLength(meta), windows: cuts.length, ctxLen: meta.ctx_len ?? null, parts,
  };
}

/**
 * SAE `id`'s encoder on the trunk's output `run` (from runTrunk), window by window, the rows joined
 * into one sequence. Returns { ids, texts, nTokens, bos, window, windows, ctxLen, sae, k, topIds,
 * topActs, nActive } where sae is the SAE's model.json entry, topIds/topActs are flat [seq * k]
 * arrays (token t, rank r at t * k + r), strongest first, and nActive[t] is the number of features
 * that fire on token t over the whole SAE (the export's `n_active` output; null for an export
 * without it). The browser sees only the k strongest (`export.top_k`): where nActive[t] > k, a
 * feature missing from the top k may still fire there.
 */
export async function runEncoder(model, id, run, onProgress = () => {}) {
  const sae = saeMeta(model, id);
  const session = await loadEncoder(model, sae.id, onProgress);
  const { outputs } = sae;
  const k = sae.top_k;
  const seq = run.ids.length;
  const topIds = new Int32Array(seq * k);
  const topActs = new Float32Array(seq * k);
  let nActive = outputs.n_active ? new Int32Array(seq) : null;
  let row = 0; // next row of the joined result
  for (const { residuals, skip } of run.parts) {
    const out = await session.run({ [sae.input.name]: residuals[sae.input.from] });
    topIds.set(out[outputs.ids].data.subarray(skip * k), row * k);
    topActs.set(out[outputs.acts].data.subarray(skip * k), row * k);
    const active = nActive && out[outputs.n_active];
    if (active) nActive.set(Int32Array.from(active.data).subarray(skip), row);
    else nActive = null;
    row += out[outputs.acts].dims[1] - skip;
    for (const t of Object.values(out)) t.dispose?.();
  }
  const { parts, ...tokens } = run;
  return { ...tokens, sae, k, topIds, topActs, nActive };
}
