// sluice-plugin: write a Sluice transform in JavaScript as one plain class.
//
// A Sluice transform is a WebAssembly component implementing
// `wit/transform.wit` (contract 0.2: a batch crosses the sandbox as one
// buffer each way). This module hides that contract, as the Rust SDK
// (`plugins/sluice-plugin`) does: write a class with
//
// * `constructor(config)` -- validate the plugin's `config` table from the
//   pipeline file (a `Config`); throw to reject it (the pipeline, or the hot
//   reload, is refused with your message);
// * `process(record)` -- return the outputs of one `Record`: an array of
//   outputs, one output, or `null`/`undefined` for none. An output is
//   `{ value, key?, headers?, timestamp?, route? }` (value and key as string
//   or Uint8Array). Throw to send the record to the dead-letter destination
//   with your message; the pipeline goes on.
//
// and wire it to the component in the entry module (`index.js`):
//
//     import { log } from "sluice:transform/log@0.2.0";
//     import { exportTransform } from "./sluice-plugin.js";
//     import MyTransform from "./transform.js";
//     export const batch = exportTransform(MyTransform, log);
//
// (The same object also serves contract 0.1's `transform` export, for a
// component built from `wit/0.1`: `export const transform = ...`.)
//
// Build with `componentize-js --wit wit -n transformer -o app.wasm index.js`
// (`build.sh` does it). The class and this module import nothing from the
// component, so `node --test` tests them natively.

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** One input record. `value` and `key` are bytes; `text()` decodes the value. */
export class Record {
  constructor({ value, key = undefined, headers = [], timestamp = undefined, topic = "", partition = 0, offset = 0n }) {
    this.value = bytes(value);
    this.key = key === undefined ? undefined : bytes(key);
    /** `[{ name, value: Uint8Array }]`, in order; names may repeat. */
    this.headers = headers;
    /** Milliseconds since the Unix epoch (a BigInt), if the source had one. */
    this.timestamp = timestamp;
    /** Where the record was read from. */
    this.topic = topic;
    this.partition = partition;
    this.offset = offset;
  }

  /** The value decoded as UTF-8. */
  text() {
    return decoder.decode(this.value);
  }

  /** The value parsed as JSON. */
  json() {
    return JSON.parse(this.text());
  }
}

/** The plugin's `config` table. Values arrive as strings (TOML numbers and
 * booleans are written out; arrays and tables arrive as JSON). */
export class Config extends Map {
  /** `parse(this.get(key))`, with a message naming the key when `parse`
   * throws; `fallback` when the key is absent. */
  parse(key, parse, fallback = undefined) {
    if (!this.has(key)) return fallback;
    const raw = this.get(key);
    try {
      return parse(raw);
    } catch (error) {
      throw new Error(`config \`${key}\` = ${JSON.stringify(raw)}: ${message(error)}`);
    }
  }

  /** A finite number, or `fallback` when the key is absent. */
  number(key, fallback = undefined) {
    return this.parse(key, (raw) => {
      const n = Number(raw);
      if (raw.trim() === "" || !Number.isFinite(n)) throw new Error("not a finite number");
      return n;
    }, fallback);
  }

  /** Rejects any key not in `known`, so that a typo in the pipeline file is
   * reported instead of silently ignored. */
  rejectUnknown(...known) {
    const unknown = [...this.keys()].filter((k) => !known.includes(k)).sort();
    if (unknown.length === 0) return;
    throw new Error(known.length
      ? `unknown config key(s): ${unknown.join(", ")} (known: ${known.join(", ")})`
      : `unknown config key(s): ${unknown.join(", ")} (this plugin takes no config)`);
  }
}

let hostLog = undefined;

/** Log lines from inside the plugin. In the sandbox they go to the host's
 * log, tagged with the pipeline and plugin; natively (unit tests) to stderr. */
export const log = {
  debug: (msg) => emit("debug", msg),
  info: (msg) => emit("info", msg),
  warn: (msg) => emit("warn", msg),
  error: (msg) => emit("error", msg),
};

function emit(level, msg) {
  if (hostLog) hostLog(level, String(msg));
  else console.error(`[${level}] ${msg}`);
}

/** Wraps `Plugin` (a class as described above) as the component's `batch`
 * export (contract 0.2; `transform` for 0.1); `logImport` is the `log`
 * function imported from `sluice:transform/log`. */
