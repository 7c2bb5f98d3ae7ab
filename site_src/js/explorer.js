// The feature explorer: a sortable, filterable, paginated table over data/features.js.
// Label scores (F1, null where not scored) sort after every scored feature, whichever the direction.
// Its state (filter, switches, sort, page) lives in the URL's query string, replaced as it changes,
// so Back from a feature page returns to the same view and a view can be shared as a link.
(function () {
  "use strict";
  var A = window.Atlas, PAGE = 50;
  var state = { key: "id", dir: 1, page: 0, rows: [] }, F;
  var $ = function (id) { return document.getElementById(id); };
  // checkbox id -> [URL key, default]
  var SWITCHES = { "atlas-hide-dead": ["dead", true], "atlas-hide-dense": ["dense", false], "atlas-hide-dominated": ["dominated", false] };

  function saveState() {
    var p = new URLSearchParams();
    if ($("atlas-filter").value) p.set("filter", $("atlas-filter").value); // not "q": the theme's search box opens on ?q=
    Object.keys(SWITCHES).forEach(function (id) {
      var key = SWITCHES[id][0], on = $(id).checked;
      if (on !== SWITCHES[id][1]) p.set("hide-" + key, on ? "1" : "0");
    });
    if ($("atlas-score-min").value) p.set("min", $("atlas-score-min").value);
    if ($("atlas-score-max").value) p.set("max", $("atlas-score-max").value);
    if (state.key !== "id" || state.dir !== 1) p.set("sort", (state.dir < 0 ? "-" : "") + state.key);
    if (state.page) p.set("page", String(state.page + 1));
    var query = p.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function loadState() {
    var p = new URLSearchParams(location.search);
    $("atlas-filter").value = p.get("filter") || "";
    Object.keys(SWITCHES).forEach(function (id) {
      var v = p.get("hide-" + SWITCHES[id][0]);
      $(id).checked = v === null ? SWITCHES[id][1] : v === "1";
    });
    $("atlas-score-min").value = p.get("min") || "";
    $("atlas-score-max").value = p.get("max") || "";
    var sort = p.get("sort") || "id", key = sort.replace(/^-/, "");
    if (document.querySelector('#atlas-explorer th button[data-sort="' + key.replace(/[^a-z_0-9]/g, "") + '"]')) {
      state.key = key;
      state.dir = sort[0] === "-" ? -1 : 1;
    }
    return Math.max(0, (parseInt(p.get("page"), 10) || 1) - 1);
  }

  function applyFilter(keepPage) {
    var q = $("atlas-filter").value.trim().toLowerCase();
    var hideDead = $("atlas-hide-dead").checked, hideDense = $("atlas-hide-dense").checked;
    var hideDominated = $("atlas-hide-dominated").checked;
    var lo = bound("atlas-score-min"), hi = bound("atlas-score-max"), limited = lo !== null || hi !== null;
    var rows = [];
    for (var i = 0; i < F.n; i++) {
      if (F.present && !F.present[i]) continue;
      if (hideDead && (F.flags[i] & 1)) continue;
      if (hideDense && (F.flags[i] & 2)) continue;
      if (hideDominated && (F.flags[i] & 12)) continue;
      if (q && F.label[i].toLowerCase().indexOf(q) < 0) continue;
      if (limited && (F.f1[i] === null || (lo !== null && F.f1[i] < lo) || (hi !== null && F.f1[i] > hi))) continue;
      rows.push(i);
    }
    state.rows = rows;
    sort(keepPage);
  }

  function bound(id) {
    var v = $(id).value.trim();
    return v === "" || isNaN(Number(v)) ? null : Number(v);
  }

  function sort(keepPage) {
    var k = state.key, d = state.dir, col = k === "id" ? null : F[k];
    state.rows.sort(function (a, b) {
      if (!col) return d * (a - b);
      var x = col[a], y = col[b];
      if (k === "label") return d * x.localeCompare(y) || a - b;
      if (x === null || y === null) return (x === null) - (y === null) || a - b;
      return d * (x - y) || a - b;
    });
    if (typeof keepPage === "number") state.page = Math.min(keepPage, Math.max(0, Math.ceil(state.rows.length / PAGE) - 1));
    else state.page = 0;
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
      if (F.flags[i] & 4) lab.appendChild(A.el("span", { class: "atlas-badge dominated", title: "fires mostly on special tokens (start, separator, padding)" }, "special token"));
      if (F.flags[i] & 8) lab.appendChild(A.el("span", { class: "atlas-badge dominated", title: "fires mostly at one position of the context" }, "position"));
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
    saveState();
    document.querySelectorAll("#atlas-explorer th button").forEach(function (b) {
      b.parentNode.setAttribute("aria-sort", b.dataset.sort === state.key ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  A.load("features").then(function (data) {
    F = data;
    var page = loadState();
    var refilter = function () { applyFilter(); };
    ["atlas-filter", "atlas-score-min", "atlas-score-max"].forEach(function (id) { $(id).addEventListener("input", refilter); });
    Object.keys(SWITCHES).forEach(function (id) { $(id).addEventListener("change", refilter); });
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
    applyFilter(page);
  }, function (e) { $("atlas-rows").textContent = e.message; });
})();
