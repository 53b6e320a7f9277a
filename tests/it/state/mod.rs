//! Keyed state (contract 0.3): the `symbol-totals` plugin keeps running
//! totals per symbol in the state of each source partition. Its changes
//! are committed with the rows and the offsets, so the totals count every
//! trade exactly once through replays and kill -9s; a put past
//! `limits.state_mib` fails the batch; a stateful stage without a sink to
//! keep its state is refused.
//!
//! The helpers (pipelines, expected totals and candles, rigs) are here;
//! the tests are split by concern.

mod event_time;
mod exactly_once;
mod limits;
mod replay;
mod versions;

use crate::common;
use common::fixture::{kafka_dead_letter, kafka_source, Fixture};
use common::services::*;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// Per symbol: (trades, volume), computed from the frames.
fn expected_totals(frames: &[Vec<u8>]) -> BTreeMap<String, (i64, f64)> {
    let mut totals: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for frame in frames {
        let Ok(trades) = trade_flattener::flatten(frame) else { continue };
        for trade in trades {
            let v: serde_json::Value = serde_json::from_slice(&trade.value).unwrap();
            let t = totals.entry(v["symbol"].as_str().unwrap().to_string()).or_default();
            t.0 += 1;
            t.1 += v["volume"].as_f64().unwrap();
        }
    }
    totals
}

/// Per symbol, the totals summed over the partitions' rows.
async fn stored_totals(client: &tokio_postgres::Client, table: &str) -> BTreeMap<String, (i64, f64)> {
    let rows = client
        .query(&format!("SELECT symbol, sum(trades)::bigint, sum(volume) FROM {table} GROUP BY symbol"), &[])
        .await
        .unwrap_or_default();
    rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()
}

async fn trades_in(client: &tokio_postgres::Client, table: &str) -> i64 {
    match client.query_one(&format!("SELECT coalesce(sum(trades), 0)::bigint FROM {table}"), &[]).await {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

fn assert_totals(stored: &BTreeMap<String, (i64, f64)>, want: &BTreeMap<String, (i64, f64)>) {
    assert_eq!(stored.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "one total per symbol");
    for (symbol, (trades, volume)) in stored {
        let (want_trades, want_volume) = want[symbol];
        assert_eq!(*trades, want_trades, "{symbol}: every trade counted exactly once");
        assert!(
            (volume - want_volume).abs() <= 1e-9 * want_volume.abs().max(1.0),
            "{symbol}: volume {volume} vs {want_volume}"
        );
    }
}

/// The totals pipeline over `source` into `table`, with `extra` after the transform.
fn totals_pipeline(source: &str, table: &str, extra: &str, dead_letter: &str) -> String {
    format!(
        r#"
name = "totals"
{source}
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{totals}"
{extra}
[sinks.pg]
type = "postgres"
url = "{PG_URL}"
table = "{table}"
create_table = true
upsert_key = ["symbol", "partition"]
columns = [
  {{ name = "symbol", type = "text" }},
  {{ name = "partition", type = "bigint" }},
  {{ name = "trades", type = "bigint" }},
  {{ name = "volume", type = "double precision" }},
  {{ name = "last_price", type = "double precision" }},
  {{ name = "last_ts", type = "timestamptz" }},
]
{dead_letter}
"#,
        flattener = common::plugin_path("trade_flattener").display(),
        totals = common::plugin_path("symbol_totals").display(),
    )
}

/// `sluice state FILE ARGS`: what it prints (it must succeed).
fn sluice_state(file: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .arg("state")
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run_until_eof(file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["run", "--admin-addr", "off", "--until-eof"])
        .arg(file)
        .output()
        .unwrap()
}

/// `(open, high, low, close, volume, vwap, trades)` of a candle.
type Candle = (f64, f64, f64, f64, f64, f64, i64);

/// The candles of `frames` by (symbol, window start), computed here: open
/// and close by time, ties to the lowest open and the highest close.
fn expected_candles(frames: &[Vec<u8>], window_ms: i64) -> BTreeMap<(String, i64), Candle> {
    // (open, high, low, close, volume, turnover, trades, first_ts, last_ts)
    type Acc = (f64, f64, f64, f64, f64, f64, i64, i64, i64);
    let mut acc: BTreeMap<(String, i64), Acc> = BTreeMap::new();
    for frame in frames {
        let Ok(trades) = trade_flattener::flatten(frame) else { continue };
        for trade in trades {
            let v: serde_json::Value = serde_json::from_slice(&trade.value).unwrap();
            let (symbol, p, vol, ts) = (
                v["symbol"].as_str().unwrap().to_string(),
                v["price"].as_f64().unwrap(),
                v["volume"].as_f64().unwrap(),
                v["ts"].as_i64().unwrap(),
            );
            let start = ts - ts.rem_euclid(window_ms);
            let c = acc.entry((symbol, start)).or_insert((p, p, p, p, 0.0, 0.0, 0, ts, ts));
            if (ts, p) < (c.7, c.0) {
                (c.7, c.0) = (ts, p);
            }
            if (ts, p) > (c.8, c.3) {
                (c.8, c.3) = (ts, p);
            }
            c.1 = c.1.max(p);
            c.2 = c.2.min(p);
            c.4 += vol;
            c.5 += p * vol;
            c.6 += 1;
        }
    }
    acc.into_iter().map(|(k, c)| (k, (c.0, c.1, c.2, c.3, c.4, c.5 / c.4, c.6))).collect()
}

async fn stored_candles(client: &tokio_postgres::Client, table: &str) -> BTreeMap<(String, i64), Candle> {
    let sql = format!(
        "SELECT symbol, (extract(epoch from window_start) * 1000)::bigint, open, high, low, close, volume, vwap, trades FROM {table}"
    );
    let rows = client.query(&sql, &[]).await.unwrap_or_default();
    rows.iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8))))
        .collect()
}

