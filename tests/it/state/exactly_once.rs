//! Keyed state exactly once: state, rows and offsets committed together
//! through replays, kill -9s, hand-overs, fences and outages.

use super::*;
use crate::common;
use common::fixture::{kafka_dead_letter, kafka_source, Fixture};
use common::services::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// A capture read twice: the second run restores the state, skips every
/// record it holds, and changes nothing; the state table holds each
/// symbol's totals as the rows do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_from_a_replayed_capture_are_exact_and_a_replay_changes_none() {
    let pg = PgSchema::create("state_replay").await;
    let table = format!("{}.totals", pg.name);
    let frames = common::trades::generated(2_000, 71);
    let want = expected_totals(&frames);
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
    std::fs::write(dir.path().join("feed.jsonl"), text).unwrap();
    let source = "[source]\ntype = \"file\"\npath = \"feed.jsonl\"\nbatch_max_records = 97";
    let file =
        write_pipeline(dir.path(), "totals", &totals_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\""));
    for replay in 1..=2 {
        let out = run_until_eof(&file);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "replay {replay}: {}\n{log}", out.status);
        assert_totals(&stored_totals(&pg.client, &table).await, &want);
        if replay == 2 {
            assert!(log.contains("state restored"), "{log}");
            assert!(log.contains("skipped records the restored state already holds"), "{log}");
        }
    }
    // The state holds what the rows say: one entry per symbol and partition.
    let state = pg
        .client
        .query(&format!("SELECT convert_from(substring(key from 2), 'UTF8'), convert_from(value, 'UTF8') FROM {}.sluice_state WHERE pipeline = 'totals' AND stage = 1 AND get_byte(key, 0) = 0", pg.name), &[])
        .await
        .unwrap();
    let held: BTreeMap<String, i64> = state
        .iter()
        .map(|r| {
            let value: serde_json::Value = serde_json::from_str(&r.get::<_, String>(1)).unwrap();
            (r.get(0), value["trades"].as_i64().unwrap())
        })
        .collect();
    let rows: BTreeMap<String, i64> = want.iter().map(|(s, (n, _))| (s.clone(), *n)).collect();
    assert_eq!(held, rows, "the state's counts are the rows' counts (one partition)");

    // `sluice state` reads the same from the store.
    let state = |args: &[&str]| sluice_state(&file, args);
    let all = state(&["--stage", "2"]);
    assert!(all.starts_with("transform 2 ") && all.contains(": 6 keys"), "{all}");
    let aapl = state(&["--key", "AAPL"]);
    assert!(aapl.contains(&format!("  AAPL = {{\"trades\":{},", rows["AAPL"])), "{aapl}");
}

