#!/usr/bin/env bash
# The main job, on one machine: a local Kafka-protocol broker (Tansu), the local
# PostgreSQL, a generated Finnhub trade feed into Kafka topic `trades_raw`, and
# `sluice run pipelines/trades.toml` flattening it through the WASM plugin into
# table `trades`. Prints the rows per symbol as they arrive, then stops cleanly.
#
# Environment: DEMO_FRAMES (default 20000), DEMO_RATE frames/s (default 5000),
# SLUICE_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres),
# DEMO_BROKER_PORT (default 19092).
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${DEMO_FRAMES:-20000}
rate=${DEMO_RATE:-5000}
port=${DEMO_BROKER_PORT:-19092}
export SLUICE_BROKERS=127.0.0.1:$port
export SLUICE_PG_URL=${SLUICE_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}

scripts/install-tansu.sh
scripts/ensure-postgres.sh
scripts/build-plugins.sh
cargo build --release --locked -p sluice
sluice=target/release/sluice

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "== starting the broker (tansu, in memory) on $SLUICE_BROKERS" >&2
tansu broker --listener-url "tcp://$SLUICE_BROKERS" --advertised-listener-url "tcp://$SLUICE_BROKERS" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
for topic in trades_raw trades_dlq; do
  tansu topic create --broker "tcp://$SLUICE_BROKERS" --partitions 3 "$topic" >/dev/null
done

# A fresh broker starts its offsets at 0 again: start from an empty table (when
# the sink creates it, it forgets the source offsets stored with the old rows).
psql "$SLUICE_PG_URL" -qc "DROP TABLE IF EXISTS trades" 2>/dev/null
"$sluice" check pipelines/trades.toml

echo "== running sluice (log: $work/sluice.log)" >&2
"$sluice" run pipelines/trades.toml 2>"$work/sluice.log" &
sluice_pid=$!
pids+=($sluice_pid)

# One record per batch: Tansu 0.6.0 skips the rest of a batch when a consumer
# resumes in its middle (see README, "Known broker issues").
echo "== feeding $frames frames at $rate/s into trades_raw" >&2
"$sluice" feed --topic trades_raw --count "$frames" --rate "$rate" -X batch.num.messages=1 2>"$work/feed.log"
expected=$("$sluice" feed --count "$frames" | "$sluice" plugin test target/wasm32-wasip2/release/trade_flattener.wasm 2>/dev/null | wc -l)

for _ in $(seq 1 120); do
  rows=$(psql "$SLUICE_PG_URL" -tAc "SELECT count(*) FROM trades" 2>/dev/null || echo 0)
  echo "   rows in trades: $rows / $expected" >&2
  [ "$rows" -ge "$expected" ] && break
  sleep 1
done
kill -TERM "$sluice_pid"; wait "$sluice_pid" || true

echo "== rows per symbol" >&2
psql "$SLUICE_PG_URL" -c "SELECT symbol, count(*) AS trades, round(avg(price)::numeric, 2) AS avg_price, max(traded_at) AS last_trade FROM trades GROUP BY symbol ORDER BY symbol"
[ "$rows" -eq "$expected" ] && echo "every trade stored exactly once ($rows rows)" >&2
