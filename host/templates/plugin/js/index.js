// The component's entry point: wires the plugin class to wit/transform.wit.
import { log } from "sluice:transform/log@0.1.0";
import { exportTransform } from "sluice-plugin";
import Plugin from "./transform.js";

export const transform = exportTransform(Plugin, log);
