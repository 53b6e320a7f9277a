// The entry point of the earlier build (state version 0, JSON candles).
import { log } from "sluice:transform/log@0.3.0";
import * as state from "sluice:transform/state@0.3.0";
import { exportSchema, exportTransform } from "sluice-plugin";
import JsonStateCandles from "./json-state.js";

export const batch = exportTransform(JsonStateCandles, log, state);
export const schema = exportSchema(JsonStateCandles);