/// A paced feed over two partitions, and three kill -9s: the totals
/// (state, rows and offsets committed together) count every trade once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_over_two_partitions_stay_exact_through_kill_9s() {
    let fx = Fixture::new("state_kill", &[("trades_raw", 2), ("totals_dlq", 1)]).await;
    let (pg, table) = (&fx.pg, fx.table("totals"));
    let frames = common::trades::generated(10_000, 72);
    let want = expected_totals(&frames);
    let source = kafka_source("g-totals", "instance_id = \"totals-a\"\nbatch_max_records = 300");
    let file = fx.pipeline("totals", &totals_pipeline(&source, &table, "", &kafka_dead_letter("totals_dlq")));
    let feed = paced_feed(&fx.broker.addr, "trades_raw", frames, 400, Duration::from_secs(1));
    let sluice = fx.run(&[&file]);
    let mut sluice =
        kill_9_while_progressing(sluice, &[&file], &fx.broker.addr, 3, 8, || trades_in(&pg.client, &table)).await;
    let ends = feed.await.unwrap();
    assert!(fx.committed(("totals", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(sluice.stop(), Some(0));
    assert_totals(&stored_totals(&pg.client, &table).await, &want);
    assert!(sluice.log_count("state restored") > 0, "the restarts restored the state");
}

/// `[state.postgres]`: the totals into a Kafka topic, their state and
/// offsets in a database of their own, through three kill -9s over two
/// partitions. The sink is at-least-once (a batch cut between the topic's
/// ack and the state's commit is written again), but the state counts each
/// trade once: per symbol and partition, the outputs are the running
/// totals 1, 2, … n with no gap, a repeated one equal to the first, and
/// the last ones sum to the feed's totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_in_a_database_of_its_own_counts_each_trade_once_through_kill_9s() {
    let fx = Fixture::new("state_own", &[("trades_raw", 2), ("totals_out", 1), ("totals_dlq", 1)]).await;
    let (broker, pg) = (&fx.broker, &fx.pg);
    let frames = common::trades::generated(8_000, 75);
    let records = frames.len() as i64;
    let want = expected_totals(&frames);
    let trades: i64 = want.values().map(|t| t.0).sum();
    let text = format!(
        r#"
name = "totals_kafka"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["trades_raw"]
group = "g-totals-kafka"
instance_id = "totals-kafka-a"
batch_max_records = 300
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{totals}"
[sinks.out]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "totals_out"
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "totals_dlq"
[state.postgres]
url = "{PG_URL}"
offsets_table = "{schema}.offsets"
"#,
        flattener = common::plugin_path("trade_flattener").display(),
        totals = common::plugin_path("symbol_totals").display(),
        schema = pg.name,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "totals_kafka", &text);
    // How far the state store's commits go, over both partitions.
    let committed = || async {
        let sql =
            format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM {}.offsets WHERE sink = '[state]'", pg.name);
        pg.client.query_one(&sql, &[]).await.map_or(0, |row| row.get::<_, i64>(0))
    };
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 400, Duration::from_secs(1));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let mut sluice = kill_9_while_progressing(sluice, &[&file], &broker.addr, 3, 10, committed).await;
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { committed().await >= records }).await;
    assert!(all, "records committed with the state: {} of {records}", committed().await);
    assert_eq!(sluice.stop(), Some(0));
    assert!(sluice.log_count("state restored") > 0, "the restarts restored the state");

    // Per (symbol, partition): each running total, as first written.
    let mut seen: BTreeMap<(String, i64), BTreeMap<i64, serde_json::Value>> = BTreeMap::new();
    let outputs = broker.consume("totals_out", trades as usize, WAIT);
    for m in &outputs {
        let v: serde_json::Value = serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap();
        let key = (v["symbol"].as_str().unwrap().to_string(), v["partition"].as_i64().unwrap());
        let n = v["trades"].as_i64().unwrap();
        let first = seen.entry(key.clone()).or_default().entry(n).or_insert_with(|| v.clone());
        assert_eq!(*first, v, "{key:?}: total {n} written twice with other values: the state counted a trade twice");
    }
    let mut totals: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for ((symbol, partition), by_count) in &seen {
        let n = by_count.len() as i64;
        assert_eq!(
            by_count.keys().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "{symbol}/{partition}: every running total, no gap"
        );
        let last = &by_count[&n];
        let t = totals.entry(symbol.clone()).or_default();
        t.0 += n;
        t.1 += last["volume"].as_f64().unwrap();
    }
    assert_totals(&totals, &want);
    eprintln!(
        "{} outputs for {trades} trades (at-least-once: {} written again)",
        outputs.len(),
        outputs.len() as i64 - trades
    );

    // `sluice state` reads the same store.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("state")
        .arg(&file)
        .args(["--stage", "2"])
        .env("SLUICE_BROKERS", &broker.addr)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(listed.contains("transform 2 trades_raw/0: ") && listed.contains("transform 2 trades_raw/1: "), "{listed}");
}

