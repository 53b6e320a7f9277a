//! Latency from produce to row visible in PostgreSQL, at a steady rate,
//! beside a bare librdkafka consumer reading the same frames from the same
//! broker at the same time, with the same settings: what Sluice adds (the
//! transform, the PostgreSQL commit, the offsets) is the difference, frame
//! by frame.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench latency`
//! (`BENCH_RATE` frames/s, default 2,000; `BENCH_SECONDS`, default 15;
//! `BENCH_FETCH_WAIT_MS`, librdkafka's `fetch.wait.max.ms` for both
//! consumers, default 10: Tansu holds every fetch for the whole wait, 500 ms
//! by default). Needs `tansu` on PATH and PostgreSQL at 127.0.0.1:5432.
//!
//! One partition, so frame n is at offset n and its row is the table's n-th.
//! The bare consumer stamps each frame as it receives it. For Sluice, a
//! statement trigger on the table notifies (`pg_notify`) how many rows each
//! insert added, which PostgreSQL delivers when the transaction commits; row
//! n is visible at the arrival of the notification that brought the count to
//! n. Both are reported from produce, and Sluice's added latency is the
//! difference of their percentiles: both ran over the same frames at the
//! same time, so the broker's stalls that hit both cancel out.
//!
//! The frame-by-frame difference (row visible − received by the bare
//! consumer) is printed too, but it moves from run to run: each consumer
//! fetches on its own cycle (`fetch.wait.max.ms`), and how the two cycles
//! happen to line up shifts every frame's difference alike, while each
//! consumer's own distribution does not depend on it. The first 2 s are a
//! warm-up (connections, first fetches) and left out.
//!
//! Until 2026-11-26 the two ran one after the other, and a poller ran
//! `count(*)` every 2 ms: 1 ms of rounding on average, a scan of the growing
//! table each time on the same two cores, and two runs' different stalls in
//! the difference.

/// The test kit of the integration tests: broker, PostgreSQL, plugins.
#[path = "../../tests/it/common/mod.rs"]
mod common;

