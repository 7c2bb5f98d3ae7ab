// The cross-layer view of the prompt page: a layers × tokens table, one row per SAE of the atlas
// (by layer, then width), one column per token, each cell the token's strongest features in that
// SAE, linked to their pages. The table is drawn from layerGrid (results.js); every token and
// label goes in as text.
import { saePages } from "./client.js";
import { layerGrid } from "./results.js";
import { el, featureHref, loadLabels } from "./ui.js";

/** Draw `results` (one per SAE of `saes`, model.json's) into `container`, `n` features per cell. */
export async function renderLayers(container, saes, results, n = 3) {
  const grid = layerGrid(results, n);
  const texts = results[0]?.texts ?? [];
  const start = results[0]?.bos && texts.length > 1 ? 1 : 0; // BOS is the same for every prompt
  const head = el("tr", {}, el("th", { scope: "col", text: "SAE" }),
    ...texts.slice(start).map((text, i) => {
      const th = el("th", { scope: "col", class: "atlas-layer-token", text: JSON.stringify(text) });
      th.dataset.index = String(start + i);
      return th;
    }));
  const rows = [];
  for (const { sae, cells } of grid) {
    const pages = saePages(saes, sae);
    const labels = await loadLabels(pages);
    const max = Math.max(1e-9, ...cells.slice(start).map((c) => c[0]?.act ?? 0));
    const row = el("tr", { class: "atlas-layer-row" },
      el("th", { scope: "row", text: `${sae.id} · layer ${sae.layer} · ${sae.d_sae.toLocaleString("en")}` }));
    row.dataset.sae = sae.id;
    cells.slice(start).forEach((cell, i) => {
      const td = el("td", { class: "atlas-layer-cell" });
      td.dataset.index = String(start + i);
      for (const { id, act } of cell) {
        const a = el("a", { href: featureHref(id, pages), class: "atlas-feature-link", text: `#${id}` });
        a.dataset.featureId = String(id);
        a.dataset.act = String(act);
        a.title = `${labels.get(id) ?? `feature ${id}`}: ${act.toFixed(3)}`;
        a.style.backgroundColor = `rgba(255, 122, 0, ${(0.1 + 0.6 * Math.min(1, act / max)).toFixed(3)})`;
        td.append(a, " ");
      }
      row.append(td);
    });
    rows.push(row);
  }
  container.replaceChildren(el("table", { class: "atlas-layer-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}
