// Starts the analyser of a page (the prompt page, a feature page's "Try your own text"):
//   <script src=".../js/analyser/boot.js" data-module="prompt.js" defer></script>
// A classic script, so it also runs from file://, where browsers refuse module scripts (with
// console errors, and an empty box): there it says instead why analysis needs a local server.
(function () {
  "use strict";
  var script = document.currentScript;
  var module = new URL(script.dataset.module, script.src).href;
  if (location.protocol !== "file:") {
    import(module).catch(function (err) { console.warn("analyser: " + err); });
    return;
  }
  var line = "Analysing text needs the site to be served over http: browsers do not run it from a file:// page. " +
    "In the site folder run `python -m http.server 8000`, then open http://localhost:8000/ in your browser.";
  document.querySelectorAll("section.atlas-try, section.atlas-prompt").forEach(function (section) {
    if (section.querySelector(".atlas-needs-server")) return; // the prompt page has its own, static
    var p = document.createElement("p");
    p.className = "atlas-needs-server admonition warning";
    p.textContent = line;
    section.appendChild(p);
  });
})();