use common::services::Broker;
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
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("linger.ms", "0").create()?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut sent = Vec::with_capacity(count);
    let mut pending = Vec::with_capacity(count);
    for i in 0..count {
        tick.tick().await;
        let t = now_ms();
        let frame = format!(
            r#"{{"type":"trade","data":[{{"s":"BINANCE:BTCUSDT","p":{}.5,"t":{},"v":0.01,"c":["1"]}}]}}"#,
            60_000 + i,
            t as i64
        );
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

    let broker = Broker::start();
    let brokers = broker.addr.clone();
    for topic in ["raw", "dlq"] {
        broker.create_topic(topic, 1).await;
    }
    println!("{rate} frames/s for {seconds} s, one trade a frame, fetch.wait.max.ms = {fetch_wait}");

    // PostgreSQL: the table, as the sink would create it at its first batch,
    // with the trigger that reports each insert's rows when it commits; the
    // connection's notifications, each stamped on arrival.
    let schema = format!("latency_{}", std::process::id());
    let table = format!("{schema}.trades");
    let (pg, mut connection) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/postgres", tokio_postgres::NoTls).await?;
    let visible = Arc::new(Mutex::new(Vec::<(usize, f64)>::new()));
    let notes = visible.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let mut rows = 0;
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let at = now_ms();
                rows += n.payload().parse::<usize>().unwrap_or(0);
                if let Ok(mut notes) = notes.lock() {
                    notes.push((rows, at));
                }
            }
        }
    });
    pg.batch_execute(&format!(
        "CREATE SCHEMA {schema};\n\
         CREATE TABLE {table} (symbol text, traded_at timestamptz);\n\
         CREATE FUNCTION {schema}.notify_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('{schema}', (SELECT count(*) FROM added)::text); RETURN NULL; END $$;\n\
         CREATE TRIGGER notify_rows AFTER INSERT ON {table} REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_rows();\n\
         LISTEN {schema};"
    ))
    .await?;

    // Sluice: Kafka → trade flattener → PostgreSQL (exactly-once).
    std::env::set_var("SLUICE_BROKERS", &brokers);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("latency.toml");
    let flattener = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip2/release/trade_flattener.wasm");
    std::fs::write(
        &file,
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"raw\"]\ngroup = \"latency\"\nproperties = {{ \"fetch.wait.max.ms\" = \"{fetch_wait}\" }}\n\
             [[transforms]]\nplugin = \"{}\"\n\
             [sinks.pg]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\ntable = \"{table}\"\n\
             columns = [{{ name = \"symbol\", type = \"text\" }}, {{ name = \"traded_at\", type = \"timestamptz\", field = \"ts\" }}]\n\
             [dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"dlq\"\n",
            flattener.display()
        ),
    )?;
    let runtime = Runtime::new(Runtime::default_cache_dir())?;
    let pipeline = load_pipeline(&file, Some(&runtime)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut topology = Topology::new(runtime.clone());
    topology.apply(vec![pipeline]).await?;

    // The bare consumer, on the same topic in a group of its own.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bare")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", &fetch_wait)
        .create()?;
    consumer.subscribe(&["raw"])?;
    let received = Arc::new(Mutex::new(vec![f64::NAN; count]));
    let got = received.clone();
    let reader = tokio::spawn(async move {
        let mut left = count;
        while left > 0 {
            if let Ok(m) = consumer.recv().await {
                let at = now_ms();
                if let (Ok(mut got), Ok(n)) = (got.lock(), usize::try_from(m.offset())) {
                    if got.get(n).is_some_and(|t| t.is_nan()) {
                        got[n] = at;
                        left -= 1;
                    }
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // both groups join
    let rows = visible.clone();
    let sluice_done = tokio::spawn(async move {
        while rows.lock().ok().and_then(|r| r.last().map(|(n, _)| *n)).unwrap_or(0) < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let produced = produce(&brokers, "raw", count, rate).await?;
    tokio::time::timeout(Duration::from_secs(120), reader).await??;
    tokio::time::timeout(Duration::from_secs(120), sluice_done).await??;
    topology.shutdown().await;
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;

    // Frame n: produced, received by the bare consumer, its row visible.
    let received = received.lock().map(|r| r.clone()).unwrap_or_default();
    let notes = visible.lock().map(|v| v.clone()).unwrap_or_default();
    let mut next = 0;
    let warmup = (rate * 2) as usize;
    let (mut bare, mut sluice, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for (n, (sent, got)) in produced.iter().zip(&received).enumerate() {
        while next < notes.len() && notes[next].0 < n + 1 {
            next += 1;
        }
        let Some(&(_, seen)) = notes.get(next) else { break };
        if n >= warmup {
            bare.push(got - sent);
            sluice.push(seen - sent);
            added.push(seen - got);
        }
    }
    for v in [&mut bare, &mut sluice, &mut added] {
        v.sort_by(f64::total_cmp);
    }
    let p = |v: &[f64]| (percentile(v, 0.5), percentile(v, 0.99));
    let ((b50, b99), (s50, s99), (a50, a99)) = (p(&bare), p(&sluice), p(&added));
    println!(
        "bare librdkafka consumer, produce -> received: p50 {b50:6.1} ms   p99 {b99:6.1} ms  ({} frames)",
        bare.len()
    );
    println!(
        "sluice, produce -> row visible in PostgreSQL:  p50 {s50:6.1} ms   p99 {s99:6.1} ms  ({} rows)",
        sluice.len()
    );
    println!("added by sluice:                               p50 {:+6.1} ms   p99 {:+6.1} ms", s50 - b50, s99 - b99);
    println!("frame by frame (row visible - received):       p50 {a50:+6.1} ms   p99 {a99:+6.1} ms");
    Ok(())
}
