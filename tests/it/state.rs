//! Keyed state (contract 0.3): the `symbol-totals` plugin keeps running
//! totals per symbol in the state of each source partition. Its changes
//! are committed with the rows and the offsets, so the totals count every
//! trade exactly once through replays and kill -9s; a put past
//! `limits.state_mib` fails the batch; a stateful stage without a sink to
//! keep its state is refused.

use crate::common;

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

/// A pass-through stage inserted before a stateful one: the state stored
/// for the stateful stage's old place would be orphaned (its totals would
/// start again from 1), so the start is refused with the reason and the
/// commands; `sluice state` lists the orphaned state, `--move` gives it to
/// the stage's new place, and the totals go on from where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_would_orphan_stored_state_is_refused_until_it_is_moved() {
    let pg = PgSchema::create("state_orphan").await;
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| trade_frame("MSFT", 300.0 + i as f64, 1_700_000_000_000 + i)).collect();
    let write = |n: usize| {
        let text: Vec<u8> = frames[..n].iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
        std::fs::write(dir.path().join("feed.jsonl"), text).unwrap();
    };
    write(2);
    let source = "[source]\ntype = \"file\"\npath = \"feed.jsonl\"";
    let text = totals_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\"");
    let file = write_pipeline(dir.path(), "totals", &text);
    let out = run_until_eof(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stored_totals(&pg.client, &table).await["MSFT"].0, 2);

    // A pass-through stage before the totals: their state would be orphaned.
    let totals = format!("plugin = \"{}\"", common::plugin_path("symbol_totals").display());
    let echo = format!("plugin = \"{}\"", common::plugin_path("raw_echo").display());
    write_pipeline(dir.path(), "totals", &text.replacen(&totals, &format!("{echo}\n[[transforms]]\n{totals}"), 1));
    write(3);
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("holds keys of transform 2, and transform 2 is now raw_echo, which keeps no state"), "{log}");
    assert!(log.contains("--move 2 --to 3"), "{log}");
    assert_eq!(stored_totals(&pg.client, &table).await["MSFT"].0, 2, "nothing written");
    let state = |args: &[&str]| sluice_state(&file, args);
    assert!(state(&[]).contains("transform 2's state is orphaned"), "{}", state(&[]));
    assert!(state(&["--move", "2", "--to", "3"]).contains("to transform 3"));
    let out = run_until_eof(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = pg.client.query(&format!("SELECT trades FROM {table} WHERE symbol = 'MSFT'"), &[]).await.unwrap();
    let trades: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(trades, [3], "the third trade counted on from 2: {trades:?}");
}

/// A paced feed over two partitions, and three kill -9s: the totals
/// (state, rows and offsets committed together) count every trade once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_over_two_partitions_stay_exact_through_kill_9s() {
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    broker.create_topic("totals_dlq", 1).await;
    let pg = PgSchema::create("state_kill").await;
    let table = format!("{}.totals", pg.name);
    let frames = common::trades::generated(10_000, 72);
    let want = expected_totals(&frames);
    let trades: i64 = want.values().map(|t| t.0).sum();
    let source = r#"[source]
