// Search by label (over data/features.js) or by token (over the sharded data/tokens/*.js).
(function () {
  "use strict";
  var A = window.Atlas, MAX = 100;
  var input = document.getElementById("atlas-q"), list = document.getElementById("atlas-results");
  var status = document.getElementById("atlas-search-status"), seq = 0, F = null;

  function mode() { return document.querySelector("input[name=atlas-mode]:checked").value; }

  function show(items, note) {
    list.textContent = "";
    items.slice(0, MAX).forEach(function (r) {
      var li = A.el("li"), a = A.el("a", { href: A.featureUrl(r.id) }, "#" + r.id);
      li.appendChild(a);
      li.appendChild(document.createTextNode(" " + (F && F.label[r.id] || "")));
      if (F && F.f1[r.id] !== null) li.appendChild(A.el("span", { class: "atlas-score", title: "label F1 on held-out text" }, " score " + A.score(F.f1[r.id])));
      if (r.note) li.appendChild(A.el("small", {}, " " + r.note));
      list.appendChild(li);
    });
    status.textContent = note;
  }

  function byLabel(q, t0) {
    var words = q.toLowerCase().split(/\s+/).filter(Boolean), out = [];
    for (var i = 0; i < F.n; i++) {
      var lab = F.label[i].toLowerCase(), ok = lab.length > 0;
      for (var w = 0; ok && w < words.length; w++) ok = lab.indexOf(words[w]) >= 0;
      if (ok) out.push({ id: i, note: "max " + A.fmt(F.max_act[i]) });
    }
    out.sort(function (a, b) { return F.max_act[b.id] - F.max_act[a.id]; });
    show(out, out.length + " features (" + Math.round(performance.now() - t0) + " ms)");
  }

  function byToken(q, t0, my) {
    var forms = [q];
    if (q[0] !== " ") forms.push(" " + q);
    Promise.all(forms.map(A.tokenEntry)).then(function (entries) {
      if (my !== seq) return;
      var best = {};
      entries.forEach(function (e, k) {
        if (!e) return;
        e[0].forEach(function (id, j) {
          if (!(id in best) || best[id].act < e[1][j]) best[id] = { id: id, act: e[1][j], note: "“" + A.showToken(forms[k]) + "” at " + A.fmt(e[1][j]) };
        });
      });
      var out = Object.keys(best).map(function (k) { return best[k]; }).sort(function (a, b) { return b.act - a.act; });
      show(out, out.length + " features fire on " + forms.map(function (f) { return "“" + A.showToken(f) + "”"; }).join(" or ") +
        " (" + Math.round(performance.now() - t0) + " ms)");
    }, function (e) { status.textContent = e.message; });
  }

  // the query lives in the URL (?label= by label, ?token= by token): Back returns to it, a link shares it
  function saveState() {
    var q = input.value, p = new URLSearchParams();
    if (q) p.set(mode() === "token" ? "token" : "label", q); // not "q": the theme's search box opens on ?q=
    var query = p.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function go() {
    saveState();
    var q = input.value, my = ++seq, t0 = performance.now();
    if (!q.trim()) { show([], ""); return; }
    if (mode() === "label") byLabel(q.trim(), t0); else byToken(q, t0, my);
  }

  A.load("features").then(function (data) {
    F = data;
    input.addEventListener("input", go);
    document.querySelectorAll("input[name=atlas-mode]").forEach(function (r) { r.addEventListener("change", go); });
    var p = new URLSearchParams(location.search);
    if (p.get("token") !== null) { document.querySelector("input[value=token]").checked = true; input.value = p.get("token"); }
    else if (p.get("label")) input.value = p.get("label");
    go();
  }, function (e) { status.textContent = e.message; });
})();
