// Native unit tests of js-router: `npm test` (node --test; build.sh runs them).
import { readFileSync } from "node:fs";
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

/** The mirror of plugins/sluice-abi/tests/golden.rs. */
class GoldenMirror {
  constructor() {
    this.seen = [];
  }

  process(r) {
    this.seen.push([r.key && [...r.key], [...r.value], r.headers.map((h) => [h.name, [...h.value]]), r.timestamp, r.topic, r.partition, r.offset]);
    const value = new TextDecoder().decode(r.value);
    if (value === "fail") throw new Error("asked to fail");
    if (value === "none") return undefined;
    return [{ value: r.value, key: r.key, headers: r.headers, timestamp: r.timestamp }, { value: "second", route: "r" }];
  }
}

test("contract 0.2: the Rust codec's golden batch decodes, and the results encode byte for byte as its writer's", () => {
  const golden = new URL("../sluice-abi/golden/", import.meta.url);
  const live = {};
  const glue = exportTransform(class extends GoldenMirror {
    constructor() {
      super();
      live.mirror = this;
    }
  });
  glue.init([]);
  const out = glue.process(new Uint8Array(readFileSync(new URL("batch.bin", golden))));
  const bytes = (s) => [...new TextEncoder().encode(s)];
  assert.deepEqual(live.mirror.seen, [
    [bytes("k"), bytes("v0"), [["dup", bytes("1")], ["dup", []]], 5n, "tópic", 3, 9n],
    [undefined, [], [], undefined, "t", 0, 10n],
    [[], bytes("none"), [], -1n, "t", 0, 11n],
    [undefined, bytes("fail"), [], undefined, "t", 1, 12n],
  ]);
  assert.deepEqual(Buffer.from(out), readFileSync(new URL("results.bin", golden)));
});