type = "kafka"
brokers = "${SLUICE_BROKERS}"
topics = ["trades_raw"]
group = "g-totals"
instance_id = "totals-a"
batch_max_records = 300"#;
    let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"totals_dlq\"";
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "totals", &totals_pipeline(source, &table, "", dead_letter));
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 400, Duration::from_secs(1));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let mut sluice =
        kill_9_while_progressing(sluice, &[&file], &broker.addr, 3, 8, || trades_in(&pg.client, &table)).await;
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { trades_in(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades counted: {} of {trades}", trades_in(&pg.client, &table).await);
    tokio::time::sleep(Duration::from_secs(2)).await; // a double count would land now
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
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    broker.create_topic("totals_out", 1).await;
    broker.create_topic("totals_dlq", 1).await;
    let pg = PgSchema::create("state_own").await;
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
    a.keeps_state();
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
    a.write_committed(&views, &refs, Some(&delta), &()).await.unwrap();
    async fn state_rows(pg: &PgSchema) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.sluice_state", pg.name);
        pg.client.query_one(&sql, &[]).await.unwrap().get(0)
    }
    assert_eq!(state_rows(&pg).await, 1);
    // A new sink b of the same pipeline, beside the keeper: its table is created.
    let b = sluice::sinks::build("b", &config("b"), "totals", dir.path()).await.unwrap();
    b.write_committed(&views, &refs, None, &()).await.unwrap();
    assert_eq!(pg.count("b").await, 1);
    assert_eq!(state_rows(&pg).await, 1, "the state kept with sink a is still there");
    // The keeper's table dropped and created again: its offsets and the state go.
    pg.client.batch_execute(&format!("DROP TABLE {}.a", pg.name)).await.unwrap();
    let a = sluice::sinks::build("a", &config("a"), "totals", dir.path()).await.unwrap();
    a.keeps_state();
    a.write_committed(&views, &refs, None, &()).await.unwrap();
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
            stores.push(sluice::sinks::build("pg", &config, "race", dir.path()).await.unwrap().state_store().unwrap());
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
    let state_config: sluice::sinks::postgres::keeper::PostgresStateConfig =
        toml::from_str(&format!("url = \"{PG_URL}\"\noffsets_table = \"{}.offsets\"\n", pg.name)).unwrap();
    let keepers = [
        ("sink", sluice::sinks::build("pg", &sink_config, "fence_sink", dir.path()).await.unwrap()),
        ("store", state_config.build("fence_store", dir.path()).unwrap()),
    ];
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
        keeper.write_committed(&views, &refs, Some(&delta(0, Some(3), "first")), &()).await.unwrap();
        // Computed from offset 0 again: another instance's batch, late.
        let error = keeper.write_committed(&[], &[], Some(&delta(0, Some(2), "stale")), &()).await.unwrap_err();
        let fenced =
            error.chain().find_map(|e| e.downcast_ref::<Fenced>()).unwrap_or_else(|| panic!("{which}: {error:#}"));
        assert_eq!((fenced.expected, fenced.stored), (0, 3), "{which}");
        // A fired timer's batch from the stale state: fenced too.
        let error = keeper.write_committed(&[], &[], Some(&delta(0, None, "timer")), &()).await.unwrap_err();
        assert!(error.chain().any(|e| e.is::<Fenced>()), "{which}: {error:#}");
        // From where the store is: committed.
        keeper.write_committed(&[], &[], Some(&delta(3, Some(5), "second")), &()).await.unwrap();
        let store = keeper.state_store().unwrap();
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

/// Past `limits.state_mib` a put faults the batch: with `on_plugin_failure
/// = "dead_letter"` the records go to the dead letters, the limit is the
/// reason logged, and nothing reaches the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_past_the_state_limit_fails_its_records_with_the_reason() {
    let pg = PgSchema::create("state_limit").await;
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames = common::trades::generated(20, 73);
    let text: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
    std::fs::write(dir.path().join("feed.jsonl"), text).unwrap();
    let source = "on_plugin_failure = \"dead_letter\"\n[source]\ntype = \"file\"\npath = \"feed.jsonl\"";
    let limits = "[transforms.limits]\nstate_mib = 0";
    let file = write_pipeline(
        dir.path(),
        "totals",
        &totals_pipeline(source, &table, limits, "[dead_letter]\ntype = \"stdout\""),
    );
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("state limit of 0 MiB reached (limits.state_mib)"), "{log}");
    // Every frame is dead-lettered (the stdout dead letters print the values).
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), frames.len());
    assert_eq!(trades_in(&pg.client, &table).await, 0);
}

/// `limits.state_ttl_ms`: a symbol not traded for longer than the TTL is
/// deleted from the state (and from `sluice_state` with the next commit),
/// so its running total starts again; a symbol within it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_not_written_within_its_ttl_is_deleted() {
    let broker = Broker::start();
    broker.create_topic("trades_raw", 1).await;
    let pg = PgSchema::create("state_ttl").await;
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let source =
        "[source]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopics = [\"trades_raw\"]\ngroup = \"g-ttl\"";
    let limits = "[transforms.limits]\nstate_ttl_ms = 2000";
    let text = totals_pipeline(source, &table, limits, "[dead_letter]\ntype = \"stdout\"");
    let file = write_pipeline(dir.path(), "totals", &text);
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let trades_of = |symbol: &'static str| {
        let (client, table) = (&pg.client, &table);
        async move { stored_totals(client, table).await.get(symbol).map_or(0, |t| t.0) }
    };
    let stored_keys = || async {
        let sql = format!(
            "SELECT convert_from(substring(key from 2), 'UTF8') FROM {}.sluice_state WHERE get_byte(key, 0) = 0 ORDER BY 1",
            pg.name
        );
        pg.client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    broker.produce("trades_raw", &[trade_frame("A", 1.0, 1_000), trade_frame("A", 2.0, 2_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("A").await == 2 }).await, "A's two trades");
    tokio::time::sleep(Duration::from_millis(3_000)).await; // past A's TTL
    broker.produce("trades_raw", &[trade_frame("B", 1.0, 3_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("B").await == 1 }).await, "B's trade");
    assert_eq!(stored_keys().await, ["B"], "A expired, in the store too");
    broker.produce("trades_raw", &[trade_frame("A", 3.0, 4_000), trade_frame("B", 2.0, 4_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("B").await == 2 }).await, "B's second trade");
    assert_eq!(trades_of("A").await, 1, "A's total started again after its key expired");
    assert_eq!(stored_keys().await, ["A", "B"]);
    assert_eq!(sluice.stop(), Some(0));
}

