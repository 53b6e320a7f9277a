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
//
// Keyed state (contract 0.3): build against `wit/0.3`, pass the `state`
// import as the third argument, and use `state` in `process`:
//
//     import { log } from "sluice:transform/log@0.3.0";
//     import * as host from "sluice:transform/state@0.3.0";
//     export const batch = exportTransform(MyTransform, log, host);
//
// `state.get(key)`, `put(key, value)`, `delete(key)`, `getJSON`, `putJSON`
// and `setTimer(key, at)` work on the state of the current record's source
// partition, committed with the pipeline's rows and offsets; a class with
// `onTimer(timer)` gets each timer when its partition's watermark reaches
// it. `plugins/js-candles` is the 1-minute candles in JavaScript.
//
// State versions: a class that changes the shape of its state declares
// `static STATE_VERSION = 1` (default 0), `static MIGRATES_FROM = [0]` and
// `migrate(fromVersion, key, value)`, which returns the entry in the new
// shape (`[key, value]`), or `null` to drop it, and throws to refuse it.
// Export its schema beside the batch and build with the world
// `versioned-transformer`:
//
//     export const schema = exportSchema(MyTransform);
//
// A hot swap hands the stage's state to the new version, which converts
// each partition's entries before its first batch that holds the partition;
// a version that converts none of the state's versions is refused.

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

/** The host's state calls (contract 0.3), when the component has them. */
let hostState = undefined;

/** The batch's state cache: per partition (`topic/partition`), the record
 * index the host calls name and key -> { value, dirty }; the timers asked
 * for (each once); and what the current record changed, to undo. */
const cache = { scopes: new Map(), current: undefined, timers: new Map(), undo: [], timersBefore: [] };

/** Natively (unit tests): the store and the timers set. */
const native = { store: new Map(), timers: [] };

const keyString = (key) => String.fromCharCode(...key);

/** Keyed state of the current record's source partition (see the top of
 * this file). Keys and values are strings or Uint8Arrays; values come back
 * as Uint8Arrays. What a record that throws changed is undone. */
export const state = {
  get(key) {
    return entry(bytes(key)).value;
  },
  put(key, value) {
    set(bytes(key), bytes(value));
  },
  delete(key) {
    set(bytes(key), undefined);
  },
  getJSON(key) {
    const value = state.get(key);
    return value === undefined ? undefined : JSON.parse(decoder.decode(value));
  },
  putJSON(key, value) {
    state.put(key, JSON.stringify(value));
  },
  /** Asks for `onTimer` with `key` once the watermark of the current
   * record's partition reaches `at` (ms, a Number or BigInt). */
  setTimer(key, at) {
    const k = bytes(key), when = BigInt(at), scope = cache.current;
    if (scope === undefined) return hostState ? hostState.setTimer(0, k, when) : void native.timers.push([k, when]);
    const id = `${scope.record}:${when}:${keyString(k)}`;
    if (!cache.timers.has(id)) {
      cache.timers.set(id, [scope.record, k, when]);
      cache.timersBefore.push(id);
    }
  },
  /** The watermark of the current record's partition (ms, a BigInt), or undefined. */
  watermark() {
    return hostState ? hostState.watermark(cache.current ? cache.current.record : 0) : undefined;
  },
  /** Natively: the `[key, at]` timers set so far, taken. */
  takeTimers() {
    const timers = native.timers;
    native.timers = [];
    return timers;
  },
  /** Natively: the stored values (a Map from key strings), for tests. */
  nativeStore: native.store,
};

function entry(key) {
  const scope = cache.current;
  if (scope === undefined) return { value: read(0, key) };
  const k = keyString(key);
  let e = scope.entries.get(k);
  if (e === undefined) {
    e = { key, value: read(scope.record, key), dirty: false };
    scope.entries.set(k, e);
  }
  return e;
}

function read(record, key) {
  if (hostState) return hostState.get(record, key) ?? undefined;
  return native.store.get(keyString(key));
}

function set(key, value) {
  const scope = cache.current;
  if (scope === undefined) return store(0, key, value);
  const e = entry(key);
  cache.undo.push([e, e.value, e.dirty]);
  e.value = value;
  e.dirty = true;
}

function store(record, key, value) {
  if (hostState) {
    if (value === undefined) hostState.delete(record, key);
    else hostState.put(record, key, value);
  } else if (value === undefined) native.store.delete(keyString(key));
  else native.store.set(keyString(key), value);
}

function beginRecord(index, topic, partition) {
  const id = `${topic}/${partition}`;
  let scope = cache.scopes.get(id);
  if (scope === undefined) {
    scope = { record: index, entries: new Map() };
    cache.scopes.set(id, scope);
  }
  cache.current = scope;
  cache.undo = [];
  cache.timersBefore = [];
}

function undoRecord() {
  for (const id of cache.timersBefore) cache.timers.delete(id);
  for (let i = cache.undo.length - 1; i >= 0; i--) {
    const [e, value, dirty] = cache.undo[i];
    e.value = value;
    e.dirty = dirty;
  }
  cache.undo = [];
}