/// A sink that creates its table forgets the offsets stored for it (they
/// belong to the rows of an old table of that name), and the state with
/// them only when the state is kept with that sink: a new sink added beside
/// the state's keeper leaves the state alone; the keeper's table created
/// again forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sink_beside_the_states_keeper_leaves_the_state_alone() {
    use sluice::record::{Origin, Output};
    use sluice::state::{Change, Delta};
    let pg = PgSchema::create("state_new_sink").await;
    let dir = tempfile::tempdir().unwrap();
    let config = |table: &str| -> sluice::sinks::SinkConfig {
        toml::from_str(&format!(
            "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.{table}\"\ncreate_table = true\ncolumns = [{{ name = \"v\", type = \"text\" }}]\n",
            pg.name
        ))
        .unwrap()
    };
    let topic: std::sync::Arc<str> = "in".into();
    let partition = (topic.clone(), 0);
    let outputs: Vec<Output> = vec![Output { value: r#"{"v":"x"}"#.into(), ..Output::default() }];
    let origins = [Origin { topic: topic.clone(), partition: 0, offset: 0 }];
    let views: Vec<_> = outputs.iter().map(Output::view).collect();
    let refs: Vec<&Origin> = origins.iter().collect();
    let a = sluice::sinks::build("a", &config("a"), "totals", dir.path()).await.unwrap();
    a.state_keeper().unwrap().take_on();
    let delta = Delta {
        changes: vec![Change {
            stage: 1,
            partition: partition.clone(),
            key: b"\0MSFT".to_vec(),
            value: Some(b"2".to_vec()),
        }],
        positions: vec![(partition.clone(), 1)],
        fences: vec![(partition.clone(), 0)],
    };
    a.state_keeper().unwrap().commit(&delta, &views, &refs, &()).await.unwrap();
    async fn state_rows(pg: &PgSchema) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.sluice_state", pg.name);
        pg.client.query_one(&sql, &[]).await.unwrap().get(0)
    }
    assert_eq!(state_rows(&pg).await, 1);
    // A new sink b of the same pipeline, beside the keeper: its table is created.
    let b = sluice::sinks::build("b", &config("b"), "totals", dir.path()).await.unwrap();
    b.write_committed(&views, &refs, &()).await.unwrap();
    assert_eq!(pg.count("b").await, 1);
    assert_eq!(state_rows(&pg).await, 1, "the state kept with sink a is still there");
    // The keeper's table dropped and created again: its offsets and the state go.
    pg.client.batch_execute(&format!("DROP TABLE {}.a", pg.name)).await.unwrap();
    let a = sluice::sinks::build("a", &config("a"), "totals", dir.path()).await.unwrap();
    a.state_keeper().unwrap().take_on();
    a.write_committed(&views, &refs, &()).await.unwrap();
    assert_eq!(pg.count("a").await, 1, "the record is written again into the new table");
    assert_eq!(state_rows(&pg).await, 0, "the state went with the keeper's offsets");
}

/// Instances of one pipeline starting together make the state table once:
/// each reads the store at once, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_make_the_state_table_once() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let pg = PgSchema::create(&format!("state_race{round}")).await;
        let config: sluice::sinks::SinkConfig = toml::from_str(&format!(
            "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.t\"\ncreate_table = true\ncolumns = [{{ name = \"v\", type = \"text\" }}]\n",
            pg.name
        ))
        .unwrap();
        let mut stores = Vec::new();
        for _ in 0..4 {
            let sink = sluice::sinks::build("pg", &config, "race", dir.path()).await.unwrap();
            stores.push(sink.state_keeper().unwrap().store());
        }
        let all = sluice::state::Filter::default();
        let scans = stores.iter().map(|s| s.scan(&all));
        for scanned in futures::future::join_all(scans).await {
            assert!(scanned.is_ok(), "round {round}: {:#}", scanned.unwrap_err());
        }
    }
}

