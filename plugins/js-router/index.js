// The component's entry point: wires the Router class to wit/transform.wit (contract 0.2).
import { log } from "sluice:transform/log@0.2.0";
import { exportTransform } from "sluice-plugin";
import Router from "./router.js";

export const batch = exportTransform(Router, log);
