//! `sluice backfill` end to end: a past time range of the trades topic
//! recomputed into a side table, exactly (the rows of the frames whose
//! Kafka timestamps are in the range, each once), again after a rerun and
//! after a kill -9, with the live consumer group's offsets untouched.

use crate::common;

use common::services::*;
use common::trades::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Kafka timestamp of frame 0; frame `i` is `i` seconds later.
const BASE_MS: i64 = 1_575_526_000_000;

/// Produces `frames` to `trades_raw`, frame `i` to partition `i % partitions`
/// with timestamp `BASE_MS + i s`, one record per batch (see [`Broker::produce`]).
async fn produce_timed(broker: &Broker, frames: &[Vec<u8>], partitions: i32) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for (i, frame) in frames.iter().enumerate() {
        let record = FutureRecord::<(), [u8]>::to("trades_raw")
            .payload(frame)
            .partition(i as i32 % partitions)
            .timestamp(BASE_MS + i as i64 * 1000);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
}

/// `sluice backfill pipeline ARGS`, its log in `log`.
fn backfill(pipeline: &Path, args: &[&str], brokers: &str, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .arg("backfill")
        .arg(pipeline)
        .args(args)
        .env("SLUICE_BROKERS", brokers)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for `child` to end by itself (two minutes at most); its exit code.
fn exit_code(mut child: Child, log: &Path) -> i32 {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the backfill did not end: {}", std::fs::read_to_string(log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_range_is_recomputed_into_a_side_table_exactly_once_beside_the_live_group() {
    let (broker, pg, table) = trades_setup("backfill", 2).await;
    let frames = generated(60, 41);
    produce_timed(&broker, &frames, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-live", 7, PG_URL, ""));
    let log = dir.path().join("log");
    let live_offsets = broker.committed("g-live", "trades_raw", 2);

    // Frames 20..40: their Kafka timestamps are in [BASE + 20 s, BASE + 40 s).
    let side = format!("{}.trades_side", pg.name);
    let range = ["--from", &(BASE_MS + 20_000).to_string(), "--to", "2019-12-05T06:07:20Z", "--into", &side];
    assert_eq!(
        "2019-12-05T06:07:20Z".parse(),
        Ok(sluice::sources::Position::Time(BASE_MS + 40_000)),
        "the two ways of writing a time agree"
    );
    let status = exit_code(backfill(&file, &range, &broker.addr, &log), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("backfill done"), "{text}");
    let expected = expected_trades(&frames[20..40]);
    assert!(!expected.is_empty());
    assert_eq!(stored_trades_in(&pg.client, &side).await, expected, "exactly the range: {text}");

    // Again: nothing is written twice.
    assert_eq!(exit_code(backfill(&file, &range, &broker.addr, &log), &log), 0);
    assert_eq!(stored_trades_in(&pg.client, &side).await, expected, "a rerun writes nothing twice");

    // A range given as offsets: frame i is at offset i / 2 of partition
    // i % 2, so offsets 5..10 of both partitions are frames 10..20; a
    // partition the start leaves out is not read.
    let by_offsets = format!("{}.trades_offsets", pg.name);
    let offsets = ["--from", "0:5,1:5", "--to", "0:10,1:10", "--into", by_offsets.as_str()];
    assert_eq!(exit_code(backfill(&file, &offsets, &broker.addr, &log), &log), 0);
    assert_eq!(stored_trades_in(&pg.client, &by_offsets).await, expected_trades(&frames[10..20]));
    let one = format!("{}.trades_p1", pg.name);
    assert_eq!(exit_code(backfill(&file, &["--from", "1:25", "--into", one.as_str()], &broker.addr, &log), &log), 0);
    let odd_tail: Vec<Vec<u8>> = frames[50..].iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(stored_trades_in(&pg.client, &one).await, expected_trades(&odd_tail));

    // The whole topic, slowly, killed halfway and started again: every trade once.
    let whole = format!("{}.trades_all", pg.name);
    let all = ["--from", "earliest", "--into", whole.as_str()];
    let slow: Vec<&str> = all.iter().copied().chain(["--max-rate", "10"]).collect();
    let mut child = backfill(&file, &slow, &broker.addr, &log);
    assert!(
        wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, &whole).await > 0 }).await,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = count_rows(&pg.client, &whole).await;
    let expected_all = expected_trades(&frames);
    assert!(partial < expected_all.len(), "killed halfway: {partial} of {} rows", expected_all.len());
    assert_eq!(exit_code(backfill(&file, &all, &broker.addr, &log), &log), 0);
    assert_eq!(stored_trades_in(&pg.client, &whole).await, expected_all, "after a kill -9, every trade once");

    // The live pipeline's group was never joined nor committed to, and the
    // live table was never written.
    assert_eq!(broker.committed("g-live", "trades_raw", 2), live_offsets);
    assert_eq!(count_rows(&pg.client, &table).await, 0);

    // A bad bound is named.
    let status = exit_code(backfill(&file, &["--from", "yesterday", "--into", &side], &broker.addr, &log), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status, 2, "{text}");
    assert!(text.contains("RFC 3339"), "{text}");
    // So is a target that is the live one.
    let status = exit_code(backfill(&file, &["--from", "earliest", "--into", &table], &broker.addr, &log), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status, 2, "{text}");
    assert!(text.contains("live target"), "{text}");
}

/// A backfill never writes into the live table under another spelling of
/// its name (`public.t` for `t`: the names are resolved as PostgreSQL
/// does), never runs over a range that is empty for certain, and refuses a
/// source that cannot read a range. Each is refused before anything is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_into_the_live_table_or_over_an_empty_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let live = format!("bf_live_{}_{}", std::process::id(), free_port());
    let pipeline = |source: &str| {
        format!(
            "name = \"bf\"\n{source}[[transforms]]\nplugin = \"{}\"\n[sinks.pg]\ntype = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{live}\"\n{TRADE_COLUMNS}\n[dead_letter]\ntype = \"stdout\"\n",
            common::plugin_path("trade_flattener").display()
        )
    };
    let kafka = "[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntopics = [\"in\"]\n";
    let file = write_pipeline(dir.path(), "bf", &pipeline(kafka));
    let log = dir.path().join("log");
    let cases: [(&[&str], &str); 2] = [
        (&["--from", "earliest", "--into", &format!("public.{live}")], "is the live target"),
        (&["--from", "2020-01-02T00:00:00Z", "--to", "2020-01-01T00:00:00Z", "--into", "side"], "the range is empty"),
    ];
    for (args, want) in cases {
        let code = exit_code(backfill(&file, args, "127.0.0.1:9", &log), &log);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    let file_source = write_pipeline(dir.path(), "bf", &pipeline("[source]\ntype = \"file\"\npath = \"bf.toml\"\n"));
    let code = exit_code(backfill(&file_source, &["--from", "earliest", "--into", "side"], "", &log), &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("a `file` source cannot"), "{text}");
}
