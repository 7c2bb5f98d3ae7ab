// The feature map: a canvas scatter of map_x/map_y with zoom, pan, hover labels and click-through,
// named regions (atlas/map_regions.py), a density legend drawn with the points' own colour function,
// find-and-locate by id or label words, a keyboard crosshair (Enter opens the feature under it), and
// the view, the located feature and the query kept in the address (?f=&x=&y=&z=&q=).
(function () {
  "use strict";
  var A = window.Atlas;
  var $ = function (id) { return document.getElementById(id); };
  var canvas = $("atlas-map-canvas"), tip = $("atlas-map-tip"), regionBox = $("atlas-map-regions");
  var ctx = canvas.getContext("2d"), F, pts = [], view, home, grid, hover = -1, drag = null;
  var selected = -1, crosshair = false, regionButtons = [];

  function fit() {
    var w = canvas.clientWidth, dpr = window.devicePixelRatio || 1;
    canvas.width = w * dpr; canvas.height = Math.round(w * 0.62) * dpr;
    canvas.style.height = Math.round(w * 0.62) + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  // `home`: the view that shows every point, for this canvas size; its scale is zoom 1 (so an address's
  // zoom means the same on any screen)
  function measure() {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    pts.forEach(function (i) { x0 = Math.min(x0, F.x[i]); x1 = Math.max(x1, F.x[i]); y0 = Math.min(y0, F.y[i]); y1 = Math.max(y1, F.y[i]); });
    if (!pts.length) { x0 = y0 = 0; x1 = y1 = 1; }
    var w = canvas.clientWidth, h = canvas.clientHeight;
    home = { s: 0.92 * Math.min(w / ((x1 - x0) || 1), h / ((y1 - y0) || 1)), cx: (x0 + x1) / 2, cy: (y0 + y1) / 2 };
  }

  function reset() { view = Object.assign({}, home); select(-1); changed(); }

  function toX(x) { return canvas.clientWidth / 2 + (x - view.cx) * view.s; }
  function toY(y) { return canvas.clientHeight / 2 - (y - view.cy) * view.s; }
  function sx(i) { return toX(F.x[i]); }
  function sy(i) { return toY(F.y[i]); }

  // density → colour: blue (rare) to orange-brown (frequent), log scale from 1e-6 to 1e-1; the legend uses it too
  function colour(d) {
    var t = Math.max(0, Math.min(1, (Math.log10(d + 1e-9) + 6) / 5));
    return "hsl(" + (230 - 200 * t) + ",70%," + (65 - 25 * t) + "%)";
  }

  function legend() {
    var scale = $("atlas-map-scale"), c = scale.getContext("2d"), w = scale.width;
    for (var x = 0; x < w; x++) { c.fillStyle = colour(Math.pow(10, -6 + 5 * x / (w - 1))); c.fillRect(x, 0, 1, scale.height); }
    var ticks = $("atlas-map-ticks");
    [[1e-6, "≤0.0001%"], [1e-4, "0.01%"], [1e-2, "1%"], [1e-1, "≥10%"]].forEach(function (t) {
      var s = A.el("span", {}, t[1]);
      s.style.left = (100 * (Math.log10(t[0]) + 6) / 5) + "%";
      ticks.appendChild(s);
    });
  }

  function draw() {
    var w = canvas.clientWidth, h = canvas.clientHeight, r = Math.max(3, Math.min(7, view.s / home.s * 3));
    ctx.clearRect(0, 0, w, h);
    grid = {};
    pts.forEach(function (i) {
      var x = sx(i), y = sy(i);
      if (x < -5 || y < -5 || x > w + 5 || y > h + 5) return;
      ctx.fillStyle = colour(F.density[i]);
      ctx.fillRect(x - r / 2, y - r / 2, r, r);
      var key = Math.floor(x / 12) + "," + Math.floor(y / 12);
      (grid[key] = grid[key] || []).push(i);
    });
    var fg = getComputedStyle(canvas).color;
    ctx.strokeStyle = fg; ctx.lineWidth = 2;
    [hover, selected].forEach(function (i) {
      if (i < 0) return;
      ctx.beginPath(); ctx.arc(sx(i), sy(i), i === selected ? 9 : 6, 0, 2 * Math.PI); ctx.stroke();
    });
    if (crosshair) {
      ctx.lineWidth = 1; ctx.beginPath();
      ctx.moveTo(w / 2 - 10, h / 2); ctx.lineTo(w / 2 + 10, h / 2); ctx.moveTo(w / 2, h / 2 - 10); ctx.lineTo(w / 2, h / 2 + 10);
      ctx.stroke();
    }
    placeRegions(w, h);
    if (selected >= 0 && hover < 0) showTip(selected, sx(selected), sy(selected));
  }

  // region names: largest regions first; a name that would overlap one already placed is left out at this zoom
  function placeRegions(w, h) {
    var placed = [];
    regionButtons.forEach(function (b) {
      var x = toX(b.region[1]), y = toY(b.region[2]), bw = b.offsetWidth || 80, bh = b.offsetHeight || 16;
      var box = [x - bw / 2 - 4, y - bh / 2 - 2, x + bw / 2 + 4, y + bh / 2 + 2];
      var clash = box[0] < 0 || box[1] < 0 || box[2] > w || box[3] > h || placed.some(function (o) {
        return box[0] < o[2] && o[0] < box[2] && box[1] < o[3] && o[1] < box[3];
      });
      b.hidden = clash;
      if (clash) return;
      placed.push(box);
      b.style.left = x + "px"; b.style.top = y + "px";
    });
  }

  function nearest(x, y, radius) {
    var best = -1, bd = radius * radius, reach = Math.ceil(radius / 12), gx = Math.floor(x / 12), gy = Math.floor(y / 12);
    for (var dx = -reach; dx <= reach; dx++) for (var dy = -reach; dy <= reach; dy++) {
      (grid[(gx + dx) + "," + (gy + dy)] || []).forEach(function (i) {
        var d = Math.pow(sx(i) - x, 2) + Math.pow(sy(i) - y, 2);
        if (d < bd) { bd = d; best = i; }
      });
    }
    return best;
  }

  function pos(e) { var r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }

  function showTip(i, x, y) {
    if (i < 0) { tip.hidden = true; return; }
    tip.textContent = "#" + i + " " + (F.label[i] || "(no label)");
    tip.style.left = x + 12 + "px"; tip.style.top = y + 12 + "px";
    tip.hidden = false;
  }

  function open(i) { if (i >= 0) location.href = A.featureUrl(i); }

  function select(i) {
    selected = i;
    $("atlas-map-found").textContent = "";
    if (i >= 0 && onMap(i)) return;
    if (i >= 0) {   // a dead feature (or one this map lacks) has no point: say so, and link its page
      var found = $("atlas-map-found");
      found.append("#" + i + " is not on the map (it never fired) — ");
      found.appendChild(A.el("a", { href: A.featureUrl(i) }, "open its page"));
      selected = -1;
    }
  }

  function onMap(i) { return i >= 0 && i < F.n && !(F.present && !F.present[i]) && !(F.flags[i] & 1); }

  function locate(i) {
    select(i);
    if (selected < 0) { changed(); return; }
    view.cx = F.x[i]; view.cy = F.y[i];
    view.s = Math.max(view.s, home.s * 4);
    changed();
  }

  // the query: "#12" or "12" is a feature id; anything else, words that must all appear in a label
  function find(q) {
    q = q.trim();
    var list = $("atlas-map-matches");
    list.textContent = "";
    if (!q) return;
    var id = /^#?(\d+)$/.exec(q);
    if (id) {
      var n = parseInt(id[1], 10);
      if (n >= F.n || (F.present && !F.present[n])) { $("atlas-map-found").textContent = "no feature #" + n; return; }
      locate(n);
      return;
    }
    var words = q.toLowerCase().split(/\s+/), hits = [];
    for (var i = 0; i < F.n; i++) {
      if (!onMap(i)) continue;
      var label = (F.label[i] || "").toLowerCase();
      if (words.every(function (w) { return label.indexOf(w) >= 0; })) hits.push(i);
    }
    hits.sort(function (a, b) { return (F.f1[b] || 0) - (F.f1[a] || 0) || F.density[b] - F.density[a]; });
    if (!hits.length) { select(-1); $("atlas-map-found").textContent = "no live feature's label has " + JSON.stringify(q); changed(); return; }
    hits.slice(0, 8).forEach(function (i) {
      var b = A.el("button", { type: "button", "data-feature": i }, "#" + i + " " + (F.label[i] || "(no label)"));
      b.addEventListener("click", function () { mark(b); locate(i); });
      list.appendChild(A.el("li")).appendChild(b);
    });
    if (hits.length > 8) list.appendChild(A.el("li", {}, "+" + (hits.length - 8).toLocaleString("en") + " more"));
    mark(list.querySelector("button"));
    locate(hits[0]);
  }

  function mark(button) {
    $("atlas-map-matches").querySelectorAll("button").forEach(function (b) { b.removeAttribute("aria-current"); });
    button.setAttribute("aria-current", "true");
  }

  // the address keeps the view (zoom relative to the fitted view), the located feature and the query
  var saveTimer = null;
  function changed() {
    draw();
    clearTimeout(saveTimer);
    saveTimer = setTimeout(save, 150);
  }

  function save() {
    var p = new URLSearchParams(), q = $("atlas-map-q").value.trim();
    if (q) p.set("q", q);
    if (selected >= 0) p.set("f", selected);
    if (Math.abs(view.s / home.s - 1) > 1e-3 || Math.abs(view.cx - home.cx) * view.s > 1 || Math.abs(view.cy - home.cy) * view.s > 1) {
      p.set("x", Number(view.cx.toPrecision(5))); p.set("y", Number(view.cy.toPrecision(5)));
      p.set("z", Number((view.s / home.s).toPrecision(4)));
    }
    var query = p.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function restore() {
    var p = new URLSearchParams(location.search), num = function (k) { var v = parseFloat(p.get(k)); return isFinite(v) ? v : null; };
    view = Object.assign({}, home);
    var q = p.get("q"), f = p.get("f") !== null ? parseInt(p.get("f"), 10) : -1;
    if (q) {
      $("atlas-map-q").value = q;
      find(q);
      var b = $("atlas-map-matches").querySelector('button[data-feature="' + f + '"]');
      if (b) mark(b);
    }
    if (f >= 0) locate(f);
    var x = num("x"), y = num("y"), z = num("z");
    if (x !== null && y !== null && z !== null && z > 0) { view.cx = x; view.cy = y; view.s = home.s * z; }
    changed();
  }

  // keyboard: the crosshair at the centre marks the feature nearest it, which Enter opens
  function underCrosshair() {
    var i = nearest(canvas.clientWidth / 2, canvas.clientHeight / 2, 36);
    selected = i;
    $("atlas-map-found").textContent = i >= 0 ? "#" + i + " " + (F.label[i] || "(no label)") : "";
  }

  function start(data) {
    F = data;
    for (var i = 0; i < F.n; i++) if (onMap(i)) pts.push(i);
    $("atlas-map-status").textContent = pts.length.toLocaleString("en") + " live features" +
      (F.regions && F.regions.length ? " in " + F.regions.length + " named regions" : "");
    legend();
    (F.regions || []).forEach(function (r) {
      var b = A.el("button", { type: "button", title: r[3].toLocaleString("en") + " features; click to zoom in" }, r[0]);
      b.region = r;
      b.addEventListener("click", function () { view.cx = r[1]; view.cy = r[2]; view.s *= 2.5; changed(); });
      regionBox.appendChild(b);
      regionButtons.push(b);
    });
    $("atlas-map-names").addEventListener("change", function (e) { regionBox.hidden = !e.target.checked; });
    fit(); measure(); restore();
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      var p = pos(e), k = Math.exp(-e.deltaY * 0.0015);
      var wx = view.cx + (p[0] - canvas.clientWidth / 2) / view.s, wy = view.cy - (p[1] - canvas.clientHeight / 2) / view.s;
      view.s *= k;
      view.cx = wx - (p[0] - canvas.clientWidth / 2) / view.s; view.cy = wy + (p[1] - canvas.clientHeight / 2) / view.s;
      changed();
    }, { passive: false });
    canvas.addEventListener("pointerdown", function (e) { drag = { p: pos(e), cx: view.cx, cy: view.cy, moved: false }; canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointermove", function (e) {
      var p = pos(e);
      if (drag) {
        var dx = p[0] - drag.p[0], dy = p[1] - drag.p[1];
        if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
        view.cx = drag.cx - dx / view.s; view.cy = drag.cy + dy / view.s;
        changed(); return;
      }
      var i = nearest(p[0], p[1], 12);
      if (i !== hover) { hover = i; draw(); }
      showTip(i, p[0], p[1]);
      canvas.style.cursor = i >= 0 ? "pointer" : "grab";
    });
    canvas.addEventListener("pointerup", function (e) {
      var moved = drag && drag.moved; drag = null;
      if (!moved) { var p = pos(e); open(nearest(p[0], p[1], 12)); }
    });
    canvas.addEventListener("pointerleave", function () { hover = -1; tip.hidden = true; draw(); });
    canvas.addEventListener("focus", function () { crosshair = canvas.matches(":focus-visible"); draw(); });
    canvas.addEventListener("blur", function () { crosshair = false; draw(); });
    canvas.addEventListener("keydown", function (e) {
      var step = 40 / view.s, moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (e.key === "Enter") { open(selected >= 0 ? selected : hover); e.preventDefault(); return; }
      if (moves[e.key]) { view.cx += moves[e.key][0]; view.cy += moves[e.key][1]; }
      else if (e.key === "+" || e.key === "=") view.s *= 1.25;
      else if (e.key === "-") view.s /= 1.25;
      else return;
      e.preventDefault();
      crosshair = true; draw(); underCrosshair(); changed();
    });
    $("atlas-map-find").addEventListener("submit", function (e) { e.preventDefault(); find($("atlas-map-q").value); });
    $("atlas-map-reset").addEventListener("click", function () {
      $("atlas-map-q").value = ""; $("atlas-map-matches").textContent = ""; reset();
    });
    window.addEventListener("resize", function () { var z = view.s / home.s; fit(); measure(); view.s = home.s * z; draw(); });
  }

  A.load("features").then(start, function (e) { $("atlas-map-status").textContent = e.message; });
})();
