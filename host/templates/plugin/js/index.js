// The component's entry point: wires the plugin class to wit/transform.wit (contract 0.2).
import { log } from "sluice:transform/log@0.2.0";
import { exportTransform } from "sluice-plugin";
import Plugin from "./transform.js";

export const batch = exportTransform(Plugin, log);
