// What a prompt's analysis shows, computed from analyse()'s result (see model.js): plain functions
// of arrays, no DOM and no imports, so they also run in Node (tests/js/results.test.mjs).
//
// The browser sees each token's top k features (`export.top_k`), and, from exports that have it,
// how many fire over the whole SAE (`nActive`). Where more fire than it sees, a feature missing
// from the top k may still fire, more weakly: these functions say so instead of reporting 0.

/** Activation of `feature` at each token (0 where it is not among the token's top k). */
export function featureActs(result, feature) {
  const { k, topIds, topActs } = result;
  const acts = new Float32Array(result.ids.length);
  for (let t = 0; t < acts.length; t++) {
    for (let r = 0; r < k; r++) {
      if (topIds[t * k + r] === feature && topActs[t * k + r] > 0) { acts[t] = topActs[t * k + r]; break; }
    }
  }
  return acts;
}

/**
 * What the browser sees of token t: { shown, active } — `shown` features with activation > 0
 * among its top k, of `active` that fire over the whole SAE. Without the export's n_active, a
 * token whose k-th activation is > 0 may have more: then active is null (unknown).
 */
export function tokenCoverage(result, t) {
  const { k, topActs, nActive } = result;
  let shown = 0;
  while (shown < k && topActs[t * k + shown] > 0) shown++;
  if (nActive) return { shown, active: Math.max(nActive[t], shown) };
  return { shown, active: shown < k ? shown : null };
}

/**
 * Where `feature` is out of sight: for each token, null when its activation there is known (it
 * is among the top k, or every active feature is), else { shown, active, below } — it is not
 * among the `shown` strongest of `active` (null: unknown) features that fire, so if it fires
 * there its activation is at most `below`, the weakest one shown.
 */
export function featureUnseen(result, feature) {
  const { k, topIds, topActs } = result;
  const unseen = new Array(result.ids.length).fill(null);
  for (let t = 0; t < unseen.length; t++) {
    const cov = tokenCoverage(result, t);
    if (cov.active !== null && cov.active <= cov.shown) continue; // every active feature is in sight
    let listed = false;
    for (let r = 0; r < cov.shown; r++) if (topIds[t * k + r] === feature) listed = true;
    if (!listed) unseen[t] = { ...cov, below: topActs[t * k + cov.shown - 1] };
  }
  return unseen;
}

/** "the 4 strongest of the 9 features that fire" ("the 4 strongest features that fire" when the count is unknown). */
export function coverageText({ shown, active }) {
  return active === null ? `the ${shown} strongest features that fire` : `the ${shown} strongest of the ${active} features that fire`;
}

/** Top features of token t: [{ id, act }] with act > 0, strongest first. */
export function tokenFeatures(result, t, n = result.k) {
  const { k, topIds, topActs } = result;
  const out = [];
  for (let r = 0; r < Math.min(k, n); r++) {
    if (topActs[t * k + r] > 0) out.push({ id: topIds[t * k + r], act: topActs[t * k + r] });
  }
  return out;
}

/**
 * The prompt's strongest features: max activation over tokens, strongest first. The BOS
 * position is skipped: its residual is the same for every prompt and not about the text.
 * Only each token's top k are seen, so this is the strongest of what the browser sees.
 */
export function promptFeatures(result, n = 20) {
  const best = new Map();
  for (let t = firstToken(result); t < result.ids.length; t++) {
    for (const { id, act } of tokenFeatures(result, t)) {
      const b = best.get(id);
      if (!b || act > b.act) best.set(id, { id, act, token: t });
    }
  }
  return [...best.values()].sort((a, b) => b.act - a.act).slice(0, n);
}

/** The first token that is about the text (1 when a BOS token was prepended). */
export function firstToken(result) {
  return result.bos && result.ids.length > 1 ? 1 : 0;
}

/**
 * Tokens (BOS left out) on which more features fire than the browser sees:
 * { tokens, of, maxActive } (maxActive null when the export does not say).
 */
export function promptCoverage(result) {
  let tokens = 0;
  let maxActive = 0;
  const start = firstToken(result);
  for (let t = start; t < result.ids.length; t++) {
    const { shown, active } = tokenCoverage(result, t);
    if (active === null || active > shown) tokens++;
    maxActive = active === null || maxActive === null ? null : Math.max(maxActive, active);
  }
  return { tokens, of: result.ids.length - start, maxActive };
}

/**
 * What the box can honestly say. The browser sees each token's `top_k` strongest features; where
 * more fire (the export's n_active) and this feature is not among them, it may still fire there,
 * more weakly, so "does not fire" is only said of tokens where every active feature is in sight.
 */
export function verdict(feature, result, acts, unseen) {
  const start = firstToken(result);
  const n = acts.length - start;
  let max = 0;
  const hidden = [];
  for (let t = start; t < acts.length; t++) {
    max = Math.max(max, acts[t]);
    if (unseen[t]) hidden.push(unseen[t]);
  }
  const fires = `Feature ${feature} fires on this text (max ${max.toFixed(2)}).`;
  if (!hidden.length) return max > 0 ? fires : `Feature ${feature} does not fire on this text.`;
  const counts = hidden.map((u) => u.active);
  const lo = Math.min(...counts.map((c) => c ?? Infinity));
  const hi = Math.max(...counts.map((c) => c ?? Infinity));
  const shown = Math.min(...hidden.map((u) => u.shown));
  const of = hi === Infinity ? "" : lo === hi ? ` of the ${hi}` : ` of the ${lo}–${hi}`;
  const notAmong = `not among the ${shown} strongest${of} features that fire`;
  const tokens = (c) => `${c} token${c === 1 ? "" : "s"}`;
  if (max > 0) {
    return `${fires} On ${hidden.length} other token${hidden.length === 1 ? "" : "s"} it is ${notAmong} there, ` +
      "so it may fire there too, more weakly (dotted underline).";
  }
  if (hidden.length < n) {
    return `Feature ${feature} does not fire on ${n - hidden.length} of the ${tokens(n)}. On the other ` +
      `${hidden.length === 1 ? "token" : hidden.length} it is ${notAmong} there, so it may fire there, more weakly ` +
      "(dotted underline).";
  }
  return `Feature ${feature} is ${notAmong} on ${n === 1 ? "this token" : `any of the ${tokens(n)}`}, so it ` +
    `may still fire, more weakly (dotted underline): the analyser sees only each token's ${shown} strongest.`;
}

/**
 * The cross-layer view of one prompt: for each SAE's result (client.js encode), each token's `n`
 * strongest features, [{ id, act }] strongest first — rows are SAEs (by layer, then width),
 * columns tokens.
 */
export function layerGrid(results, n = 3) {
  return results.map((result) => ({
    sae: result.sae,
    cells: result.ids.map((_, t) => tokenFeatures(result, t, n)),
  }));
}
