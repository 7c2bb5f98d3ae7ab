// The prompt-analyser page (site_src/prompt.md): type text, see which SAE features fire.
//
// Content-Security-Policy this code needs (onnxruntime-web compiles WebAssembly, which CSP
// treats as eval; everything else is same-origin):
//   default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self';
//   worker-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';
//   font-src 'self'; object-src 'none'; base-uri 'self'
// ('unsafe-inline' in style-src is for the theme; this code sets colours through the CSSOM,
// which style-src does not restrict.)
import { renderLayers } from "./layers.js";
import { loadModel, runEncoder, runTrunk, saePages, unsupportedReason } from "./model.js";
import { featureActs, featureUnseen, promptCoverage, promptFeatures, tokenCoverage, tokenFeatures } from "./results.js";
import { el, featureItem, loadLabels, progressReporter, renderTokens } from "./ui.js";

const root = document.querySelector("section.atlas-prompt");
if (root) mount(root);

function mount(root) {
  const $ = (sel) => root.querySelector(sel);
  const form = $(".atlas-prompt-form");
  const input = $(".atlas-prompt-input");
  const notice = $(".atlas-notice");
  const bar = $(".atlas-progress");
  const status = $(".atlas-status");
  const coverage = $(".atlas-coverage");
  const featureInput = $(".atlas-feature-input");
  const tokens = $(".atlas-tokens");
  const strongest = $(".atlas-strongest");
  const tokenTitle = $(".atlas-token-title");
  const tokenList = $(".atlas-token-features");
  const tokenCount = $(".atlas-token-coverage");
  const layersBlock = $(".atlas-layers-block");
  const layers = $(".atlas-layers");
  const saeChoice = $(".atlas-sae-choice");
  const saeSelect = $(".atlas-sae-select");
  let result = null;
  let model = null;
  let run = null; // the last prompt's trunk output: switching SAE runs only its encoder
  let pages = "";
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

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) return; // empty input does nothing
    root.dataset.state = "running";
    notice.hidden = true;
    try {
      const progress = progressReporter(bar, status);
      model = await loadModel(progress);
      offerSaes();
      const t0 = performance.now();
      run = await runTrunk(model, text); // once: every SAE reads its layer's residual from it
      await showSae(saeSelect.value, progress);
      const ms = performance.now() - t0;
      status.textContent = `${result.ids.length} tokens analysed in ${ms.toFixed(0)} ms.`;
      if (result.truncated) {
        notice.textContent = `The prompt has ${result.nTokens} tokens; only the first ${result.ids.length} ` +
          `(the model's maximum, including the start token) were analysed.`;
        notice.hidden = false;
      }
      if (model.meta.saes.length > 1) {
        const all = [];
        for (const sae of model.meta.saes) all.push(await runEncoder(model, sae.id, run, progress));
        bar.hidden = true;
        await renderLayers(layers, model, all);
        layersBlock.hidden = false;
      }
      root.dataset.state = "done";
    } catch (err) {
      bar.hidden = true;
      status.textContent = `Analysis failed: ${err.message || err}`;
      root.dataset.state = "error";
      console.warn(err);
    }
  });

  featureInput.addEventListener("input", () => result && showHeatmap());
  saeSelect.addEventListener("change", async () => {
    if (!run) return;
    featureInput.value = "";
    await showSae(saeSelect.value, progressReporter(bar, status));
  });

  /** For a suite: the SAEs to choose from for the lists and colours (once per page). */
  function offerSaes() {
    if (model.meta.saes.length < 2 || saeSelect.options.length) return;
    for (const sae of model.meta.saes) {
      saeSelect.append(el("option", { value: sae.id, text: `${sae.id} · layer ${sae.layer} · ${sae.d_sae.toLocaleString("en")} features` }));
    }
    saeChoice.hidden = false;
  }

  /** The lists and colours for SAE `id` ("" for the first) on the last prompt. */
  async function showSae(id, progress) {
    result = await runEncoder(model, id, run, progress);
    bar.hidden = true;
    pages = saePages(model, result.sae);
    labels = await loadLabels(pages);
    coverage.textContent = coverageLine(result);
    showStrongest();
    const top = promptFeatures(result, 1)[0];
    if (!featureInput.value && top) featureInput.value = String(top.id);
    selected = null;
    showHeatmap();
  }

  function showStrongest() {
    strongest.replaceChildren(...promptFeatures(result, 20).map((f) => {
      const li = featureItem(f.id, f.act, labels, pages);
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
    const unseen = Number.isFinite(feature) ? featureUnseen(result, feature) : null;
    const spans = renderTokens(tokens, result.texts, acts, { skipFirst: result.bos, unseen });
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
    const listed = tokenFeatures(result, t, 10);
    tokenList.replaceChildren(...listed.map((f) => featureItem(f.id, f.act, labels, pages)));
    const { shown, active } = tokenCoverage(result, t);
    tokenCount.textContent = active === 0 ? "No feature fires on this token."
      : active === listed.length ? `All ${active} features that fire on this token.`
        : active === null ? `The ${listed.length} strongest of the ${shown} features seen; more may fire on this token.`
          : `The ${listed.length} strongest of the ${active} features that fire on this token.`;
  }
}

/** How much of the prompt's features the page shows (the browser sees each token's top k). */
function coverageLine(result) {
  const { tokens, of, maxActive } = promptCoverage(result);
  const k = result.k;
  if (!tokens) return `Every feature that fires is shown (the analyser sees up to ${k} per token).`;
  if (maxActive === null) {
    return `The analyser sees the ${k} strongest features of each token: on ${tokens} of the ${of} tokens all ${k} ` +
      "fire, so more may fire there (this export does not say), and any weaker ones are left out of the lists and colours.";
  }
  return `The analyser sees the ${k} strongest features of each token: on ${tokens} of the ${of} tokens more ` +
    `fire (up to ${maxActive}), and the weaker ones are left out of the lists and colours.`;
}
