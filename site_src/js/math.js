// Typesets the formulas that pymdownx.arithmatex (generic mode) leaves as \( … \) and \[ … \],
// with KaTeX copied from npm into vendor/katex/ (see vendor.json). Without it the TeX stays readable.
(function () {
  "use strict";
  var root = new URL("../", document.currentScript.src);
  var nodes = document.querySelectorAll(".arithmatex");
  if (!nodes.length) return;
  var css = document.createElement("link");
  css.rel = "stylesheet";
  css.href = new URL("assets/vendor/katex/katex.min.css", root).href;
  document.head.appendChild(css);
  var js = document.createElement("script");
  js.src = new URL("assets/vendor/katex/katex.min.js", root).href;
  js.onload = function () {
    nodes.forEach(function (el) {
      var tex = el.textContent.trim(), display = el.tagName === "DIV";
      tex = tex.replace(/^\\[([]/, "").replace(/\\[)\]]$/, "");
      try { window.katex.render(tex, el, { displayMode: display, throwOnError: false }); } catch (e) { /* keep the TeX */ }
    });
  };
  document.head.appendChild(js);
})();
