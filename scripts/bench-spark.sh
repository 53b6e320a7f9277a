#!/usr/bin/env bash
# The same 1-minute candles job in Spark 3.5 and in Sluice, side by side on
# one generated capture: trades per second, and per core (trades / CPU
# seconds of the process that computes them). Spark is measured at its best:
# hot (a warm-up run in the same JVM first), the whole capture in one
# trigger, a sink that does nothing (`noop`: Sluice's side writes its candles
# into PostgreSQL, exactly once), its CPU read from the JVM's counters
# between the start and the end of the query (start-up left out); the same
# aggregation as a Spark batch job is measured beside it. Sluice runs with its
# compile cache warm. Both sides' candles are checked equal, candle by candle.
#
# Spark: scripts/spark_candles.py (PyPI pyspark 3.5, Debian's JDK 17,
# local[2]). Sluice: the capture as a `file` source through the flattener and
# ohlc-candles into PostgreSQL, exactly once, `sluice run --until-eof` (the
# PostgreSQL server's CPU is not counted).
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

echo "== Spark 3.5 (local[2], hot: a warm-up run first, one trigger, noop sink)"
"$spark_env/bin/python" scripts/spark_candles.py "$work/in" "$work/spark" 2 >"$work/spark.log" 2>&1 || {
  tail -30 "$work/spark.log" >&2
  exit 1
}
read -r _ stream_wall stream_cpu < <(grep '^streaming ' "$work/spark.result")
read -r _ batch_wall batch_cpu < <(grep '^batch ' "$work/spark.result")

schema="bench_spark_$$"
psql "$pg_url" -qc "CREATE SCHEMA $schema"
scripts/candles-from-file.sh bench-candles "$work/capture/feed.jsonl" "$pg_url" "$schema.candles" > "$work/candles.toml"
echo "== Sluice (flattener → ohlc-candles → PostgreSQL, exactly once; compile cache warm)"
"$sluice" --cache-dir "$work/cache" check "$work/candles.toml" >/dev/null
/usr/bin/time -f "%U %S %e" -o "$work/time" \
  "$sluice" --cache-dir "$work/cache" run --admin-addr off --until-eof "$work/candles.toml" 2>"$work/sluice.log" >/dev/null
read -r user sys sluice_wall < "$work/time"
sluice_cpu=$(echo "$user + $sys" | bc)
psql "$pg_url" -tAc "COPY (SELECT symbol, (extract(epoch FROM window_start) * 1000)::bigint, open, high, low, close, volume, trades FROM $schema.candles) TO STDOUT WITH CSV" > "$work/sluice.candles.csv"
psql "$pg_url" -qc "DROP SCHEMA $schema CASCADE"
python3 - "$work/spark.candles.csv" "$work/sluice.candles.csv" "$trades" <<'PY'
import csv, sys
def read(path):
    return {(r[0], int(r[1])): (float(r[2]), float(r[3]), float(r[4]), float(r[5]), float(r[6]), int(r[7])) for r in csv.reader(open(path))}
spark, sluice, trades = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3])
assert spark.keys() == sluice.keys(), f"candles only one side has: {sorted(spark.keys() ^ sluice.keys())[:5]}"
for k in spark:
    a, b = spark[k], sluice[k]
    assert a[:4] == b[:4] and a[5] == b[5] and abs(a[4] - b[4]) <= 1e-9 * max(1.0, abs(a[4])), f"{k}: spark {a}, sluice {b}"
counted = sum(c[5] for c in sluice.values())
assert counted == trades, f"{counted} trades in the candles, {trades} in the capture"
print(f"both sides: the same {len(spark)} candles, every one of the {trades} trades counted once")
PY
awk -v t="$trades" -v sc="$stream_cpu" -v sw="$stream_wall" -v bc="$batch_cpu" -v bw="$batch_wall" -v lc="$sluice_cpu" -v lw="$sluice_wall" 'BEGIN {
  printf "spark streaming (hot, one trigger): %8.0f trades/s, %8.0f trades/s per core (%.1f s wall, %.1f CPU s)\n", t / sw, t / sc, sw, sc
  printf "spark batch (hot):                  %8.0f trades/s, %8.0f trades/s per core (%.1f s wall, %.1f CPU s)\n", t / bw, t / bc, bw, bc
  printf "sluice (whole process):             %8.0f trades/s, %8.0f trades/s per core (%.1f s wall, %.1f CPU s)\n", t / lw, t / lc, lw, lc
  printf "sluice / spark streaming per core: %.1fx; / spark batch: %.1fx (goal >= 5x)\n", (t / lc) / (t / sc), (t / lc) / (t / bc)
}'
