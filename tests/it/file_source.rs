//! The `file` source end to end: a captured feed replayed from a file into
//! PostgreSQL, exactly once across replays, `sluice run --until-eof`
//! stopping at its end, and a file followed as it grows. No broker.

use crate::common;

use common::services::*;
use common::trades::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// The trades pipeline reading `capture.jsonl` (JSON lines) into `table`,
/// dead letters on stdout.
fn replay_pipeline(table: &str) -> String {
    format!(
        r#"
name = "replay"
[source]
type = "file"
path = "capture.jsonl"
format = "json"
batch_max_records = 200
[[transforms]]
plugin = "{plugin}"
[sinks.pg]
type = "postgres"
url = "{PG_URL}"
table = "{table}"
create_table = true
{TRADE_COLUMNS}
[dead_letter]
type = "stdout"
"#,
        plugin = common::plugin_path("trade_flattener").display()
    )
}

/// `sluice run ARGS pipeline`, its stdout in `dir/stdout`, its log in `dir/log`.
fn sluice(dir: &Path, args: &[&str], pipeline: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["run", "--admin-addr", "off"])
        .args(args)
        .arg(pipeline)
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit by itself, for at most `WAIT`.
fn exit_code(mut child: std::process::Child, dir: &Path) -> Option<i32> {
    let started = Instant::now();
    while started.elapsed() < WAIT {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("sluice did not stop at the end of the input: {}", std::fs::read_to_string(dir.join("log")).unwrap());
}

fn lines(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_feed_replays_into_postgres_exactly_once_and_run_stops_at_its_end() {
    let pg = PgSchema::create("replay").await;
    let table = format!("{}.trades", pg.name);
    let not_json: Vec<Vec<u8>> = vec![b"garbage".to_vec(), br#"{"type":"trade","data":["#.to_vec()];
    let not_a_trade = br#"{"type":"trade","data":[{"s":"A","p":1,"t":2}]}"#.to_vec();
    let mut frames = generated(1500, 21);
    frames.extend(not_json.iter().cloned());
    frames.push(not_a_trade.clone());
    frames.extend(generated(500, 22));
    let expected = expected_trades(&frames);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("capture.jsonl"), lines(&frames)).unwrap();
    let pipeline = write_pipeline(dir.path(), "replay", &replay_pipeline(&table));
    let code = exit_code(sluice(dir.path(), &["--until-eof"], &pipeline), dir.path());
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(code, Some(0), "exit 0 at the end of the input: {log}");
    assert!(log.contains("pipeline finished: its input ended"), "{log}");
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "every trade of the capture, once");
    let mut dead: Vec<Vec<u8>> =
        std::fs::read(dir.path().join("stdout")).unwrap().split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    dead.retain(|l| !l.is_empty());
    dead.sort();
    let mut want: Vec<Vec<u8>> = not_json.iter().cloned().chain([not_a_trade]).collect();
    want.sort();
    assert_eq!(dead, want, "the lines that are not JSON and the frame that is not a trade are dead-lettered");

    // A second replay of the same capture stores nothing twice: the offsets
    // (byte positions in the file) are stored with the rows.
    let code = exit_code(sluice(dir.path(), &["--until-eof"], &pipeline), dir.path());
    assert_eq!(code, Some(0));
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "a replay again stores nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_until_eof_the_file_is_followed_as_it_grows() {
    let pg = PgSchema::create("follow").await;
    let table = format!("{}.trades", pg.name);
    let (first, second) = (generated(300, 31), generated(300, 32));
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture.jsonl");
    std::fs::write(&capture, lines(&first)).unwrap();
    let pipeline = write_pipeline(dir.path(), "replay", &replay_pipeline(&table));
    let mut child = sluice(dir.path(), &[], &pipeline);

    let want_first = expected_trades(&first);
    let stored = wait_until(WAIT, || async { count_rows(&pg.client, &table).await >= want_first.len() }).await;
    assert!(stored, "the file's lines so far: {} of {} rows", count_rows(&pg.client, &table).await, want_first.len());
    let mut file = std::fs::OpenOptions::new().append(true).open(&capture).unwrap();
    std::io::Write::write_all(&mut file, &lines(&second)).unwrap();
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    let want = expected_trades(&all);
    let stored = wait_until(WAIT, || async { count_rows(&pg.client, &table).await >= want.len() }).await;
    assert!(stored, "the lines appended: {} of {} rows", count_rows(&pg.client, &table).await, want.len());
    assert!(child.try_wait().unwrap().is_none(), "still following the file");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).stdin(Stdio::null()).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "graceful exit");
    assert_eq!(stored_trades_in(&pg.client, &table).await, want, "every trade, once");
}
