#!/usr/bin/env bash
# Python and JavaScript echo plugins built against contract 0.1 (the SDKs as
# they were at 9de304c, before 0.2) and 0.2 (the SDKs now), measured side by
# side on the same trades by `--bench languages` (section 3, BENCH_COMPARE),
# with the repository's py-enrich and js-router built both ways too.
# Output: target/bench-echo/*.wasm and the bench's tables.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-plugins.sh
root=$PWD
out=$root/target/bench-echo
rm -rf "$out" && mkdir -p "$out"
old=9de304c
bin=$root/plugins/js-router/node_modules/.bin
py=$root/.tools/python/bin/componentize-py

for contract in 01 02; do
  dir=$out/src-$contract
  mkdir -p "$dir/py" "$dir/js" "$dir/py-enrich" "$dir/js-router"
  if [ "$contract" = 01 ]; then
    wit=$root/wit/0.1 log=0.1.0 export=transform
    git show "$old:plugins/sluice-plugin-py/sluice_plugin.py" >"$dir/py/sluice_plugin.py"
    git show "$old:plugins/sluice-plugin-js/sluice-plugin.js" >"$dir/js/sluice-plugin.js"
  else
    wit=$root/wit log=0.2.0 export=batch
    cp plugins/sluice-plugin-py/sluice_plugin.py "$dir/py/"
    cp plugins/sluice-plugin-js/sluice-plugin.js "$dir/js/"
  fi
  cat >"$dir/py/app.py" <<'PY'
import sluice_plugin
from sluice_plugin import Output


class Echo:
    def __init__(self, config):
        pass

    def process(self, record):
        return Output(record.value, record.key, record.headers, record.timestamp)


Transform = sluice_plugin.export(Echo)
PY
  "$py" -d "$wit" -w transformer componentize -p "$dir/py" app -o "$out/py_echo_v$contract.wasm" >/dev/null
  cp plugins/py-enrich/app.py "$dir/py-enrich/"
  "$py" -d "$wit" -w transformer componentize -p "$dir/py-enrich" -p "$dir/py" app -o "$out/py_enrich_v$contract.wasm" >/dev/null

  cat >"$dir/js/index.js" <<JS
import { log } from "sluice:transform/log@$log";
import { exportTransform } from "./sluice-plugin.js";
class Echo {
  constructor(config) {}
  process(record) {
    return { value: record.value, key: record.key, headers: record.headers, timestamp: record.timestamp };
  }
}
export const $export = exportTransform(Echo, log);
JS
  sed 's|from "sluice-plugin"|from "../js/sluice-plugin.js"|' plugins/js-router/router.js >"$dir/js-router/router.js"
  cat >"$dir/js-router/index.js" <<JS
import { log } from "sluice:transform/log@$log";
import { exportTransform } from "../js/sluice-plugin.js";
import Router from "./router.js";
export const $export = exportTransform(Router, log);
JS
  for js in js js-router; do
    name=$([ "$js" = js ] && echo js_echo || echo js_router)
    "$bin/esbuild" "$dir/$js/index.js" --bundle --format=esm --platform=neutral --external:sluice:* --log-level=warning --outfile="$dir/$js/dist/index.js"
    "$bin/jco" componentize "$dir/$js/dist/index.js" --wit "$wit" --world-name transformer --disable all --out "$out/${name}_v$contract.wasm" >/dev/null
  done
done

list=$(printf "$out/%s.wasm," py_echo_v01 py_echo_v02 js_echo_v01 js_echo_v02 py_enrich_v01 py_enrich_v02 js_router_v01 js_router_v02)
BENCH_COMPARE=${list%,} cargo bench -p sluice --bench languages
