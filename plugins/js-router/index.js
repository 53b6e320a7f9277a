// The component's entry point: wires the Router class to wit/transform.wit.
import { log } from "sluice:transform/log@0.1.0";
import { exportTransform } from "sluice-plugin";
import Router from "./router.js";

export const transform = exportTransform(Router, log);
