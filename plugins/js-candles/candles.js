// js-candles: OHLC candles per symbol over event-time windows, in
// JavaScript (the same candles as the Rust `ohlc-candles` and the Python
// `py-candles`, to show keyed state in a third language).
//
// Each flattened trade (`{"symbol","price","volume","ts"}`) is folded into
// the candle of its symbol and window, kept in the keyed state of its source
// partition; when the partition's watermark passes the window's end the
// candle is emitted with the fields of `ohlc-candles` and its state deleted.
// Ties on the timestamp go to the lowest price for the open and the highest
// for the close, so a candle does not depend on the order of arrival.
//
// Config `window_ms`: the window (default 60000). The stage needs
// `[transforms.event_time]`.
//
// State version 1 keeps an open candle as 72 bytes (open, high, low, close,
// volume, turnover as little-endian doubles; trades, first and last
// timestamp as 64-bit integers), the shape of the Rust `ohlc-candles`;
// `migrate` converts the JSON objects of version 0 (`json-state.js`, the
// earlier build), so a hot swap from it keeps the open windows.
import { state } from "sluice-plugin";

const decoder = new TextDecoder();
const FLOATS = ["open", "high", "low", "close", "volume", "turnover"];
const INTEGERS = ["trades", "first_ts", "last_ts"];

/** A candle in version 1's 72 bytes. */
export function pack(c) {
  const view = new DataView(new ArrayBuffer(72));
  FLOATS.forEach((f, i) => view.setFloat64(8 * i, c[f], true));
  INTEGERS.forEach((f, i) => view.setBigInt64(48 + 8 * i, BigInt(c[f]), true));
  return new Uint8Array(view.buffer);
}

/** Version 1's 72 bytes as a candle. */
export function unpack(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const c = {};
  FLOATS.forEach((f, i) => (c[f] = view.getFloat64(8 * i, true)));
  INTEGERS.forEach((f, i) => (c[f] = Number(view.getBigInt64(48 + 8 * i, true))));
  return c;
}

export default class Candles {
  static STATE_VERSION = 1;
  static MIGRATES_FROM = [0];

  constructor(config) {
    config.rejectUnknown("window_ms");
    this.window = config.number("window_ms", 60000);
    if (!Number.isInteger(this.window) || this.window <= 0) {
      throw new Error(`config \`window_ms\` = ${this.window}: must be a positive integer`);
    }
  }

  process(record) {
    const { symbol, price, volume, ts } = record.json();
    const start = ts - (((ts % this.window) + this.window) % this.window);
    const key = `${symbol}\0${start}`;
    const c = this.load(key) ?? {
      open: price, high: price, low: price, close: price, volume: 0, turnover: 0, trades: 0, first_ts: ts, last_ts: ts,
    };
    if (ts < c.first_ts || (ts === c.first_ts && price < c.open)) [c.first_ts, c.open] = [ts, price];
    if (ts > c.last_ts || (ts === c.last_ts && price > c.close)) [c.last_ts, c.close] = [ts, price];
    c.high = Math.max(c.high, price);
    c.low = Math.min(c.low, price);
    c.volume += volume;
    c.turnover += price * volume;
    c.trades += 1;
    this.store(key, c);
    state.setTimer(key, start + this.window);
    return null;
  }

  onTimer(timer) {
    const c = this.load(timer.key);
    if (c === undefined) return null;
    state.delete(timer.key);
    const [symbol, start] = decoder.decode(timer.key).split("\0");
    const vwap = c.volume > 0 ? c.turnover / c.volume : c.close;
    const candle = {
      symbol, window_start: Number(start), open: c.open, high: c.high, low: c.low, close: c.close,
      volume: c.volume, vwap, trades: c.trades, first_ts: c.first_ts, last_ts: c.last_ts,
    };
    return { value: JSON.stringify(candle), key: symbol, timestamp: BigInt(start) };
  }

  /** The open candle under `key`, or undefined. */
  load(key) {
    const raw = state.get(key);
    return raw === undefined ? undefined : unpack(raw);
  }

  store(key, c) {
    state.put(key, pack(c));
  }

  /** A version-0 candle (a JSON object) in this version's 72 bytes. */
  migrate(fromVersion, key, value) {
    return [key, pack(JSON.parse(decoder.decode(value)))];
  }
}
