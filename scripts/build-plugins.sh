#!/usr/bin/env bash
# Builds every plugin under plugins/ as a WebAssembly component (wasm32-wasip2).
# Output: target/wasm32-wasip2/release/<crate>.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
# Plugins get fat LTO and one codegen unit (the host keeps the faster-building defaults).
CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  cargo build --release --target wasm32-wasip2 -p trade-flattener -p symbol-router -p chaos "$@"
