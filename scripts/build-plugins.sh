#!/usr/bin/env bash
# Builds every plugin under plugins/ as a WebAssembly component, in its own
# language, installing the toolchains a fresh machine lacks:
#   Rust       (trade-flattener, symbol-router, candles, symbol-totals, ohlc-candles, window-stats, chaos, raw-echo): the wasm32-wasip2 target, by rustup
#   Python     (py-enrich, py-candles): componentize-py, from PyPI, in the venv .tools/python
#   JavaScript (js-router, js-candles): jco + componentize-js + esbuild, from npm (package-lock.json)
# Output: target/wasm32-wasip2/release/<name>.wasm for every plugin (contract
# 0.2), plus <name>_v01.wasm of the flattener and chaos built against contract
# 0.1 (the host serves both; the tests and `--bench flatten` compare them),
# trade_flattener_rounding.wasm (feature round-prices: a shadow candidate),
# and ohlc_candles_{json_state,no_migrate,failing}.wasm (state-version tests).
# The flattener's builds are then optimised by Binaryen's wasm-opt (below).
# Each Python/JavaScript plugin's native unit tests run before it is built.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/wasm32-wasip2/release
componentize_py_version=0.25.1
# Runs a command, showing its output only when it fails.
quietly() {
  local what=$1 log
  shift
  if ! log=$("$@" 2>&1); then
    printf '%s\n' "$log" >&2
    echo "build-plugins: $what failed" >&2
    return 1
  fi
}

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
# Plugins get fat LTO and one codegen unit (the host keeps the faster-building
# defaults), and keep their function names (the name section: a fault's reason
# says where), without debug info.
export CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_STRIP=debuginfo
for plugin in trade-flattener chaos; do
  cargo build --release --target wasm32-wasip2 -p "$plugin" --features sluice-plugin/contract-0-1 "$@"
  cp "$out/${plugin//-/_}.wasm" "$out/${plugin//-/_}_v01.wasm"
done
# The flattener that rounds prices to whole units: the shadow-run tests'
# (and the book's) candidate that computes something else.
cargo build --release --target wasm32-wasip2 -p trade-flattener --features round-prices "$@"
cp "$out/trade_flattener.wasm" "$out/trade_flattener_rounding.wasm"
cargo build --release --target wasm32-wasip2 -p trade-flattener -p symbol-router -p candles -p chaos -p raw-echo "$@"
# Stateful plugins (contract 0.3) on their own: built with the others, the
# SDK's `state` feature would be unified into every plugin of the build.
# First ohlc-candles' test builds (see its crate docs): state version 0
# (JSON), version 1 without a migrate, and a build that fails.
for feature in json-state no-migrate failing; do
  cargo build --release --target wasm32-wasip2 -p ohlc-candles --features "$feature" "$@"
  cp "$out/ohlc_candles.wasm" "$out/ohlc_candles_${feature//-/_}.wasm"
done
cargo build --release --target wasm32-wasip2 -p symbol-totals -p ohlc-candles -p window-stats "$@"

# Python: componentize-py embeds CPython and the app module into a component.
py=.tools/python
if ! "$py/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $componentize_py_version"; then
  echo "installing componentize-py $componentize_py_version from PyPI into $py" >&2
  python3 -m venv "$py"
  "$py/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$componentize_py_version"
fi
quietly "sluice-plugin-py: unit tests" env -C plugins/sluice-plugin-py python3 -m unittest
# py-candles keeps state of a declared version: it is built against contract
# 0.3 (wit/0.3), world versioned-transformer; py_candles_json_state.wasm is its
# earlier build (state version 0), for the test of a migrating hot swap.
for plugin in py-enrich py-candles; do
  wit=wit world=transformer
  [ "$plugin" = py-candles ] && wit=wit/0.3 world=versioned-transformer
  quietly "$plugin: unit tests" env -C "plugins/$plugin" PYTHONPATH=../sluice-plugin-py python3 -m unittest
  quietly "$plugin: componentize-py" "$py/bin/componentize-py" -d "$wit" -w "$world" componentize \
    -p "plugins/$plugin" -p plugins/sluice-plugin-py app -o "$out/${plugin//-/_}.wasm"
done
quietly "py-candles (json-state): componentize-py" "$py/bin/componentize-py" -d wit/0.3 -w versioned-transformer \
  componentize -p plugins/py-candles -p plugins/sluice-plugin-py app_json_state -o "$out/py_candles_json_state.wasm"

# JavaScript: esbuild bundles the plugin with its npm dependencies (the SDK
# among them), jco componentize embeds it with the StarlingMonkey engine.
for plugin in js-router js-candles; do
  dir=plugins/$plugin
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
  quietly "$plugin: unit tests" npm run --prefix "$dir" test
  quietly "$plugin: build" npm run --prefix "$dir" build
  cp "$dir"/dist/*.wasm "$out/"
done

# Binaryen's wasm-opt -O3 on the trade flattener: 8-11% less time per frame
# (scripts/bench-wasm-opt.sh measures it against the plain build, which stays
# in $out/deps). Binaryen reads core modules, not components: `jco opt` (from
# js-router's npm dependencies) optimises the component's core modules and
# puts them back. -g keeps the function names (a fault's reason says where).
# Cargo puts the plain build back at every run, so this never runs twice on one file.
for plugin in trade_flattener trade_flattener_v01; do
  quietly "$plugin: wasm-opt" plugins/js-router/node_modules/.bin/jco opt "$out/$plugin.wasm" -o "$out/$plugin.opt.wasm" --quiet -- -O3 -g
  mv "$out/$plugin.opt.wasm" "$out/$plugin.wasm"
done
