// Native unit tests of js-candles: `npm test` (node --test; build-plugins.sh runs them).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Config, Record, state } from "sluice-plugin";
import Candles from "./candles.js";

const trade = (symbol, price, volume, ts) => new Record({ value: JSON.stringify({ symbol, price, volume, ts }) });

test("a candle is emitted once when its window closes", () => {
  const plugin = new Candles(new Config([["window_ms", "60000"]]));
  for (const [price, volume, ts] of [[10, 1, 60500], [12, 1, 61000], [9, 2, 119000], [11, 1, 119000]]) {
    assert.equal(plugin.process(trade("A", price, volume, ts)), null, "nothing before the close");
  }
  const timers = state.takeTimers();
  assert.deepEqual(new Set(timers.map(([, at]) => at)), new Set([120000n]));
  const timer = { key: timers[0][0], at: 120000n };
  const out = plugin.onTimer(timer);
  const c = JSON.parse(out.value);
  assert.deepEqual([c.symbol, c.window_start, out.timestamp], ["A", 60000, 60000n]);
  assert.deepEqual([c.open, c.close], [10, 11], "a tie goes to the highest close");
  assert.deepEqual([c.high, c.low, c.trades], [12, 9, 4]);
  assert.ok(Math.abs(c.vwap - (10 + 12 + 18 + 11) / 5) < 1e-12);
  assert.equal(plugin.onTimer(timer), null, "a window closes once");
});

test("the config is checked", () => {
  assert.throws(() => new Candles(new Config([["window_ms", "0"]])));
  assert.throws(() => new Candles(new Config([["size", "1"]])));
});

test("a JSON candle of version 0 migrates to the same candle", async () => {
  const { migrate } = await import("sluice-plugin");
  const { default: JsonStateCandles } = await import("./json-state.js");
  const old = new JsonStateCandles(new Config([]));
  old.process(trade("A", 10, 1, 60500));
  old.process(trade("A", 12, 0.5, 61000));
  const entries = [...state.nativeStore.entries()].map(([k, v]) => [Uint8Array.from(k, (ch) => ch.charCodeAt(0)), v]);
  assert.equal(JSON.parse(new TextDecoder().decode(entries[0][1])).trades, 2, "version 0 keeps JSON");
  const current = new Candles(new Config([]));
  const migrated = migrate(Candles, current, 0, entries);
  assert.equal(migrated[0][1].length, 72, "version 1 keeps 72 bytes");
  state.nativeStore.clear();
  for (const [k, v] of migrated) state.nativeStore.set(String.fromCharCode(...k), v);
  current.process(trade("A", 9, 1, 62000));
  const c = JSON.parse(current.onTimer({ key: entries[0][0], at: 120000n }).value);
  assert.deepEqual([c.open, c.high, c.low, c.close, c.trades, c.volume], [10, 12, 9, 9, 3, 2.5]);
  assert.throws(() => migrate(Candles, current, 3, []), /no migrate from state version 3 \(this build keeps version 1\)/);
});