export function exportTransform(Plugin, logImport = undefined) {
  let instance = undefined;
  return {
    init(entries) {
      if (logImport) hostLog = logImport;
      try {
        instance = new Plugin(new Config(entries));
      } catch (error) {
        // A thrown value becomes the `err` of `result<_, string>`.
        throw message(error);
      }
    },

    // Contract 0.2: one batch buffer in, one results buffer out.
    process(buf) {
      if (instance === undefined) throw new Error("plugin used before init");
      return processBuffer(instance, buf);
    },

    // Contract 0.1: records lifted field by field.
    processBatch(batch) {
      if (instance === undefined) {
        return batch.map(() => ({ tag: "err", val: "plugin used before init" }));
      }
      // A plain loop and direct field copies: the engine interprets this
      // code, and every construct per record shows in the throughput.
      const results = new Array(batch.length);
      for (let i = 0; i < batch.length; i++) {
        const input = batch[i];
        const record = Object.create(Record.prototype);
        record.value = input.value;
        record.key = input.key;
        record.headers = input.headers;
        record.timestamp = input.timestamp;
        record.topic = input.origin.topic;
        record.partition = input.origin.partition;
        record.offset = input.origin.offset;
        try {
          results[i] = { tag: "ok", val: outputs(instance.process(record)) };
        } catch (error) {
          results[i] = { tag: "err", val: message(error) };
        }
      }
      return results;
    },
  };
}

// Contract 0.2's layouts (wit/transform.wit): little-endian tables of fixed
// entries, byte ranges as (offset, length) from the start of the buffer.
const BATCH_MAGIC = 0x32424c53;
const RESULTS_MAGIC = 0x324f4c53;

/** A growable byte buffer: the results being built. */
class Writer {
  constructor(capacity) {
    this.buf = new Uint8Array(Math.max(capacity, 64));
    this.len = 32;
  }