/// A stateful stage needs an exactly-once PostgreSQL sink to keep its state.
#[test]
fn a_stateful_stage_without_a_state_sink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("feed.jsonl"), "{}\n").unwrap();
    let text = format!(
        "name = \"nostate\"\n[source]\ntype = \"file\"\npath = \"feed.jsonl\"\n[[transforms]]\nplugin = \"{}\"\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n",
        common::plugin_path("symbol_totals").display()
    );
    let file = write_pipeline(dir.path(), "nostate", &text);
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(
            "transform 1 (symbol_totals) keeps state (contract 0.3): the pipeline needs an exactly-once postgres sink"
        ),
        "{log}"
    );
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

/// Candles emitted once per window and partition, through three kill -9s
/// over two partitions; the last windows close by `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ohlc_candles_over_two_partitions_are_exact_through_kill_9s() {
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    broker.create_topic("ohlc_dlq", 1).await;
    let pg = PgSchema::create("ohlc_kill").await;
    let table = format!("{}.candles", pg.name);
    let frames = common::trades::generated(10_000, 74);
    let want = expected_candles(&frames, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    let source = r#"[source]
type = "kafka"
brokers = "${SLUICE_BROKERS}"
topics = ["trades_raw"]
group = "g-ohlc"
instance_id = "ohlc-a"
batch_max_records = 300"#;
    let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"ohlc_dlq\"";
    let dir = tempfile::tempdir().unwrap();
    let event_time = "allowed_lateness_ms = 0\nidle_timeout_ms = 4000";
    let file = write_pipeline(dir.path(), "ohlc", &ohlc_pipeline(source, &table, event_time, dead_letter, ""));
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 400, Duration::from_secs(1));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let mut sluice =
        kill_9_while_progressing(sluice, &[&file], &broker.addr, 3, 9, || candle_trades(&pg.client, &table)).await;
    feed.await.unwrap();
    // The last window of each partition closes once it has been idle.
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    tokio::time::sleep(Duration::from_secs(2)).await; // a double count would land now
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
    assert!(sluice.log_count("idle partitions' watermarks moved on") > 0);
    assert!(broker.consume("ohlc_dlq", 0, Duration::from_secs(2)).is_empty(), "no late record, no dead letter");
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

