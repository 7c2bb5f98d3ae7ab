// The prompt-analyser page (site_src/prompt.md): type text, see which SAE features fire.
//
// Content-Security-Policy this code needs (onnxruntime-web compiles WebAssembly, which CSP
// treats as eval; everything else is same-origin):
//   default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self';
//   worker-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';
//   font-src 'self'; object-src 'none'; base-uri 'self'
// ('unsafe-inline' in style-src is for the theme; this code sets colours through the CSSOM,
// which style-src does not restrict.)
// The model runs in a Web Worker (client.js, worker.js): the page stays responsive while it works.
import { analyse, encode, saePages, unsupportedReason } from "./client.js";
import { renderLayers } from "./layers.js";
import { featureActs, featureUnseen, promptCoverage, promptFeatures, tokenCoverage, tokenFeatures } from "./results.js";
import { el, featureItem, lengthNotes, loadLabels, progressReporter, renderTokens, showFailure } from "./ui.js";

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
  let saes = [];     // model.json's SAEs, known after the first analysis
  let latest = 0;    // the latest analysis; an earlier one that ends later is dropped
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
    const mine = ++latest;
    root.dataset.state = "running";
    notice.hidden = true;
    layersBlock.hidden = true;
    try {
      const progress = progressReporter(bar, status);
      // the trunk once, with the chosen SAE's encoder: every other SAE reads the trunk's output kept in the worker
      const first = await analyse(text, saeSelect.value, progress);
      if (mine !== latest) return;
      saes = first.saes;
      offerSaes();
      await showSae(first);
      const done = `${result.ids.length} tokens analysed in ${first.ms.toFixed(0)} ms.`;
      status.textContent = done;
      const notes = lengthNotes(result);
      notice.textContent = notes;
      notice.hidden = !notes;
      if (saes.length > 1) {
        const all = [];
        for (const sae of saes) all.push(sae.id === first.sae.id ? first : await encode(first.run, sae.id, progress));
        if (mine !== latest) return;
        bar.hidden = true;
        status.textContent = done; // the other encoders' downloads and starts wrote their progress here
        await renderLayers(layers, saes, all);
        layersBlock.hidden = false;
      }
      root.dataset.state = "done";
    } catch (err) {
      if (mine !== latest) return;
      showFailure(err, { bar, status, notice, root });
    }
  });

  featureInput.addEventListener("input", () => result && showHeatmap());
  saeSelect.addEventListener("change", async () => {
    if (!result) return;
    const mine = latest;
    try {
      const next = await encode(result.run, saeSelect.value, progressReporter(bar, status));
      if (mine === latest) await showSae(next);
    } catch (err) {
      bar.hidden = true;
      status.textContent = `Analysis failed: ${err.message || err}`;
      console.warn(err);
    }
  });
  // one set of listeners for all tokens (a long prompt has thousands)
  const tokenAt = (event) => event.target.closest?.(".atlas-token");
  tokens.addEventListener("mouseover", (event) => { const s = tokenAt(event); if (s) showToken(Number(s.dataset.index)); });
  tokens.addEventListener("focusin", (event) => { const s = tokenAt(event); if (s) showToken(Number(s.dataset.index)); });
  tokens.addEventListener("mouseleave", () => selected !== null && showToken(selected));
  tokens.addEventListener("click", (event) => {
    const span = tokenAt(event);
    if (!span) return;
    selected = Number(span.dataset.index);
    tokens.querySelector(".atlas-selected")?.classList.remove("atlas-selected");
    span.classList.add("atlas-selected");
    showToken(selected);
  });

  // prompt.html#text=...: fill in and analyse (on load, and when only the hash changes)
  const fromHash = () => {
    const m = /^#text=(.*)$/s.exec(location.hash);
    if (!m) return;
    let text;
    try { text = decodeURIComponent(m[1]); } catch { return; }
    input.value = text;
    form.requestSubmit();
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();

  /** For a suite: the SAEs to choose from for the lists and colours (once per page). */
  function offerSaes() {
    if (saes.length < 2 || saeSelect.options.length) return;
    for (const sae of saes) {
      saeSelect.append(el("option", { value: sae.id, text: `${sae.id} · layer ${sae.layer} · ${sae.d_sae.toLocaleString("en")} features` }));
    }
    saeChoice.hidden = false;
  }

  /** The lists and colours for one SAE's result (`next`), coloured by its own strongest feature. */
  async function showSae(next) {
    result = next;
    bar.hidden = true;
    pages = saePages(saes, result.sae);
    labels = await loadLabels(pages);
    coverage.textContent = coverageLine(result);
    showStrongest();
    // a new prompt or SAE is coloured by its own strongest feature, never the last one's
    const top = promptFeatures(result, 1)[0];
    featureInput.value = top ? String(top.id) : "";
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
    renderTokens(tokens, result.texts, acts, { skipFirst: result.bos, unseen });
    tokens.dataset.feature = Number.isFinite(feature) ? String(feature) : "";
    if (selected !== null) tokens.querySelector(`[data-index="${selected}"]`)?.classList.add("atlas-selected");
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
