// Loads the site's own indexes (site/data/*.js, written by atlas/search_index.py).
// Each data file is a script that calls Atlas.loaded(name, data); loading by <script> tag
// instead of fetch() also works from file://. Classic script (not a module) for the same reason.
(function () {
  "use strict";
  var root = new URL("../", document.currentScript.src);   // this file lives in <root>/js/
  var waiting = {};
  var cache = {};

  function load(name) {
    if (cache[name]) return cache[name];
    cache[name] = new Promise(function (resolve, reject) {
      waiting[name] = resolve;
      var s = document.createElement("script");
      s.src = new URL("data/" + name + ".js", root).href;
      s.onerror = function () { delete cache[name]; reject(new Error("could not load data/" + name + ".js")); };
      document.head.appendChild(s);
    });
    return cache[name];
  }

  // FNV-1a over UTF-8, the same hash as atlas.search_index.fnv1a
  function fnv1a(text) {
    var bytes = new TextEncoder().encode(text), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) { h ^= bytes[i]; h = Math.imul(h, 0x01000193) >>> 0; }
    return h >>> 0;
  }

  function tokenEntry(text) {
    return load("tokens/meta").then(function (meta) {
      var shard = fnv1a(text) % meta.shards;
      return load("tokens/" + shard).then(function (data) {
        return Object.prototype.hasOwnProperty.call(data, text) ? data[text] : null;
      });
    });
  }

  function featureUrl(id) { return new URL("features/" + id + "/index.html", root).href; }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(x) {
    if (x === 0) return "0";
    return Math.abs(x) >= 1e4 ? Math.round(x).toLocaleString("en") : Number(x.toPrecision(3)).toString();
  }
  function pct(x) { return x === 0 ? "0%" : Number((100 * x).toPrecision(3)) + "%"; }
  // a label score (F1 in [0, 1], null where not scored), as the pages print it
  function score(x) { return x === null || x === undefined ? "–" : x.toFixed(2); }
  function showToken(t) { return t.replace(/\n/g, "↵").replace(/\t/g, "⇥"); }

  window.Atlas = {
    root: root, load: load, tokenEntry: tokenEntry, featureUrl: featureUrl, el: el, fmt: fmt, pct: pct,
    showToken: showToken, fnv1a: fnv1a, score: score,
    loaded: function (name, data) {
      var resolve = waiting[name];
      delete waiting[name];
      if (resolve) resolve(data);
    },
  };
})();
