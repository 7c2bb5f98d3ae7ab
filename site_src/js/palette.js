// Feature pages' light/dark switch. atlas/pages.py (lean_chrome) replaces the theme's palette form by one
// button and prepends the form's options as ATLAS_PALETTE; this script keeps the theme's behaviour: the
// stored choice (the theme's own `__palette` key, so it carries to and from the hand-written pages), else
// the option whose media query matches, and a click moves to the next option. Runs synchronously right
// after the header, so the page never paints in the wrong scheme.
(function () {
  "use strict";
  var options = window.ATLAS_PALETTE || [];
  var button = document.querySelector(".atlas-palette");
  if (!options.length || !button) return;
  var stored = null;
  try { stored = window.__md_get && __md_get("__palette"); } catch (e) { stored = null; }
  var index = stored && options[stored.index] ? stored.index : 0;
  if (!stored) {
    for (var i = 0; i < options.length; i++) {
      if (options[i].color.media && matchMedia(options[i].color.media).matches) { index = i; break; }
    }
  }
  function apply(i) {
    var o = options[i];
    Object.keys(o.color).forEach(function (k) { document.body.setAttribute("data-md-color-" + k, o.color[k]); });
    button.title = o.title;
    button.setAttribute("aria-label", o.title);
    button.firstElementChild.setAttribute("class", o.icon);
  }
  apply(index);
  button.addEventListener("click", function () {
    index = (index + 1) % options.length;
    apply(index);
    if (window.__md_set) __md_set("__palette", {index: index, color: options[index].color});
  });
})();
