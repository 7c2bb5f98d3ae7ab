// "Try your own text" on a feature page: mounts on
//   <section class="atlas-try" data-feature-id="N" data-root="../../" [data-sae="L8"]>
// (data-sae: the SAE of a suite the page belongs to; without it, the atlas's first SAE)
// and colours the tokens of the visitor's text by feature N, with the same model as the prompt
// page (downloaded once, cached), in the same kind of Web Worker. CSP: see prompt.js.
import { analyse, unsupportedReason } from "./client.js";
import { featureActs, featureUnseen, verdict } from "./results.js";
import { el, lengthNotes, progressReporter, renderTokens, showFailure } from "./ui.js";

for (const section of document.querySelectorAll("section.atlas-try[data-feature-id]")) mount(section);

function mount(section) {
  const feature = Number.parseInt(section.dataset.featureId, 10);
  // A static "needs a local server" notice in the page covers file://, where no module runs.
  section.querySelector(".atlas-needs-server")?.remove();
  const input = el("textarea", { class: "atlas-try-input", rows: 3, placeholder: "Type some text and press Analyse" });
  input.setAttribute("aria-label", `Text to analyse with feature ${feature}`);
  const button = el("button", { type: "submit", class: "md-button", text: "Analyse" });
  const form = el("form", { class: "atlas-try-form" }, input, el("div", {}, button));
  const bar = el("progress", { class: "atlas-progress", hidden: true });
  const status = el("p", { class: "atlas-status" });
  const notice = el("p", { class: "atlas-notice", hidden: true });
  const tokens = el("div", { class: "atlas-tokens" });
  section.append(form, bar, status, notice, tokens);

  const reason = unsupportedReason();
  if (reason) {
    notice.textContent = reason;
    notice.hidden = false;
    button.disabled = true;
    section.dataset.state = "unsupported";
    return;
  }
  let latest = 0; // the latest analysis; an earlier one that ends later is dropped
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    const mine = ++latest;
    section.dataset.state = "running";
    notice.hidden = true;
    try {
      const result = await analyse(input.value, section.dataset.sae || "", progressReporter(bar, status));
      if (mine !== latest) return;
      bar.hidden = true;
      const acts = featureActs(result, feature);
      const unseen = featureUnseen(result, feature);
      renderTokens(tokens, result.texts, acts, { skipFirst: result.bos, unseen });
      status.textContent = verdict(feature, result, acts, unseen);
      const notes = lengthNotes(result);
      notice.textContent = notes;
      notice.hidden = !notes;
      section.dataset.state = "done";
    } catch (err) {
      if (mine !== latest) return;
      showFailure(err, { bar, status, notice, root: section });
    }
  });
}
