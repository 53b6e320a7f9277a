// sluice-plugin: write a Sluice transform in JavaScript as one plain class.
//
// A Sluice transform is a WebAssembly component implementing
// `wit/transform.wit`. This module hides that contract, as the Rust SDK
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
//     import { log } from "sluice:transform/log@0.1.0";
//     import { exportTransform } from "./sluice-plugin.js";
//     import MyTransform from "./transform.js";
//     export const transform = exportTransform(MyTransform, log);
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

/** Wraps `Plugin` (a class as described above) as the component's
 * `transform` export; `logImport` is the `log` function imported from
 * `sluice:transform/log@0.1.0`. Export the result as `transform`. */
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
