// The page's side of the analyser: one Web Worker per page (worker.js) runs the trunk and the
// encoders; this module sends it prompts and SAE choices and resolves with its results. It imports
// no runtime library, so the page's main thread never parses onnxruntime-web or the tokenizer.

export const SITE_ROOT = new URL("../../", import.meta.url);

/** Why analysis cannot run here, or null. */
export function unsupportedReason() {
  if (location.protocol === "file:") {
    return "Prompt analysis needs the site to be served over http: browsers block loading the model " +
      "from file://. From the site folder run `python -m http.server 8000`, then open " +
      "http://localhost:8000/ in your browser.";
  }
  if (typeof WebAssembly !== "object") return "Prompt analysis needs WebAssembly, which this browser does not offer.";
  if (typeof Worker !== "function") return "Prompt analysis needs Web Workers, which this browser does not offer.";
  return null;
}

/** A prompt the analyser refused (too long): its message is the line to show. */
export class Refused extends Error {}

let worker = null;
let nextId = 0;
const pending = new Map(); // id -> { resolve, reject, onProgress, onWindow }

function start() {
  worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  worker.onmessage = ({ data }) => {
    const job = pending.get(data.id);
    if (!job) return;
    if (data.type === "progress") job.onProgress(data.loaded, data.total, data.phase);
    else if (data.type === "window") job.onWindow(data.i, data.n);
    else {
      pending.delete(data.id);
      if (data.type === "result") job.resolve(data.result);
      else job.reject(data.refused ? new Refused(data.message) : new Error(data.message));
    }
  };
  // The worker itself failed (its script did not load, or it ran out of memory): fail every job
  // and start a fresh worker next time.
  worker.onerror = (event) => {
    event.preventDefault?.();
    const err = new Error(event.message || "the analyser's worker stopped");
    for (const job of pending.values()) job.reject(err);
    pending.clear();
    worker.terminate();
    worker = null;
  };
}

function ask(message, { onProgress = () => {}, onWindow = () => {} } = {}) {
  if (!worker) start();
  const id = ++nextId;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject, onProgress, onWindow });
    worker.postMessage({ id, ...message });
  });
}

/**
 * Analyse `text` with SAE `sae` ("" for the atlas's first) in the worker: the trunk runs once and
 * its output stays in the worker for `encode`. Resolves with model.js's runEncoder result plus `run`
 * (this analysis, for encode), `ms` (the time the model took) and `saes` (model.json's SAEs);
 * onProgress(loaded, total, phase) while files load ("download", "init", "ready"), onWindow(i, n)
 * before window i of n. Rejects with Refused for a prompt too long to analyse.
 */
export function analyse(text, sae = "", callbacks = {}) {
  return ask({ text, sae }, callbacks);
}

/** SAE `sae`'s encoder on analysis `run`'s trunk output (the worker keeps the last one): as analyse. */
export function encode(run, sae, callbacks = {}) {
  return ask({ run, sae }, callbacks);
}

/**
 * The site folder holding SAE `sae`'s pages (features/N/, data/) among `saes` (model.json's): the
 * site root for a single-SAE atlas, `<id>/` (e.g. "L8/") for each SAE of a suite.
 */
export function saePages(saes, sae) {
  return saes.length > 1 ? `${sae.id}/` : "";
}
