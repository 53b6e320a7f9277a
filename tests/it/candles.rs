//! 1-minute OHLC candles: the flattener and the `candles` plugin make one
//! partial candle per trade, and the PostgreSQL sink's aggregating upsert
//! combines them per (symbol, minute), in the transaction that stores the
//! source offsets. The stored candles equal those computed from the feed
//! directly, through replays, several partitions and kill -9s.

use crate::common;

use common::services::*;
use common::trades::*;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// `(open, high, low, close, volume, trades, first_ts, last_ts)` of a candle.
type Candle = (f64, f64, f64, f64, f64, i64, i64, i64);

/// The candles of `frames`, by (symbol, minute start in ms), computed here
/// from the trades the flattener makes of them: open and close are the
/// prices of the first and last trade by time (ties: the smallest open,
/// the largest close).
fn expected_candles(frames: &[Vec<u8>]) -> BTreeMap<(String, i64), Candle> {
    let mut candles: BTreeMap<(String, i64), Candle> = BTreeMap::new();
    for frame in frames {
        let Ok(trades) = trade_flattener::flatten(frame) else { continue };
        for trade in trades {
            let v: serde_json::Value = serde_json::from_slice(&trade.value).unwrap();
            let (symbol, price, volume, ts) = (
                v["symbol"].as_str().unwrap().to_string(),
                v["price"].as_f64().unwrap(),
                v["volume"].as_f64().unwrap(),
                v["ts"].as_i64().unwrap(),
            );
            let bucket = ts - ts.rem_euclid(60_000);
            let c = candles.entry((symbol, bucket)).or_insert((price, price, price, price, 0.0, 0, ts, ts));
            if ts < c.6 || (ts == c.6 && price < c.0) {
                c.0 = price;
            }
            if ts > c.7 || (ts == c.7 && price > c.3) {
                c.3 = price;
            }
            c.1 = c.1.max(price);
            c.2 = c.2.min(price);
            c.4 += volume;
            c.5 += 1;
            c.6 = c.6.min(ts);
            c.7 = c.7.max(ts);
        }
    }
    candles
}

async fn stored_candles(client: &tokio_postgres::Client, table: &str) -> BTreeMap<(String, i64), Candle> {
    let ms = |col: &str| format!("(extract(epoch from {col}) * 1000)::bigint");
    let rows = client
        .query(
            &format!(
                "SELECT symbol, {}, open, high, low, close, volume, trades, {}, {} FROM {table}",
                ms("bucket"),
                ms("first_ts"),
                ms("last_ts")
            ),
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8), r.get(9)))
        })
        .collect()
}

/// The stored candles equal `want`: exactly, but for the volume (a sum of
/// doubles in another order), to 1e-9 relative.
fn assert_candles(stored: &BTreeMap<(String, i64), Candle>, want: &BTreeMap<(String, i64), Candle>) {
    assert_eq!(stored.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "one candle per symbol and minute");
    for (key, s) in stored {
        let w = &want[key];
        let exact = |c: &Candle| (c.0, c.1, c.2, c.3, c.5, c.6, c.7);
        assert_eq!(exact(s), exact(w), "candle {key:?}: (open, high, low, close, trades, first_ts, last_ts)");
        assert!((s.4 - w.4).abs() <= 1e-9 * w.4.abs().max(1.0), "candle {key:?}: volume {} vs {}", s.4, w.4);
    }
}

/// The candles pipeline over `source` (a `[source]` table) into `table`.
fn candles_pipeline(source: &str, table: &str, dead_letter: &str) -> String {
    format!(
        r#"
name = "candles"
{source}
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{candles}"
[sinks.pg]
type = "postgres"
url = "{PG_URL}"
table = "{table}"
create_table = true
upsert_key = ["symbol", "bucket"]
columns = [
  {{ name = "symbol", type = "text" }},
  {{ name = "bucket", type = "timestamptz" }},
  {{ name = "open", type = "double precision", merge = "first", by = "first_ts" }},
  {{ name = "high", type = "double precision", merge = "max" }},
  {{ name = "low", type = "double precision", merge = "min" }},
  {{ name = "close", type = "double precision", merge = "last", by = "last_ts" }},
  {{ name = "volume", type = "double precision", merge = "sum" }},
  {{ name = "trades", type = "bigint", merge = "sum" }},
  {{ name = "first_ts", type = "timestamptz", merge = "min" }},
  {{ name = "last_ts", type = "timestamptz", merge = "max" }},
]
{dead_letter}
"#,
        flattener = common::plugin_path("trade_flattener").display(),
        candles = common::plugin_path("candles").display(),
    )
}

async fn trades_in(client: &tokio_postgres::Client, table: &str) -> i64 {
    match client.query_one(&format!("SELECT coalesce(sum(trades), 0)::bigint FROM {table}"), &[]).await {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candles_from_a_replayed_capture_equal_those_computed_from_the_feed_and_a_replay_changes_none() {
    let pg = PgSchema::create("candles_replay").await;
    let table = format!("{}.candles", pg.name);
    let frames = generated(3_000, 61);
    let want = expected_candles(&frames);
    let trades: i64 = want.values().map(|c| c.5).sum();
    let dir = tempfile::tempdir().unwrap();
    // Two capture files, read in name order, and small batches: a candle's
    // partials meet across batches and files.
    let (a, b) = frames.split_at(1_700);
    for (name, part) in [("1.jsonl", a), ("2.jsonl", b)] {
        let text: Vec<u8> = part.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let source = "[source]\ntype = \"file\"\npath = \"*.jsonl\"\nbatch_max_records = 97";
    let file =
        write_pipeline(dir.path(), "candles", &candles_pipeline(source, &table, "[dead_letter]\ntype = \"stdout\""));
    for replay in 1..=2 {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--cache-dir")
            .arg(common::test_cache_dir())
            .args(["run", "--admin-addr", "off", "--until-eof"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "replay {replay}: {status}");
        assert_eq!(trades_in(&pg.client, &table).await, trades, "replay {replay}: every trade counted once");
        assert_candles(&stored_candles(&pg.client, &table).await, &want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candles_over_two_partitions_stay_exact_through_kill_9s() {
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    broker.create_topic("candles_dlq", 1).await;
    let pg = PgSchema::create("candles_kill").await;
    let table = format!("{}.candles", pg.name);
    let frames = generated(12_000, 62);
    let want = expected_candles(&frames);
    let trades: i64 = want.values().map(|c| c.5).sum();

    let source = r#"[source]
type = "kafka"
brokers = "${SLUICE_BROKERS}"
topics = ["trades_raw"]
group = "g-candles"
instance_id = "candles-a"
batch_max_records = 300"#;
    let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"candles_dlq\"";
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "candles", &candles_pipeline(source, &table, dead_letter));
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 1_000, Duration::from_millis(600));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let mut sluice =
        kill_9_while_progressing(sluice, &[&file], &broker.addr, 3, 7, || trades_in(&pg.client, &table)).await;
    let ends = feed.await.unwrap();
    let all = wait_until(WAIT, || async { trades_in(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades counted: {} of {trades}", trades_in(&pg.client, &table).await);
    let offsets = format!("{}.sluice_offsets", pg.name);
    assert!(wait_committed(&pg.client, &offsets, ("candles", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(sluice.stop(), Some(0));
    assert_eq!(trades_in(&pg.client, &table).await, trades, "every trade counted exactly once");
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
}
