// Feature pages: make the highlighted tokens of the example windows reachable by keyboard, so the
// value CSS shows on :hover is also shown on :focus (site_src/css/atlas.css). The markup carries no
// tabindex of its own: on 24,576 pages that attribute alone would cost ~70 MB.
(function () {
  "use strict";
  document.querySelectorAll(".atlas-ex i[data-v]").forEach(function (el) {
    el.tabIndex = 0;
    el.setAttribute("aria-label", el.textContent + ": " + el.getAttribute("data-v"));
  });
})();
