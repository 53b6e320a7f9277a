#!/usr/bin/env bash
# Tests {{name}} natively, builds it as a WebAssembly component ({{name}}.wasm),
# then runs its golden test.
# Installs the wasm32-wasip2 Rust target (rustup) when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
cargo test --quiet
cargo build --quiet --release --target wasm32-wasip2
# Write aside, then rename: a running Sluice watching the file never sees half of it.
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{crate}}.wasm" .{{name}}.wasm.tmp
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
