// The steer box's Web Worker: loads the steering model once (engine.js) and generates the
// unsteered, steered and (optionally) random-control continuations step by step, posting each
// token as it comes. Messages in: {type: "generate", prompt, feature, strength, maxAct, control, nNew},
// {type: "stop"}. Out: progress, ready, token {run, id, text, ms}, done, error.
import { featureVector, generator, loadSteering, promptIds, randomControl, tokenText } from "./engine.js";

let model = null;
let stopped = false;

const post = (msg) => self.postMessage(msg);
const yieldToMessages = () => new Promise((r) => setTimeout(r, 0)); // lets a "stop" in between steps

self.onmessage = async ({ data }) => {
  if (data.type === "stop") { stopped = true; return; }
  if (data.type !== "generate") return;
  stopped = false;
  try {
    const t0 = performance.now();
    if (!model) {
      model = await loadSteering((loaded, total, phase) => post({ type: "progress", loaded, total, phase }));
      post({ type: "ready", ms: performance.now() - t0 });
    }
    const ids = promptIds(model, data.prompt);
    const steered = featureVector(model, data.feature, data.strength, data.maxAct);
    const runs = { unsteered: new Float32Array(model.meta.d_model), steered };
    if (data.control) runs.control = randomControl(steered, model.meta.control_seed ?? 0);
    const steps = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, generator(model, ids, v)]));
    post({ type: "prompt", ids });
    for (let n = 0; n < data.nNew && !stopped; n++) {
      for (const [run, step] of Object.entries(steps)) {
        const t = performance.now();
        const id = await step();
        if (id === null) { stopped = true; break; }
        post({ type: "token", run, id, text: tokenText(model, id), ms: performance.now() - t, sinceStart: performance.now() - t0 });
      }
      await yieldToMessages();
    }
    post({ type: "done", stopped });
  } catch (err) {
    post({ type: "error", message: String(err?.message ?? err) });
  }
};
