// The prompt-analyser page (site_src/prompt.md): type text, see which SAE features fire.
//
// Content-Security-Policy this code needs (onnxruntime-web compiles WebAssembly, which CSP
// treats as eval; everything else is same-origin):
//   default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self';
//   worker-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';
//   font-src 'self'; object-src 'none'; base-uri 'self'
// ('unsafe-inline' in style-src is for the theme; this code sets colours through the CSSOM,
// which style-src does not restrict.)
import { analyse, featureActs, loadModel, promptFeatures, tokenFeatures, unsupportedReason } from "./model.js";
import { featureItem, loadLabels, progressReporter, renderTokens } from "./ui.js";

const root = document.querySelector("section.atlas-prompt");
if (root) mount(root);

function mount(root) {
  const $ = (sel) => root.querySelector(sel);
  const form = $(".atlas-prompt-form");
  const input = $(".atlas-prompt-input");
  const notice = $(".atlas-notice");
  const bar = $(".atlas-progress");
  const status = $(".atlas-status");
  const featureInput = $(".atlas-feature-input");
  const tokens = $(".atlas-tokens");
  const strongest = $(".atlas-strongest");
  const tokenTitle = $(".atlas-token-title");
  const tokenList = $(".atlas-token-features");
  let result = null;
  let selected = null;
  let labels = new Map();

  // The page's static notice covers file:// (where browsers load no module at all): remove it.
  root.querySelector(".atlas-needs-server")?.remove();
  const reason = unsupportedReason();
  if (reason) {
    notice.textContent = reason;
    notice.hidden = false;
    form.querySelector("button").disabled = true;
    root.dataset.state = "unsupported";
    return;
  }
  form.querySelector("button").disabled = false;
  loadLabels().then((m) => { labels = m; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) return; // empty input does nothing
    root.dataset.state = "running";
    notice.hidden = true;
    try {
      const model = await loadModel(progressReporter(bar, status));
      labels = await loadLabels();
      bar.hidden = true;
      const t0 = performance.now();
      result = await analyse(model, text);
      const ms = performance.now() - t0;
      status.textContent = `${result.ids.length} tokens analysed in ${ms.toFixed(0)} ms.`;
      if (result.truncated) {
        notice.textContent = `The prompt has ${result.nTokens} tokens; only the first ${result.ids.length} ` +
          `(the model's maximum, including the start token) were analysed.`;
        notice.hidden = false;
      }
      showStrongest();
      const top = promptFeatures(result, 1)[0];
      if (!featureInput.value && top) featureInput.value = String(top.id);
      selected = null;
      showHeatmap();
      root.dataset.state = "done";
    } catch (err) {
      bar.hidden = true;
      status.textContent = `Analysis failed: ${err.message || err}`;
      root.dataset.state = "error";
      console.warn(err);
    }
  });

  featureInput.addEventListener("input", () => result && showHeatmap());

  function showStrongest() {
    strongest.replaceChildren(...promptFeatures(result, 20).map((f) => {
      const li = featureItem(f.id, f.act, labels);
      const pick = document.createElement("button");
      pick.type = "button";
      pick.className = "atlas-pick";
      pick.textContent = "show";
      pick.title = "Colour the tokens by this feature";
      pick.addEventListener("click", () => { featureInput.value = String(f.id); showHeatmap(); });
      li.append(" ", pick);
      return li;
    }));
  }

  function showHeatmap() {
    const feature = Number.parseInt(featureInput.value, 10);
    const acts = Number.isFinite(feature) ? featureActs(result, feature) : new Float32Array(result.ids.length);
    const spans = renderTokens(tokens, result.texts, acts, { skipFirst: result.bos });
    tokens.dataset.feature = Number.isFinite(feature) ? String(feature) : "";
    spans.forEach((span, t) => {
      span.addEventListener("mouseenter", () => showToken(t));
      span.addEventListener("focus", () => showToken(t));
      span.addEventListener("mouseleave", () => selected !== null && showToken(selected));
      span.addEventListener("click", () => { selected = t; spans.forEach((s) => s.classList.toggle("atlas-selected", s === span)); showToken(t); });
    });
    showToken(selected ?? (promptFeatures(result, 1)[0]?.token ?? 0));
  }

  function showToken(t) {
    tokenTitle.textContent = `Token ${t}: ${JSON.stringify(result.texts[t])}`;
    tokenList.dataset.index = String(t);
    tokenList.replaceChildren(...tokenFeatures(result, t, 10).map((f) => featureItem(f.id, f.act, labels)));
  }
}