  reserve(n) {
    if (this.len + n <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    grown.set(this.buf.subarray(0, this.len));
    this.buf = grown;
  }

  /** Appends `data` (bytes); returns its offset. */
  put(data) {
    this.reserve(data.length);
    this.buf.set(data, this.len);
    const at = this.len;
    this.len += data.length;
    return at;
  }
}

function processBuffer(instance, buf) {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const u32 = (at) => view.getUint32(at, true);
  if (u32(0) !== BATCH_MAGIC) throw new Error("malformed batch from the host");
  const count = u32(4), topicCount = u32(8), recordsAt = u32(16), topicsAt = u32(20), headersAt = u32(24);
  const span = (off, len) => buf.subarray(off, off + len);
  const topics = new Array(topicCount);
  for (let t = 0; t < topicCount; t++) topics[t] = decoder.decode(span(u32(topicsAt + 8 * t), u32(topicsAt + 8 * t + 4)));
  const out = new Writer(buf.length * 2);
  const results = new Array(count);
  const outputs = [];
  const headers = [];
  for (let i = 0; i < count; i++) {
    const at = recordsAt + 56 * i;
    const flags = u32(at), first = u32(at + 12), n = u32(at + 16);
    const record = Object.create(Record.prototype);
    record.value = span(u32(at + 48), u32(at + 52));
    record.key = flags & 1 ? span(u32(at + 40), u32(at + 44)) : undefined;
    const recordHeaders = n === 0 ? [] : new Array(n);
    for (let h = 0; h < n; h++) {
      const e = headersAt + 16 * (first + h);
      recordHeaders[h] = { name: decoder.decode(span(u32(e), u32(e + 4))), value: span(u32(e + 8), u32(e + 12)) };
    }
    record.headers = recordHeaders;
    record.timestamp = flags & 2 ? view.getBigInt64(at + 32, true) : undefined;
    record.topic = topics[u32(at + 4)];
    record.partition = view.getInt32(at + 8, true);
    record.offset = view.getBigInt64(at + 24, true);
    const mark = [out.len, outputs.length, headers.length];
    try {
      const result = instance.process(record);
      if (result === null || result === undefined) {
        results[i] = [0, 0, 0];
      } else if (!Array.isArray(result)) {
        write(out, result, outputs, headers);
        results[i] = [0, 1, 0];
      } else {
        for (let o = 0; o < result.length; o++) write(out, result[o], outputs, headers);
        results[i] = [0, outputs.length - mark[1], 0];
      }
    } catch (error) {
      out.len = mark[0];
      outputs.length = mark[1];
      headers.length = mark[2];
      const text = encoder.encode(message(error));
      results[i] = [1, out.put(text), text.length];
    }
  }
  const resultsAt = out.len, outputsAt = resultsAt + 12 * count, tablesAt = outputsAt + 48 * outputs.length;
  out.reserve(tablesAt + 16 * headers.length - out.len);
  const w = new DataView(out.buf.buffer);
  for (let i = 0; i < count; i++) {
    const r = results[i];
    w.setUint32(resultsAt + 12 * i, r[0], true);
    w.setUint32(resultsAt + 12 * i + 4, r[1], true);
    w.setUint32(resultsAt + 12 * i + 8, r[2], true);
  }
  for (let o = 0; o < outputs.length; o++) {
    const e = outputs[o], at = outputsAt + 48 * o;
    w.setUint32(at, e[0], true);
    w.setUint32(at + 4, e[1], true);
    w.setUint32(at + 8, e[2], true);
    w.setUint32(at + 12, 0, true);
    w.setBigInt64(at + 16, e[3], true);
    for (let f = 0; f < 6; f++) w.setUint32(at + 24 + 4 * f, e[4 + f], true);
  }
  for (let h = 0; h < headers.length; h++) {
    for (let f = 0; f < 4; f++) w.setUint32(tablesAt + 16 * h + 4 * f, headers[h][f], true);
  }
  const header = [RESULTS_MAGIC, count, outputs.length, headers.length, resultsAt, outputsAt, tablesAt, 0];
  for (let f = 0; f < 8; f++) w.setUint32(4 * f, header[f], true);
  return out.buf.subarray(0, tablesAt + 16 * headers.length);
}

/** Appends one output to the results being built. */
function write(out, output, outputs, headers) {
  if (output === null || typeof output !== "object" || output.value === undefined) {
    throw new Error("an output must be an object with a `value`");
  }
  let flags = 0, keyAt = 0, keyLen = 0, routeAt = 0, routeLen = 0, timestamp = 0n;
  if (output.key !== undefined && output.key !== null) {
    const key = bytes(output.key);
    keyAt = out.put(key);
    keyLen = key.length;
    flags |= 1;
  }
  if (output.timestamp !== undefined && output.timestamp !== null) {
    timestamp = BigInt(output.timestamp);
    flags |= 2;
  }
  if (output.route !== undefined && output.route !== null) {
    const route = encoder.encode(output.route);
    routeAt = out.put(route);
    routeLen = route.length;
    flags |= 4;
  }
  const first = headers.length, list = output.headers;
  const count = list === undefined || list === null ? 0 : list.length;
  for (let h = 0; h < count; h++) {
    const name = encoder.encode(list[h].name), value = bytes(list[h].value);
    headers.push([out.put(name), name.length, out.put(value), value.length]);
  }
  const value = bytes(output.value);
  outputs.push([flags, first, count, timestamp, keyAt, keyLen, out.put(value), value.length, routeAt, routeLen]);
}

function outputs(result) {
  if (result === null || result === undefined) return [];
  if (!Array.isArray(result)) return [toWit(result)];
  const out = new Array(result.length);
  for (let i = 0; i < result.length; i++) out[i] = toWit(result[i]);
  return out;
}

function toWit(output) {
  if (output === null || typeof output !== "object" || output.value === undefined) {
    throw new Error("an output must be an object with a `value`");
  }
  const headers = output.headers;
  return {
    key: output.key === undefined || output.key === null ? undefined : bytes(output.key),
    value: bytes(output.value),
    headers: headers === undefined || headers === null || headers.length === 0
      ? []
      : headers.map((h) => ({ name: h.name, value: bytes(h.value) })),
    timestamp: output.timestamp === undefined || output.timestamp === null ? undefined : BigInt(output.timestamp),
    route: output.route ?? undefined,
  };
}

function bytes(value) {
  if (typeof value === "string") return encoder.encode(value);
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new Error(`expected a string or Uint8Array, got ${typeof value}`);
}

function message(error) {
  return error instanceof Error ? error.message : String(error);
}
