// The component's entry point: wires the Candles class to wit/0.3 (contract
// 0.3, keyed state), with its state version (world versioned-transformer).
import { log } from "sluice:transform/log@0.3.0";
import * as state from "sluice:transform/state@0.3.0";
import { exportSchema, exportTransform } from "sluice-plugin";
import Candles from "./candles.js";

export const batch = exportTransform(Candles, log, state);
export const schema = exportSchema(Candles);
