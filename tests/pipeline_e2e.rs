//! Pipelines end to end against a real Kafka-protocol broker (Tansu) and the
//! local PostgreSQL, with `sluice run` as a process.

mod common;

use common::services::*;
use common::trades::*;
use common::plugin_path;
use rdkafka::Message;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn trades_pipeline(schema: &str, group: &str, batch: usize) -> String {
    trades_pipeline_to(&format!("{schema}.trades"), group, batch, "${SLUICE_PG_URL}", "")
}

async fn stored_trades(pg: &PgSchema) -> Vec<Trade> {
    stored_trades_in(&pg.client, &format!("{}.trades", pg.name)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_reach_postgres_and_bad_frames_the_dead_letter_topic() {
    let broker = Broker::start();
    create_trades_topics(&broker, 3).await;
    let pg = PgSchema::create("e2e").await;

    let malformed: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        br#"{"type":"trade"}"#.to_vec(),
        br#"{"type":"trade","data":[{"s":"A","p":1,"t":2}]}"#.to_vec(),
        Vec::new(),
        vec![0xff, 0xfe, b'{'],
    ];
    let mut frames = generated(400, 7);
    frames.push(br#"{"type":"trade","data":[]}"#.to_vec());
    frames.push(br#"{"type":"trade","data":[{"s":"NULL:C","p":1.5,"t":1700000000000,"v":2,"c":null}]}"#.to_vec());
    frames.extend(malformed.iter().cloned());
    frames.extend(generated(100, 8));
    let expected = expected_trades(&frames);
    broker.produce("trades_raw", &frames).await;

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline(&pg.name, "g-e2e", 100));
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let all_stored = wait_until(WAIT, || async { pg.count("trades").await as usize >= expected.len() }).await;
    assert!(all_stored, "rows: {} of {}", pg.count("trades").await, expected.len());
    let dead = broker.consume("trades_dlq", malformed.len(), WAIT);
    assert_eq!(sluice.stop(), Some(0), "graceful exit");

    assert_eq!(stored_trades(&pg).await, expected, "exactly the flattened trades, each once");
    let conditions: Vec<String> = pg
        .client
        .query(&format!("SELECT array_to_string(conditions, ',') FROM {}.trades WHERE symbol = 'NULL:C'", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(conditions, vec![String::new()], "c: null stores an empty array");

    let mut dead_values: Vec<Vec<u8>> = dead.iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect();
    dead_values.sort();
    let mut want = malformed.clone();
    want.sort();
    assert_eq!(dead_values, want, "exactly the malformed frames are dead-lettered");
    for m in &dead {
        assert_eq!(header(m, "sluice.pipeline").as_deref(), Some("trades"));
        assert_eq!(header(m, "sluice.plugin").as_deref(), Some("trade_flattener"));
        assert_eq!(header(m, "sluice.topic").as_deref(), Some("trades_raw"));
        assert!(header(m, "sluice.error").is_some_and(|e| !e.is_empty()));
        assert!(header(m, "sluice.partition").is_some() && header(m, "sluice.offset").is_some());
    }

    let raw = broker.consume("trades_raw", frames.len(), WAIT);
    assert_eq!(raw.len(), frames.len());
    // A partition that received nothing has nothing committed (-1): position 0.
    let committed: Vec<i64> = broker.committed("g-e2e", "trades_raw", 3).into_iter().map(|c| c.max(0)).collect();
    assert_eq!(committed, end_offsets(&raw, 3), "offsets committed up to the end of every partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_two_plugins_routes_to_two_sinks() {
    let broker = Broker::start();
    for t in ["raw", "btc", "other", "dlq"] {
        broker.create_topic(t, 1).await;
    }
    let frames = generated(300, 11);
    broker.produce("raw", &frames).await;
    let expected = expected_trades(&frames);
    let btc_expected = expected.iter().filter(|t| t.0.contains("BTC") || t.0.contains("XBT")).count();
    assert!(btc_expected > 0 && btc_expected < expected.len());

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "router",
        &format!(
            r#"
default_sink = "other"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["raw"]
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{router}"
config = {{ routes = "BTC=btc,XBT=btc" }}
[sinks.btc]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "btc"
[sinks.other]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "other"
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "dlq"
"#,
            flattener = plugin_path("trade_flattener").display(),
            router = plugin_path("symbol_router").display()
        ),
    );
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let btc = broker.consume("btc", btc_expected, WAIT);
    let other = broker.consume("other", expected.len() - btc_expected, WAIT);
    assert_eq!(sluice.stop(), Some(0));

    assert_eq!(btc.len(), btc_expected);
    assert_eq!(other.len(), expected.len() - btc_expected);
    let mut per_symbol: BTreeMap<String, usize> = BTreeMap::new();
    for m in btc.iter().chain(&other) {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let symbol = v["symbol"].as_str().unwrap();
        assert_eq!(m.key(), Some(symbol.as_bytes()), "key is the symbol");
        assert_eq!(m.timestamp().to_millis(), v["ts"].as_i64(), "timestamp is the trade's");
        let is_btc = symbol.contains("BTC") || symbol.contains("XBT");
        assert_eq!(m.topic() == "btc", is_btc, "{symbol} routed to {}", m.topic());
        *per_symbol.entry(symbol.to_string()).or_default() += 1;
    }
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for t in &expected {
        *want.entry(t.0.clone()).or_default() += 1;
    }
    assert_eq!(per_symbol, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_stream_then_restart_loses_nothing() {
    let broker = std::sync::Arc::new(Broker::start());
    create_trades_topics(&broker, 2).await;
    let pg = PgSchema::create("restart").await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline(&pg.name, "g-restart", 20));

    let first = generated(1500, 21);
    let second = generated(1500, 22);
    let expected = expected_trades(&[first.clone(), second.clone()].concat());

    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    // Feed the first half in slices while the router runs, and stop it mid-stream.
    let feeder = {
        let broker = broker.clone();
        let first = first.clone();
        tokio::spawn(async move {
            for chunk in first.chunks(50) {
                broker.produce("trades_raw", chunk).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    assert!(wait_until(WAIT, || async { pg.count("trades").await > 0 }).await);
    assert_eq!(sluice.stop(), Some(0));
    let after_stop = pg.count("trades").await as usize;
    let feeding_when_stopped = !feeder.is_finished();
    feeder.await.unwrap();
    broker.produce("trades_raw", &second).await;

    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let done = wait_until(WAIT, || async { pg.count("trades").await as usize >= expected.len() }).await;
    assert!(done, "rows: {} of {}", pg.count("trades").await, expected.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sluice.stop(), Some(0));
    assert!(feeding_when_stopped && after_stop < expected.len(), "the first run was stopped mid-stream");
    assert_eq!(stored_trades(&pg).await, expected, "every trade exactly once across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_keeps_the_latest_row_per_key() {
    let broker = Broker::start();
    broker.create_topic("raw", 1).await; // one partition: a defined order
    broker.create_topic("dlq", 1).await;
    let pg = PgSchema::create("upsert").await;
    let frames = generated(600, 31);
    broker.produce("raw", &frames).await;
    // The last trade of each symbol, in feed order.
    let mut latest: BTreeMap<String, (f64, i64)> = BTreeMap::new();
    for f in &frames {
        for o in trade_flattener::flatten(f).unwrap_or_default() {
            let v: serde_json::Value = serde_json::from_slice(&o.value).unwrap();
            latest.insert(v["symbol"].as_str().unwrap().to_string(), (v["price"].as_f64().unwrap(), v["ts"].as_i64().unwrap()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "latest",
        &format!(
            r#"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["raw"]
batch_max_records = 70
[[transforms]]
plugin = "{plugin}"
[sinks.pg]
type = "postgres"
url = "${{SLUICE_PG_URL}}"
table = "{schema}.latest"
create_table = true
upsert_key = ["symbol"]
columns = [
  {{ name = "symbol", type = "text" }},
  {{ name = "price", type = "double precision" }},
  {{ name = "ts", type = "bigint" }},
]
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "dlq"
"#,
            plugin = plugin_path("trade_flattener").display(),
            schema = pg.name
        ),
    );
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let last_ts = latest.values().map(|(_, ts)| *ts).max().unwrap();
    let query = format!("SELECT symbol, price, ts FROM {}.latest ORDER BY symbol", pg.name);
    let caught_up = wait_until(WAIT, || async {
        let max: Option<i64> = match pg.client.query_one(&format!("SELECT max(ts) FROM {}.latest", pg.name), &[]).await {
            Ok(row) => row.get(0),
            Err(_) => None,
        };
        max == Some(last_ts)
    })
    .await;
    assert!(caught_up, "the last trade never arrived");
    assert_eq!(sluice.stop(), Some(0));
    let rows: BTreeMap<String, (f64, i64)> = pg
        .client
        .query(&query, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(rows, latest, "one row per symbol, holding its latest trade");
}

/// The PostgreSQL sink's exactly-once offsets, batch by batch, without a
/// broker: a batch that brings a partition new to the offsets table beside
/// one already there writes every row of both (the sink starts its
/// transaction over once it has added the new partition's row), and a batch
/// read again writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_offsets_hold_per_partition_when_a_batch_brings_a_new_one() {
    use sluice::record::{Origin, Output};
    let pg = PgSchema::create("offsets").await;
    let config: sluice::config::SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.t\"\ncreate_table = true\ncolumns = [{{ name = \"v\", type = \"text\" }}]\n",
        pg.name
    ))
    .unwrap();
    let sink = sluice::sinks::build("pg", &config, "offsets", std::path::Path::new(".")).await.unwrap();
    let topic: std::sync::Arc<str> = "in".into();
    // (partition, offsets) → one row per offset, its value naming both.
    let write = |parts: &[(i32, std::ops::Range<i64>)]| {
        let records: Vec<(Output, Origin)> = parts
            .iter()
            .flat_map(|(p, offsets)| offsets.clone().map(move |o| (*p, o)))
            .map(|(p, o)| (Output { value: format!(r#"{{"v":"{p}/{o}"}}"#).into(), ..Output::default() }, Origin { topic: topic.clone(), partition: p, offset: o }))
            .collect();
        let sink = &sink;
        async move {
            let views: Vec<_> = records.iter().map(|(out, _)| out.view()).collect();
            let origins: Vec<&Origin> = records.iter().map(|(_, origin)| origin).collect();
            assert!(sink.write(&views, &origins).await.unwrap().is_empty());
        }
    };
    write(&[(0, 0..3)]).await;
    write(&[(0, 3..6), (1, 0..3)]).await;
    // Read again (a restart before the source's commit): nothing twice.
    write(&[(0, 3..6), (1, 0..3)]).await;
    write(&[(0, 4..8), (1, 2..4), (2, 0..1)]).await;
    let rows: Vec<String> = pg.client.query(&format!("SELECT v FROM {}.t ORDER BY v", pg.name), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let mut expected: Vec<String> = (0..8).map(|o| format!("0/{o}")).chain((0..4).map(|o| format!("1/{o}"))).chain(["2/0".to_string()]).collect();
    expected.sort();
    assert_eq!(rows, expected);
    let offsets: Vec<(i32, i64)> = pg
        .client
        .query(&format!("SELECT partition, next_offset FROM {}.sluice_offsets ORDER BY partition", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(offsets, [(0, 8), (1, 4), (2, 1)]);
}
