//! End-to-end pipeline throughput on a real broker (Tansu, started here on a
//! free loopback port) and the local PostgreSQL: a passthrough pipeline
//! (Kafka → Kafka, no transform) beside the trade flattener into Kafka and
//! into PostgreSQL, and the two-plugin chain of
//! `pipelines/examples/btc-router.toml` (flattener, then symbol router, into
//! two Kafka topics by route), and the flattener into PostgreSQL with a
//! shadow run beside it (every batch, then one in ten), and 1-minute candles
//! two ways (the stateless partial-candle plugin into an aggregating upsert,
//! and the stateful `ohlc-candles`), over the same pre-produced feed.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench pipeline`
//! (`BENCH_FRAMES=N`, default 400,000 frames: shorter runs last under a second and vary by 2x). Needs `tansu` on PATH
//! (`scripts/install-tansu.sh`) and PostgreSQL at 127.0.0.1:5432.
//!
//! Throughput is measured between the pipeline's first and last offset commit,
//! so consumer-group join time is left out. The router's CPU (user + system of
//! this process, where the pipelines run; the broker and PostgreSQL are other
//! processes) is measured from each pipeline's start to its last commit, and
//! given per trade (the passthrough's per trade its frames carry).

/// The test kit of the integration tests: broker, PostgreSQL, plugins.
#[path = "../../tests/it/common/mod.rs"]
mod common;

use common::services::Broker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice::config::load_pipeline;
use sluice::feed::FeedGenerator;
use sluice::runtime::Runtime;
use sluice::topology::Topology;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 2;

