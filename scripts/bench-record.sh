#!/usr/bin/env bash
# What recording a stage (`sluice record`) costs the live path, in CPU
# seconds of the `sluice run` process, the recording's copies and its
# writer thread included (the `sluice record` client, which writes the
# capture file, and PostgreSQL are other processes, reported apart).
#
# The process's CPU is also split: the recording's writer thread (which
# encodes the capture: its own cost, as a shadow's candidate thread is)
# and the rest, the live path (the stage copies each call's inputs and
# outputs; a tokio worker sends the capture's bytes).
#
# The candles pipeline (file → flattener → ohlc-candles → PostgreSQL,
# exactly once) runs without --until-eof on an empty file; in the
# `record` runs, `sluice record --stage 2` is started first. Then one
# generated capture is appended to the file, and the process's CPU is
# read from /proc once it has gone quiet (the input drained). The two
# modes alternate RUNS times; the script prints each run, the medians
# and the overhead.
#
# Environment: FRAMES (default 100000), RUNS (default 3), PG_URL (default
# the local server), SLUICE (a sluice binary; default: the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${FRAMES:-100000}
runs=${RUNS:-3}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
scripts/build-plugins.sh >/dev/null
if [ -z "${SLUICE:-}" ]; then
  cargo build --release --locked -p sluice
  SLUICE=target/release/sluice
fi
work=$(mktemp -d)
schema="bench_record_$$"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; psql -q "$pg_url" -c "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null; rm -rf "$work"' EXIT
"$SLUICE" feed --count "$frames" --ping-every 0 > "$work/feed.jsonl"
trades=$(grep -o '"s":' "$work/feed.jsonl" | wc -l)
echo "capture: $frames frames, $trades trades; $runs alternating runs without and with a recording of stage 2"
psql -q "$pg_url" -c "CREATE SCHEMA $schema"
scripts/candles-from-file.sh bench-record "$work/input.jsonl" "$pg_url" "$schema.candles" > "$work/candles.toml"
: > "$work/input.jsonl"
"$SLUICE" --cache-dir "$work/cache" check "$work/candles.toml" >/dev/null
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU ticks of the process's recording writer threads (named record-…).
writer_cpu() {
  local sum=0 t
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm" 2>/dev/null)" in record-*) sum=$((sum + $(awk '{print $14 + $15}' "$t/stat"))) ;; esac
  done
  echo "$sum"
}
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {
  for _ in $(seq 600); do
    grep -q "$1" "$2" && return 0
    sleep 0.1
  done
  echo "no \"$1\" in $2" >&2
  tail -20 "$2" >&2
  exit 1
}
one() {
  local mode=$1 n=$2 addr
  psql -q "$pg_url" -c "DROP TABLE IF EXISTS $schema.candles, $schema.sluice_offsets, $schema.sluice_state"
  : > "$work/input.jsonl"
  addr=127.0.0.1:$(port)
  "$SLUICE" --cache-dir "$work/cache" run --admin-addr "$addr" "$work/candles.toml" 2> "$work/run-$mode-$n.log" &
  pid=$!
  wait_for "pipeline starting" "$work/run-$mode-$n.log"
  local recorder=""
  if [ "$mode" = record ]; then
    /usr/bin/time -f "%U %S" -o "$work/client-$n" "$SLUICE" record bench-record --stage 2 --out "$work/capture-$n" \
      --max-mib 100000 --addr "$addr" > "$work/record-$n.out" 2>&1 &
    recorder=$!
    wait_for "recording requested" "$work/run-$mode-$n.log"
  fi
  local before after last writer
  before=$(cpu "$pid")
  cat "$work/feed.jsonl" >> "$work/input.jsonl"
  # Drained: no CPU tick spent in a whole second.
  last=-1
  while true; do
    sleep 1
    after=$(cpu "$pid")
    [ "$after" = "$last" ] && break
    last=$after
  done
  writer=$(writer_cpu "$pid")
  kill -TERM "$pid"
  wait "$pid" || true
  pid=""
  local secs
  secs=$(python3 -c "print(($after - $before) / $tick)")
  echo "$mode $secs" >> "$work/times"
  [ "$mode" = record ] && echo "live $(python3 -c "print(($after - $before - $writer) / $tick)")" >> "$work/times"
  [ "$mode" = record ] && echo "writer $(python3 -c "print($writer / $tick)")" >> "$work/times"
  if [ -n "$recorder" ]; then
    wait "$recorder" || { cat "$work/record-$n.out" >&2; exit 1; }
    echo "run $n: $mode $secs CPU s; $(cat "$work/record-$n.out"); capture $(du -m "$work/capture-$n" | cut -f1) MiB; client $(cat "$work/client-$n") user/system s"
    # The capture replayed (checked exact against the live outputs): its speed.
    /usr/bin/time -f "%e %U %S" -o "$work/replay-$n" "$SLUICE" --cache-dir "$work/cache" replay "$work/capture-$n" --diff > "$work/replay-$n.out"
    python3 - "$work/capture-$n" "$work/replay-$n" "$work/replay-$n.out" <<'PY'
import os, re, sys
size = os.path.getsize(sys.argv[1])
wall, user, system = map(float, open(sys.argv[2]).read().split())
report = open(sys.argv[3]).read()
records = int(re.search(r"(\d+) input records", report).group(1))
print(f"  replay --diff: {records} records in {wall:.2f} s = {records / wall:,.0f} records/s "
      f"({(user + system) / records * 1e6:.2f} us CPU a record); no differences: {'no differences' in report}; "
      f"capture {size / records * 1000 / 1024:.0f} KiB per 1,000 records")
PY
    rm -f "$work/capture-$n"
  else
    echo "run $n: $mode $secs CPU s"
  fi
}
for n in $(seq "$runs"); do
  one plain "$n"
  one record "$n"
done
python3 - "$work/times" "$trades" <<'PY'
import statistics, sys
cpu = {}
for line in open(sys.argv[1]):
    mode, secs = line.split()
    cpu.setdefault(mode, []).append(float(secs))
trades = int(sys.argv[2])
for mode in ("plain", "record", "live", "writer"):
    runs = cpu[mode]
    print(f"{mode:7} CPU s: median {statistics.median(runs):.2f} ({min(runs):.2f}-{max(runs):.2f}); "
          f"{statistics.median(runs) / trades * 1e6:.2f} us per trade")
plain = statistics.median(cpu['plain'])
print(f"recording's cost, the whole process (medians): {statistics.median(cpu['record']) / plain * 100 - 100:+.1f}%")
print(f"recording's cost to the live path, the writer thread left out (medians): {statistics.median(cpu['live']) / plain * 100 - 100:+.1f}%")
PY
