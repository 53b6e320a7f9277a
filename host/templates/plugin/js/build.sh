#!/usr/bin/env bash
# Tests {{name}} natively, then builds it as a WebAssembly component: {{name}}.wasm.
# Installs jco, componentize-js and esbuild from npm (package.json) when missing.
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules ] || npm install --no-audit --no-fund --loglevel=error
npm test --silent
npm run --silent build
# Move into place (a rename): a running Sluice watching the file never sees half of it.
cp dist/{{name}}.wasm .{{name}}.wasm.tmp
mv .{{name}}.wasm.tmp {{name}}.wasm
echo "built {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)"
