#!/usr/bin/env bash
# The demo: builds Sluice and the trade flattener, generates a Finnhub-style
# feed and flattens it through the WebAssembly plugin, one row per trade.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-plugins.sh
cargo build --release --locked -p sluice
sluice=target/release/sluice
wasm=target/wasm32-wasip2/release/trade_flattener.wasm
frames=${DEMO_FRAMES:-20}
echo "== $frames frames of a generated Finnhub feed, through $wasm" >&2
"$sluice" feed --count "$frames" | "$sluice" plugin test "$wasm"
