//! 1-minute OHLC candles three ways, over the same captured feed replayed
//! from a file (the `file` source: no broker, so the figures are Sluice's
//! and PostgreSQL's alone):
//!
//! 1. **trades**: flattener → one row per trade (plain binary COPY), the
//!    baseline;
//! 2. **streamed candles**: flattener → `candles` → the PostgreSQL sink's
//!    aggregating upsert (each batch aggregated per symbol and minute, then
//!    merged with the stored candles in the transaction of its offsets);
//! 3. **batch candles**: the candles computed afterwards from the trades
//!    table by one `INSERT … SELECT … GROUP BY` (what a periodic batch job
//!    does), timed alone.
//!
//! Each replay is checked: the trades table holds every trade, the two
//! candle tables are equal.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench candles`
//! (`BENCH_FRAMES=N`, default 200,000 frames). Needs PostgreSQL at 127.0.0.1:5432.

use sluice::config::load_pipeline;
use sluice::feed::FeedGenerator;
use sluice::runtime::Runtime;
use sluice::sources::RunOptions;
use sluice::topology::Topology;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Replays the pipeline in `file` to the end of its input; returns the seconds it took.
async fn replay(runtime: &Runtime, file: &Path) -> anyhow::Result<f64> {
    let pipeline = load_pipeline(file, Some(runtime)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut topology = Topology::with_options(runtime.clone(), RunOptions { until_eof: true, range: None });
    let started = Instant::now();
    topology.apply(vec![pipeline]).await?;
    while !topology.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        anyhow::ensure!(topology.reap().await == 0, "the pipeline failed");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write pipeline");
    path
}

const CANDLE_COLUMNS: &str = r#"columns = [
  { name = "symbol", type = "text" },
  { name = "bucket", type = "timestamptz" },
  { name = "open", type = "double precision", merge = "first", by = "first_ts" },
  { name = "high", type = "double precision", merge = "max" },
  { name = "low", type = "double precision", merge = "min" },
  { name = "close", type = "double precision", merge = "last", by = "last_ts" },
  { name = "volume", type = "double precision", merge = "sum" },
  { name = "trades", type = "bigint", merge = "sum" },
  { name = "first_ts", type = "timestamptz", merge = "min" },
  { name = "last_ts", type = "timestamptz", merge = "max" },
]"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let frames: usize = std::env::var("BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let dir = tempfile::tempdir()?;
    let mut generator = FeedGenerator::new(5);
    generator.ping_every = 0;
    let mut capture = std::io::BufWriter::new(std::fs::File::create(dir.path().join("capture.jsonl"))?);
    let mut trades = 0;
    for frame in generator.take(frames) {
        trades += frame.trades;
        capture.write_all(frame.json.as_bytes())?;
        capture.write_all(b"\n")?;
    }
    capture.flush()?;
    drop(capture);
    println!("workload: {frames} frames, {trades} trades, replayed from a file");

    let (pg, connection) = tokio_postgres::connect(PG, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let schema = format!("bench_candles_{}", std::process::id());
    let plugin = |name: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/wasm32-wasip2/release/{name}.wasm"))
    };
    let source = "[source]\ntype = \"file\"\npath = \"capture.jsonl\"\nformat = \"json\"\n";
    let flatten = format!("[[transforms]]\nplugin = \"{}\"\n", plugin("trade_flattener").display());
    let candles = format!("[[transforms]]\nplugin = \"{}\"\n", plugin("candles").display());
    let sink = |table: &str, rest: &str| {
        format!("[sinks.pg]\ntype = \"postgres\"\nurl = \"{PG}\"\ntable = \"{schema}.{table}\"\ncreate_table = true\n{rest}\n")
    };
    let trade_columns = "columns = [\n{ name = \"symbol\", type = \"text\" },\n{ name = \"price\", type = \"double precision\" },\n{ name = \"volume\", type = \"double precision\" },\n{ name = \"traded_at\", type = \"timestamptz\", field = \"ts\" },\n]";
    let candle_sink = format!("upsert_key = [\"symbol\", \"bucket\"]\n{CANDLE_COLUMNS}");
    let dlq = "[dead_letter]\ntype = \"stdout\"\n";
    let to_trades = write(dir.path(), "trades", format!("{source}{flatten}{}{dlq}", sink("trades", trade_columns)));
    let to_candles =
        write(dir.path(), "candles", format!("{source}{flatten}{candles}{}{dlq}", sink("candles", &candle_sink)));

    let runtime = Runtime::new(Runtime::default_cache_dir())?;
    let secs = replay(&runtime, &to_trades).await?;
    println!(
        "trades (rows):         {:>6.2} s  {:>9.0} frames/s = {:>9.0} trades/s",
        secs,
        frames as f64 / secs,
        trades as f64 / secs
    );
    let secs = replay(&runtime, &to_candles).await?;
    let count = |table: &str| format!("SELECT count(*) FROM {schema}.{table}");
    let candle_rows: i64 = pg.query_one(&count("candles"), &[]).await?.get(0);
    println!(
        "streamed candles:      {:>6.2} s  {:>9.0} frames/s = {:>9.0} trades/s  ({candle_rows} candles)",
        secs,
        frames as f64 / secs,
        trades as f64 / secs
    );
    let started = Instant::now();
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.batch_candles AS SELECT symbol, date_bin('1 minute', traded_at, 'epoch') AS bucket, \
         (array_agg(price ORDER BY traded_at ASC, price ASC))[1] AS open, max(price) AS high, min(price) AS low, \
         (array_agg(price ORDER BY traded_at DESC, price DESC))[1] AS close, sum(volume) AS volume, count(*) AS trades, \
         min(traded_at) AS first_ts, max(traded_at) AS last_ts FROM {schema}.trades GROUP BY 1, 2"
    ))
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!("batch candles (SQL):   {secs:>6.2} s  over the stored trades, after the fact");

    let rows: i64 = pg.query_one(&count("trades"), &[]).await?.get(0);
    anyhow::ensure!(rows as usize == trades, "the trades table holds {rows} rows, expected {trades}");
    let differ: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.candles c FULL JOIN {schema}.batch_candles b USING (symbol, bucket) \
                 WHERE c.open IS DISTINCT FROM b.open OR c.high IS DISTINCT FROM b.high OR c.low IS DISTINCT FROM b.low \
                 OR c.close IS DISTINCT FROM b.close OR c.trades IS DISTINCT FROM b.trades \
                 OR abs(c.volume - b.volume) > 1e-9 * greatest(abs(b.volume), 1) OR b.volume IS NULL OR c.volume IS NULL"
            ),
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(differ == 0, "{differ} streamed candles differ from the batch ones");
    println!("check: {rows} trades stored; the streamed candles equal the batch ones ({candle_rows})");
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    Ok(())
}
