// The analyser's Web Worker: loads the model (model.js) and analyses prompts off the page's main
// thread, so typing, scrolling and timers keep running while the tokenizer and onnxruntime-web
// work. Messages in: { id, text, sae } (run the trunk on `text`, keep its output, then SAE `sae`'s
// encoder) and { id, run, sae } (SAE `sae`'s encoder on the kept output of analysis `run`, e.g. for
// another SAE of a suite). Out: { id, type: "progress" | "window" | "result" | "error", ... }; a
// result is runEncoder's (its typed arrays transferred, not copied) plus `run`, `ms` (the time the
// model took) and `saes` (model.json's SAEs). Messages are handled one at a time, in order.
import { PromptTooLong, loadModel, runEncoder, runTrunk } from "./model.js";

let queue = Promise.resolve();
let kept = null; // { run, trunk }: the last prompt's trunk output
let runs = 0;

self.onmessage = ({ data }) => { queue = queue.then(() => handle(data)); };

async function handle({ id, text, run, sae }) {
  const post = (msg, transfer = []) => self.postMessage({ id, ...msg }, transfer);
  try {
    const model = await loadModel((loaded, total, phase) => post({ type: "progress", loaded, total, phase }));
    post({ type: "progress", phase: "ready" });
    const t0 = performance.now();
    if (text !== undefined) {
      kept = null; // the last prompt's residuals are not needed any more
      kept = { run: ++runs, trunk: await runTrunk(model, text, (i, n) => post({ type: "window", i, n })) };
    } else if (kept?.run !== run) {
      throw new Error("that prompt's analysis is no longer kept: analyse it again");
    }
    const result = await runEncoder(model, sae, kept.trunk,
      (loaded, total, phase) => post({ type: "progress", loaded, total, phase }));
    result.ms = performance.now() - t0;
    result.run = kept.run;
    result.saes = model.meta.saes;
    const buffers = [result.topIds.buffer, result.topActs.buffer];
    if (result.nActive) buffers.push(result.nActive.buffer);
    post({ type: "result", result }, buffers);
  } catch (err) {
    post({ type: "error", message: String(err?.message || err), refused: err instanceof PromptTooLong });
  }
}
