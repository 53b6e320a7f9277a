//! Latency from produce to row visible in PostgreSQL, at a steady rate,
//! beside a bare librdkafka consumer on the same broker with the same rate
//! and settings in the same run: what Sluice adds (the transform, the
//! PostgreSQL commit, the offsets) is the difference.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench latency`
//! (`BENCH_RATE` frames/s, default 2,000; `BENCH_SECONDS`, default 15;
//! `BENCH_FETCH_WAIT_MS`, librdkafka's `fetch.wait.max.ms` for both
//! consumers, default 10: Tansu holds every fetch for the whole wait, 500 ms
//! by default). Needs `tansu` on PATH and PostgreSQL at 127.0.0.1:5432.
//!
//! Each frame carries one trade whose timestamp is the time it was produced;
//! the bare consumer measures receive time − that timestamp; for Sluice a
//! poller counts the table's rows every 2 ms (one partition, so rows appear
//! in produce order) and the row n's latency is the first poll that saw n
//! rows − the n-th frame's produce time. The first 2 s of each are a warm-up
//! (connections, first fetches) and left out.

mod common;

use common::Broker;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use sluice::config::load_pipeline;
use sluice::runtime::Runtime;
use sluice::topology::Topology;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Produces `count` one-trade frames to `topic` at `rate`/s; returns each frame's produce time (ms).
async fn produce(brokers: &str, topic: &str, count: usize, rate: u64) -> anyhow::Result<Vec<f64>> {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).set("linger.ms", "0").create()?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut sent = Vec::with_capacity(count);
    let mut pending = Vec::with_capacity(count);
    for i in 0..count {
        tick.tick().await;
        let t = now_ms();
        let frame = format!(r#"{{"type":"trade","data":[{{"s":"BINANCE:BTCUSDT","p":{}.5,"t":{},"v":0.01,"c":["1"]}}]}}"#, 60_000 + i, t as i64);
        pending.push(producer.send_result(FutureRecord::<(), _>::to(topic).payload(&frame)).map_err(|(e, _)| e)?);
        sent.push(t);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(sent)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rate = env("BENCH_RATE", 2_000);
    let seconds = env("BENCH_SECONDS", 15);
    let fetch_wait = env("BENCH_FETCH_WAIT_MS", 10).to_string();
    let count = (rate * seconds) as usize;

    let broker = Broker::start()?;
    let brokers = broker.addr.clone();
    broker.create_topics(&["bare", "raw", "dlq"], 1).await?;
    println!("{rate} frames/s for {seconds} s, one trade a frame, fetch.wait.max.ms = {fetch_wait}");

    // 1. A bare librdkafka consumer.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bare")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", &fetch_wait)
        .create()?;
    consumer.subscribe(&["bare"])?;
    let received = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let got = received.clone();
    let reader = tokio::spawn(async move {
        while got.lock().map(|g| g.len()).unwrap_or(count) < count {
            if let Ok(m) = consumer.recv().await {
                let sent: f64 = m
                    .payload()
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .and_then(|s| s.split("\"t\":").nth(1)?.split(',').next()?.parse().ok())
                    .unwrap_or(f64::NAN);
                if let Ok(mut g) = got.lock() {
                    g.push(now_ms() - sent);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // the group joins
    produce(&brokers, "bare", count, rate).await?;
    reader.await?;
    // The first 2 s are a warm-up (connections, the first fetches): left out of both.
    let warmup = (rate * 2) as usize;
    let mut bare: Vec<f64> = received.lock().map(|g| g.iter().skip(warmup).copied().collect()).unwrap_or_default();
    bare.sort_by(f64::total_cmp);

    // 2. Sluice: Kafka → trade flattener → PostgreSQL (exactly-once).
    std::env::set_var("SLUICE_BROKERS", &brokers);
    let schema = format!("latency_{}", std::process::id());
    let (pg, connection) = tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/postgres", tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("latency.toml");
    let flattener = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release/trade_flattener.wasm");
    std::fs::write(
        &file,
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"raw\"]\ngroup = \"latency\"\nproperties = {{ \"fetch.wait.max.ms\" = \"{fetch_wait}\" }}\n\
             [[transforms]]\nplugin = \"{}\"\n\
             [sinks.pg]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\ntable = \"{schema}.trades\"\ncreate_table = true\n\
             columns = [{{ name = \"symbol\", type = \"text\" }}, {{ name = \"traded_at\", type = \"timestamptz\", field = \"ts\" }}]\n\
             [dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"dlq\"\n",
            flattener.display()
        ),
    )?;
    let runtime = Runtime::new(Runtime::default_cache_dir())?;
    let pipeline = load_pipeline(&file, Some(&runtime)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut topology = Topology::new(runtime.clone());
    topology.apply(vec![pipeline]).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // the group joins, the table is created
    let seen = Arc::new(Mutex::new(Vec::<(i64, f64)>::new()));
    let polls = seen.clone();
    let table = format!("{schema}.trades");
    let poller = tokio::spawn(async move {
        let query = format!("SELECT count(*) FROM {table}");
        loop {
            let rows: i64 = pg.query_one(&query, &[]).await.map(|r| r.get(0)).unwrap_or(0);
            let at = now_ms();
            if let Ok(mut p) = polls.lock() {
                if p.last().is_none_or(|(n, _)| *n < rows) {
                    p.push((rows, at));
                }
            }
            if rows as usize >= count {
                let _ = pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let produced = produce(&brokers, "raw", count, rate).await?;
    tokio::time::timeout(Duration::from_secs(120), poller).await??;
    topology.shutdown().await;
    let polls = seen.lock().map(|p| p.clone()).unwrap_or_default();
    let mut sluice = Vec::with_capacity(count);
    let mut next = 0;
    for (i, sent) in produced.iter().enumerate() {
        while next < polls.len() && (polls[next].0 as usize) < i + 1 {
            next += 1;
        }
        if let Some((_, at)) = polls.get(next) {
            sluice.push(at - sent);
        }
    }
    let mut sluice: Vec<f64> = sluice.into_iter().skip(warmup).collect();
    sluice.sort_by(f64::total_cmp);

    let (b50, b99, s50, s99) = (percentile(&bare, 0.5), percentile(&bare, 0.99), percentile(&sluice, 0.5), percentile(&sluice, 0.99));
    println!("bare librdkafka consumer, produce -> received: p50 {b50:6.1} ms   p99 {b99:6.1} ms  ({} frames)", bare.len());
    println!("sluice, produce -> row visible in PostgreSQL:  p50 {s50:6.1} ms   p99 {s99:6.1} ms  ({} rows)", sluice.len());
    println!("added by sluice:                               p50 {:+6.1} ms   p99 {:+6.1} ms", s50 - b50, s99 - b99);
    Ok(())
}
