// DOM helpers shared by the prompt page and the feature-page box. Every prompt, token and
// label is untrusted: it goes in with textContent, never as HTML.
import { SITE_ROOT } from "./model.js";
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

/** Feature `id`'s page; `pages` is its SAE's folder in the site ("" for a single-SAE atlas, see model.js saePages). */
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
 */
export function renderTokens(container, texts, acts, { skipFirst = false, unseen = null } = {}) {
  container.replaceChildren();
  let max = 0;
  for (let t = skipFirst ? 1 : 0; t < acts.length; t++) max = Math.max(max, acts[t]);
  const spans = texts.map((text, t) => {
    const span = el("span", { class: "atlas-token", text: visible(text), tabIndex: 0 });
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
    container.append(span);
    return span;
  });
  return spans;
}

/** Whitespace made visible enough to hover: newlines as ↵, otherwise the text as is. */
function visible(text) {
  return text.replace(/\n/g, "↵\n") || "∅";
}

/** Progress callback writing into a <progress> and a status line. */
export function progressReporter(bar, status) {
  return (loaded, total, phase) => {
    bar.hidden = false;
    if (phase === "init") {
      bar.removeAttribute("value");
      status.textContent = "Starting the model…";
      return;
    }
    bar.max = total || 1;
    bar.value = loaded;
    status.textContent = `Downloading the model: ${(loaded / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`;
  };
}
