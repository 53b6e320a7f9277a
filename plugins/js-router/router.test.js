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

/** A batch in contract 0.2's layout (wit/transform.wit): values only, topic "t". */
function encodeBatch(values) {
  const enc = new TextEncoder();
  const bodies = values.map((v) => enc.encode(v));
  const recordsAt = 32, topicsAt = recordsAt + 56 * bodies.length, payloadAt = topicsAt + 8;
  const size = payloadAt + 1 + bodies.reduce((n, b) => n + b.length, 0);
  const buf = new Uint8Array(size), view = new DataView(buf.buffer);
  [0x32424c53, bodies.length, 1, 0, recordsAt, topicsAt, payloadAt, 0].forEach((n, i) => view.setUint32(4 * i, n, true));
  buf.set(enc.encode("t"), payloadAt);
  view.setUint32(topicsAt, payloadAt, true);
  view.setUint32(topicsAt + 4, 1, true);
  let at = payloadAt + 1;
  bodies.forEach((body, i) => {
    const e = recordsAt + 56 * i;
    view.setBigInt64(e + 24, BigInt(i), true);
    view.setUint32(e + 48, at, true);
    view.setUint32(e + 52, body.length, true);
    buf.set(body, at);
    at += body.length;
  });
  return buf;
}

test("contract 0.2: one buffer in, one buffer out, a bad record fails alone", () => {
  const glue = exportTransform(Router);
  glue.init([]);
  const out = glue.process(encodeBatch(["{oops", '{"symbol":"BINANCE:X"}']));
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const u32 = (at) => view.getUint32(at, true);
  const text = (off, len) => new TextDecoder().decode(out.subarray(off, off + len));
  assert.equal(u32(0), 0x324f4c53);
  assert.deepEqual([u32(4), u32(8)], [2, 1], "two results, one output");
  const results = u32(16), outputs = u32(20);
  assert.equal(u32(results), 1, "the first record failed");
  assert.match(text(u32(results + 4), u32(results + 8)), /JSON|Unexpected|Expected/);
  assert.deepEqual([u32(results + 12), u32(results + 16)], [0, 1]);
  assert.equal(u32(outputs) & 4, 4, "a route is present");
  assert.equal(text(u32(outputs + 40), u32(outputs + 44)), "binance");
  assert.equal(text(u32(outputs + 32), u32(outputs + 36)), '{"symbol":"BINANCE:X"}');
});
