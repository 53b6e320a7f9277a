// Native unit tests: `npm test` (build.sh runs them first).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Config, Record } from "sluice-plugin";
import Plugin from "./transform.js";

test("labels JSON objects", () => {
  const out = new Plugin(new Config([["label", "demo"]])).process(new Record({ value: '{"price":1.5}' }));
  assert.deepEqual(JSON.parse(out.value), { price: 1.5, label: "demo" });
});

test("rejects what is not an object", () => {
  assert.throws(() => new Plugin(new Config()).process(new Record({ value: "[1]" })), /expected a JSON object/);
});

test("rejects unknown config", () => {
  assert.throws(() => new Plugin(new Config([["lable", "x"]])), /unknown config key/);
});
