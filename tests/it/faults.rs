//! Fault injection against the real broker (Tansu) and real PostgreSQL:
//! crashes, restarts of every service, failover between instances, hostile
//! plugins and hostile input. Each test asserts that nothing is lost, that
//! PostgreSQL holds every trade exactly once, and that records keep flowing.
//! The README's fault table lists these tests.

use crate::common;

use common::plugin_path;
use common::services::*;
use common::trades::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::Message;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// Waits until `table` has at least `rows` rows.
async fn wait_rows(client: &tokio_postgres::Client, table: &str, rows: usize) -> bool {
    wait_until(WAIT, || async { count_rows(client, table).await >= rows }).await
}

/// The end of most fault tests: wait until `table` holds as many rows as
/// `expected`, give a duplicate `settle` to land, stop `sluice` gracefully,
/// and check every trade is stored exactly once.
async fn stop_once_all_stored(
    sluice: &mut SluiceProcess,
    client: &tokio_postgres::Client,
    table: &str,
    expected: &[Trade],
    settle: Duration,
    what: &str,
) {
    assert!(
        wait_rows(client, table, expected.len()).await,
        "rows: {} of {}",
        count_rows(client, table).await,
        expected.len()
    );
    tokio::time::sleep(settle).await;
    assert_eq!(sluice.stop(), Some(0));
    assert!(stored_trades_in(client, table).await == expected, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_a_feed_stores_every_trade_exactly_once() {
    let (broker, pg, table) = trades_setup("kill9", 2).await;
    let frames = generated(36_000, 99);
    let expected = expected_trades(&frames);
    assert!(expected.len() >= 100_000, "{} trades", expected.len());

    let dir = tempfile::tempdir().unwrap();
    // Static membership: a restarted instance takes its partitions back at once.
    let text = trades_pipeline_to(&table, "g-kill9", 500, "${SLUICE_PG_URL}", r#"instance_id = "kill9-a""#);
    let file = write_pipeline(dir.path(), "trades", &text);
    // A paced feed (about 30 s), so that every kill lands while it flows.
    let feed = paced_feed(&broker.addr, "trades_raw", frames, 1_000, Duration::from_millis(700));
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let mut rng = StdRng::seed_from_u64(5);
    for kill in 1..=5 {
        let before = count_rows(&pg.client, &table).await;
        assert!(
            wait_rows(&pg.client, &table, (before + 1).min(expected.len())).await,
            "no progress before kill {kill}"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2000))).await;
        sluice.kill9();
        eprintln!("kill -9 #{kill} at {} rows", count_rows(&pg.client, &table).await);
        sluice = SluiceProcess::run(&[&file], &broker.addr);
    }
    let ends = feed.await.unwrap();
    let offsets = format!("{}.sluice_offsets", pg.name);
    assert!(wait_committed(&pg.client, &offsets, ("trades", "pg"), "trades_raw", &ends).await, "the input committed");
    assert_eq!(sluice.stop(), Some(0));
    let stored = stored_trades_in(&pg.client, &table).await;
    assert_eq!(stored.len(), expected.len(), "row count");
    assert!(stored == expected, "every trade exactly once after 5 kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restart_mid_stream_pauses_then_resumes_exactly_once() {
    let pg = PrivatePostgres::start();
    let client = pg.client().await;
    let broker = Broker::start();
    create_trades_topics(&broker, 2).await;
    let frames = generated(8_000, 41);
    let expected = expected_trades(&frames);

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to("public.trades", "g-pg", 200, &pg.url(), ""));
    let addr = broker.addr.clone();
    let feed = tokio::spawn(async move { produce_to(&addr, "trades_raw", &frames, &[]).await });
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    assert!(wait_rows(&client, "public.trades", 1).await, "no rows before the restart");
    pg.stop_server();
    assert!(sluice.wait_log("sink write failed; retrying", 0).await, "the outage is logged and retried");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_server();
    let client = pg.client().await;
    feed.await.unwrap();
    stop_once_all_stored(
        &mut sluice,
        &client,
        "public.trades",
        &expected,
        Duration::from_secs(1),
        "every trade exactly once across the outage",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_pauses_then_resumes_exactly_once() {
    let data = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_durable(data.path());
    create_trades_topics(&broker, 2).await;
    let pg = PgSchema::create("brokerrestart").await;
    let table = format!("{}.trades", pg.name);
    let first = generated(3_000, 51);
    let second = generated(3_000, 52);
    let expected = expected_trades(&[first.clone(), second.clone()].concat());

    let dir = tempfile::tempdir().unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-broker", 200, "${SLUICE_PG_URL}", ""));
    broker.produce("trades_raw", &first).await;
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    assert!(wait_rows(&pg.client, &table, 1).await, "no rows before the broker restart");
    broker.kill();
    assert!(sluice.wait_log("kafka consumer error", 0).await, "the outage is logged and retried");
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();
    broker.produce("trades_raw", &second).await;
    stop_once_all_stored(
        &mut sluice,
        &pg.client,
        &table,
        &expected,
        Duration::from_secs(1),
        "every trade exactly once across the broker restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_group_and_the_survivor_takes_over_when_one_stops() {
    let (broker, pg, table) = trades_setup("failover", 4).await;
    let frames = generated(8_000, 61);
    let expected = expected_trades(&frames);

    let dir = tempfile::tempdir().unwrap();
    let extra = r#"properties = { "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }"#;
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-failover", 100, "${SLUICE_PG_URL}", extra));
    let mut a = SluiceProcess::run(&[&file], &broker.addr);
    let mut b = SluiceProcess::run(&[&file], &broker.addr);
    let addr = broker.addr.clone();
    let feed = tokio::spawn(async move { produce_to(&addr, "trades_raw", &frames, &[]).await });
    let shared = wait_until(WAIT, || async {
        let owned = |p: &SluiceProcess| {
            std::fs::read_to_string(&p.log)
                .unwrap_or_default()
                .lines()
                .rev()
                .find(|l| l.contains("partitions assigned"))
                .map(|l| l.matches("trades_raw/").count())
        };
        matches!((owned(&a), owned(&b)), (Some(x), Some(y)) if x > 0 && y > 0 && x + y == 4)
    })
    .await;
    assert!(shared, "both instances own partitions");
    let before = count_rows(&pg.client, &table).await;
    assert!(wait_rows(&pg.client, &table, before + 1).await);
    // A graceful stop (a scale-down, a rolling deploy): the instance leaves
    // the group and the survivor is given its partitions at once. (After a
    // `kill -9`, Tansu 0.6.0 evicts the dead member after the session timeout
    // but hands the survivor its old assignment again; see the README.)
    let assigned_before = b.log_count("partitions assigned");
    assert_eq!(a.stop(), Some(0));
    feed.await.unwrap();
    assert!(b.wait_log("partitions assigned", assigned_before).await, "the survivor is given the partitions");
    stop_once_all_stored(
        &mut b,
        &pg.client,
        &table,
        &expected,
        Duration::from_secs(1),
        "every trade exactly once after the failover",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_and_dead_lettered() {
    let broker = Broker::start();
    for t in ["in", "out", "dlq"] {
        broker.create_topic(t, 1).await;
    }
    // A port that listens: connecting to it fails only because the sandbox denies it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let chaos = plugin_path("chaos");
    let stage = |mode: &str, extra: &str| {
        format!(
            "[[transforms]]\nplugin = \"{}\"\nconfig = {{ mode = \"{mode}\", trigger = \"{mode}\"{extra} }}\n",
            chaos.display()
        )
    };
    let text = [
        "[source]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopics = [\"in\"]\nbatch_max_records = 20\n"
            .to_string(),
        stage("trap", ""),
        stage("loop", "") + "limits = { cpu_ms = 200 }\n",
        stage("alloc", "") + "limits = { memory_mib = 16 }\n",
        stage("big", ", big_mib = 20"),
        stage("many", ", many = 200000"),
        stage("fs", ""),
        stage("net", &format!(", addr = \"127.0.0.1:{port}\"")),
        "[sinks.out]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"out\"\n".to_string(),
        "[dead_letter]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopic = \"dlq\"\n".to_string(),
    ]
    .concat();
    let hostile = [
        ("trap", "chaos: trapping as asked"),
        ("loop", "CPU limit exceeded (200 ms per call)"),
        ("alloc", "memory limit exceeded (16777216 bytes)"),
        ("big", "output limit: 20971520 bytes of output for one record (limit 16777216)"),
        ("many", "output limit: 200000 outputs for one record (limit 100000)"),
        ("fs", "chaos: cannot read /etc/hostname"),
        ("net", &format!("chaos: cannot connect to 127.0.0.1:{port}")),
    ];
    let mut values = Vec::new();
    for (i, (mode, _)) in hostile.iter().enumerate() {
        values.push(format!("ok-{i}").into_bytes());
        values.push(mode.as_bytes().to_vec());
    }
    let goods_after: Vec<Vec<u8>> = (0..200).map(|i| format!("after-{i}").into_bytes()).collect();
    values.extend(goods_after.iter().cloned());
    broker.produce("in", &values).await;

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "hostile", &text);
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let goods = hostile.len() + goods_after.len();
    let out = broker.consume("out", goods, WAIT);
    let dead = broker.consume("dlq", hostile.len(), WAIT);
    assert_eq!(sluice.stop(), Some(0));

    let mut got: Vec<Vec<u8>> = out.iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect();
    let mut want: Vec<Vec<u8>> =
        values.iter().filter(|v| !hostile.iter().any(|(m, _)| m.as_bytes() == v.as_slice())).cloned().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every good record passes, including the 200 after the hostile ones");
    assert_eq!(dead.len(), hostile.len(), "one dead letter per hostile record");
    for (mode, reason) in hostile {
        let letter = dead
            .iter()
            .find(|m| m.payload() == Some(mode.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {mode}"));
        assert_eq!(header(letter, "sluice.plugin").as_deref(), Some("chaos"), "{mode}");
        let error = header(letter, "sluice.error").unwrap();
        assert!(error.contains(reason), "{mode}: {error}");
    }
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_dead_lettered_with_reasons_and_the_stream_goes_on() {
    let (broker, pg, table) = trades_setup("hostileinput", 1).await;
    let ten_mb = format!(r#"{{"type":"trade","data":"{}"}}"#, "x".repeat(10 << 20)).into_bytes();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let hostile: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xfe, 0x00, b'{'], "not a Finnhub frame"),
        (Vec::new(), "not a Finnhub frame"),
        (deep.clone(), "not a Finnhub frame"),
        (br#"{"type":"trade","data":[{"s":null,"p":1,"t":1,"v":1}]}"#.to_vec(), "bad trade in `data`"),
        (ten_mb.clone(), "bad trade in `data`"),
    ];
    let good_before = generated(100, 71);
    let good_after = generated(300, 72);
    let mut frames = good_before.clone();
    frames.extend(hostile.iter().map(|(v, _)| v.clone()));
    frames.extend(good_after.iter().cloned());
    let expected = expected_trades(&[good_before, good_after].concat());
    produce_to(&broker.addr, "trades_raw", &frames, &[("message.max.bytes", "33554432")]).await;

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-input", 50, "${SLUICE_PG_URL}", ""));
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    assert!(
        wait_rows(&pg.client, &table, expected.len()).await,
        "rows: {} of {}",
        count_rows(&pg.client, &table).await,
        expected.len()
    );
    let dead = broker.consume("trades_dlq", hostile.len(), WAIT);
    assert_eq!(sluice.stop(), Some(0), "no panic, a clean exit");
    assert!(
        stored_trades_in(&pg.client, &table).await == expected,
        "the good frames around the hostile ones, each once"
    );

    assert_eq!(dead.len(), hostile.len(), "one dead letter per hostile frame");
    for (value, reason) in &hostile {
        let letter = if value.len() > 1 << 20 {
            // Over the dead-letter producer's message size: kept truncated, with the origin.
            let m = dead.iter().find(|m| header(m, "sluice.truncated").is_some()).expect("the 10 MB frame, truncated");
            assert_eq!(header(m, "sluice.truncated").unwrap(), value.len().to_string());
            assert_eq!(m.payload().unwrap(), &value[..64 << 10]);
            m
        } else {
            dead.iter()
                .find(|m| m.payload().unwrap_or_default() == value.as_slice())
                .expect("each hostile frame as it was")
        };
        let error = header(letter, "sluice.error").unwrap();
        assert!(error.starts_with(reason), "{error}");
        assert!(header(letter, "sluice.offset").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_read_again_from_the_start_writes_no_row_twice() {
    let (broker, pg, table) = trades_setup("replay", 2).await;
    let frames = generated(800, 111);
    let expected = expected_trades(&frames);
    broker.produce("trades_raw", &frames).await;

    let dir = tempfile::tempdir().unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-replay-1", 100, "${SLUICE_PG_URL}", ""));
    let mut first = SluiceProcess::run(&[&file], &broker.addr);
    assert!(wait_rows(&pg.client, &table, expected.len()).await);
    assert_eq!(first.stop(), Some(0));

    // A new consumer group (as after a lost or reset group) reads everything
    // again; the offsets stored with the rows say it is all there already.
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-replay-2", 100, "${SLUICE_PG_URL}", ""));
    let mut second = SluiceProcess::run(&[&file], &broker.addr);
    assert!(second.wait_log("skipped rows already in the table", 0).await, "the replayed rows are recognised");
    let skipped = || {
        let log = std::fs::read_to_string(&second.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("skipped rows"))
            .filter_map(|l| l.split("rows=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
            .sum::<usize>()
    };
    let replayed = wait_until(WAIT, || async { skipped() >= expected.len() }).await;
    assert!(replayed, "every row of the re-read topic is skipped: {} of {}", skipped(), expected.len());
    assert_eq!(second.stop(), Some(0));
    assert!(stored_trades_in(&pg.client, &table).await == expected, "no row written twice");

    // The table dropped (its offsets table kept): the sink creates it again
    // and forgets the stored offsets, so a re-read fills it, once.
    pg.client.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-replay-3", 100, "${SLUICE_PG_URL}", ""));
    let mut third = SluiceProcess::run(&[&file], &broker.addr);
    assert!(third.wait_log("forgot the source offsets stored with the rows of the old one", 0).await);
    stop_once_all_stored(
        &mut third,
        &pg.client,
        &table,
        &expected,
        Duration::from_millis(500),
        "every trade once in the new table",
    )
    .await;
}
