// Search across a suite's SAEs by label (the suite site's root search page, written by atlas/build.py).
// Each SAE's label index is <id>/data/features.js, a script that calls Atlas.loaded("features", data);
// they are loaded one after another (each one's call names the same index), when the first query comes.
// Classic script, so it also works from file://.
(function () {
  "use strict";
  var box = document.getElementById("atlas-suite-search");
  if (!box) return;
  var root = new URL("../", document.currentScript.src);   // this file lives in <root>/js/
  var saes = box.dataset.saes.split(" ");
  var input = document.getElementById("atlas-q");
  var status = document.getElementById("atlas-search-status");
  var list = document.getElementById("atlas-results");
  var MAX = 200;
  var pending = null;
  var indexes = null;

  window.Atlas = { loaded: function (name, data) { if (pending) pending(data); } };

  function loadOne(id) {
    return new Promise(function (resolve, reject) {
      pending = resolve;
      var s = document.createElement("script");
      s.src = new URL(id + "/data/features.js", root).href;
      s.onerror = function () { reject(new Error("could not load " + id + "/data/features.js")); };
      document.head.appendChild(s);
    });
  }

  function loadAll() {
    if (indexes) return indexes;
    indexes = saes.reduce(function (chain, id) {
      return chain.then(function (all) {
        return loadOne(id).then(function (data) { all.push({ id: id, labels: data.label }); return all; });
      });
    }, Promise.resolve([]));
    return indexes;
  }

  function show(query) {
    var q = query.trim().toLowerCase();
    list.replaceChildren();
    if (!q) { status.textContent = ""; return; }
    status.textContent = "loading…";
    loadAll().then(function (all) {
      if (input.value.trim().toLowerCase() !== q) return;   // a newer query is on its way
      var n = 0;
      all.forEach(function (sae) {
        sae.labels.forEach(function (label, fid) {
          if (!label || label.toLowerCase().indexOf(q) < 0) return;
          n += 1;
          if (n > MAX) return;
          var li = document.createElement("li");
          var a = document.createElement("a");
          a.href = new URL(sae.id + "/features/" + fid + "/index.html", root).href;
          a.textContent = sae.id + " #" + fid;
          li.append(a, " ", label);
          list.append(li);
        });
      });
      status.textContent = n > MAX ? n.toLocaleString("en") + " features; the first " + MAX + " shown"
                                   : n.toLocaleString("en") + " features";
    }, function (err) { status.textContent = err.message; });
  }

  var timer = null;
  input.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(function () { show(input.value); }, 150); });
  var start = new URLSearchParams(location.search).get("label");
  if (start) { input.value = start; show(start); }
})();
