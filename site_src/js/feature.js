// Feature pages (templates/feature.html). The page's HTML carries what must read without JavaScript
// (label, score, statistics); this script draws the rest from the feature's shared data file
// data/pages/<group>.js (written by atlas/page_data.py, whose docstring gives the format) and the
// vocabulary data/vocab.js: histogram with axes, top examples and samples across the range (whitespace
// made visible, one tab stop per example, arrow keys between tokens, a token's value and position on
// hover and focus, "analyse this example"), logit effects, nearest features, and the feature's data as
// JSON. Everything untrusted is inserted with textContent. Classic script (not a module): works from file://.
(function () {
  "use strict";
  var host = document.getElementById("atlas-feature");
  if (!host || !window.Atlas) return;
  var id = Number(host.getAttribute("data-id"));
  var group = host.getAttribute("data-group");
  var LEVELS = 8;            // highlight classes a1..a8, as atlas/pages.py LEVELS
  var FIRST_TOP = 10;        // top examples shown before "more examples"
  var el = Atlas.el;

  // ------------------------------------------------------------ decoding the data file

  var B85 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";
  var B85_VALUE = new Uint8Array(128);
  for (var c = 0; c < B85.length; c++) B85_VALUE[B85.charCodeAt(c)] = c;

  // Python's base64.b85decode: groups of 5 characters -> 4 bytes, the last group padded with "~"
  function b85decode(text) {
    var pad = (5 - text.length % 5) % 5;
    text += "~~~~".slice(0, pad);
    var out = new Uint8Array(text.length / 5 * 4);
    for (var i = 0, o = 0; i < text.length; i += 5, o += 4) {
      var v = 0;
      for (var j = 0; j < 5; j++) v = v * 85 + B85_VALUE[text.charCodeAt(i + j)];
      out[o] = v >>> 24; out[o + 1] = (v >>> 16) & 255; out[o + 2] = (v >>> 8) & 255; out[o + 3] = v & 255;
    }
    return out.subarray(0, out.length - pad);
  }

  function inflate(bytes) {
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer();
  }

  function half(h) {          // IEEE float16 -> number
    var s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, f = h & 1023;
    if (e === 0) return s * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * Math.pow(2, e - 15);
  }

  var READ = {
    u1: function (d, p) { return d.getUint8(p); }, u2: function (d, p) { return d.getUint16(p, true); },
    u4: function (d, p) { return d.getUint32(p, true); }, i1: function (d, p) { return d.getInt8(p); },
    i2: function (d, p) { return d.getInt16(p, true); }, i4: function (d, p) { return d.getInt32(p, true); },
    f2: function (d, p) { return half(d.getUint16(p, true)); }, f4: function (d, p) { return d.getFloat32(p, true); },
  };

  // the payload -> {features: [row…], examples: [row…]}; floats that are NaN stand for null
  function parse(buffer) {
    var view = new DataView(buffer), n = view.getUint32(0, true);
    var header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
    var pos = 4 + n, out = {};
    function take(dtype, count) {
      var size = Number(dtype[1]), read = READ[dtype], values = new Array(count);
      for (var i = 0; i < count; i++, pos += size) values[i] = read(view, pos);
      return values;
    }
    Object.keys(header.tables).forEach(function (name) {
      var spec = header.tables[name], rows = [];
      for (var r = 0; r < spec.n; r++) rows.push({});
      spec.columns.forEach(function (col) {
        var cname = col[0], dtype = col[1], isList = col[2], inline = col[3], values;
        if (inline !== null) values = dtype === "b" ? inline.map(Boolean) : inline;
        else if (isList && (dtype === "geo" || dtype === "lin")) {
          var lens = take("u2", spec.n), ends = take("f4", 2 * lens.filter(function (k) { return k > 0; }).length), e = 0;
          values = lens.map(function (k) {
            if (!k) return [];
            var v = expand(dtype, ends[e], ends[e + 1], k);
            e += 2;
            return v;
          });
        } else if (isList) {
          var lengths = take("u2", spec.n), flat = take(dtype, lengths.reduce(function (a, b) { return a + b; }, 0));
          values = [];
          for (var k = 0, at = 0; k < spec.n; at += lengths[k], k++) values.push(flat.slice(at, at + lengths[k]));
        } else values = take(dtype, spec.n);
        for (var i = 0; i < spec.n; i++) rows[i][cname] = values[i];
      });
      out[name] = rows;
    });
    return out;
  }

  // a progression from first to last, as atlas/page_data.py expand(): float64 arithmetic, float32 values
  function expand(kind, first, last, n) {
    var out = new Array(n), lo = Math.log(first), hi = Math.log(last);
    for (var i = 0; i < n; i++) {
      var t = i / Math.max(n - 1, 1);
      out[i] = Math.fround(kind === "geo" ? Math.exp(lo + t * (hi - lo)) : first + t * (last - first));
    }
    out[0] = first;
    out[n - 1] = last;
    return out;
  }

  function nullIfNaN(x) { return typeof x === "number" && isNaN(x) ? null : x; }

  // ------------------------------------------------------------ text

  var GLYPHS = {"\n": "↵", "\t": "⇥", " ": "·", "\r": ""};
  function glyphs(text) { return text.replace(/[\n\t \r]/g, function (ch) { return GLYPHS[ch]; }); }
  function isBlank(text) { return text.length > 0 && !/\S/.test(text); }

  // a token inside an example window: whitespace-only tokens as glyphs, and every newline also breaks the
  // line (the window is white-space: pre-wrap), so indentation after it keeps its width
  function fillToken(span, text) {
    if (isBlank(text)) {
      span.classList.add("ws");
      span.textContent = text.replace(/\r/g, "").replace(/[\n\t ]/g, function (ch) {
        return ch === "\n" ? "↵\n" : GLYPHS[ch];
      });
    } else span.textContent = text.replace(/\r/g, "").replace(/\n/g, "↵\n").replace(/\t/g, "⇥\t");
  }

  function fmtValue(a) {      // as atlas/pages.py fmt_value
    if (a >= 99.5) return a.toFixed(0);
    var s = Number(a.toPrecision(2)).toString();
    return s.indexOf("0.") === 0 ? s.slice(1) : s;
  }

  // ------------------------------------------------------------ sections

  function section(parent, hid, title) {
    parent.appendChild(el("h2", {id: hid}, title));
  }

  function histogram(parent, f) {
    var counts = f.hist_counts || [], edges = f.hist_edges || [];
    if (!counts.length || !counts.some(function (x) { return x > 0; })) return;
    section(parent, "histogram", "Activation histogram");
    var NS = "http://www.w3.org/2000/svg";
    var W = 480, H = 150, L = 50, B = 34, T = 8, R = 12;
    var top = Math.max.apply(null, counts), bw = (W - L - R) / counts.length;
    var y = function (c) { return T + (H - T - B) * (1 - Math.log10(1 + c) / Math.log10(1 + top)); };
    function svg(tag, attrs, text) {
      var e = document.createElementNS(NS, tag);
      for (var k in attrs) e.setAttribute(k, attrs[k]);
      if (text !== undefined) e.textContent = text;
      return e;
    }
    var fig = el("figure", {class: "atlas-hist"});
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "Histogram of activations from " + Atlas.fmt(edges[0]) + " to " + Atlas.fmt(edges[edges.length - 1]) +
        ", log-spaced bins, log counts; tallest bin " + top.toLocaleString("en")});
    counts.forEach(function (c, i) {
      if (c <= 0) return;
      var r = svg("rect", {x: (L + i * bw + 0.5).toFixed(1), y: y(c).toFixed(1), width: Math.max(1, bw - 1).toFixed(1),
                            height: (H - B - y(c)).toFixed(1), class: "bar"});
      r.appendChild(svg("title", {}, Atlas.fmt(edges[i]) + "–" + Atlas.fmt(edges[i + 1]) + ": " + c.toLocaleString("en") + " tokens"));
      s.appendChild(r);
    });
    s.appendChild(svg("path", {class: "axis", d: "M" + L + " " + T + "V" + (H - B) + "H" + (W - R)}));
    // y ticks: powers of ten up to the tallest bin (log scale)
    for (var p = 1; p <= top; p *= 10) {
      s.appendChild(svg("path", {class: "axis", d: "M" + (L - 4) + " " + y(p).toFixed(1) + "h4"}));
      s.appendChild(svg("text", {x: L - 6, y: (y(p) + 3.5).toFixed(1), "text-anchor": "end"}, p.toLocaleString("en")));
    }
    var mid = (T + H - B) / 2;
    s.appendChild(svg("text", {x: 10, y: mid, "text-anchor": "middle", class: "title", transform: "rotate(-90 10 " + mid + ")"},
                      "tokens (log scale)"));
    // x ticks: five bin edges, evenly spaced on the (log) axis
    for (var k = 0; k <= 4; k++) {
      var i = Math.round(k * counts.length / 4), x = L + i * bw;
      s.appendChild(svg("path", {class: "axis", d: "M" + x.toFixed(1) + " " + (H - B) + "v4"}));
      s.appendChild(svg("text", {x: x.toFixed(1), y: H - B + 15, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle"},
                        Atlas.fmt(edges[i])));
    }
    s.appendChild(svg("text", {x: L + (W - L - R) / 2, y: H - 3, "text-anchor": "middle", class: "title"},
                      "activation (log scale)"));
    fig.appendChild(s);
    fig.appendChild(el("figcaption", {}, "Activations on the tokens where the feature fires: log-spaced bins, " +
      "log count of tokens per bin (tallest " + top.toLocaleString("en") + ")."));
    parent.appendChild(fig);
  }

  // one example: a single tab stop; arrow keys move between its tokens and its "analyse" link
  function example(ex, maxAct, vocab, prompt) {
    var li = el("li");
    var mark = ex.offset - ex.window_start;
    li.appendChild(el("b", {}, Atlas.fmt(ex.activation)));
    var win = el("span", {class: "atlas-win", role: "group",
                          "aria-label": "Example, activation " + Atlas.fmt(ex.activation) + "; arrow keys move between tokens"});
    var text = "", stops = [];
    ex.token_ids.forEach(function (t, i) {
      var tok = t >= 0 && t < vocab.length ? vocab[t] : "\ufffd", a = ex.acts[i];
      text += tok;
      var span = el("span");
      fillToken(span, tok);
      var tip = "position " + (ex.window_start + i);
      if (a > 0) {
        span.className += " a" + Math.min(LEVELS, Math.floor(a * LEVELS / maxAct) + 1) + (i === mark ? " pk" : "");
        tip = fmtValue(a) + " at " + tip;
      }
      span.setAttribute("data-tip", tip);
      span.setAttribute("aria-label", JSON.stringify(tok) + ", " + tip);
      span.tabIndex = i === mark ? 0 : -1;
      stops.push(span);
      win.appendChild(span);
    });
    li.appendChild(win);
    var go = el("a", {class: "atlas-analyse", href: prompt + "#text=" + encodeURIComponent(text), tabindex: "-1",
                      title: "Open this example in the prompt analyser"}, "analyse");
    li.appendChild(go);
    stops.push(go);
    if (!stops.some(function (s) { return s.tabIndex === 0; })) stops[0].tabIndex = 0;
    li.addEventListener("keydown", function (e) {
      var at = stops.indexOf(document.activeElement), to = at;
      if (at < 0) return;
      if (e.key === "ArrowRight" || e.key === "ArrowDown") to = Math.min(stops.length - 1, at + 1);
      else if (e.key === "ArrowLeft" || e.key === "ArrowUp") to = Math.max(0, at - 1);
      else if (e.key === "Home") to = 0;
      else if (e.key === "End") to = stops.length - 1;
      else return;
      e.preventDefault();
      stops[at].tabIndex = -1;
      stops[to].tabIndex = 0;
      stops[to].focus();
    });
    return li;
  }

  function examples(parent, f, rows, vocab) {
    var prompt = "../../prompt.html";          // feature pages live at features/<id>/index.html
    var top = rows.filter(function (e) { return e.kind === "top"; });
    var samples = rows.filter(function (e) { return e.kind !== "top"; })
      .sort(function (a, b) { return b.activation - a.activation; });
    if (!top.length && !samples.length) return;
    var skip = el("a", {class: "atlas-skip", href: "#atlas-after-examples"}, "Skip the examples");
    parent.appendChild(skip);
    if (top.length) {
      section(parent, "top", "Top activations");
      var ol = el("ol", {class: "atlas-ex"});
      top.slice(0, FIRST_TOP).forEach(function (e) { ol.appendChild(example(e, f.max_act, vocab, prompt)); });
      parent.appendChild(ol);
      if (top.length > FIRST_TOP) {
        var more = el("button", {type: "button", class: "md-button atlas-more"}, "More examples (" + (top.length - FIRST_TOP) + ")");
        more.addEventListener("click", function () {
          var first = null;
          top.slice(FIRST_TOP).forEach(function (e) {
            var li = example(e, f.max_act, vocab, prompt);
            first = first || li;
            ol.appendChild(li);
          });
          more.remove();
          first.querySelector("[tabindex='0']").focus();
        });
        parent.appendChild(more);
      }
    }
    if (samples.length) {
      section(parent, "intervals", "Samples across the range");
      var det = el("details", {class: "atlas-interval"});
      det.appendChild(el("summary", {}, samples.length + " samples from every part of the activation range, strongest first"));
      var list = el("ol", {class: "atlas-ex"});
      samples.forEach(function (e) { list.appendChild(example(e, f.max_act, vocab, prompt)); });
      det.appendChild(list);
      parent.appendChild(det);
    }
    parent.appendChild(el("span", {id: "atlas-after-examples", tabindex: "-1"}));
  }

  function logits(parent, f, vocab) {
    if (!f.top_logit_ids || !f.top_logit_ids.length) return;
    section(parent, "logits", "Logit effects");
    var box = el("div", {class: "atlas-logits"});
    [["Promoted", f.top_logit_ids, f.top_logit_values], ["Suppressed", f.bottom_logit_ids, f.bottom_logit_values]]
      .forEach(function (side) {
        var table = el("table"), head = el("tr"), body = el("tbody");
        head.appendChild(el("th", {}, side[0]));
        head.appendChild(el("th", {}, "logit"));
        table.appendChild(el("thead")).appendChild(head);
        side[1].forEach(function (t, i) {
          var tr = el("tr"), tok = t >= 0 && t < vocab.length ? vocab[t] : "?";
          var td = el("td", {title: JSON.stringify(tok)}, glyphs(tok));
          if (isBlank(tok)) td.className = "ws";
          tr.appendChild(td);
          tr.appendChild(el("td", {}, (side[2][i] >= 0 ? "+" : "") + side[2][i].toFixed(3)));
          body.appendChild(tr);
        });
        table.appendChild(body);
        box.appendChild(table);
      });
    parent.appendChild(box);
  }

  function neighbours(parent, f) {
    var ids = f.neighbour_ids || [];
    var rows = ids.map(function (n, i) { return [n, f.neighbour_cosines[i], (f.neighbour_labels || [])[i] || ""]; })
      .filter(function (r) { return r[0] !== id && r[0] >= 0; });
    if (!rows.length) return;
    section(parent, "neighbours", "Nearest features");
    var ul = el("ul", {class: "atlas-neighbours"});
    rows.forEach(function (r) {
      var li = el("li");
      li.appendChild(el("a", {href: "../" + r[0] + "/index.html"}, "#" + r[0]));
      li.appendChild(document.createTextNode(" " + r[2] + " "));
      li.appendChild(el("small", {}, "cos " + r[1].toFixed(2)));
      ul.appendChild(li);
    });
    parent.appendChild(ul);
  }

  // the feature's data as the shards hold it (its examples as the site keeps them), with token texts
  function record(f, rows, vocab) {
    var feature = {};
    Object.keys(f).forEach(function (k) { feature[k] = Array.isArray(f[k]) ? f[k].map(nullIfNaN) : nullIfNaN(f[k]); });
    return {
      feature: feature,
      examples: rows.map(function (e) {
        var out = {};
        Object.keys(e).forEach(function (k) { out[k] = e[k]; });
        out.tokens = e.token_ids.map(function (t) { return t >= 0 && t < vocab.length ? vocab[t] : null; });
        return out;
      }),
      note: "Examples as the site keeps them: every top example, and per interval the first " +
        "sample trimmed around its marked token; their activations are float16. The Parquet shards hold all.",
    };
  }

  function download(parent, f, rows, vocab) {
    var button = el("button", {type: "button", class: "md-button atlas-download"}, "Download JSON");
    button.addEventListener("click", function () {
      var blob = new Blob([JSON.stringify(record(f, rows, vocab), null, 1)], {type: "application/json"});
      var a = el("a", {href: URL.createObjectURL(blob), download: "feature-" + id + ".json"});
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
    });
    parent.appendChild(button);
  }

  function render(data, vocab) {
    var f = data.features.filter(function (r) { return r.feature_id === id; })[0];
    if (!f) throw new Error("feature " + id + " is not in data/pages/" + group + ".js");
    var rows = data.examples.filter(function (e) { return e.feature_id === id; });
    var out = document.createDocumentFragment();
    histogram(out, f);
    examples(out, f, rows, vocab);
    logits(out, f, vocab);
    neighbours(out, f);
    download(out, f, rows, vocab);
    host.textContent = "";
    host.appendChild(out);
    host.setAttribute("data-state", "done");
    window.AtlasFeature = {record: function () { return record(f, rows, vocab); }};
  }

  host.setAttribute("data-state", "loading");
  Promise.all([Atlas.load("pages/" + group).then(function (text) { return inflate(b85decode(text)); }).then(parse),
               Atlas.load("vocab")])
    .then(function (got) { render(got[0], got[1]); })
    .catch(function (err) {
      host.setAttribute("data-state", "error");
      host.textContent = "";
      host.appendChild(el("p", {class: "atlas-error"}, "Could not show this feature's examples: " + err.message));
    });
})();