function endBatch() {
  for (const [record, key, at] of cache.timers.values()) {
    if (hostState) hostState.setTimer(record, key, at);
    else native.timers.push([key, at]);
  }
  for (const scope of cache.scopes.values()) {
    for (const e of scope.entries.values()) if (e.dirty) store(scope.record, e.key, e.value);
  }
  cache.scopes.clear();
  cache.timers.clear();
  cache.current = undefined;
  cache.undo = [];
}

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
 * function imported from `sluice:transform/log`, `stateImport` the
 * `sluice:transform/state@0.3.0` module (contract 0.3: keyed state). */
export function exportTransform(Plugin, logImport = undefined, stateImport = undefined) {
  return {
    init(entries) {
      if (logImport) hostLog = logImport;
      if (stateImport) hostState = stateImport;
      try {
        live.instance = new Plugin(new Config(entries));
      } catch (error) {
        // A thrown value becomes the `err` of `result<_, string>`.
        throw message(error);
      }
    },

    // Contract 0.2: one batch buffer in, one results buffer out.
    process(buf) {
      const instance = live.instance;
      if (instance === undefined) throw new Error("plugin used before init");
      return processBuffer(instance, buf, stateImport !== undefined || typeof instance.onTimer === "function");
    },

    // Contract 0.1: records lifted field by field.
    processBatch(batch) {
      const instance = live.instance;
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

/** The plugin instance `init` made (one per component). */
const live = { instance: undefined };

/** Contract 0.3's `schema` export for `Plugin` (world `versioned-transformer`):
 * its state version and its `migrate`. */
export function exportSchema(Plugin) {
  return {
    stateVersion() {
      // A typed array: componentize-js lowers a list<u32> from one.
      return { current: stateVersion(Plugin), migratesFrom: Uint32Array.from(migratesFrom(Plugin)) };
    },
    migrate(oldVersion, entries) {
      try {
        return migrate(Plugin, live.instance, oldVersion, entries);
      } catch (error) {
        // A thrown value becomes the `err` of `result<_, string>`.
        throw message(error);
      }
    },
  };
}

/** The state version `Plugin` keeps (`static STATE_VERSION`, default 0). */
export function stateVersion(Plugin) {
  return Plugin.STATE_VERSION ?? 0;
}

/** The state versions `Plugin` converts (`static MIGRATES_FROM`). */
export function migratesFrom(Plugin) {
  return [...(Plugin.MIGRATES_FROM ?? [])];
}

/** One partition's entries kept by `fromVersion`, in the shape of
 * `Plugin`'s state version: each through `instance.migrate`. */
export function migrate(Plugin, instance, fromVersion, entries) {
  if (!migratesFrom(Plugin).includes(fromVersion)) {
    throw new Error(`no migrate from state version ${fromVersion} (this build keeps version ${stateVersion(Plugin)})`);
  }
  if (instance === undefined) throw new Error("plugin used before init");
  const out = [];
  for (const [key, value] of entries) {
    const entry = instance.migrate(fromVersion, bytes(key), bytes(value));
    if (entry !== null && entry !== undefined) out.push([bytes(entry[0]), bytes(entry[1])]);
  }
  return out;
}

// Contract 0.2's layouts (wit/transform.wit): little-endian tables of fixed
// entries, byte ranges as (offset, length) from the start of the buffer.
const BATCH_MAGIC = 0x32424c53;
const RESULTS_MAGIC = 0x324f4c53;

/** A typed array filled from the front that doubles when full: the results
 * buffer (bytes, after its 32-byte header) and its tables (u32 words). */
class Growable {
  constructor(Type, capacity, len = 0) {
    this.array = new Type(Math.max(capacity, len, 16));
    this.len = len;
  }

  reserve(n) {
    if (this.len + n <= this.array.length) return;
    const grown = new this.array.constructor(Math.max(this.array.length * 2, this.len + n));
    grown.set(this.array.subarray(0, this.len));
    this.array = grown;
  }

  /** Appends `data`; returns where it starts. */
  put(data) {
    this.reserve(data.length);
    this.array.set(data, this.len);
    const at = this.len;
    this.len += data.length;
    return at;
  }

  /** The filled part as bytes (WebAssembly and typed arrays are little-endian). */
  bytes() {
    return new Uint8Array(this.array.buffer, 0, this.len * this.array.BYTES_PER_ELEMENT);
  }
}

// The tables are read and written as Uint32Arrays (copied once, so aligned):
// in an interpreter, an element access costs much less than a DataView call.
function processBuffer(instance, buf, stateful = false) {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const u32 = (at) => view.getUint32(at, true);
  if (u32(0) !== BATCH_MAGIC) throw new Error("malformed batch from the host");
  const count = u32(4), topicCount = u32(8), headerCount = u32(12), recordsAt = u32(16), topicsAt = u32(20), headersAt = u32(24);
  const table = (at, words) => new Uint32Array(buf.slice(at, at + 4 * words).buffer);
  const records = table(recordsAt, 14 * count);
  const inHeaders = headerCount === 0 ? null : table(headersAt, 4 * headerCount);
  const topicTable = table(topicsAt, 2 * topicCount);
  const topics = new Array(topicCount);
  for (let t = 0; t < topicCount; t++) topics[t] = decoder.decode(buf.subarray(topicTable[2 * t], topicTable[2 * t] + topicTable[2 * t + 1]));
  const out = new Growable(Uint8Array, buf.length * 2, 32);
  const results = new Uint32Array(3 * count);
  const outputs = new Growable(Uint32Array, 12 * count);
  const headers = new Growable(Uint32Array, 0);
  for (let i = 0; i < count; i++) {
    const r = 14 * i;
    const flags = records[r], first = records[r + 3], n = records[r + 4];
    const record = Object.create(Record.prototype);
    const valueAt = records[r + 12];
    record.value = buf.subarray(valueAt, valueAt + records[r + 13]);
    record.key = flags & 1 ? buf.subarray(records[r + 10], records[r + 10] + records[r + 11]) : undefined;
    const recordHeaders = n === 0 ? [] : new Array(n);
    for (let h = 0; h < n; h++) {
      const e = 4 * (first + h);
      recordHeaders[h] = {
        name: decoder.decode(buf.subarray(inHeaders[e], inHeaders[e] + inHeaders[e + 1])),
        value: buf.subarray(inHeaders[e + 2], inHeaders[e + 2] + inHeaders[e + 3]),
      };
    }
    record.headers = recordHeaders;
    record.timestamp = flags & 2 ? view.getBigInt64(recordsAt + 56 * i + 32, true) : undefined;
    record.topic = topics[records[r + 1]];
    record.partition = records[r + 2] | 0;
    record.offset = view.getBigInt64(recordsAt + 56 * i + 24, true);
    const mark = out.len, outputsMark = outputs.len, headersMark = headers.len;
    if (stateful) beginRecord(i, record.topic, record.partition);
    try {
      const result = stateful && record.offset < 0n
        // A fired timer (contract 0.3).
        ? (instance.onTimer ? instance.onTimer({ key: record.key ?? new Uint8Array(), at: record.timestamp ?? 0n, topic: record.topic, partition: record.partition }) : undefined)
        : instance.process(record);
      if (result === null || result === undefined) {
        // no outputs: results[3 * i .. 3 * i + 2] stay 0
      } else if (!Array.isArray(result)) {
        write(out, result, outputs, headers);
        results[3 * i + 1] = 1;
      } else {
        for (let o = 0; o < result.length; o++) write(out, result[o], outputs, headers);
        results[3 * i + 1] = (outputs.len - outputsMark) / 12;
      }
    } catch (error) {
      if (stateful) undoRecord();
      out.len = mark;
      outputs.len = outputsMark;
      headers.len = headersMark;
      const text = encoder.encode(message(error));
      results[3 * i] = 1;
      results[3 * i + 1] = out.put(text);
      results[3 * i + 2] = text.length;
    }
  }
  if (stateful) endBatch();
  const resultsAt = out.put(new Uint8Array(results.buffer));
  const outputsAt = out.put(outputs.bytes());
  const tablesAt = out.put(headers.bytes());
  const header = new DataView(out.array.buffer);
  const fields = [RESULTS_MAGIC, count, outputs.len / 12, headers.len / 4, resultsAt, outputsAt, tablesAt, 0];
  for (let f = 0; f < 8; f++) header.setUint32(4 * f, fields[f], true);
  return out.bytes();
}

/** Appends one output to the results being built. */
function write(out, output, outputs, headers) {
  if (output === null || typeof output !== "object" || output.value === undefined) {
    throw new Error("an output must be an object with a `value`");
  }
  outputs.reserve(12);
  const e = outputs.len, w = outputs.array;
  w.fill(0, e, e + 12);
  let flags = 0;
  if (output.key !== undefined && output.key !== null) {
    const key = bytes(output.key);
    w[e + 6] = out.put(key);
    w[e + 7] = key.length;
    flags |= 1;
  }
  if (output.timestamp !== undefined && output.timestamp !== null) {
    const timestamp = BigInt.asUintN(64, BigInt(output.timestamp));
    w[e + 4] = Number(timestamp & 0xffffffffn);
    w[e + 5] = Number(timestamp >> 32n);
    flags |= 2;
  }
  if (output.route !== undefined && output.route !== null) {
    const route = encoder.encode(output.route);
    w[e + 10] = out.put(route);
    w[e + 11] = route.length;
    flags |= 4;
  }
  const list = output.headers;
  const count = list === undefined || list === null ? 0 : list.length;
  w[e + 1] = headers.len / 4;
  w[e + 2] = count;
  for (let h = 0; h < count; h++) {
    const name = encoder.encode(list[h].name), value = bytes(list[h].value);
    headers.reserve(4);
    const hw = headers.array, at = headers.len;
    hw[at] = out.put(name);
    hw[at + 1] = name.length;
    hw[at + 2] = out.put(value);
    hw[at + 3] = value.length;
    headers.len += 4;
  }
  const value = bytes(output.value);
  w[e] = flags;
  w[e + 8] = out.put(value);
  w[e + 9] = value.length;
  outputs.len += 12;
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
