// Native unit tests of js-router: `npm test` (node --test; build.sh runs them).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Config, Record, exportTransform } from "sluice-plugin";
import Router from "./router.js";

const trade = (symbol) => new Record({ value: JSON.stringify({ symbol, price: 1, volume: 2 }), key: symbol, timestamp: 7n });
const route = (config, symbol) => new Router(new Config(Object.entries(config))).process(trade(symbol)).route;

test("routes by the exchange prefix in lower case", () => {
  assert.equal(route({}, "BINANCE:BTCUSDT"), "binance");
  assert.equal(route({}, "COINBASE:ETH-USD"), "coinbase");
  assert.equal(route({}, "AAPL"), undefined);
});

test("explicit routes and a fallback", () => {
  const config = { routes: "BINANCE=bn, COINBASE=cb", fallback: "rest" };
  assert.equal(route(config, "BINANCE:BTCUSDT"), "bn");
  assert.equal(route(config, "KRAKEN:XBTUSD"), "rest");
  assert.equal(route(config, "AAPL"), "rest");
  assert.equal(route({ routes: "BINANCE=bn" }, "KRAKEN:XBTUSD"), undefined);
});

test("keeps value, key and timestamp", () => {
  const input = trade("BINANCE:BTCUSDT");
  const out = new Router(new Config()).process(input);
  assert.equal(out.value, input.value);
  assert.deepEqual([out.key, out.timestamp], [input.key, 7n]);
});

test("rejects bad config", () => {
  assert.throws(() => new Router(new Config([["routes", "BINANCE"]])), /is not EXCHANGE=SINK/);
  assert.throws(() => new Router(new Config([["rutes", "x"]])), /unknown config key\(s\): rutes/);
});

test("a record that is not a trade fails alone, through the component glue", () => {
  const glue = exportTransform(Router);
  glue.init([]);
  const origin = { topic: "t", partition: 0, offset: 1n };
  const results = glue.processBatch([
    { value: new TextEncoder().encode("{oops"), headers: [], origin },
    { value: new TextEncoder().encode('{"symbol":"BINANCE:X"}'), headers: [], origin },
  ]);
  assert.equal(results[0].tag, "err");
  assert.equal(results[1].tag, "ok");
  assert.equal(results[1].val[0].route, "binance");
  assert.throws(() => glue.init([["nope", "1"]]), /unknown config key/);
});
