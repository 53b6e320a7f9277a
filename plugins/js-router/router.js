// js-router: routes each flattened trade to a sink named after its exchange.
//
// Input: a flattened trade (`{"symbol":"BINANCE:BTCUSDT",...}`), as the trade
// flattener or py-enrich write it. The exchange is the symbol's prefix before
// `:`; the output is the input unchanged (key, headers and timestamp kept)
// with its route set.
//
// Config:
// * `routes` (optional): comma-separated `EXCHANGE=SINK` pairs, e.g.
//   "BINANCE=binance,COINBASE=coinbase". Without it, the route is the
//   exchange in lower case (`BINANCE:` -> `binance`).
// * `fallback` (optional): the sink for trades whose exchange is not in
//   `routes`, or that have no exchange prefix. Without it they go to the
//   pipeline's default sink.

import { log } from "sluice-plugin";

export default class Router {
  constructor(config) {
    config.rejectUnknown("routes", "fallback");
    this.routes = undefined;
    if (config.has("routes")) {
      this.routes = new Map();
      for (const pair of config.get("routes").split(",")) {
        const [exchange, sink, extra] = pair.trim().split("=");
        if (!exchange || !sink || extra !== undefined) {
          throw new Error(`config \`routes\`: ${JSON.stringify(pair)} is not EXCHANGE=SINK`);
        }
        this.routes.set(exchange.trim(), sink.trim());
      }
    }
    this.fallback = config.get("fallback") || undefined;
    log.info(this.routes
      ? `routing ${[...this.routes].map(([e, s]) => `${e}: to ${s}`).join(", ")}; others to ${this.fallback ?? "the default sink"}`
      : `routing each exchange to the sink of its name; others to ${this.fallback ?? "the default sink"}`);
  }

  process(record) {
    const trade = record.json();
    if (trade === null || typeof trade !== "object" || typeof trade.symbol !== "string") {
      throw new Error("not a flattened trade: no string `symbol`");
    }
    const colon = trade.symbol.indexOf(":");
    const exchange = colon > 0 ? trade.symbol.slice(0, colon) : undefined;
    let route = this.fallback;
    if (exchange !== undefined) {
      route = this.routes ? (this.routes.get(exchange) ?? this.fallback) : exchange.toLowerCase();
    }
    return {
      value: record.value,
      key: record.key,
      headers: record.headers,
      timestamp: record.timestamp,
      route,
    };
  }
}
