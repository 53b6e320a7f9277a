// js-candles with its open candles as JSON objects: state version 0, the
// earlier build. `npm run build` builds it as `js_candles_json_state.wasm`,
// for the test of a hot swap that migrates the state to version 1.
import { state } from "sluice-plugin";
import Candles from "./candles.js";

export default class JsonStateCandles extends Candles {
  static STATE_VERSION = 0;
  static MIGRATES_FROM = [];

  load(key) {
    return state.getJSON(key);
  }

  store(key, c) {
    state.putJSON(key, c);
  }
}
