// The steer box: mounts on
//   <section class="atlas-steer" data-feature-id="N" data-max-act="A">   (feature N, strength in units of A)
//   <section class="atlas-steer">                                        (the prompt page: feature chosen in the box)
// and on a feature page (whose byte budget leaves room for one script tag only) after its
// <section class="atlas-try" data-feature-id="N">, with A read from the page's "Max activation" entry.
// A prompt, a strength slider (negative too) and Generate: the unsteered and the steered
// continuations side by side, streamed as the worker makes them, the steered tokens that differ
// from the unsteered ones marked; optionally a random direction of the same norm as a control.
// Strength is in units of the feature's max activation (atlas/steer.py); on the prompt page, where
// the box does not know it, in activation units. Text goes in with textContent only.

const RUNS = { unsteered: "Unsteered", steered: "Steered", control: "Random direction, same norm" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (v === true) node.setAttribute(k, "");
    else if (v !== false && v != null) node.setAttribute(k, String(v));
  }
  node.append(...children);
  return node;
}

let worker = null;
function getWorker() {
  worker ??= new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  return worker;
}

for (const section of document.querySelectorAll("section.atlas-steer")) mount(section);
for (const tryBox of document.querySelectorAll("section.atlas-try[data-feature-id]")) {
  const dt = [...document.querySelectorAll("dt")].find((d) => d.textContent.trim() === "Max activation");
  const section = el("section", { class: "atlas-steer", "data-feature-id": tryBox.dataset.featureId,
    "data-max-act": dt?.nextElementSibling?.textContent.trim() ?? "" });
  tryBox.after(el("h2", { id: "steer", text: "Steer the model" }), section);
  mount(section);
}

function mount(section) {
  const fixed = section.dataset.featureId !== undefined;
  const maxAct = fixed ? Number.parseFloat((section.dataset.maxAct || "").replace(/,/g, "")) : 1; // "12,345" from the page
  const featureInput = el("input", { type: "number", min: 0, step: 1, value: fixed ? section.dataset.featureId : 0,
    class: "atlas-steer-feature", "aria-label": "Feature to steer with", hidden: fixed });
  const prompt = el("input", { type: "text", class: "atlas-steer-prompt", value: section.dataset.prompt || "The",
    "aria-label": "Prompt to continue" });
  const slider = el("input", { type: "range", min: -20, max: 20, step: 0.5, value: 4, class: "atlas-steer-strength",
    "aria-label": "Steering strength" });
  const strengthText = el("output", { class: "atlas-steer-strength-value" });
  const control = el("input", { type: "checkbox", class: "atlas-steer-control" });
  const tokens = el("input", { type: "number", min: 1, max: 200, value: 20, class: "atlas-steer-tokens",
    "aria-label": "Tokens to generate" });
  const go = el("button", { type: "submit", class: "md-button md-button--primary atlas-steer-go", text: "Generate" });
  const stop = el("button", { type: "button", class: "md-button atlas-steer-stop", text: "Stop", disabled: true });
  const unit = fixed ? `× max activation (${maxAct})` : "activation units";
  const form = el("form", { class: "atlas-steer-form" },
    fixed ? "" : el("label", {}, "Feature ", featureInput), " ",
    el("label", {}, "Prompt ", prompt), " ",
    el("label", {}, "Strength ", slider, " ", strengthText, ` ${unit}`), " ",
    el("label", {}, control, " random direction of the same norm (control)"), " ",
    el("label", {}, "Tokens ", tokens), " ", go, " ", stop);
  const status = el("p", { class: "atlas-status atlas-steer-status", "aria-live": "polite" });
  const columns = el("div", { class: "atlas-steer-columns", style: "display:flex;gap:1em;flex-wrap:wrap" });
  section.append(form, status, columns);
  const showStrength = () => { strengthText.textContent = Number(slider.value).toFixed(1); };
  slider.addEventListener("input", showStrength);
  showStrength();
  if (!(maxAct > 0)) {
    status.textContent = "This feature never fired on the analysed text: there is no activation to steer with.";
    go.disabled = true;
    return;
  }
  if (location.protocol === "file:") {
    status.textContent = "Steering needs the site to be served over http (python -m http.server in the site folder).";
    go.disabled = true;
    return;
  }

  stop.addEventListener("click", () => getWorker().postMessage({ type: "stop" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const w = getWorker();
    const runs = { unsteered: [], steered: [], ...(control.checked ? { control: [] } : {}) };
    const boxes = {};
    columns.replaceChildren();
    for (const run of Object.keys(runs)) {
      const out = el("div", { class: "atlas-steer-text", "data-run": run, style: "white-space:pre-wrap" });
      boxes[run] = out;
      columns.append(el("div", { class: "atlas-steer-column", style: "flex:1 1 16em" }, el("h3", { text: RUNS[run] }), out));
    }
    section.dataset.state = "running";
    go.disabled = true;
    stop.disabled = false;
    let first = null;
    let firstAt = 0;
    let count = 0;
    w.onmessage = ({ data }) => {
      if (data.type === "progress") {
        status.textContent = data.phase === "download"
          ? `Downloading the model: ${(data.loaded / 1e6).toFixed(1)} of ${(data.total / 1e6).toFixed(1)} MB`
          : "Starting the model…";
      } else if (data.type === "ready") {
        status.textContent = "Generating…";
      } else if (data.type === "prompt") {
        section.dataset.promptIds = data.ids.join(",");
      } else if (data.type === "token") {
        if (first === null) { first = data.sinceStart; firstAt = performance.now(); }
        count += 1;
        const list = runs[data.run];
        list.push(data.id);
        const span = el("span", { class: "atlas-steer-token", "data-id": data.id, text: data.text });
        const same = runs.unsteered[list.length - 1];
        if (data.run !== "unsteered" && same !== undefined && same !== data.id) {
          span.classList.add("atlas-steer-changed");
          span.style.background = "rgba(255, 170, 0, 0.35)";
          span.title = "differs from the unsteered token";
        }
        if (data.run === "unsteered") markLater(boxes, runs, list.length - 1);
        boxes[data.run].append(span);
        boxes[data.run].dataset.ids = list.join(",");
      } else if (data.type === "done" || data.type === "error") {
        status.textContent = data.type === "error" ? `Error: ${data.message}`
          : `${data.stopped ? "Stopped" : "Done"}; first token after ${(first / 1000).toFixed(1)} s.`;
        // timings for tests/bench/bench_steer.py: first token since Generate, tokens/s after it (all columns)
        section.dataset.firstMs = String(first);
        section.dataset.tokensPerSecond = String((count - 1) / Math.max((performance.now() - firstAt) / 1000, 1e-9));
        section.dataset.state = data.type === "error" ? "error" : "done";
        go.disabled = false;
        stop.disabled = true;
      }
    };
    w.postMessage({ type: "generate", prompt: prompt.value, feature: Number.parseInt(featureInput.value, 10),
      strength: Number(slider.value), maxAct, control: control.checked, nNew: Number.parseInt(tokens.value, 10) || 20 });
  });
}

/** Steered tokens that arrived before the unsteered token at `index`: mark them now if they differ. */
function markLater(boxes, runs, index) {
  for (const run of ["steered", "control"]) {
    const span = boxes[run]?.children[index];
    if (span && Number(span.dataset.id) !== runs.unsteered[index]) {
      span.classList.add("atlas-steer-changed");
      span.style.background = "rgba(255, 170, 0, 0.35)";
      span.title = "differs from the unsteered token";
    }
  }
}
