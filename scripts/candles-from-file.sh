#!/usr/bin/env bash
# Prints the benchmarks' candles pipeline: the capture FILE as a `file`
# source, through the flattener and ohlc-candles (1-minute windows), into
# PostgreSQL table TABLE at PG_URL exactly once (`pipelines/candles.toml`'s
# sink), dead letters on stdout. Used by bench-spark.sh and bench-overhead.sh.
# Usage: scripts/candles-from-file.sh NAME FILE PG_URL TABLE
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 file=$2 pg_url=$3 table=$4
cat <<TOML
name = "$name"
[source]
type = "file"
path = "$file"
[[transforms]]
plugin = "$PWD/target/wasm32-wasip2/release/trade_flattener.wasm"
[[transforms]]
plugin = "$PWD/target/wasm32-wasip2/release/ohlc_candles.wasm"
config = { window_ms = 60000 }
[transforms.event_time]
allowed_lateness_ms = 2000
$(sed -n '/^\[sinks.pg\]/,/^\]/p' pipelines/candles.toml | sed "s#^url = .*#url = \"$pg_url\"#; s#^table = .*#table = \"$table\"#")
[dead_letter]
type = "stdout"
TOML