/// The fence, against PostgreSQL: a batch commits its state only if the
/// store still holds each of its partitions at the offset the batch's state
/// started from. A batch computed from a partition another instance has
/// committed past since (the last batch of an old owner, or the first of a
/// new owner that read the state before the old owner's last commit) is
/// refused with [`sluice::state::Fenced`], nothing of it written, whether
/// the state is kept by an exactly-once postgres sink or by a
/// `[state.postgres]` database; a fired timer's batch (no record moves the
/// offset) is fenced too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_from_a_partition_committed_since_is_fenced() {
    use sluice::record::{Origin, Output};
    use sluice::state::{Change, Delta, Fenced};
    let pg = PgSchema::create("state_fence").await;
    let dir = tempfile::tempdir().unwrap();
    let sink_config: sluice::sinks::SinkConfig = toml::from_str(&format!(
        "type = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.t\"\ncreate_table = true\ncolumns = [{{ name = \"v\", type = \"text\" }}]\n",
        pg.name
    ))
    .unwrap();
    let state_config: sluice::state::postgres::PostgresStateConfig =
        toml::from_str(&format!("url = \"{PG_URL}\"\noffsets_table = \"{}.offsets\"\n", pg.name)).unwrap();
    let sink = sluice::sinks::build("pg", &sink_config, "fence_sink", dir.path()).await.unwrap();
    let own = state_config.build("fence_store", dir.path()).unwrap();
    let keepers: [(&str, &dyn sluice::state::StateKeeper); 2] =
        [("sink", sink.state_keeper().unwrap()), ("store", &*own)];
    let topic: std::sync::Arc<str> = "in".into();
    let partition = (topic.clone(), 0);
    let delta = |from: i64, to: Option<i64>, value: &str| Delta {
        changes: vec![Change {
            stage: 1,
            partition: partition.clone(),
            key: b"\0k".to_vec(),
            value: Some(value.into()),
        }],
        positions: to.map(|to| (partition.clone(), to)).into_iter().collect(),
        fences: vec![(partition.clone(), from)],
    };
    for (which, keeper) in &keepers {
        // Rows only for the sink (the store takes none): records 0..3.
        let outputs: Vec<Output> =
            (0..3).map(|o| Output { value: format!(r#"{{"v":"{o}"}}"#).into(), ..Output::default() }).collect();
        let origins: Vec<Origin> = (0..3).map(|o| Origin { topic: topic.clone(), partition: 0, offset: o }).collect();
        let (outputs, origins) = if *which == "sink" { (outputs, origins) } else { (Vec::new(), Vec::new()) };
        let views: Vec<_> = outputs.iter().map(Output::view).collect();
        let refs: Vec<&Origin> = origins.iter().collect();
        keeper.commit(&delta(0, Some(3), "first"), &views, &refs, &()).await.unwrap();
        // Computed from offset 0 again: another instance's batch, late.
        let error = keeper.commit(&delta(0, Some(2), "stale"), &[], &[], &()).await.unwrap_err();
        let fenced =
            error.chain().find_map(|e| e.downcast_ref::<Fenced>()).unwrap_or_else(|| panic!("{which}: {error:#}"));
        assert_eq!((fenced.expected, fenced.stored), (0, 3), "{which}");
        // A fired timer's batch from the stale state: fenced too.
        let error = keeper.commit(&delta(0, None, "timer"), &[], &[], &()).await.unwrap_err();
        assert!(error.chain().any(|e| e.is::<Fenced>()), "{which}: {error:#}");
        // From where the store is: committed.
        keeper.commit(&delta(3, Some(5), "second"), &[], &[], &()).await.unwrap();
        let store = keeper.store();
        let loaded = store.load(1, &partition).await.unwrap();
        assert_eq!(loaded.next_offset, 5, "{which}");
        assert_eq!(
            loaded.entries.get(b"\0k".as_slice()).map(Vec::as_slice),
            Some(b"second".as_slice()),
            "{which}: nothing of a fenced batch"
        );
    }
    assert_eq!(pg.count("t").await, 3, "the sink's rows: the first batch's only");
}

/// Candles emitted once per window and partition, through three kill -9s
/// over two partitions; the last windows close by `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ohlc_candles_over_two_partitions_are_exact_through_kill_9s() {
    let fx = Fixture::new("ohlc_kill", &[("trades_raw", 2), ("ohlc_dlq", 1)]).await;
    let (pg, table) = (&fx.pg, fx.table("candles"));
    let frames = common::trades::generated(10_000, 74);
    let want = expected_candles(&frames, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    let source = kafka_source("g-ohlc", "instance_id = \"ohlc-a\"\nbatch_max_records = 300");
    let event_time = "allowed_lateness_ms = 0\nidle_timeout_ms = 4000";
    let file = fx.pipeline("ohlc", &ohlc_pipeline(&source, &table, event_time, &kafka_dead_letter("ohlc_dlq"), ""));
    let feed = paced_feed(&fx.broker.addr, "trades_raw", frames, 400, Duration::from_secs(1));
    let sluice = fx.run(&[&file]);
    let mut sluice =
        kill_9_while_progressing(sluice, &[&file], &fx.broker.addr, 3, 9, || candle_trades(&pg.client, &table)).await;
    let ends = feed.await.unwrap();
    // The last window of each partition closes once it has been idle.
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    assert!(fx.committed(("ohlc", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
    assert!(sluice.log_count("idle partitions' watermarks moved on") > 0);
    assert!(fx.broker.consume("ohlc_dlq", 0, Duration::from_secs(2)).is_empty(), "no late record, no dead letter");
}

/// The candles in Python (`plugins/py-candles`) and JavaScript
/// (`plugins/js-candles`), built against contract 0.3 with their SDKs'
/// state: a capture replayed to its end gives the candles computed from
/// the feed, every column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_candles_from_a_capture_are_exact() {
    let frames = common::trades::generated(2_000, 77);
    let want = expected_candles(&frames, 10_000);
    for plugin in ["py_candles", "js_candles"] {
        let pg = PgSchema::create(plugin).await;
        let table = format!("{}.candles", pg.name);
        let dir = tempfile::tempdir().unwrap();
        let mut capture = frames.join(&b'\n');
        capture.push(b'\n');
        std::fs::write(dir.path().join("capture.jsonl"), capture).unwrap();
        let source = "[source]\ntype = \"file\"\npath = \"capture.jsonl\"";
        let text = ohlc_pipeline(source, &table, "allowed_lateness_ms = 0", "[dead_letter]\ntype = \"stdout\"", "")
            .replace(
                &common::plugin_path("ohlc_candles").display().to_string(),
                &common::plugin_path(plugin).display().to_string(),
            );
        let file = write_pipeline(dir.path(), "ohlc", &text);
        let out = run_until_eof(&file);
        let (stdout, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{plugin}: {log}");
        let dead = stdout.lines().count();
        assert_eq!(dead, 0, "{plugin}: dead letters, the first: {:?}", stdout.lines().next());
        assert!(log.contains(&format!("plugin={plugin}")) && log.contains("contract=0.3"), "{log}");
        assert_candles(&stored_candles(&pg.client, &table).await, &want);
    }
}

/// Two instances in one group share the partitions and each keeps the state
/// of its own; one stops mid-feed (a scale-down), the survivor restores the
/// state of the partitions it is given, and the candles are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_state_and_the_survivor_takes_it_over() {
    let GroupRig { fx, table, frames, want, trades, file } = GroupRig::new("ohlc_two", 8_000, 76, 200).await;
    let (broker, pg) = (&fx.broker, &fx.pg);
    let mut a = SluiceProcess::run(&[&file], &broker.addr);
    let mut b = SluiceProcess::run(&[&file], &broker.addr);
    let shared = wait_until(WAIT, || async {
        matches!((owned(&a), owned(&b)), (Some(x), Some(y)) if x > 0 && y > 0 && x + y == 4)
    })
    .await;
    assert!(shared, "both instances own partitions");
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 400, Duration::from_millis(700));
    assert!(wait_until(WAIT, || async { candle_trades(&pg.client, &table).await > 0 }).await, "no candle");
    let assigned_before = b.log_count("partitions assigned");
    assert_eq!(a.stop(), Some(0), "a graceful stop: the last batches are committed first");
    assert!(b.wait_log("partitions assigned", assigned_before).await, "the survivor is given the partitions");
    let ends = feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    assert!(fx.committed(("ohlc", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(b.stop(), Some(0));
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
    assert!(b.log_count("state restored") >= 4, "the survivor restored every partition's state");
}

/// Graceful hand-overs back and forth under a paced feed: a second
/// instance joins the group (the first hands it partitions while its last
/// batches may still be committing) and leaves again (it hands them back),
/// three times. A new owner that read a partition's state before the old
/// owner's last commit is fenced off and starts again, so no trade counts
/// twice and no timer fires twice: the candles are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_hand_overs_back_and_forth_keep_the_candles_exact() {
    let GroupRig { fx, table, frames, want, trades, file } = GroupRig::new("ohlc_handover", 10_000, 78, 100).await;
    let (broker, pg) = (&fx.broker, &fx.pg);
    let mut a = SluiceProcess::run(&[&file], &broker.addr);
    assert!(wait_until(WAIT, || async { owned(&a) == Some(4) }).await, "the first instance owns every partition");
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 250, Duration::from_millis(600));
    assert!(wait_until(WAIT, || async { candle_trades(&pg.client, &table).await > 0 }).await, "no candle");
    let mut fences = 0;
    for round in 1..=3 {
        let mut b = SluiceProcess::run(&[&file], &broker.addr);
        let shared = wait_until(WAIT, || async {
            matches!((owned(&a), owned(&b)), (Some(x), Some(y)) if x > 0 && y > 0 && x + y == 4)
        })
        .await;
        assert!(shared, "round {round}: both instances own partitions");
        let offsets = fx.offsets_table();
        let committed = committed_offsets(&pg.client, &offsets, "ohlc", "pg", "trades_raw").await.values().sum();
        let moved = wait_batch_committed(&pg.client, &offsets, ("ohlc", "pg"), "trades_raw", committed).await;
        assert!(moved, "round {round}: no batch while both own partitions");
        let before = a.log_count("partitions assigned");
        assert_eq!(b.stop(), Some(0), "round {round}: a graceful stop");
        assert!(a.wait_log("partitions assigned", before).await, "round {round}: the partitions come back");
        fences += b.log_count("state fenced");
    }
    let ends = feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    assert!(fx.committed(("ohlc", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(a.stop(), Some(0));
    fences += a.log_count("state fenced");
    eprintln!("batches fenced off: {fences}");
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
    assert!(broker.consume("ohlc_dlq", 0, Duration::from_secs(2)).is_empty(), "nothing dead-lettered");
}

/// A fence broken mid-feed: as if another instance had committed one more
/// record of each partition (the offsets row moved on under the running
/// instance), the instance's next batch is refused, the pipeline starts
/// again on its own, restores the state as committed, and goes on. The
/// candles are exact for every trade but those of the records the "other
/// instance" took: none counts twice, none of the rest is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_pipeline_starts_again_and_goes_on_exactly() {
    let (rig, frames) = SwapRig::new("ohlc_fenced", 4_000, 79, &common::plugin_path("ohlc_candles")).await;
    let sluice = rig.run();
    let records = frames.len();
    let feed = paced_feed(&rig.fx.broker.addr, "trades_raw", frames, 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    let sql = format!(
        "UPDATE {}.sluice_offsets SET next_offset = next_offset + 1 WHERE pipeline = 'ohlc' RETURNING partition, next_offset",
        rig.fx.pg.name
    );
    let taken: Vec<(i32, i64)> =
        rig.fx.pg.client.query(&sql, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get::<_, i64>(1) - 1)).collect();
    assert_eq!(taken.len(), 2, "both partitions committed before the move");
    assert!(sluice.wait_log("state fenced", 0).await, "the next batch was not fenced");
    assert!(
        sluice.wait_log("pipeline starting again after a state fence", 0).await,
        "the pipeline did not start again"
    );
    // Every trade but those of the records taken.
    let kept: Vec<Vec<u8>> = rig
        .fx
        .broker
        .consume("trades_raw", records, WAIT)
        .iter()
        .filter(|m| !taken.contains(&(rdkafka::Message::partition(*m), rdkafka::Message::offset(*m))))
        .map(|m| rdkafka::Message::payload(m).unwrap_or_default().to_vec())
        .collect();
    assert_eq!(kept.len(), records - 2);
    let want = expected_candles(&kept, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    let ends = feed.await.unwrap();
    let all = wait_until(WAIT, || async { rig.candle_trades().await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", rig.candle_trades().await);
    assert!(rig.committed(&ends).await, "the input committed");
    let mut sluice = sluice;
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&rig.fx.pg.client, &rig.table).await, &want);
    assert!(sluice.log_count("state restored") >= 4, "restored at the start and again after the fence");
}

/// The property behind the candles: any partitioning of a multiset of
/// trades, each part folded into partial candles (`ohlc-candles`' fold) and
/// the partials merged by the PostgreSQL sink's rules in any order and
/// batching, gives the candles of one pass over all the trades. Ties on the
/// timestamp and repeated prices are frequent by construction.
#[test]
fn any_partitioning_merged_by_the_sinks_rules_gives_the_one_pass_candles() {
    use ohlc_candles::Candle;
    use proptest::prelude::*;
    use sluice::record::{Origin, Output, OutputRef};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(PgSchema::create("ohlc_prop"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), "").unwrap();
    let case = std::sync::atomic::AtomicUsize::new(0);
    // (symbol, 10 s slot, ms in slot, price, volume in hundredths, part)
    let trades = prop::collection::vec((0..2usize, 0..18i64, 0..3i64, 0..5usize, 1..1000u32, 0..4usize), 1..60);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(24));
    runner
        .run(&(trades, 1..4usize), |(trades, batches)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let table = format!("{}.c{n}", pg.name);
            let one_pass = |which: &dyn Fn(usize) -> bool| {
                let mut candles: BTreeMap<(String, i64), Candle> = BTreeMap::new();
                for (i, &(symbol, slot, ms, price, volume, _)) in trades.iter().enumerate() {
                    if which(i) {
                        let ts = 1_700_000_000_000 + slot * 10_000 + ms;
                        let key = (format!("S{symbol}"), ts - ts.rem_euclid(60_000));
                        candles.entry(key).or_default().add(10.0 + price as f64, f64::from(volume) / 100.0, ts);
                    }
                }
                candles
            };
            let want = one_pass(&|_| true);
            // Each part's partial candles, as ohlc-candles emits them.
            let mut rows: Vec<Vec<u8>> = Vec::new();
            for part in 0..4 {
                for ((symbol, start), c) in one_pass(&|i| trades[i].5 == part) {
                    rows.push(
                        serde_json::json!({"symbol": symbol, "window_start": start, "open": c.open, "high": c.high,
                            "low": c.low, "close": c.close, "volume": c.volume, "vwap": c.vwap(), "trades": c.trades,
                            "first_ts": c.first_ts, "last_ts": c.last_ts})
                        .to_string()
                        .into_bytes(),
                    );
                }
            }
            rows.reverse();
            let sink_toml = ohlc_pipeline(
                "[source]\ntype = \"file\"\npath = \"x\"",
                &table,
                "",
                "[dead_letter]\ntype = \"stdout\"",
                "",
            )
            .replace("create_table = true", "create_table = true\nexactly_once = false");
            let file = write_pipeline(dir.path(), "prop", &sink_toml);
            let spec = sluice::config::load_pipeline(&file, None).unwrap();
            let stored = rt.block_on(async {
                let sink = sluice::sinks::build("pg", &spec.sinks["pg"], "prop", dir.path()).await.unwrap();
                let origin = Origin { topic: "t".into(), partition: 0, offset: 0 };
                let per_batch = rows.len().div_ceil(batches);
                for chunk in rows.chunks(per_batch) {
                    let outputs: Vec<Output> =
                        chunk.iter().map(|v| Output { value: v.clone().into(), ..Output::default() }).collect();
                    let views: Vec<OutputRef> = outputs.iter().map(Output::view).collect();
                    let origins: Vec<&Origin> = views.iter().map(|_| &origin).collect();
                    assert!(sink.write(&views, &origins).await.unwrap().is_empty());
                }
                stored_candles(&pg.client, &table).await
            });
            let want: BTreeMap<(String, i64), crate::state::Candle> = want
                .into_iter()
                .map(|(k, c)| (k, (c.open, c.high, c.low, c.close, c.volume, c.vwap(), c.trades as i64)))
                .collect();
            assert_candles(&stored, &want);
            Ok(())
        })
        .unwrap();
}

/// PostgreSQL down for 10 s mid-run: the batch waits (the sink retries;
/// nothing is read further), the state stays as it was before the batch,
/// and the candles come out exact once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_down_for_ten_seconds_still_gives_exact_candles() {
    let pg = PrivatePostgres::start();
    let client = pg.client().await;
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    broker.create_topic("ohlc_dlq", 1).await;
    let frames = common::trades::generated(6_000, 77);
    let want = expected_candles(&frames, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    let source = r#"[source]
type = "kafka"
brokers = "${SLUICE_BROKERS}"
topics = ["trades_raw"]
group = "g-ohlc-pg"
batch_max_records = 200"#;
    let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"ohlc_dlq\"";
    let dir = tempfile::tempdir().unwrap();
    let text =
        ohlc_pipeline(source, "public.candles", "idle_timeout_ms = 3000", dead_letter, "").replace(PG_URL, &pg.url());
    let file = write_pipeline(dir.path(), "ohlc", &text);
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 300, Duration::from_millis(500));
    assert!(wait_until(WAIT, || async { candle_trades(&client, "public.candles").await > 0 }).await, "no candle");
    pg.stop_server();
    assert!(sluice.wait_log("sink write failed; retrying", 0).await, "the outage is logged and retried");
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.start_server();
    let client = pg.client().await;
    let ends = feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&client, "public.candles").await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&client, "public.candles").await);
    let offsets = "public.sluice_offsets";
    assert!(wait_committed(&client, offsets, ("ohlc", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&client, "public.candles").await, &want);
}