async fn candle_trades(client: &tokio_postgres::Client, table: &str) -> i64 {
    match client.query_one(&format!("SELECT coalesce(sum(trades), 0)::bigint FROM {table}"), &[]).await {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

/// Exactly, but for the sums (volume, VWAP): to 1e-9 relative.
fn assert_candles(stored: &BTreeMap<(String, i64), Candle>, want: &BTreeMap<(String, i64), Candle>) {
    assert_eq!(stored.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "one candle per symbol and window");
    for (key, s) in stored {
        let w = &want[key];
        assert_eq!(
            (s.0, s.1, s.2, s.3, s.6),
            (w.0, w.1, w.2, w.3, w.6),
            "candle {key:?}: open, high, low, close, trades"
        );
        for (what, a, b) in [("volume", s.4, w.4), ("vwap", s.5, w.5)] {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "candle {key:?}: {what} {a} vs {b}");
        }
    }
}

/// The flagship: flattener → ohlc-candles (event time) → `candles`, the
/// partitions' partial candles merged by the sink's rules.
pub(crate) fn ohlc_pipeline(
    source: &str,
    table: &str,
    event_time: &str,
    dead_letter: &str,
    extra_sinks: &str,
) -> String {
    format!(
        r#"
name = "ohlc"
{source}
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{candles}"
config = {{ window_ms = 10000 }}
[transforms.event_time]
{event_time}
[sinks.pg]
type = "postgres"
url = "{PG_URL}"
table = "{table}"
create_table = true
upsert_key = ["symbol", "window_start"]
columns = [
  {{ name = "symbol", type = "text" }},
  {{ name = "window_start", type = "timestamptz" }},
  {{ name = "open", type = "double precision", merge = "first", by = "first_ts" }},
  {{ name = "high", type = "double precision", merge = "max" }},
  {{ name = "low", type = "double precision", merge = "min" }},
  {{ name = "close", type = "double precision", merge = "last", by = "last_ts" }},
  {{ name = "volume", type = "double precision", merge = "sum" }},
  {{ name = "vwap", type = "double precision", merge = "weighted_mean", by = "volume" }},
  {{ name = "trades", type = "bigint", merge = "sum" }},
  {{ name = "first_ts", type = "timestamptz", merge = "min" }},
  {{ name = "last_ts", type = "timestamptz", merge = "max" }},
]
{extra_sinks}
{dead_letter}
"#,
        flattener = common::plugin_path("trade_flattener").display(),
        candles = common::plugin_path("ohlc_candles").display(),
    )
}

/// A Finnhub frame of one trade.
pub(crate) fn trade_frame(symbol: &str, price: f64, t: i64) -> Vec<u8> {
    format!(r#"{{"type":"trade","data":[{{"s":"{symbol}","p":{price},"t":{t},"v":1.0,"c":[]}}]}}"#).into_bytes()
}

/// `plugin` with a custom section appended: the same code, a new version
/// (another hash), as a rebuild would give.
fn rebuilt(plugin: &std::path::Path, dir: &std::path::Path, tag: &str) -> std::path::PathBuf {
    let mut bytes = std::fs::read(plugin).unwrap();
    let name = format!("sluice-test-{tag}");
    let payload_len = 1 + name.len();
    bytes.extend([0u8, payload_len as u8, name.len() as u8]);
    bytes.extend(name.as_bytes());
    let out = dir.join(format!("ohlc_candles_{tag}.wasm"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// A broker with `trades_raw` (`partitions`) and `ohlc_dlq`, a schema named
/// after `name`, its `candles` table's name, `frames` generated frames
/// (seed `seed`), the candles they make and their trades.
async fn candle_services(
    name: &str,
    partitions: i32,
    frames: usize,
    seed: u64,
) -> (Fixture, String, Vec<Vec<u8>>, BTreeMap<(String, i64), Candle>, i64) {
    let fx = Fixture::new(name, &[("trades_raw", partitions), ("ohlc_dlq", 1)]).await;
    let table = fx.table("candles");
    let frames = common::trades::generated(frames, seed);
    let want = expected_candles(&frames, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    (fx, table, frames, want, trades)
}

/// A paced feed into `trades_raw` (2 partitions) and the flagship
/// pipeline, whose candles plugin is a file of its own (`live`) to deploy
/// new builds onto, with what the candles must come out as.
struct SwapRig {
    /// The broker, the schema, and the folder of the pipeline file and the plugin builds.
    fx: Fixture,
    table: String,
    want: BTreeMap<(String, i64), Candle>,
    trades: i64,
    live: std::path::PathBuf,
    file: std::path::PathBuf,
}

impl SwapRig {
    /// `frames` generated frames (seed `seed`); the pipeline runs `build`
    /// as its candles plugin, in consumer group `g-{name}`.
    async fn new(name: &str, frames: usize, seed: u64, build: &std::path::Path) -> (SwapRig, Vec<Vec<u8>>) {
        SwapRig::with_idle(name, frames, seed, build, 3_000).await
    }

    /// [`SwapRig::new`], with the candles' `idle_timeout_ms`.
    async fn with_idle(
        name: &str,
        frames: usize,
        seed: u64,
        build: &std::path::Path,
        idle_ms: u64,
    ) -> (SwapRig, Vec<Vec<u8>>) {
        let (fx, table, frames, want, trades) = candle_services(name, 2, frames, seed).await;
        let live = fx.dir.path().join("ohlc_candles.wasm");
        std::fs::copy(build, &live).unwrap();
        let source = kafka_source(&format!("g-{name}"), "batch_max_records = 200");
        let event_time = format!("idle_timeout_ms = {idle_ms}");
        let text = ohlc_pipeline(&source, &table, &event_time, &kafka_dead_letter("ohlc_dlq"), "")
            .replace(&common::plugin_path("ohlc_candles").display().to_string(), &live.display().to_string());
        let file = fx.pipeline("ohlc", &text);
        (SwapRig { fx, table, want, trades, live, file }, frames)
    }

    fn run(&self) -> SluiceProcess {
        self.fx.run(&[&self.file])
    }

    /// Puts `build` in place of the live plugin file (a rename, as a deploy does).
    fn deploy(&self, build: &std::path::Path) {
        let aside = self.live.with_extension("incoming");
        std::fs::copy(build, &aside).unwrap();
        std::fs::rename(&aside, &self.live).unwrap();
    }

    async fn candle_trades(&self) -> i64 {
        candle_trades(&self.fx.pg.client, &self.table).await
    }

    /// Waits until the pipeline has committed the input up to `ends`.
    async fn committed(&self, ends: &Ends) -> bool {
        self.fx.committed(("ohlc", "pg"), "trades_raw", ends).await
    }

    /// The sum of the committed offsets, for [`wait_batch_committed`].
    async fn committed_sum(&self) -> i64 {
        let offsets = self.fx.offsets_table();
        committed_offsets(&self.fx.pg.client, &offsets, "ohlc", "pg", "trades_raw").await.values().sum()
    }

    /// Waits until a batch more than `before` is committed: the chain in place has run.
    async fn batch_committed(&self, before: i64) -> bool {
        wait_batch_committed(&self.fx.pg.client, &self.fx.offsets_table(), ("ohlc", "pg"), "trades_raw", before).await
    }

    /// Waits for the feed, then for every trade to be in a closed candle;
    /// stops `sluice` and checks the candles.
    async fn finish(&self, feed: tokio::task::JoinHandle<Ends>, mut sluice: SluiceProcess) -> SluiceProcess {
        let ends = feed.await.unwrap();
        let all = wait_until(WAIT, || async { self.candle_trades().await >= self.trades }).await;
        assert!(all, "trades in candles: {} of {}", self.candle_trades().await, self.trades);
        assert!(self.committed(&ends).await, "the input committed");
        assert_eq!(sluice.stop(), Some(0));
        assert_candles(&stored_candles(&self.fx.pg.client, &self.table).await, &self.want);
        assert!(self.fx.broker.consume("ohlc_dlq", 0, Duration::from_secs(2)).is_empty(), "nothing dead-lettered");
        sluice
    }
}

/// The last `partitions assigned` line of `p`'s log: how many partitions it owns.
fn owned(p: &SluiceProcess) -> Option<usize> {
    std::fs::read_to_string(&p.log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.contains("partitions assigned"))
        .map(|l| l.matches("trades_raw/").count())
}

/// The flagship pipeline for several instances in one group, over four
/// partitions, with what the candles must come out as.
struct GroupRig {
    /// The broker, the schema, and the folder of the pipeline file.
    fx: Fixture,
    table: String,
    frames: Vec<Vec<u8>>,
    want: BTreeMap<(String, i64), Candle>,
    trades: i64,
    file: std::path::PathBuf,
}

impl GroupRig {
    /// `frames` generated frames (seed `seed`), consumer group `g-{name}`,
    /// batches of at most `batch` records.
    async fn new(name: &str, frames: usize, seed: u64, batch: usize) -> GroupRig {
        let (fx, table, frames, want, trades) = candle_services(name, 4, frames, seed).await;
        let more = format!(
            "batch_max_records = {batch}\nproperties = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }}"
        );
        let source = kafka_source(&format!("g-{name}"), &more);
        let text = ohlc_pipeline(&source, &table, "idle_timeout_ms = 3000", &kafka_dead_letter("ohlc_dlq"), "");
        let file = fx.pipeline("ohlc", &text);
        GroupRig { fx, table, frames, want, trades, file }
    }
}
