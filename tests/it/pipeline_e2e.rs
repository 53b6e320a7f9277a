//! Pipelines end to end against a real Kafka-protocol broker (Tansu) and the
//! local PostgreSQL, with `sluice run` as a process.

use crate::common;

use common::plugin_path;
use common::services::*;
use common::trades::*;
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
            latest.insert(
                v["symbol"].as_str().unwrap().to_string(),
                (v["price"].as_f64().unwrap(), v["ts"].as_i64().unwrap()),
            );
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
        let max: Option<i64> = match pg.client.query_one(&format!("SELECT max(ts) FROM {}.latest", pg.name), &[]).await
        {
            Ok(row) => row.get(0),
            Err(_) => None,
        };
        max == Some(last_ts)
    })
    .await;
    assert!(caught_up, "the last trade never arrived");
    assert_eq!(sluice.stop(), Some(0));
    let rows: BTreeMap<String, (f64, i64)> =
        pg.client.query(&query, &[]).await.unwrap().iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
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
    let config: sluice::sinks::SinkConfig = toml::from_str(&format!(
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
            .map(|(p, o)| {
                (
                    Output { value: format!(r#"{{"v":"{p}/{o}"}}"#).into(), ..Output::default() },
                    Origin { topic: topic.clone(), partition: p, offset: o },
                )
            })
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
    let rows: Vec<String> = pg
        .client
        .query(&format!("SELECT v FROM {}.t ORDER BY v", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected: Vec<String> =
        (0..8).map(|o| format!("0/{o}")).chain((0..4).map(|o| format!("1/{o}"))).chain(["2/0".to_string()]).collect();
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

/// Writes `values` (one output each, partition 0, offsets from 0) to `sink`;
/// returns the rejections as (index, reason).
async fn write_values(sink: &dyn sluice::sinks::Sink, values: &[String]) -> Vec<(usize, String)> {
    use sluice::record::{Origin, Output};
    let topic: std::sync::Arc<str> = "in".into();
    let outputs: Vec<Output> =
        values.iter().map(|v| Output { value: v.clone().into_bytes().into(), ..Output::default() }).collect();
    let origins: Vec<Origin> =
        (0..values.len()).map(|o| Origin { topic: topic.clone(), partition: 0, offset: o as i64 }).collect();
    let views: Vec<_> = outputs.iter().map(Output::view).collect();
    let refs: Vec<&Origin> = origins.iter().collect();
    sink.write(&views, &refs).await.unwrap().into_iter().map(|r| (r.index, r.reason)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_rejects_each_value_postgres_refuses_and_writes_the_rest_with_the_offsets() {
    let pg = PgSchema::create("refused").await;
    // A table made beforehand, with a constraint the sink cannot know of.
    pg.client
        .batch_execute(&format!(
            "CREATE TABLE {}.t (id bigint, s text, n bigint, ts timestamptz, tags text[], doc jsonb, CHECK (s IS DISTINCT FROM 'forbidden'))",
            pg.name
        ))
        .await
        .unwrap();
    let config: sluice::sinks::SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.t\"\ncolumns = [{{ name = \"id\", type = \"bigint\" }}, {{ name = \"s\", type = \"text\" }}, \
         {{ name = \"n\", type = \"bigint\" }}, {{ name = \"ts\", type = \"timestamptz\" }}, {{ name = \"tags\", type = \"text[]\" }}, {{ name = \"doc\", type = \"jsonb\" }}]\n",
        pg.name
    ))
    .unwrap();
    let sink = sluice::sinks::build("pg", &config, "refused", std::path::Path::new(".")).await.unwrap();
    // (value, what its rejection says; None: stored)
    let cases: Vec<(String, Option<&str>)> = vec![
        (r#"{"id":0,"s":"ok","n":1,"ts":1700000000000,"tags":["a"],"doc":{"a":[1,"b"]}}"#.into(), None),
        (r#"{"id":1,"s":"nul\u0000byte"}"#.into(), Some("column \"s\" needs a string without NUL")),
        (r#"{"id":2,"tags":["x","\u0000"]}"#.into(), Some("column \"tags\" needs strings without NUL")),
        (r#"{"id":3,"doc":{"k":["\u0000"]}}"#.into(), Some("column \"doc\" needs JSON without NUL")),
        (r#"{"id":4,"doc":{"\u0000":1}}"#.into(), Some("column \"doc\" needs JSON without NUL")),
        (
            r#"{"id":5,"ts":99999999999999999}"#.into(),
            Some("column \"ts\" needs milliseconds since 1970 within PostgreSQL's timestamp range"),
        ),
        (
            r#"{"id":6,"ts":-99999999999999999}"#.into(),
            Some("column \"ts\" needs milliseconds since 1970 within PostgreSQL's timestamp range"),
        ),
        (r#"{"id":7,"n":9223372036854775808}"#.into(), Some("column \"n\" needs an integer within bigint")),
        (
            r#"{"id":8,"s":"forbidden"}"#.into(),
            Some("PostgreSQL refused the row: new row for relation \"t\" violates check constraint"),
        ),
        (r#"{"id":9,"s":"\ud800"}"#.into(), Some("column \"s\" needs a string without lone UTF-16 surrogates")),
        (r#"{"id":10,"doc":"\\u0000 is a backslash, not a NUL","s":"\\u0000"}"#.into(), None),
        (r#"{"id":11,"ts":9224318015999999}"#.into(), None),
        (r#"{"id":12,"ts":-210866803200000}"#.into(), None),
        (r#"{"id":13,"s":"forbidden","n":2}"#.into(), Some("SQLSTATE 23514")),
        (r#"{"id":14,"doc":{"x":"\ud83d\ude00"},"tags":["\ud83d\ude00"]}"#.into(), None),
    ];
    let mut values: Vec<String> = cases.iter().map(|(v, _)| v.clone()).collect();
    values.extend((100..140).map(|id| format!(r#"{{"id":{id},"s":"row {id}","n":{id}}}"#)));
    let rejected = write_values(&*sink, &values).await;
    let want: Vec<usize> = cases.iter().enumerate().filter(|(_, (_, why))| why.is_some()).map(|(i, _)| i).collect();
    assert_eq!(rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), want, "{rejected:#?}");
    for (i, reason) in &rejected {
        let expected = cases[*i].1.unwrap();
        assert!(reason.contains(expected), "row {i}: {reason:?} should say {expected:?}");
    }
    let stored: Vec<(i64, Option<String>, Option<i64>)> = pg
        .client
        .query(&format!("SELECT id, s, (extract(epoch FROM ts) * 1000)::int8 FROM {}.t ORDER BY id", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut ids: Vec<i64> = cases
        .iter()
        .filter(|(_, why)| why.is_none())
        .map(|(v, _)| serde_json::from_str::<serde_json::Value>(v).unwrap()["id"].as_i64().unwrap())
        .collect();
    ids.extend(100..140);
    assert_eq!(stored.iter().map(|r| r.0).collect::<Vec<_>>(), ids, "every good row, once");
    let at = |id: i64| stored.iter().find(|r| r.0 == id).unwrap();
    assert_eq!(at(0).2, Some(1700000000000));
    assert_eq!(at(10).1.as_deref(), Some("\\u0000"), "an escaped backslash is text");
    assert_eq!(at(11).2, Some(9224318015999999), "the last millisecond PostgreSQL stores");
    assert_eq!(at(12).2, Some(-210866803200000), "the first");
    let docs: Vec<String> = pg
        .client
        .query(&format!("SELECT doc::text FROM {}.t WHERE id IN (0, 14) ORDER BY id", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(docs, [r#"{"a": [1, "b"]}"#, "{\"x\": \"\u{1f600}\"}"]);

    // Read again (a restart before the source's commit): nothing stored twice, offsets past the batch.
    write_values(&*sink, &values).await;
    assert_eq!(count_rows(&pg.client, &format!("{}.t", pg.name)).await, ids.len());
    let next: i64 =
        pg.client.query_one(&format!("SELECT next_offset FROM {}.sluice_offsets", pg.name), &[]).await.unwrap().get(0);
    assert_eq!(next, values.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_batch_with_a_refused_row_keeps_the_last_good_value_per_key() {
    let pg = PgSchema::create("refused_upsert").await;
    pg.client
        .batch_execute(&format!("CREATE TABLE {}.u (k text PRIMARY KEY, v bigint CHECK (v >= 0))", pg.name))
        .await
        .unwrap();
    let config: sluice::sinks::SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.u\"\nupsert_key = [\"k\"]\ncolumns = [{{ name = \"k\", type = \"text\" }}, {{ name = \"v\", type = \"bigint\" }}]\n",
        pg.name
    ))
    .unwrap();
    let sink = sluice::sinks::build("pg", &config, "refused_upsert", std::path::Path::new(".")).await.unwrap();
    let values: Vec<String> = ["a:1", "b:1", "a:-1", "c:5", "a:2", "b:-7", "c:6", "d:-1", "a:3"]
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once(':').unwrap();
            format!(r#"{{"k":"{k}","v":{v}}}"#)
        })
        .collect();
    let rejected = write_values(&*sink, &values).await;
    assert_eq!(rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 5, 7], "{rejected:#?}");
    assert!(rejected.iter().all(|(_, r)| r.contains("SQLSTATE 23514")), "{rejected:#?}");
    let rows: Vec<(String, i64)> = pg
        .client
        .query(&format!("SELECT k, v FROM {}.u ORDER BY k", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("a".to_string(), 3), ("b".to_string(), 1), ("c".to_string(), 6)]);
}

mod conversion_property {
    //! For random values of every column type, the PostgreSQL sink either
    //! converts a value into one PostgreSQL stores and reads back equal, or
    //! rejects it beforehand (never through PostgreSQL's refusal).
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use serde_json::Value;
    use sluice::sinks::postgres::rows::{PG_END_MS, PG_MIN_MS};

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            1 => Just(r#""nul \u0000""#.to_string()),
            1 => Just(r#""lone \ud800""#.to_string()),
            1 => Just(r#""\\u0000""#.to_string()),
            1 => Just("17".to_string()),
        ]
    }

    fn integer() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<i128>().prop_map(|v| v.to_string()),
            Just("1.5".to_string()),
            Just("1e3".to_string()),
            Just("-0".to_string()),
        ]
    }

    fn double() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| serde_json::to_string(&v).unwrap()),
            1 => any::<i64>().prop_map(|v| v.to_string()),
            1 => Just("1e400".to_string()),
            1 => Just("\"1.5\"".to_string()),
        ]
    }

    fn millis() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            ((PG_MIN_MS - 3)..(PG_MIN_MS + 3)).prop_map(|v| v.to_string()),
            ((PG_END_MS - 3)..(PG_END_MS + 3)).prop_map(|v| v.to_string()),
            (-10_i64.pow(13)..10_i64.pow(13)).prop_map(|v| v.to_string()),
            Just("1.0".to_string()),
        ]
    }

    fn json() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop_oneof![
            6 => value.prop_map(|v| v.to_string()),
            1 => Just(r#"{"k":"lone \udc00"}"#.to_string()),
        ]
    }

    /// One row's fields (absent when `None`), as JSON text.
    fn row() -> impl Strategy<Value = Vec<(&'static str, Option<String>)>> {
        let array = prop_oneof![
            4 => prop::collection::vec(string(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
            1 => Just("\"not an array\"".to_string()),
        ];
        (
            prop::option::of(string()),
            prop::option::of(integer()),
            prop::option::of(double()),
            prop::option::of(millis()),
            prop::option::of(array),
            prop::option::of(json()),
            prop::option::of(prop_oneof![
                Just("true".to_string()),
                Just("false".to_string()),
                Just("null".to_string()),
                Just("1".to_string())
            ]),
        )
            .prop_map(|(s, n, d, ts, tags, doc, b)| {
                vec![("s", s), ("n", n), ("d", d), ("ts", ts), ("tags", tags), ("doc", doc), ("b", b)]
            })
    }

    /// What a column should read back as, judged from a generic JSON value:
    /// `Err` when PostgreSQL cannot store it.
    #[derive(Debug, PartialEq)]
    enum Want {
        Null,
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
        Strings(Vec<String>),
        Json(Value),
    }

    fn no_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => !s.contains('\0'),
            Value::Array(items) => items.iter().all(no_nul),
            Value::Object(m) => m.iter().all(|(k, v)| !k.contains('\0') && no_nul(v)),
            _ => true,
        }
    }

    /// Numbers as f64, so that PostgreSQL's `1e3` → `1000` compares equal.
    fn normal(v: Value) -> Value {
        match v {
            Value::Number(n) => Value::from(n.as_f64().unwrap()),
            Value::Array(items) => Value::Array(items.into_iter().map(normal).collect()),
            Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, normal(v))).collect()),
            other => other,
        }
    }

    /// A JSON integer literal (`-0` is one) within i64.
    fn integer_literal(v: &Value, raw: Option<&str>) -> Option<i64> {
        let raw = raw.filter(|_| v.is_number())?;
        raw.strip_prefix('-').unwrap_or(raw).bytes().all(|b| b.is_ascii_digit()).then(|| raw.parse().ok()).flatten()
    }

    fn want(row: &Value, fields: &[(&str, Option<String>)]) -> Option<Vec<Want>> {
        let get = |k: &str| row.get(k).filter(|v| !v.is_null());
        let raw = |k: &str| fields.iter().find(|(name, _)| *name == k).and_then(|(_, v)| v.as_deref());
        let text = |v: &Value| v.as_str().filter(|s| !s.contains('\0')).map(str::to_string);
        Some(vec![
            match get("s") {
                None => Want::Null,
                Some(v) => Want::Text(text(v)?),
            },
            match get("n") {
                None => Want::Null,
                Some(v) => Want::Int(integer_literal(v, raw("n"))?),
            },
            match get("d") {
                None => Want::Null,
                Some(v) => Want::Float(v.as_f64().filter(|f| f.is_finite())?),
            },
            match get("ts") {
                None => Want::Null,
                Some(v) => Want::Int(integer_literal(v, raw("ts")).filter(|ms| (PG_MIN_MS..PG_END_MS).contains(ms))?),
            },
            match get("tags") {
                None => Want::Null,
                Some(v) => Want::Strings(v.as_array()?.iter().map(text).collect::<Option<_>>()?),
            },
            match get("doc") {
                None => Want::Null,
                Some(v) => Want::Json(no_nul(v).then(|| normal(v.clone()))?),
            },
            match get("b") {
                None => Want::Null,
                Some(v) => Want::Bool(v.as_bool()?),
            },
        ])
    }

    #[test]
    fn every_value_is_stored_as_it_was_or_rejected_beforehand() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let pg = rt.block_on(PgSchema::create("convert"));
        let config: sluice::sinks::SinkConfig = toml::from_str(&format!(
            "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.v\"\ncreate_table = true\nexactly_once = false\ncolumns = [\
             {{ name = \"id\", type = \"bigint\" }}, {{ name = \"s\", type = \"text\" }}, {{ name = \"n\", type = \"bigint\" }}, \
             {{ name = \"d\", type = \"double precision\" }}, {{ name = \"ts\", type = \"timestamptz\" }}, {{ name = \"tags\", type = \"text[]\" }}, \
             {{ name = \"doc\", type = \"jsonb\" }}, {{ name = \"b\", type = \"boolean\" }}]\n",
            pg.name
        ))
        .unwrap();
        let sink = rt.block_on(sluice::sinks::build("pg", &config, "convert", std::path::Path::new("."))).unwrap();
        // The sink creates the table when it first writes: one good row first,
        // so that a case whose rows are all rejected still finds the table.
        assert!(rt.block_on(write_values(&*sink, &[r#"{"id":-1}"#.to_string()])).is_empty());
        let next_id = std::cell::Cell::new(0_i64);
        let mut runner = TestRunner::new(Config { cases: 96, failure_persistence: None, ..Config::default() });
        let (stored, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(&prop::collection::vec(row(), 1..12), |rows| {
                let first = next_id.get();
                next_id.set(first + rows.len() as i64);
                let values: Vec<String> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, fields)| {
                        let mut text = format!("{{\"id\":{}", first + i as i64);
                        for (k, v) in fields {
                            if let Some(v) = v {
                                text.push_str(&format!(",\"{k}\":{v}"));
                            }
                        }
                        text + "}"
                    })
                    .collect();
                let rejected = rt.block_on(write_values(&*sink, &values));
                let wants: Vec<Option<Vec<Want>>> =
                    values.iter().zip(&rows).map(|(v, fields)| serde_json::from_str::<Value>(v).ok().and_then(|row| want(&row, fields))).collect();
                for (i, reason) in &rejected {
                    assert!(wants[*i].is_none(), "{} was rejected ({reason}) but PostgreSQL can store it", values[*i]);
                    assert!(!reason.contains("PostgreSQL refused"), "{} reached PostgreSQL before it was refused: {reason}", values[*i]);
                }
                let read = rt.block_on(pg.client.query(
                    &format!("SELECT id, s, n, d, (extract(epoch FROM ts) * 1000)::int8, tags, doc::text, b FROM {}.v WHERE id >= $1 ORDER BY id", pg.name),
                    &[&first],
                ))
                .unwrap();
                let mut read = read.iter().peekable();
                for (i, want) in wants.iter().enumerate() {
                    let id = first + i as i64;
                    let Some(want) = want else {
                        assert!(rejected.iter().any(|(r, _)| *r == i), "{} was stored, but PostgreSQL cannot store it as it is", values[i]);
                        refused.set(refused.get() + 1);
                        continue;
                    };
                    let row = read.next_if(|r| r.get::<_, i64>(0) == id).unwrap_or_else(|| panic!("{} is missing", values[i]));
                    let or_null = |w: Option<Want>| w.unwrap_or(Want::Null);
                    let got = vec![
                        or_null(row.get::<_, Option<String>>(1).map(Want::Text)),
                        or_null(row.get::<_, Option<i64>>(2).map(Want::Int)),
                        or_null(row.get::<_, Option<f64>>(3).map(Want::Float)),
                        or_null(row.get::<_, Option<i64>>(4).map(Want::Int)),
                        or_null(row.get::<_, Option<Vec<String>>>(5).map(Want::Strings)),
                        or_null(row.get::<_, Option<String>>(6).map(|t| Want::Json(normal(serde_json::from_str(&t).unwrap())))),
                        or_null(row.get::<_, Option<bool>>(7).map(Want::Bool)),
                    ];
                    assert_eq!(&got, want, "{} read back differently", values[i]);
                    stored.set(stored.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        let (stored, refused) = (stored.get(), refused.get());
        assert!(stored > 20 && refused > 20, "both kinds were tried: {stored} stored, {refused} rejected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_postgres_refuses_are_dead_lettered_and_every_good_trade_is_stored_once() {
    let broker = Broker::start();
    create_trades_topics(&broker, 2).await;
    for t in ["raw", "raw_dlq"] {
        broker.create_topic(t, 1).await;
    }
    let pg = PgSchema::create("refusedfeed").await;

    // Trades the flattener passes on and PostgreSQL cannot store as they are.
    let refused_frames: Vec<Vec<u8>> = vec![
        br#"{"type":"trade","data":[{"s":"nul\u0000byte","p":1,"t":1700000000000,"v":1}]}"#.to_vec(),
        br#"{"type":"trade","data":[{"s":"FAR","p":1,"t":99999999999999999,"v":1}]}"#.to_vec(),
        br#"{"type":"trade","data":[{"s":"PAST","p":1,"t":-9223372036854775808,"v":1}]}"#.to_vec(),
        br#"{"type":"trade","data":[{"s":"COND","p":1,"t":1700000000000,"v":1,"c":["\u0000"]}]}"#.to_vec(),
    ];
    let mut frames = generated(300, 41);
    for (i, bad) in refused_frames.iter().enumerate() {
        frames.insert(40 + i * 60, bad.clone());
    }
    let expected = expected_trades(&generated(300, 41));
    broker.produce("trades_raw", &frames).await;
    // Records straight into a table of every column type (no plugin).
    let refused_rows: Vec<Vec<u8>> = vec![
        br#"{"id":-1,"doc":{"k":"\u0000"}}"#.to_vec(),
        br#"{"id":-2,"n":9223372036854775808}"#.to_vec(),
        br#"{"id":-3,"n":-9223372036854775809}"#.to_vec(),
        br#"{"id":-4,"tags":["a","\u0000"]}"#.to_vec(),
    ];
    let mut rows: Vec<Vec<u8>> = (0..200)
        .map(|i| format!(r#"{{"id":{i},"n":{},"doc":{{"i":{i}}},"tags":["t{i}"]}}"#, i64::MAX - i).into_bytes())
        .collect();
    for (i, bad) in refused_rows.iter().enumerate() {
        rows.insert(30 + i * 40, bad.clone());
    }
    broker.produce("raw", &rows).await;

    let dir = tempfile::tempdir().unwrap();
    let trades = write_pipeline(dir.path(), "trades", &trades_pipeline(&pg.name, "g-refusedfeed", 50));
    let raw = write_pipeline(
        dir.path(),
        "raw",
        &format!(
            r#"
name = "raw"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["raw"]
group = "g-refusedraw"
batch_max_records = 50
[sinks.pg]
type = "postgres"
url = "${{SLUICE_PG_URL}}"
table = "{}.typed"
create_table = true
columns = [{{ name = "id", type = "bigint" }}, {{ name = "n", type = "bigint" }}, {{ name = "doc", type = "jsonb" }}, {{ name = "tags", type = "text[]" }}]
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "raw_dlq"
"#,
            pg.name
        ),
    );
    let mut sluice = SluiceProcess::run(&[&trades, &raw], &broker.addr);
    let admin = sluice.admin_addr().await;
    let dead_trades = broker.consume("trades_dlq", refused_frames.len(), WAIT);
    let dead_rows = broker.consume("raw_dlq", refused_rows.len(), WAIT);
    let all_stored = wait_until(WAIT, || async {
        pg.count("trades").await as usize >= expected.len() && pg.count("typed").await as usize >= 200
    })
    .await;
    assert!(
        all_stored,
        "trades {} of {}, typed {} of 200; log {}",
        pg.count("trades").await,
        expected.len(),
        pg.count("typed").await,
        sluice.log.display()
    );
    let healthy = wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 200 }).await;
    assert!(healthy, "/health: {:?}", http(&admin, "GET", "/health"));
    assert_eq!(sluice.stop(), Some(0));

    assert_eq!(stored_trades(&pg).await, expected, "every good trade once, and nothing else");
    let mut dead: Vec<Vec<u8>> = dead_trades.iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect();
    dead.sort();
    let mut want = refused_frames.clone();
    want.sort();
    assert_eq!(dead, want, "the frames of the refused trades are dead-lettered");
    for m in dead_trades.iter().chain(&dead_rows) {
        let error = header(m, "sluice.error").unwrap_or_default();
        assert!(error.starts_with("sink pg: postgres sink: column "), "{error}");
    }
    let reasons: Vec<String> = dead_trades.iter().map(|m| header(m, "sluice.error").unwrap()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"traded_at\" needs milliseconds since 1970 within PostgreSQL's timestamp range")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("\"symbol\" needs a string without NUL")), "{reasons:?}");

    let mut dead: Vec<Vec<u8>> = dead_rows.iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect();
    dead.sort();
    let mut want = refused_rows.clone();
    want.sort();
    assert_eq!(dead, want, "the refused records are dead-lettered");
    let typed: Vec<(i64, i64)> = pg
        .client
        .query(&format!("SELECT id, n FROM {}.typed ORDER BY id", pg.name), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(typed, (0..200).map(|i| (i, i64::MAX - i)).collect::<Vec<_>>(), "the good records, once, as they were");
    assert_eq!(
        broker.committed("g-refusedraw", "raw", 1),
        vec![rows.len() as i64],
        "the source committed past the refused records"
    );
}
