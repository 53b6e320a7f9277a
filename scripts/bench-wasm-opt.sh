#!/usr/bin/env bash
# Measures Binaryen's wasm-opt on the trade flattener. build-plugins.sh ships
# it optimised at -O3 (the bench's "wasm 0.2" row); this compares the plain
# build (left by cargo in target/wasm32-wasip2/release/deps) and the other
# levels, side by side in one run of `--bench flatten`. Binaryen does not read
# components, so `jco opt` (npm, a build dependency of js-router) runs wasm-opt
# on the component's core modules and puts them back.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-plugins.sh
jco=$PWD/plugins/js-router/node_modules/.bin/jco
plain=$PWD/target/wasm32-wasip2/release/deps/trade_flattener.wasm
out=$PWD/target/wasm-opt
mkdir -p "$out"
list=$plain,
for level in O2 O4 Os; do
  # -g keeps the function names, as the shipped build does (a fault says where).
  "$jco" opt "$plain" -o "$out/trade_flattener_$level.wasm" --quiet -- "-$level" -g
  list+="$out/trade_flattener_$level.wasm,"
done
ls -l "$plain" target/wasm32-wasip2/release/trade_flattener.wasm "$out"/*.wasm
BENCH_COMPARE=$list cargo bench -p sluice --bench flatten
