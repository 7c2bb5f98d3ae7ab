// DOM helpers shared by the prompt page and the feature-page box. Every prompt, token and
// label is untrusted: it goes in with textContent, never as HTML.
import { Refused, SITE_ROOT } from "./client.js";
import { coverageText } from "./results.js";

const labels = new Map(); // SAE pages folder -> Promise<Map<feature id, label>>

/**
 * Feature labels of the SAE whose pages are under `pages` ("" for a single-SAE atlas), from its
 * compact index (<pages>data/features.js, written by atlas build as
 * `Atlas.loaded("features", {label: [...], ...});`), or an empty map when the site has none.
 */
export function loadLabels(pages = "") {
  if (!labels.has(pages)) labels.set(pages, readLabels(pages));
  return labels.get(pages);
}

async function readLabels(pages) {
  const map = new Map();
  try {
    const r = await fetch(new URL(`${pages}data/features.js`, SITE_ROOT));
    if (r.ok) {
      const text = await r.text();
      const json = text.slice(text.indexOf(",") + 1, text.lastIndexOf(")"));
      const label = JSON.parse(json).label || [];
      label.forEach((l, i) => l && map.set(i, String(l)));
    }
  } catch { /* no index: links show ids only */ }
  return map;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

/** Feature `id`'s page; `pages` is its SAE's folder in the site ("" for a single-SAE atlas, see client.js saePages). */
export function featureHref(id, pages = "") {
  return new URL(`${pages}features/${id}/index.html`, SITE_ROOT).href;
}

/** A list item linking to feature `id`, with its label when known and the activation. */
export function featureItem(id, act, labelMap, pages = "") {
  const label = labelMap?.get(id);
  const a = el("a", { href: featureHref(id, pages), class: "atlas-feature-link" });
  a.append(el("span", { class: "atlas-feature-id", text: `#${id}` }));
  if (label) a.append(" ", el("span", { class: "atlas-feature-label", text: label }));
  const li = el("li", { class: "atlas-feature-item" }, a, " ", el("span", { class: "atlas-act", text: act.toFixed(2) }));
  li.dataset.featureId = String(id);
  li.dataset.act = String(act);
  return li;
}

/**
 * Render tokens into `container` coloured by `acts` (Float32Array); returns the token spans.
 * `unseen` (from featureUnseen) marks tokens where the feature is not among the strongest the
 * browser sees, so its activation there is unknown: no value, a dotted underline and a title saying so.
 * The tokens are one tab stop (the first, or the last one focused); arrow keys move between them.
 */
export function renderTokens(container, texts, acts, { skipFirst = false, unseen = null } = {}) {
  container.replaceChildren();
  container.style.whiteSpace = "pre-wrap"; // indentation and line breaks as typed
  let max = 0;
  for (let t = skipFirst ? 1 : 0; t < acts.length; t++) max = Math.max(max, acts[t]);
  const spans = texts.map((text, t) => {
    const span = el("span", { class: "atlas-token", text: visible(text), tabIndex: -1 });
    span.dataset.index = String(t);
    const u = unseen?.[t];
    if (u && !(skipFirst && t === 0)) {
      span.classList.add("atlas-token-unseen");
      span.dataset.unseen = `${u.shown}/${u.active ?? ""}`;
      span.dataset.below = u.below.toFixed(4);
      span.title = `${JSON.stringify(text)}: not among ${coverageText(u)} on this token ` +
        `(if it fires here, its activation is at most ${u.below.toFixed(3)})`;
    } else {
      span.dataset.act = acts[t].toFixed(4);
      span.title = `${JSON.stringify(text)}: ${acts[t].toFixed(3)}`;
    }
    const alpha = max > 0 ? Math.max(0, Math.min(1, acts[t] / max)) : 0;
    span.style.backgroundColor = alpha > 0 ? `rgba(255, 122, 0, ${(0.12 + 0.78 * alpha).toFixed(3)})` : "";
    if (skipFirst && t === 0) span.classList.add("atlas-token-bos");
    return span;
  });
  container.append(...spans);
  if (spans.length) spans[skipFirst && spans.length > 1 ? 1 : 0].tabIndex = 0;
  container.onkeydown = (event) => {
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, Home: -Infinity, End: Infinity }[event.key];
    const from = event.target.closest?.(".atlas-token");
    if (!step || !from) return;
    event.preventDefault();
    const i = Math.max(0, Math.min(spans.length - 1, Number(from.dataset.index) + (Number.isFinite(step) ? step : step * spans.length)));
    from.tabIndex = -1;
    spans[i].tabIndex = 0;
    spans[i].focus();
  };
  return spans;
}

/** Whitespace made visible enough to hover: newlines as ↵, otherwise the text as is. */
function visible(text) {
  return text.replace(/\n/g, "↵\n") || "∅";
}

/** Progress callbacks writing into a <progress> and a status line: { onProgress, onWindow } for client.analyse. */
export function progressReporter(bar, status) {
  return {
    onProgress(loaded, total, phase) {
      bar.hidden = phase === "ready";
      if (phase === "ready") return;
      if (phase === "init") {
        bar.removeAttribute("value");
        status.textContent = "Starting the model…";
        return;
      }
      bar.max = total || 1;
      bar.value = loaded;
      status.textContent = `Downloading the model: ${(loaded / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`;
    },
    onWindow(i, n) {
      if (n < 2) { status.textContent = "Analysing…"; return; }
      bar.hidden = false;
      bar.max = n;
      bar.value = i;
      status.textContent = `Analysing window ${i + 1} of ${n}…`;
    },
  };
}

/** What the page says about a long prompt: how it was cut, and whether it is longer than the SAE's training contexts. */
export function lengthNotes(result) {
  const notes = [];
  const text = result.ids.length - (result.bos ? 1 : 0);
  if (result.windows > 1) {
    notes.push(`The prompt has ${text.toLocaleString("en")} tokens, more than one run of the model takes ` +
      `(${result.window.toLocaleString("en")} tokens): it was cut into ${result.windows} windows, each started with ` +
      "the start token as the SAE's training contexts were, and each token sees only the text of its own window.");
  }
  const longest = Math.min(text, result.window - (result.bos ? 1 : 0));
  const trained = result.ctxLen && result.ctxLen - (result.bos ? 1 : 0);
  if (trained && longest > trained) {
    notes.push(`The SAE was trained on contexts of ${result.ctxLen} tokens (the start token and ${trained} of text): ` +
      `from the ${ordinal(trained + 1)} token of a window on, its features may fire differently than on the feature pages.`);
  }
  return notes.join(" ");
}

function ordinal(n) {
  const s = n % 100 >= 11 && n % 100 <= 13 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
  return `${n}${s}`;
}

/** An analysis that did not finish: a refusal (too long) as a notice, any other error as a status line.
 * Sets `root.dataset.state` to "refused" or "error". */
export function showFailure(err, { bar, status, notice, root }) {
  bar.hidden = true;
  if (err instanceof Refused) {
    status.textContent = "";
    notice.textContent = err.message;
    notice.hidden = false;
    root.dataset.state = "refused";
    return;
  }
  status.textContent = `Analysis failed: ${err.message || err}`;
  root.dataset.state = "error";
  console.warn(err);
}
