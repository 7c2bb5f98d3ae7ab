// The feature explorer: a sortable, filterable, paginated table over data/features.js.
// Label scores (F1, null where not scored) sort after every scored feature, whichever the direction.
(function () {
  "use strict";
  var A = window.Atlas, PAGE = 50;
  var state = { key: "id", dir: 1, page: 0, rows: [] }, F;
  var $ = function (id) { return document.getElementById(id); };

  function applyFilter() {
    var q = $("atlas-filter").value.trim().toLowerCase();
    var hideDead = $("atlas-hide-dead").checked, hideDense = $("atlas-hide-dense").checked;
    var lo = bound("atlas-score-min"), hi = bound("atlas-score-max"), limited = lo !== null || hi !== null;
    var rows = [];
    for (var i = 0; i < F.n; i++) {
      if (F.present && !F.present[i]) continue;
      if (hideDead && (F.flags[i] & 1)) continue;
      if (hideDense && (F.flags[i] & 2)) continue;
      if (q && F.label[i].toLowerCase().indexOf(q) < 0) continue;
      if (limited && (F.f1[i] === null || (lo !== null && F.f1[i] < lo) || (hi !== null && F.f1[i] > hi))) continue;
      rows.push(i);
    }
    state.rows = rows;
    sort();
  }

  function bound(id) {
    var v = $(id).value.trim();
    return v === "" || isNaN(Number(v)) ? null : Number(v);
  }

  function sort() {
    var k = state.key, d = state.dir, col = k === "id" ? null : F[k];
    state.rows.sort(function (a, b) {
      if (!col) return d * (a - b);
      var x = col[a], y = col[b];
      if (k === "label") return d * x.localeCompare(y) || a - b;
      if (x === null || y === null) return (x === null) - (y === null) || a - b;
      return d * (x - y) || a - b;
    });
    state.page = 0;
    render();
  }

  function render() {
    var body = $("atlas-rows"), start = state.page * PAGE, rows = state.rows.slice(start, start + PAGE);
    body.textContent = "";
    rows.forEach(function (i) {
      var tr = A.el("tr"), a = A.el("a", { href: A.featureUrl(i) }, "#" + i), td = A.el("td");
      td.appendChild(a);
      tr.appendChild(td);
      var lab = A.el("td", {}, F.label[i] || "—");
      if (F.flags[i] & 1) lab.appendChild(A.el("span", { class: "atlas-badge dead" }, "dead"));
      if (F.flags[i] & 2) lab.appendChild(A.el("span", { class: "atlas-badge dense" }, "dense"));
      tr.appendChild(lab);
      tr.appendChild(A.el("td", { class: "num", title: F.f1[i] === null ? "not scored" : "label F1 on held-out text" },
        A.score(F.f1[i])));
      tr.appendChild(A.el("td", { class: "num" }, A.pct(F.density[i])));
      tr.appendChild(A.el("td", { class: "num" }, A.fmt(F.max_act[i])));
      body.appendChild(tr);
    });
    var pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
    $("atlas-page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("atlas-count").textContent = state.rows.length.toLocaleString("en") + " features";
    $("atlas-prev").disabled = state.page === 0;
    $("atlas-next").disabled = state.page + 1 >= pages;
    document.querySelectorAll("#atlas-explorer th button").forEach(function (b) {
      b.parentNode.setAttribute("aria-sort", b.dataset.sort === state.key ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  A.load("features").then(function (data) {
    F = data;
    $("atlas-filter").addEventListener("input", applyFilter);
    $("atlas-hide-dead").addEventListener("change", applyFilter);
    $("atlas-hide-dense").addEventListener("change", applyFilter);
    $("atlas-score-min").addEventListener("input", applyFilter);
    $("atlas-score-max").addEventListener("input", applyFilter);
    $("atlas-prev").addEventListener("click", function () { state.page--; render(); });
    $("atlas-next").addEventListener("click", function () { state.page++; render(); });
    document.querySelectorAll("#atlas-explorer th button").forEach(function (b) {
      b.addEventListener("click", function () {
        var k = b.dataset.sort;
        state.dir = state.key === k ? -state.dir : (k === "label" || k === "id" ? 1 : -1);
        state.key = k;
        sort();
      });
    });
    applyFilter();
  }, function (e) { $("atlas-rows").textContent = e.message; });
})();