/// Sum of the committed offsets of `group` on `topic` (= records done).
fn committed(consumer: &BaseConsumer, topic: &str) -> i64 {
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition(topic, p);
    }
    consumer
        .committed_offsets(list, Duration::from_secs(5))
        .map(|l| l.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { 0 }).sum())
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used: the router's, since
/// the pipelines run in process (the broker and PostgreSQL are others).
/// `/proc/self/stat` counts in clock ticks, 100 a second on Linux.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs the pipeline in `file` until its group has committed `records`;
/// returns records/s between its first and its last commit, and the CPU
/// seconds the process used from the pipeline's start to its end.
async fn measure(
    runtime: &Runtime,
    file: &Path,
    brokers: &str,
    group: &str,
    records: i64,
) -> anyhow::Result<(f64, f64)> {
    let pipeline = load_pipeline(file, Some(runtime)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create()?;
    let mut topology = Topology::new(runtime.clone());
    let cpu_start = cpu_seconds();
    topology.apply(vec![pipeline]).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut start) = (0, Instant::now());
    loop {
        let done = tokio::task::block_in_place(|| committed(&probe, "raw"));
        if first == 0 && done > 0 {
            (first, start) = (done, Instant::now());
        }
        if done >= records {
            let rate = (done - first) as f64 / start.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu_start;
            topology.shutdown().await;
            return Ok((rate, cpu));
        }
        anyhow::ensure!(Instant::now() < deadline, "pipeline did not finish: {done} of {records}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write pipeline");
    path
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let frames: usize = std::env::var("BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let broker = Broker::start();
    let brokers = broker.addr.clone();
    std::env::set_var("SLUICE_BROKERS", &brokers);
    for topic in ["raw", "out_pass", "out_flat", "out_btc", "out_other", "dlq"] {
        broker.create_topic(topic, PARTITIONS).await;
    }

    let mut generator = FeedGenerator::new(3);
    generator.ping_every = 0;
    let feed: Vec<_> = generator.take(frames).collect();
    let trades: usize = feed.iter().map(|f| f.trades).sum();
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "10").create()?;
    let produce_start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for f in &feed {
        pending.push_back(producer.send_result(FutureRecord::<(), _>::to("raw").payload(&f.json)).map_err(|(e, _)| e)?);
        if pending.len() > 20_000 {
            if let Some(d) = pending.pop_front() {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    println!("workload: {frames} frames, {trades} trades; produced in {:.1} s", produce_start.elapsed().as_secs_f64());

    let dir = tempfile::tempdir()?;
    let flattener =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release/trade_flattener.wasm");
    let source = |group: &str| {
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"raw\"]\ngroup = \"{group}\"\n"
        )
    };
    let kafka_sink = |topic: &str| {
        format!("[sinks.out]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"{topic}\"\n")
    };
    let dlq = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"dlq\"\n";
    let transform = format!("[[transforms]]\nplugin = \"{}\"\n", flattener.display());
    let (pg, connection) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/postgres", tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let schema = format!("bench_{}", std::process::id());
    let pg_sink = format!(
        "[sinks.out]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\ntable = \"{schema}.trades\"\ncreate_table = true\ncolumns = [\n{{ name = \"symbol\", type = \"text\" }},\n{{ name = \"price\", type = \"double precision\" }},\n{{ name = \"volume\", type = \"double precision\" }},\n{{ name = \"traded_at\", type = \"timestamptz\", field = \"ts\" }},\n{{ name = \"conditions\", type = \"text[]\" }},\n]\n"
    );
    let pass = write(dir.path(), "pass", format!("{}{}{dlq}", source("g-pass"), kafka_sink("out_pass")));
    let flat = write(dir.path(), "flat", format!("{}{transform}{}{dlq}", source("g-flat"), kafka_sink("out_flat")));
    let to_pg = write(dir.path(), "pg", format!("{}{transform}{pg_sink}{dlq}", source("g-pg")));
    // The same pipeline with the flattener built against contract 0.1, into its own table.
    let transform_v01 = transform.replace("trade_flattener.wasm", "trade_flattener_v01.wasm");
    let pg_sink_v01 = pg_sink.replace(".trades\"", ".trades_v01\"");
    let to_pg_v01 = write(dir.path(), "pg01", format!("{}{transform_v01}{pg_sink_v01}{dlq}", source("g-pg01")));
    // The flattener into PostgreSQL with a shadow run of its 0.1 build (an
    // equivalent candidate) on every batch, and on one in ten: what a
    // shadow costs the live path, on this machine's two cores.
    let shadowed = |sample: f64, table: &str, group: &str| {
        let shadow = format!(
            "[transforms.shadow]\nplugin = \"{}\"\nsample = {sample}\n",
            flattener.with_file_name("trade_flattener_v01.wasm").display()
        );
        let sink = pg_sink.replace(".trades\"", &format!(".{table}\""));
        write(dir.path(), group, format!("{}{transform}{shadow}{sink}{dlq}", source(group)))
    };
    let to_pg_shadow = shadowed(1.0, "trades_shadow", "g-shadow");
    let to_pg_shadow10 = shadowed(0.1, "trades_shadow10", "g-shadow10");

    // btc-router: the flattener, then the symbol router; BTC trades to one
    // topic by route, the rest to the default sink.
    let router = flattener.with_file_name("symbol_router.wasm");
    let chain = format!(
        "default_sink = \"other\"\n{}{transform}[[transforms]]\nplugin = \"{}\"\nconfig = {{ routes = \"BTC=btc,XBT=btc\" }}\n{}{}{dlq}",
        source("g-chain"),
        router.display(),
        kafka_sink("out_btc").replace("[sinks.out]", "[sinks.btc]"),
        kafka_sink("out_other").replace("[sinks.out]", "[sinks.other]"),
    );
    let chain = write(dir.path(), "chain", chain);

    // 1-minute candles two ways, into tables of the same shape: the
    // stateless `candles` plugin (a partial candle per trade, combined by
    // the sink's aggregating upsert) and the stateful `ohlc-candles` (keyed
    // state per partition, one partial candle per window and partition,
    // emitted when the watermark passes the window).
    let candle_sink = |table: &str, bucket: &str| {
        format!(
            "[sinks.out]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\ntable = \"{schema}.{table}\"\ncreate_table = true\nupsert_key = [\"symbol\", \"{bucket}\"]\ncolumns = [\n{{ name = \"symbol\", type = \"text\" }},\n{{ name = \"{bucket}\", type = \"timestamptz\" }},\n{{ name = \"open\", type = \"double precision\", merge = \"first\", by = \"first_ts\" }},\n{{ name = \"high\", type = \"double precision\", merge = \"max\" }},\n{{ name = \"low\", type = \"double precision\", merge = \"min\" }},\n{{ name = \"close\", type = \"double precision\", merge = \"last\", by = \"last_ts\" }},\n{{ name = \"volume\", type = \"double precision\", merge = \"sum\" }},\n{{ name = \"trades\", type = \"bigint\", merge = \"sum\" }},\n{{ name = \"first_ts\", type = \"timestamptz\", merge = \"min\" }},\n{{ name = \"last_ts\", type = \"timestamptz\", merge = \"max\" }},\n]\n"
        )
    };
    let stateless = format!(
        "{}{transform}[[transforms]]\nplugin = \"{}\"\n{}{dlq}",
        source("g-candles"),
        flattener.with_file_name("candles.wasm").display(),
        candle_sink("candles_partial", "bucket")
    );
    let stateless = write(dir.path(), "candles", stateless);
    let stateful = format!(
        "{}{transform}[[transforms]]\nplugin = \"{}\"\n[transforms.event_time]\nallowed_lateness_ms = 0\n{}{dlq}",
        source("g-ohlc"),
        flattener.with_file_name("ohlc_candles.wasm").display(),
        candle_sink("candles_state", "window_start")
    );
    let stateful = write(dir.path(), "ohlc", stateful);

    let runtime = Runtime::new(Runtime::default_cache_dir())?;
    let records = frames as i64;
    let per_trade = trades as f64 / frames as f64;
    let cpu_line = |cpu: f64| format!("router CPU {cpu:.2} s = {:.2} µs per trade", cpu * 1e6 / trades as f64);
    let (pass_rate, cpu) = measure(&runtime, &pass, &brokers, "g-pass", records).await?;
    println!("passthrough   kafka -> kafka:      {:>9.0} frames/s                      {}", pass_rate, cpu_line(cpu));
    let (flat_rate, cpu) = measure(&runtime, &flat, &brokers, "g-flat", records).await?;
    println!(
        "flatten       kafka -> kafka:      {:>9.0} frames/s = {:>9.0} trades/s  {}",
        flat_rate,
        flat_rate * per_trade,
        cpu_line(cpu)
    );
    let (pg_rate, pg_cpu) = measure(&runtime, &to_pg, &brokers, "g-pg", records).await?;
    println!(
        "flatten       kafka -> postgres:   {:>9.0} frames/s = {:>9.0} rows/s    {}",
        pg_rate,
        pg_rate * per_trade,
        cpu_line(pg_cpu)
    );
    let (pg01_rate, cpu) = measure(&runtime, &to_pg_v01, &brokers, "g-pg01", records).await?;
    println!(
        "  (0.1 build) kafka -> postgres:   {:>9.0} frames/s = {:>9.0} rows/s    {}",
        pg01_rate,
        pg01_rate * per_trade,
        cpu_line(cpu)
    );
    let (chain_rate, cpu) = measure(&runtime, &chain, &brokers, "g-chain", records).await?;
    println!(
        "flatten+route kafka -> 2 kafkas:   {:>9.0} frames/s = {:>9.0} trades/s  {}",
        chain_rate,
        chain_rate * per_trade,
        cpu_line(cpu)
    );
    println!("ratio flatten/passthrough (frames/s): {:.2} (goal >= 0.70)", flat_rate / pass_rate);
    let (shadow_rate, cpu) = measure(&runtime, &to_pg_shadow, &brokers, "g-shadow", records).await?;
    println!(
        "  + shadow (every batch):          {:>9.0} frames/s = {:>9.0} rows/s    {}",
        shadow_rate,
        shadow_rate * per_trade,
        cpu_line(cpu)
    );
    let (shadow10_rate, cpu) = measure(&runtime, &to_pg_shadow10, &brokers, "g-shadow10", records).await?;
    println!(
        "  + shadow (sample = 0.1):         {:>9.0} frames/s = {:>9.0} rows/s    {}",
        shadow10_rate,
        shadow10_rate * per_trade,
        cpu_line(cpu)
    );
    let (candles_rate, candles_cpu) = measure(&runtime, &stateless, &brokers, "g-candles", records).await?;
    println!(
        "candles (partial per trade, upsert) -> postgres: {:>9.0} frames/s = {:>9.0} trades/s  {}",
        candles_rate,
        candles_rate * per_trade,
        cpu_line(candles_cpu)
    );
    let (ohlc_rate, ohlc_cpu) = measure(&runtime, &stateful, &brokers, "g-ohlc", records).await?;
    println!(
        "ohlc-candles (keyed state) -> postgres:          {:>9.0} frames/s = {:>9.0} trades/s  {}",
        ohlc_rate,
        ohlc_rate * per_trade,
        cpu_line(ohlc_cpu)
    );
    println!(
        "ratio router CPU ohlc-candles / flatten->postgres: {:.2} (goal <= 1.30)",
        ohlc_cpu / pg_cpu.max(f64::EPSILON)
    );
    let report = &sluice::shadow::reports("g-shadow")[0];
    println!(
        "  shadow report (every batch): {} batches compared, {} skipped, {} outputs identical, {} differing, candidate CPU {:.2} s",
        report.batches_compared,
        report.batches_skipped,
        report.counts.identical,
        report.counts.differing(),
        report.cpu_seconds
    );
    for table in ["trades", "trades_v01", "trades_shadow", "trades_shadow10"] {
        let rows: i64 = pg.query_one(&format!("SELECT count(*) FROM {schema}.{table}"), &[]).await?.get(0);
        anyhow::ensure!(rows as usize == trades, "postgres {table} holds {rows} rows, expected {trades}");
    }
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    Ok(())
}
