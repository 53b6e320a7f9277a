#!/usr/bin/env bash
# Tests {{name}} natively, builds it as a WebAssembly component ({{name}}.wasm),
# then runs its golden test.
# Installs componentize-py from PyPI into .venv when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
version={{componentize_py_version}}
if ! .venv/bin/componentize-py --version 2>/dev/null | grep -qx "componentize-py $version"; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "componentize-py==$version"
fi
PYTHONPATH=sdk python3 -m unittest --quiet
# Write aside, then rename: a running Sluice watching the file never sees half of it.
.venv/bin/componentize-py -d wit -w transformer componentize -p . -p sdk app -o .{{name}}.wasm.tmp >/dev/null
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
