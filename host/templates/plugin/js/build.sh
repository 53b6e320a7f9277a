#!/usr/bin/env bash
# Tests {{name}} natively, builds it as a WebAssembly component ({{name}}.wasm),
# then runs its golden test.
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
# The golden test: the sample's outputs against sample.expected.jsonl (after a
# change you mean, rewrite it with --update). SLUICE names the binary if it is
# not on PATH.
sluice="${SLUICE:-sluice}"
if command -v "$sluice" >/dev/null 2>&1; then
  "$sluice" plugin test {{name}}.wasm -i sample.jsonl --expect sample.expected.jsonl
else
  echo "sluice is not on PATH: golden test skipped (sluice plugin test {{name}}.wasm -i sample.jsonl --expect sample.expected.jsonl)"
fi
