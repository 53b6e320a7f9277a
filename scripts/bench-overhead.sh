#!/usr/bin/env bash
# What the pipeline machinery costs around the plugins, in CPU seconds (user +
# system of the `sluice` process; PostgreSQL's are not counted), on one
# generated capture read by the `file` source under `--until-eof`:
#   plugin-test  `sluice plugin test` of the flattener over the capture (the
#                plugin's own cost, no pipeline);
#   stdout       file → flattener → stdout sink;
#   candles      file → flattener → ohlc-candles → PostgreSQL, exactly once.
# The three run alternately RUNS times; the script prints each run, then the
# median and the range per job, CPU per trade, and stdout / plugin-test.
#
# Environment: FRAMES (default 200000), RUNS (default 5), PG_URL (default the
# local server), SLUICE (a sluice binary; default: the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${FRAMES:-200000}
runs=${RUNS:-5}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
scripts/build-plugins.sh >/dev/null
if [ -z "${SLUICE:-}" ]; then
  cargo build --release --locked -p sluice
  SLUICE=target/release/sluice
fi
work=$(mktemp -d)
schema="bench_overhead_$$"
trap 'psql -q "$pg_url" -c "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null; rm -rf "$work"' EXIT
plugins=$PWD/target/wasm32-wasip2/release
"$SLUICE" feed --count "$frames" --ping-every 0 > "$work/feed.jsonl"
trades=$(grep -o '"s":' "$work/feed.jsonl" | wc -l)
echo "capture: $frames frames, $trades trades; $runs alternating runs of each job"
psql -q "$pg_url" -c "CREATE SCHEMA $schema"
cat > "$work/stdout.toml" <<TOML
name = "overhead-stdout"
[source]
type = "file"
path = "$work/feed.jsonl"
[[transforms]]
plugin = "$plugins/trade_flattener.wasm"
[sinks.out]
type = "stdout"
[dead_letter]
type = "stdout"
TOML
scripts/candles-from-file.sh overhead-candles "$work/feed.jsonl" "$pg_url" "$schema.candles" > "$work/candles.toml"
run() {
  local job=$1
  shift
  /usr/bin/time -f "$job %U %S" -a -o "$work/times" "$@" >/dev/null 2>"$work/$job.log" || {
    tail -20 "$work/$job.log" >&2
    exit 1
  }
}
"$SLUICE" --cache-dir "$work/cache" check "$work/stdout.toml" "$work/candles.toml" >/dev/null
for _ in $(seq "$runs"); do
  run plugin-test "$SLUICE" --cache-dir "$work/cache" plugin test "$plugins/trade_flattener.wasm" -i "$work/feed.jsonl"
  run stdout "$SLUICE" --cache-dir "$work/cache" run --admin-addr off --until-eof "$work/stdout.toml"
  psql -q "$pg_url" -c "DROP TABLE IF EXISTS $schema.candles, $schema.sluice_offsets, $schema.sluice_state"
  run candles "$SLUICE" --cache-dir "$work/cache" run --admin-addr off --until-eof "$work/candles.toml"
  counted=$(psql -tA "$pg_url" -c "SELECT sum(trades) FROM $schema.candles")
  [ "$counted" = "$trades" ] || { echo "candles count $counted trades of $trades" >&2; exit 1; }
done
python3 - "$work/times" "$trades" <<'PY'
import statistics, sys
cpu = {}
for line in open(sys.argv[1]):
    job, user, system = line.split()
    cpu.setdefault(job, []).append(float(user) + float(system))
trades = int(sys.argv[2])
for job in ("plugin-test", "stdout", "candles"):
    runs = cpu[job]
    print(f"{job:12} CPU s: median {statistics.median(runs):.2f} ({min(runs):.2f}-{max(runs):.2f}); "
          f"{statistics.median(runs) / trades * 1e6:.2f} us per trade; runs: {' '.join(f'{r:.2f}' for r in runs)}")
print(f"stdout / plugin-test (medians): {statistics.median(cpu['stdout']) / statistics.median(cpu['plugin-test']):.2f}x")
PY
