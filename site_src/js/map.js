// The feature map: a canvas scatter of map_x/map_y with zoom, pan, hover labels and click-through.
(function () {
  "use strict";
  var A = window.Atlas;
  var canvas = document.getElementById("atlas-map-canvas"), tip = document.getElementById("atlas-map-tip");
  var ctx = canvas.getContext("2d"), F, pts = [], view, grid, hover = -1, drag = null;

  function fit() {
    var w = canvas.clientWidth, dpr = window.devicePixelRatio || 1;
    canvas.width = w * dpr; canvas.height = Math.round(w * 0.62) * dpr;
    canvas.style.height = Math.round(w * 0.62) + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  function reset() {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    pts.forEach(function (i) { x0 = Math.min(x0, F.x[i]); x1 = Math.max(x1, F.x[i]); y0 = Math.min(y0, F.y[i]); y1 = Math.max(y1, F.y[i]); });
    var w = canvas.clientWidth, h = canvas.clientHeight, s = 0.92 * Math.min(w / ((x1 - x0) || 1), h / ((y1 - y0) || 1));
    view = { s: s, cx: (x0 + x1) / 2, cy: (y0 + y1) / 2 };
    draw();
  }

  function sx(i) { return canvas.clientWidth / 2 + (F.x[i] - view.cx) * view.s; }
  function sy(i) { return canvas.clientHeight / 2 - (F.y[i] - view.cy) * view.s; }

  function colour(d) {
    var t = Math.max(0, Math.min(1, (Math.log10(d + 1e-9) + 6) / 5));
    return "hsl(" + (230 - 200 * t) + ",70%," + (65 - 25 * t) + "%)";
  }

  function draw() {
    var w = canvas.clientWidth, h = canvas.clientHeight, r = Math.max(3, Math.min(7, view.s / 15));
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
    if (hover >= 0) {
      ctx.strokeStyle = getComputedStyle(canvas).color; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx(hover), sy(hover), 6, 0, 2 * Math.PI); ctx.stroke();
    }
  }

  function nearest(x, y) {
    var best = -1, bd = 144, gx = Math.floor(x / 12), gy = Math.floor(y / 12);
    for (var dx = -1; dx <= 1; dx++) for (var dy = -1; dy <= 1; dy++) {
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

  function start(data) {
    F = data;
    for (var i = 0; i < F.n; i++) if (!(F.present && !F.present[i]) && !(F.flags[i] & 1)) pts.push(i);
    document.getElementById("atlas-map-status").textContent = pts.length.toLocaleString("en") + " live features";
    fit(); reset();
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      var p = pos(e), k = Math.exp(-e.deltaY * 0.0015);
      var wx = view.cx + (p[0] - canvas.clientWidth / 2) / view.s, wy = view.cy - (p[1] - canvas.clientHeight / 2) / view.s;
      view.s *= k;
      view.cx = wx - (p[0] - canvas.clientWidth / 2) / view.s; view.cy = wy + (p[1] - canvas.clientHeight / 2) / view.s;
      draw();
    }, { passive: false });
    canvas.addEventListener("pointerdown", function (e) { drag = { p: pos(e), cx: view.cx, cy: view.cy, moved: false }; canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointermove", function (e) {
      var p = pos(e);
      if (drag) {
        var dx = p[0] - drag.p[0], dy = p[1] - drag.p[1];
        if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
        view.cx = drag.cx - dx / view.s; view.cy = drag.cy + dy / view.s;
        draw(); return;
      }
      var i = nearest(p[0], p[1]);
      if (i !== hover) { hover = i; draw(); }
      showTip(i, p[0], p[1]);
      canvas.style.cursor = i >= 0 ? "pointer" : "grab";
    });
    canvas.addEventListener("pointerup", function (e) {
      var moved = drag && drag.moved; drag = null;
      if (!moved) { var p = pos(e), i = nearest(p[0], p[1]); if (i >= 0) location.href = A.featureUrl(i); }
    });
    canvas.addEventListener("pointerleave", function () { hover = -1; tip.hidden = true; draw(); });
    canvas.addEventListener("keydown", function (e) {
      var step = 40 / view.s, moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (moves[e.key]) { view.cx += moves[e.key][0]; view.cy += moves[e.key][1]; }
      else if (e.key === "+" || e.key === "=") view.s *= 1.25;
      else if (e.key === "-") view.s /= 1.25;
      else return;
      e.preventDefault(); draw();
    });
    document.getElementById("atlas-map-reset").addEventListener("click", reset);
    window.addEventListener("resize", function () { fit(); draw(); });
  }

  A.load("features").then(start, function (e) { document.getElementById("atlas-map-status").textContent = e.message; });
})();