/// A Finnhub frame of one trade.
pub(crate) fn trade_frame(symbol: &str, price: f64, t: i64) -> Vec<u8> {
    format!(r#"{{"type":"trade","data":[{{"s":"{symbol}","p":{price},"t":{t},"v":1.0,"c":[]}}]}}"#).into_bytes()
}

/// A quiet partition closes its last window by `idle_timeout` while the
/// other partition stays busy (its batches come every 200 ms, so the
/// pipeline is never without a batch for long): QUIET's candle is stored
/// while BUSY's feed still runs, and every candle is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_partition_closes_its_window_while_another_stays_busy() {
    let broker = Broker::start();
    broker.create_topic("trades_raw", 2).await;
    let pg = PgSchema::create("ohlc_quiet").await;
    let table = format!("{}.candles", pg.name);
    let t0: i64 = 1_700_000_000_000;
    // QUIET: three trades just before its window ends, in partition 1.
    let quiet: Vec<Vec<u8>> = (0..3).map(|i| trade_frame("QUIET", 10.0 + i as f64, t0 + 9_990 + i)).collect();
    // BUSY: 15 s of trades in partition 0, 50 ms of event time apart.
    let busy: Vec<Vec<u8>> = (0..300).map(|i| trade_frame("BUSY", 100.0 + (i % 7) as f64, t0 + 50 * i)).collect();
    let mut frames = quiet.clone();
    frames.extend(busy.iter().cloned());
    let want = expected_candles(&frames, 10_000);
    let source = "[source]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopics = [\"trades_raw\"]\ngroup = \"g-ohlc-quiet\"";
    let dir = tempfile::tempdir().unwrap();
    let event_time = "allowed_lateness_ms = 0\nidle_timeout_ms = 4000";
    let text = ohlc_pipeline(source, &table, event_time, "[dead_letter]\ntype = \"stdout\"", "");
    let file = write_pipeline(dir.path(), "ohlc", &text);
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    produce_at(&broker.addr, "trades_raw", 1, &quiet).await;
    let addr = broker.addr.clone();
    let feed = tokio::spawn(async move {
        for chunk in busy.chunks(4) {
            produce_at(&addr, "trades_raw", 0, chunk).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let quiet_closed = || async {
        // (The sink creates the table with its first batch.)
        let rows = pg.client.query(&format!("SELECT 1 FROM {table} WHERE symbol = 'QUIET'"), &[]).await;
        rows.is_ok_and(|rows| !rows.is_empty())
    };
    assert!(wait_until(Duration::from_secs(14), quiet_closed).await, "QUIET's window did not close while BUSY ran");
    assert!(!feed.is_finished(), "BUSY's feed ended first: the test did not keep the other partition busy");
    let ticks = sluice.log_count("idle partitions' watermarks moved on");
    assert_eq!(ticks, 0, "QUIET closed on an idle tick (no batch for 2 s), not after a batch of BUSY's");
    feed.await.unwrap();
    let trades: i64 = want.values().map(|c| c.6).sum();
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&pg.client, &table).await, &want);
}

/// Frames a capture file holds for the late-record tests: two on time,
/// then one 49 s behind the watermark (with 1 s of lateness), then one on
/// time again; one frame a batch.
fn late_capture(dir: &std::path::Path) {
    let frames = [(100_000, 1.0), (200_000, 2.0), (150_000, 3.0), (201_000, 4.0)].map(|(t, p)| trade_frame("A", p, t));
    let mut text = frames.join(&b'\n');
    text.push(b'\n');
    std::fs::write(dir.join("late.jsonl"), text).unwrap();
}

/// A late record under each policy: dropped, dead-lettered with the
/// watermark in the reason, or routed to a sink as it is; the candles hold
/// the on-time trades only, and the input's end closes the last window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_record_goes_where_its_policy_says() {
    let source = "[source]\ntype = \"file\"\npath = \"late.jsonl\"\nbatch_max_records = 1";
    for (policy, late) in [("drop", "\"drop\""), ("dead_letter", "\"dead_letter\""), ("route", "{ route = \"late\" }")]
    {
        let pg = PgSchema::create(&format!("ohlc_late_{policy}")).await;
        let table = format!("{}.candles", pg.name);
        let dir = tempfile::tempdir().unwrap();
        late_capture(dir.path());
        let event_time = format!("allowed_lateness_ms = 1000\nlate = {late}");
        let late_sink = if policy == "route" { "[sinks.late]\ntype = \"stdout\"" } else { "" };
        let source = format!("default_sink = \"pg\"\n{source}");
        let source = source.as_str();
        let text = ohlc_pipeline(source, &table, &event_time, "[dead_letter]\ntype = \"stdout\"", late_sink);
        let file = write_pipeline(dir.path(), "ohlc", &text);
        let out = run_until_eof(&file);
        let (stdout, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{policy}: {log}");
        let candles = stored_candles(&pg.client, &table).await;
        let trades: Vec<(i64, i64)> = candles.iter().map(|((_, start), c)| (*start, c.6)).collect();
        assert_eq!(trades, [(100_000, 1), (200_000, 2)], "{policy}: the on-time trades, every window closed");
        match policy {
            "drop" => assert_eq!(stdout.trim(), "", "dropped: no dead letter"),
            "dead_letter" => {
                assert_eq!(stdout.lines().count(), 1, "{stdout}");
                assert!(stdout.contains(r#""t":150000"#), "the frame is dead-lettered: {stdout}");
            }
            _ => {
                let routed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
                assert_eq!((routed["ts"].as_i64(), routed["price"].as_f64()), (Some(150_000), Some(3.0)), "{stdout}");
            }
        }
    }
}

/// A trade stamped in the year 2100 (a clock gone wrong) among trades of
/// now: it goes to the dead letters as ahead of time and does not move the
/// watermark, so the trades after it are on time, before and after a
/// restart, and no candle is stored for 2100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_timestamp_does_not_poison_its_partition() {
    let pg = PgSchema::create("ohlc_future").await;
    let table = format!("{}.candles", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let far = 4_102_444_800_000_i64; // 2100-01-01
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let window = now - now % 10_000 - 30_000; // the pipeline's windows are 10 s
    let write = |name: &str, trades: &[(i64, f64)]| {
        let frames: Vec<Vec<u8>> = trades.iter().map(|&(t, p)| trade_frame("A", p, t)).collect();
        let mut text = frames.join(&b'\n');
        text.push(b'\n');
        std::fs::write(dir.path().join(name), text).unwrap();
    };
    write("in.jsonl", &[(window, 1.0), (far, 99.0), (window + 1_000, 2.0), (window + 2_000, 3.0)]);
    let source = "default_sink = \"pg\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\nbatch_max_records = 1";
    let text = ohlc_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\"", "");
    let file = write_pipeline(dir.path(), "ohlc", &text);
    let out = run_until_eof(&file);
    let (stdout, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{log}");
    assert_eq!(stdout.lines().count(), 1, "only the 2100 trade is dead-lettered: {stdout}");
    assert!(stdout.contains(&far.to_string()), "{stdout}");
    let candles = stored_candles(&pg.client, &table).await;
    let trades: Vec<(i64, i64)> = candles.iter().map(|((_, start), c)| (*start, c.6)).collect();
    assert_eq!(trades, [(window, 3)], "the trades of now, in one window; none for 2100");
    // The same file again, with two more trades of the next window: a
    // restart finds a watermark of now, not of 2100.
    write(
        "in.jsonl",
        &[
            (window, 1.0),
            (far, 99.0),
            (window + 1_000, 2.0),
            (window + 2_000, 3.0),
            (window + 10_000, 4.0),
            (window + 11_000, 5.0),
        ],
    );
    let out = run_until_eof(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let candles = stored_candles(&pg.client, &table).await;
    let trades: Vec<(i64, i64)> = candles.iter().map(|((_, start), c)| (*start, c.6)).collect();
    assert_eq!(trades, [(window, 3), (window + 10_000, 2)], "the new trades are on time after the restart");
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
) -> (Broker, PgSchema, String, Vec<Vec<u8>>, BTreeMap<(String, i64), Candle>, i64) {
    let broker = Broker::start();
    broker.create_topic("trades_raw", partitions).await;
    broker.create_topic("ohlc_dlq", 1).await;
    let pg = PgSchema::create(name).await;
    let table = format!("{}.candles", pg.name);
    let frames = common::trades::generated(frames, seed);
    let want = expected_candles(&frames, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    (broker, pg, table, frames, want, trades)
}

/// A paced feed into `trades_raw` (2 partitions) and the flagship
/// pipeline, whose candles plugin is a file of its own (`live`) to deploy
/// new builds onto, with what the candles must come out as.
struct SwapRig {
    broker: Broker,
    pg: PgSchema,
    table: String,
    want: BTreeMap<(String, i64), Candle>,
    trades: i64,
    /// Holds the pipeline file and the plugin builds.
    dir: tempfile::TempDir,
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
        let (broker, pg, table, frames, want, trades) = candle_services(name, 2, frames, seed).await;
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("ohlc_candles.wasm");
        std::fs::copy(build, &live).unwrap();
        let source = format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"trades_raw\"]\ngroup = \"g-{name}\"\nbatch_max_records = 200"
        );
        let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"ohlc_dlq\"";
        let text = ohlc_pipeline(&source, &table, &format!("idle_timeout_ms = {idle_ms}"), dead_letter, "")
            .replace(&common::plugin_path("ohlc_candles").display().to_string(), &live.display().to_string());
        let file = write_pipeline(dir.path(), "ohlc", &text);
        (SwapRig { broker, pg, table, want, trades, dir, live, file }, frames)
    }

    fn run(&self) -> SluiceProcess {
        SluiceProcess::run(&[&self.file], &self.broker.addr)
    }

    /// Puts `build` in place of the live plugin file (a rename, as a deploy does).
    fn deploy(&self, build: &std::path::Path) {
        let aside = self.live.with_extension("incoming");
        std::fs::copy(build, &aside).unwrap();
        std::fs::rename(&aside, &self.live).unwrap();
    }

    async fn candle_trades(&self) -> i64 {
        candle_trades(&self.pg.client, &self.table).await
    }

    /// Waits for the feed, then for every trade to be in a closed candle;
    /// stops `sluice` and checks the candles.
    async fn finish(&self, feed: tokio::task::JoinHandle<()>, mut sluice: SluiceProcess) -> SluiceProcess {
        feed.await.unwrap();
        let all = wait_until(WAIT, || async { self.candle_trades().await >= self.trades }).await;
        assert!(all, "trades in candles: {} of {}", self.candle_trades().await, self.trades);
        tokio::time::sleep(Duration::from_secs(2)).await; // a double count would land now
        assert_eq!(sluice.stop(), Some(0));
        assert_candles(&stored_candles(&self.pg.client, &self.table).await, &self.want);
        assert!(self.broker.consume("ohlc_dlq", 0, Duration::from_secs(2)).is_empty(), "nothing dead-lettered");
        sluice
    }
}

/// Hot swaps mid-window under a paced feed: each new version takes over
/// the state (open windows, timers, watermarks), and the candles are exact:
/// no gap, no double count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_mid_window_hand_the_state_over() {
    let (rig, frames) = SwapRig::new("ohlc_swap", 6_000, 75, &common::plugin_path("ohlc_candles")).await;
    let sluice = rig.run();
    let feed = paced_feed(&rig.broker.addr, "trades_raw", frames, 200, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    for swap in 0..3 {
        let before = sluice.log_count("plugin swap ready");
        rig.deploy(&rebuilt(&common::plugin_path("ohlc_candles"), rig.dir.path(), &format!("v{swap}")));
        assert!(sluice.wait_log("plugin swap ready", before).await, "swap {swap} was not applied");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let sluice = rig.finish(feed, sluice).await;
    assert!(sluice.log_count("reload applied") >= 3, "three swaps");
}

/// Stored state entries of `schema`'s pipeline `ohlc` by value length, and
/// the partitions' state versions.
async fn state_shapes(client: &tokio_postgres::Client, schema: &str) -> (BTreeMap<i32, i64>, BTreeMap<Vec<u8>, i64>) {
    let lengths = client
        .query(
            &format!("SELECT length(value), count(*) FROM {schema}.sluice_state WHERE pipeline = 'ohlc' AND get_byte(key, 0) = 0 GROUP BY 1"),
            &[],
        )
        .await
        .unwrap();
    let versions = client
        .query(
            &format!("SELECT value, count(*) FROM {schema}.sluice_state WHERE pipeline = 'ohlc' AND key = '\\x03'::bytea GROUP BY 1"),
            &[],
        )
        .await
        .unwrap();
    (lengths.iter().map(|r| (r.get(0), r.get(1))).collect(), versions.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// State versions across hot swaps mid-window, under a paced feed. The
/// pipeline starts on the version 0 build (candles kept as JSON). A
/// version 1 build without a migrate is refused, with the reason, and the
/// running version goes on. The version 1 build (binary candles, a migrate
/// from 0) takes the open windows over, each partition converted in a
/// batch. A build that corrupts the candles it keeps and fails most trades
/// is rolled back, its batches' state changes discarded. The candles are
/// exact, and a restart on a version 0 build is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_versions_migrate_or_are_refused_and_a_failing_version_rolls_back() {
    let build = |name: &str| common::plugin_path(name);
    let (rig, frames) = SwapRig::new("ohlc_versions", 10_000, 76, &build("ohlc_candles_json_state")).await;
    let mut sluice = rig.run();
    let feed = paced_feed(&rig.broker.addr, "trades_raw", frames, 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    let (lengths, versions) = state_shapes(&rig.pg.client, &rig.pg.name).await;
    assert!(lengths.keys().all(|len| *len != 72) && versions.is_empty(), "version 0 keeps JSON: {lengths:?}");

    // Version 1 without a migrate: refused, the running version goes on.
    let rejected = sluice.log_count("reload rejected");
    rig.deploy(&build("ohlc_candles_no_migrate"));
    assert!(sluice.wait_log("reload rejected", rejected).await, "the swap without a migrate was applied");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let reason = log.lines().rev().find(|l| l.contains("reload rejected")).unwrap();
    assert!(
        reason.contains("cannot take over the stage's state")
            && reason.contains("keeps state version 1, and the pipeline's state holds version 0: it has no migrate"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // Version 1 with its migrate: swapped in mid-window, state converted.
    let ready = sluice.log_count("plugin swap ready");
    rig.deploy(&build("ohlc_candles"));
    assert!(sluice.wait_log("plugin swap ready", ready).await, "the migrating version was not swapped in");
    assert!(sluice.wait_log("state migrated", 0).await, "no partition's state was migrated");
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // A failing build: rolled back, what it changed discarded.
    let rolled = sluice.log_count("plugin version rolled back");
    rig.deploy(&build("ohlc_candles_failing"));
    assert!(sluice.wait_log("plugin version rolled back", rolled).await, "the failing version was not rolled back");
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // Stopped mid-feed, the open windows are stored as version 1 keeps them.
    assert_eq!(sluice.stop(), Some(0));
    assert!(!feed.is_finished(), "the feed ended before the stop: slow it down");
    let migrations = sluice.log_count("state migrated");
    assert!((1..=2).contains(&migrations), "each partition holding entries converted once: {migrations}");
    let (lengths, versions) = state_shapes(&rig.pg.client, &rig.pg.name).await;
    assert!(!lengths.is_empty() && lengths.keys().all(|len| *len == 72), "open candles are version 1's: {lengths:?}");
    assert_eq!(versions.keys().collect::<Vec<_>>(), [&1u32.to_le_bytes().to_vec()], "{versions:?}");

    // A start on the version 0 build is refused: it cannot read them.
    rig.deploy(&build("ohlc_candles_json_state"));
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["run", "--admin-addr", "off"])
        .arg(&rig.file)
        .env("SLUICE_BROKERS", &rig.broker.addr)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a version 0 build started on version 1 state: {stderr}");
    assert!(
        stderr.contains("transform 2 (ohlc_candles) cannot take over the stage's state: it keeps state version 0, and the pipeline's state holds version 1: it has no migrate"),
        "{stderr}"
    );

    // The version 1 build restores them and finishes the feed exactly.
    rig.deploy(&build("ohlc_candles"));
    let sluice = rig.finish(feed, rig.run()).await;
    assert_eq!(sluice.log_count("state migrated"), 0, "restored as version 1");
}

/// State versions in the Python and JavaScript SDKs: the pipeline starts
/// on the candles' earlier build (state version 0, JSON candles) under a
/// paced feed; the current build (version 1, 72 binary bytes, a `migrate`
/// from 0 written with the SDK) is swapped in mid-window and converts the
/// open windows. The candles are exact, and the state is version 1's.
async fn the_candles_migrate_their_state_in_a_hot_swap(name: &str, earlier: &str, current: &str) {
    // The feed holds at its middle until the swap is ready, however long the
    // reload takes (15 s seen on a loaded machine): the idle timeout is
    // longer than that, so the open windows wait for it too.
    let (rig, frames) = SwapRig::with_idle(name, 3_000, 77, &common::plugin_path(earlier), 45_000).await;
    let (first, rest) = frames.split_at(frames.len() / 2);
    let sluice = rig.run();
    let feed = paced_feed(&rig.broker.addr, "trades_raw", first.to_vec(), 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    feed.await.unwrap();
    let (lengths, versions) = state_shapes(&rig.pg.client, &rig.pg.name).await;
    assert!(lengths.keys().all(|len| *len != 72) && versions.is_empty(), "version 0 keeps JSON: {lengths:?}");

    let ready = sluice.log_count("plugin swap ready");
    rig.deploy(&common::plugin_path(current));
    assert!(sluice.wait_log("plugin swap ready", ready).await, "the migrating version was not swapped in");
    let feed = paced_feed(&rig.broker.addr, "trades_raw", rest.to_vec(), 100, Duration::from_millis(300));
    assert!(sluice.wait_log("state migrated", 0).await, "no partition's state was migrated");
    let sluice = rig.finish(feed, sluice).await;
    let migrations = sluice.log_count("state migrated");
    assert!((1..=2).contains(&migrations), "each partition holding entries converted once: {migrations}");
    let (_, versions) = state_shapes(&rig.pg.client, &rig.pg.name).await;
    assert!(versions.keys().all(|v| *v == 1u32.to_le_bytes()), "stored as version 1: {versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_migrates_its_state_in_a_hot_swap() {
    the_candles_migrate_their_state_in_a_hot_swap("py_versions", "py_candles_json_state", "py_candles").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_plugin_migrates_its_state_in_a_hot_swap() {
    the_candles_migrate_their_state_in_a_hot_swap("js_versions", "js_candles_json_state", "js_candles").await;
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
    broker: Broker,
    pg: PgSchema,
    table: String,
    frames: Vec<Vec<u8>>,
    want: BTreeMap<(String, i64), Candle>,
    trades: i64,
    /// Holds the pipeline file.
    dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

impl GroupRig {
    /// `frames` generated frames (seed `seed`), consumer group `g-{name}`,
    /// batches of at most `batch` records.
    async fn new(name: &str, frames: usize, seed: u64, batch: usize) -> GroupRig {
        let (broker, pg, table, frames, want, trades) = candle_services(name, 4, frames, seed).await;
        let source = format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"trades_raw\"]\ngroup = \"g-{name}\"\nbatch_max_records = {batch}\nproperties = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }}"
        );
        let dead_letter = "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"ohlc_dlq\"";
        let dir = tempfile::tempdir().unwrap();
        let text = ohlc_pipeline(&source, &table, "idle_timeout_ms = 3000", dead_letter, "");
        let file = write_pipeline(dir.path(), "ohlc", &text);
        GroupRig { broker, pg, table, frames, want, trades, dir, file }
    }
}

/// Two instances in one group share the partitions and each keeps the state
/// of its own; one stops mid-feed (a scale-down), the survivor restores the
/// state of the partitions it is given, and the candles are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_state_and_the_survivor_takes_it_over() {
    let GroupRig { broker, pg, table, frames, want, trades, dir: _dir, file } =
        GroupRig::new("ohlc_two", 8_000, 76, 200).await;
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
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    let GroupRig { broker, pg, table, frames, want, trades, dir: _dir, file } =
        GroupRig::new("ohlc_handover", 10_000, 78, 100).await;
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
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let before = a.log_count("partitions assigned");
        assert_eq!(b.stop(), Some(0), "round {round}: a graceful stop");
        assert!(a.wait_log("partitions assigned", before).await, "round {round}: the partitions come back");
        fences += b.log_count("state fenced");
    }
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&pg.client, &table).await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&pg.client, &table).await);
    tokio::time::sleep(Duration::from_secs(2)).await; // a double count would land now
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
    let feed = paced_feed(&rig.broker.addr, "trades_raw", frames, 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    let sql = format!(
        "UPDATE {}.sluice_offsets SET next_offset = next_offset + 1 WHERE pipeline = 'ohlc' RETURNING partition, next_offset",
        rig.pg.name
    );
    let taken: Vec<(i32, i64)> =
        rig.pg.client.query(&sql, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get::<_, i64>(1) - 1)).collect();
    assert_eq!(taken.len(), 2, "both partitions committed before the move");
    assert!(sluice.wait_log("state fenced", 0).await, "the next batch was not fenced");
    assert!(
        sluice.wait_log("pipeline starting again after a state fence", 0).await,
        "the pipeline did not start again"
    );
    // Every trade but those of the records taken.
    let kept: Vec<Vec<u8>> = rig
        .broker
        .consume("trades_raw", records, WAIT)
        .iter()
        .filter(|m| !taken.contains(&(rdkafka::Message::partition(*m), rdkafka::Message::offset(*m))))
        .map(|m| rdkafka::Message::payload(m).unwrap_or_default().to_vec())
        .collect();
    assert_eq!(kept.len(), records - 2);
    let want = expected_candles(&kept, 10_000);
    let trades: i64 = want.values().map(|c| c.6).sum();
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { rig.candle_trades().await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", rig.candle_trades().await);
    tokio::time::sleep(Duration::from_secs(2)).await; // a double count would land now
    let mut sluice = sluice;
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&rig.pg.client, &rig.table).await, &want);
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
    feed.await.unwrap();
    let all = wait_until(WAIT, || async { candle_trades(&client, "public.candles").await >= trades }).await;
    assert!(all, "trades in candles: {} of {trades}", candle_trades(&client, "public.candles").await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sluice.stop(), Some(0));
    assert_candles(&stored_candles(&client, "public.candles").await, &want);
}
