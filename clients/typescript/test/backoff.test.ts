/**
 * The reconnect delay: doubling, capped, jittered within half of it.
 *
 * @module
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay } from "../src/index.js";

const SETTINGS = { initialMs: 100, maxMs: 5000 };

test("backoff doubles per failure up to the cap", () => {
  const top = () => 1 - Number.EPSILON;
  assert.deepEqual(
    [1, 2, 3, 4, 5, 6, 7, 40].map((failures) => Math.round(backoffDelay(SETTINGS, failures, top))),
    [100, 200, 400, 800, 1600, 3200, 5000, 5000],
  );
});

test("jitter takes off at most half of the delay", () => {
  assert.equal(backoffDelay(SETTINGS, 3, () => 0), 200);
  assert.equal(backoffDelay(SETTINGS, 3, () => 0.5), 300);
  for (let index = 0; index < 1000; index += 1) {
    const delay = backoffDelay(SETTINGS, 10);
    assert.ok(delay >= 2500 && delay <= 5000, `${delay} outside [2500, 5000]`);
  }
});
