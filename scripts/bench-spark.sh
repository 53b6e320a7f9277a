#!/usr/bin/env bash
# The same 1-minute candles job in Spark Structured Streaming 3.5 and in
# Sluice, side by side on one generated capture: trades per second, and per
# core (trades / CPU seconds of the process that computes them: the Spark
# driver and its JVM; Sluice's router, whose PostgreSQL is another process).
#
# Spark: scripts/spark_candles.py (PyPI pyspark 3.5, Debian's JDK 17, local[2]),
# the capture split into files, read as a stream (`availableNow`), the
# updated candles appended to Parquet. Sluice: the capture as a `file`
# source through the flattener and ohlc-candles into PostgreSQL, exactly
# once, `sluice run --until-eof`.
#
# Environment: FRAMES (default 200000), PG_URL (default the local server).
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${FRAMES:-200000}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
spark_env=.tools/spark
if ! "$spark_env/bin/python" -c "import pyspark" 2>/dev/null; then
  python3 -m venv "$spark_env"
  "$spark_env/bin/pip" install --quiet "pyspark==3.5.3"
fi
scripts/build-plugins.sh >/dev/null
cargo build --release --locked -p sluice
sluice=target/release/sluice
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in" "$work/capture"
"$sluice" feed --count "$frames" --ping-every 0 > "$work/capture/feed.jsonl"
split -l 20000 -d "$work/capture/feed.jsonl" "$work/in/part-"
trades=$(grep -o '"s":' "$work/capture/feed.jsonl" | wc -l)
echo "capture: $frames frames, $trades trades"

cpu() { # user + system seconds of a command and its children, then its output
  /usr/bin/time -f "%U %S %e" -o "$work/time" "$@"
  read -r user sys wall < "$work/time"
  echo "cpu $(echo "$user + $sys" | bc) s, wall $wall s"
}

echo "== Spark Structured Streaming (local[2])"
"$spark_env/bin/python" scripts/spark_candles.py "$work/in" "$work/spark_out" 2 >"$work/spark.log" 2>&1
# The query's time and the JVM's CPU, as the job measures them (the JVM is
# not a child that /usr/bin/time sees).
read -r spark_counted spark_candles spark_wall spark_cpu < "$work/spark_out.result"
echo "spark: $spark_counted trades in $spark_candles candles"

schema="bench_spark_$$"
psql "$pg_url" -qc "CREATE SCHEMA $schema"
cat > "$work/candles.toml" <<TOML
name = "bench-candles"
[source]
type = "file"
path = "$work/capture/feed.jsonl"
[[transforms]]
plugin = "$PWD/target/wasm32-wasip2/release/trade_flattener.wasm"
[[transforms]]
plugin = "$PWD/target/wasm32-wasip2/release/ohlc_candles.wasm"
[transforms.event_time]
allowed_lateness_ms = 2000
$(sed -n '/^\[sinks.pg\]/,/^\]/p' pipelines/candles.toml | sed "s#^url = .*#url = \"$pg_url\"#; s#^table = .*#table = \"$schema.candles\"#")
[dead_letter]
type = "stdout"
TOML
echo "== Sluice (flattener → ohlc-candles → PostgreSQL, exactly once)"
cpu "$sluice" run --admin-addr off --until-eof "$work/candles.toml" 2>"$work/sluice.log" >/dev/null
sluice_cpu=$(awk '{print $1 + $2}' "$work/time")
sluice_wall=$(awk '{print $3}' "$work/time")
counted=$(psql "$pg_url" -tAc "SELECT sum(trades) FROM $schema.candles")
psql "$pg_url" -qc "DROP SCHEMA $schema CASCADE"
echo "sluice: $counted trades in candles"
awk -v t="$trades" -v sc="$spark_cpu" -v sw="$spark_wall" -v lc="$sluice_cpu" -v lw="$sluice_wall" 'BEGIN {
  printf "spark:  %8.0f trades/s, %8.0f trades/s per core (%.1f s wall, %.1f CPU s)\n", t / sw, t / sc, sw, sc
  printf "sluice: %8.0f trades/s, %8.0f trades/s per core (%.1f s wall, %.1f CPU s)\n", t / lw, t / lc, lw, lc
  printf "sluice / spark per core: %.1fx (goal >= 5x)\n", (t / lc) / (t / sc)
}'
