// node --test tests/js/results.test.mjs: what the analyser says about a result (site_src/js/analyser/results.js),
// on hand-made results: k = 2 latents seen per token, BOS first, with and without the export's n_active.
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  featureActs, featureUnseen, promptCoverage, promptFeatures, tokenCoverage, tokenFeatures, verdict,
} from "../../site_src/js/analyser/results.js";

/** A result of analyse() for tokens given as [[id, act], ...] top-k lists (k = 2), BOS first. */
function result(tokens, nActive = null) {
  const k = 2;
  const topIds = new Int32Array(tokens.length * k);
  const topActs = new Float32Array(tokens.length * k);
  tokens.forEach((list, t) => list.forEach(([id, act], r) => { topIds[t * k + r] = id; topActs[t * k + r] = act; }));
  return { ids: tokens.map((_, t) => t), bos: true, k, topIds, topActs, nActive: nActive && Int32Array.from(nActive) };
}

const say = (r, f) => verdict(f, r, featureActs(r, f), featureUnseen(r, f));

test("every active latent in sight: 'does not fire' is said, and only then", () => {
  const r = result([[[9, 5]], [[1, 2], [2, 1]], [[1, 3]]], [1, 2, 1]);
  assert.equal(say(r, 7), "Feature 7 does not fire on this text.");
  assert.equal(say(r, 1), "Feature 1 fires on this text (max 3.00).");
  assert.deepEqual(Array.from(featureActs(r, 2)), [0, 1, 0]);
  assert.deepEqual(tokenCoverage(r, 1), { shown: 2, active: 2 });
  assert.deepEqual(promptCoverage(r), { tokens: 0, of: 2, maxActive: 2 });
});

test("more latents fire than the browser sees: out of sight, never 'does not fire'", () => {
  const r = result([[[9, 5]], [[1, 2], [2, 1]], [[1, 3], [3, 0.5]], [[4, 1]]], [1, 5, 3, 1]);
  const unseen = featureUnseen(r, 7);
  assert.equal(unseen[0], null);                                  // BOS: all in sight
  assert.deepEqual(unseen[1], { shown: 2, active: 5, below: 1 });  // if 7 fires here, at most 1
  assert.deepEqual(unseen[2], { shown: 2, active: 3, below: 0.5 });
  assert.equal(unseen[3], null);                                  // one fires, one is seen
  assert.equal(say(r, 7), "Feature 7 does not fire on 1 of the 3 tokens. On the other 2 it is not among the 2 " +
    "strongest of the 3–5 features that fire there, so it may fire there, more weakly (dotted underline).");
  assert.equal(say(r, 1), "Feature 1 fires on this text (max 3.00).");            // seen wherever it is not shown
  assert.equal(say(r, 2), "Feature 2 fires on this text (max 1.00). On 1 other token it is not among the 2 " +
    "strongest of the 3 features that fire there, so it may fire there too, more weakly (dotted underline).");
  assert.deepEqual(promptCoverage(r), { tokens: 2, of: 3, maxActive: 5 });
  assert.deepEqual(tokenCoverage(r, 1), { shown: 2, active: 5 });
});

test("out of sight on every token", () => {
  const r = result([[[9, 5]], [[1, 2], [2, 1]]], [1, 4]);
  assert.equal(say(r, 7), "Feature 7 is not among the 2 strongest of the 4 features that fire on this token, so it " +
    "may still fire, more weakly (dotted underline): the analyser sees only each token's 2 strongest.");
});

test("an export without n_active: a full top k may hide more, a shorter one does not", () => {
  const r = result([[[9, 5]], [[1, 2], [2, 1]], [[1, 3]]]);
  assert.deepEqual(tokenCoverage(r, 1), { shown: 2, active: null });
  assert.deepEqual(tokenCoverage(r, 2), { shown: 1, active: 1 });
  assert.equal(say(r, 7), "Feature 7 does not fire on 1 of the 2 tokens. On the other token it is not among the 2 " +
    "strongest features that fire there, so it may fire there, more weakly (dotted underline).");
  assert.deepEqual(promptCoverage(r), { tokens: 1, of: 2, maxActive: null });
});

test("token and prompt lists keep only active latents, strongest first, BOS left out", () => {
  const r = result([[[9, 5]], [[1, 2], [2, 0]], [[2, 3], [1, 1]]], [1, 1, 2]);
  assert.deepEqual(tokenFeatures(r, 1), [{ id: 1, act: 2 }]);
  assert.deepEqual(promptFeatures(r).map((f) => [f.id, f.act, f.token]), [[2, 3, 2], [1, 2, 1]]);
});
