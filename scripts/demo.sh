#!/usr/bin/env bash
# The main job, on one machine: the whole trade stack as three pipelines in one
# `sluice run pipelines/` process. A local stand-in for Finnhub's WebSocket
# (`sluice feed --serve-websocket`) streams trades; pipelines/finnhub-ingest.toml
# puts the raw frames into Kafka topic `trades_raw` (a local Kafka-protocol
# broker, Tansu); pipelines/trades.toml flattens them through the WASM plugin
# into PostgreSQL table `trades`; pipelines/candles.toml aggregates the same
# frames into 1-minute OHLC candles (table `candles`, with keyed plugin state:
# a candle is written when its minute closes). Prints the rows per symbol and
# the last candles once every trade the stand-in sent is stored and counted
# in a closed candle, then stops cleanly.
#
# Environment: DEMO_SECONDS of live feed (default 10), DEMO_RATE frames/s
# (default 2000), SLUICE_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres),
# DEMO_BROKER_PORT (default 19092), DEMO_FEED_PORT (default 18765).
# SLUICE_BROKERS naming a Kafka that answers: the demo uses it, and neither
# installs nor starts a broker (its topics trades_raw and trades_dlq must
# exist, or the broker must create topics on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${DEMO_SECONDS:-10}
rate=${DEMO_RATE:-2000}
port=${DEMO_BROKER_PORT:-19092}
feed_port=${DEMO_FEED_PORT:-18765}
own_broker=
if [ -n "${SLUICE_BROKERS:-}" ]; then
  first=${SLUICE_BROKERS%%,*}
  if (exec 3<>"/dev/tcp/${first%:*}/${first##*:}") 2>/dev/null; then
    own_broker=1
  else
    echo "== SLUICE_BROKERS=$SLUICE_BROKERS does not answer: starting a local broker instead" >&2
  fi
fi
[ -n "$own_broker" ] || export SLUICE_BROKERS=127.0.0.1:$port
export SLUICE_PG_URL=${SLUICE_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# The stand-in plays Finnhub; with a real token, leave FINNHUB_URL unset.
export FINNHUB_URL=ws://127.0.0.1:$feed_port
export FINNHUB_TOKEN=demo-token
# Tansu holds every fetch for librdkafka's whole fetch.wait.max.ms (500 ms by
# default): pipelines/trades.toml reads this for low latency against it.
export SLUICE_FETCH_WAIT_MS=${SLUICE_FETCH_WAIT_MS:-10}

[ -n "$own_broker" ] || scripts/install-tansu.sh
scripts/ensure-postgres.sh
echo "== building the plugins (WebAssembly components; about 5 minutes the first time)" >&2
scripts/build-plugins.sh
echo "== building sluice (release; about 20 minutes on 2 cores the first time)" >&2
cargo build --release --locked -p sluice
sluice=target/release/sluice

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

if [ -n "$own_broker" ]; then
  echo "== using the broker at $SLUICE_BROKERS" >&2
else
  echo "== starting the broker (tansu, in memory) on $SLUICE_BROKERS" >&2
  tansu broker --listener-url "tcp://$SLUICE_BROKERS" --advertised-listener-url "tcp://$SLUICE_BROKERS" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  for topic in trades_raw trades_dlq; do
    tansu topic create --broker "tcp://$SLUICE_BROKERS" --partitions 3 "$topic" >/dev/null
  done
fi

# Start from empty tables (when a sink creates its table, it forgets the
# source offsets and the plugin state stored with the old rows): a fresh
# broker starts its offsets at 0 again, and on a broker of your own the
# pipelines go on from their groups' offsets there, past earlier runs' trades.
psql "$SLUICE_PG_URL" -qc "DROP TABLE IF EXISTS trades; DROP TABLE IF EXISTS candles" 2>/dev/null
"$sluice" check pipelines/

echo "== a Finnhub stand-in on $FINNHUB_URL ($rate frames/s)" >&2
"$sluice" feed --serve-websocket "127.0.0.1:$feed_port" --rate "$rate" --token "$FINNHUB_TOKEN" 2>"$work/feed.log" &
feed_pid=$!
pids+=($feed_pid)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$feed_port") 2>/dev/null && break; sleep 0.1; done

echo "== sluice run pipelines/ (finnhub-ingest: WebSocket → Kafka; trades: Kafka → flattener → PostgreSQL; candles: Kafka → flattener → ohlc-candles (keyed state) → PostgreSQL; log: $work/sluice.log)" >&2
"$sluice" run pipelines/ 2>"$work/sluice.log" &
sluice_pid=$!
pids+=($sluice_pid)

sleep "$seconds"
kill -INT "$feed_pid"; wait "$feed_pid" || true
# The stand-in says what it sent: "sent N frames (M trades) over C connections".
expected=$(sed -n 's/^sent [0-9]* frames (\([0-9]*\) trades).*/\1/p' "$work/feed.log")
echo "== the stand-in $(grep '^sent' "$work/feed.log")" >&2

# The last minute of each partition closes once the partition has been
# quiet past its idle_timeout for as long as the minute had left to run
# (at most a minute of event time; the stand-in's clock runs fast).
for _ in $(seq 1 150); do
  rows=$(psql "$SLUICE_PG_URL" -tAc "SELECT count(*) FROM trades" 2>/dev/null || echo 0)
  counted=$(psql "$SLUICE_PG_URL" -tAc "SELECT coalesce(sum(trades), 0) FROM candles" 2>/dev/null || echo 0)
  echo "   rows in trades: $rows / $expected; trades in closed candles: $counted" >&2
  [ "$rows" -ge "$expected" ] && [ "$counted" -ge "$expected" ] && break
  sleep 1
done
kill -TERM "$sluice_pid"; wait "$sluice_pid" || true

echo "== rows per symbol" >&2
psql "$SLUICE_PG_URL" -c "SELECT symbol, count(*) AS trades, round(avg(price)::numeric, 2) AS avg_price, max(traded_at) AS last_trade FROM trades GROUP BY symbol ORDER BY symbol"
echo "== the last 1-minute candles" >&2
psql "$SLUICE_PG_URL" -c "SELECT symbol, window_start, open, high, low, close, round(volume::numeric, 6) AS volume, round(vwap::numeric, 2) AS vwap, trades FROM candles ORDER BY window_start DESC, symbol LIMIT 8"
if [ "$rows" -eq "$expected" ] && [ "$counted" -eq "$expected" ]; then
  echo "every trade the feed sent stored exactly once ($rows rows), and counted once in the candles" >&2
else
  echo "MISMATCH: the feed sent $expected trades, the table holds $rows rows, the candles count $counted (log: $work/sluice.log)" >&2
  trap - EXIT
  exit 1
fi
