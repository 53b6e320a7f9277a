//! Broken plugin versions, against a real broker and PostgreSQL: a bad hot
//! swap is rolled back before its output reaches a sink, a version failing
//! from the start pauses the pipeline, the `dead_letter` policy is bounded,
//! and a plugin's log flood is rate-limited.

use crate::common;

use common::plugin_path;
use common::services::*;
use common::trades::{count_rows, expected_trades, generated, stored_trades_in, trades_setup};
use rdkafka::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Trades from Kafka through the flattener and a chaos stage (`chaos`: its
/// config) into PostgreSQL `table`; dead letters to `trades_dlq`.
fn pipeline(table: &str, group: &str, chaos: &str, extra: &str) -> String {
    format!(
        r#"
name = "broken"
{extra}
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["trades_raw"]
group = "{group}"
batch_max_records = 100

[[transforms]]
plugin = "{flattener}"

[[transforms]]
plugin = "{chaos_wasm}"
{chaos}

[sinks.pg]
type = "postgres"
url = "${{SLUICE_PG_URL}}"
table = "{table}"
create_table = true
{columns}

[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "trades_dlq"
"#,
        flattener = plugin_path("trade_flattener").display(),
        chaos_wasm = plugin_path("chaos").display(),
        columns = common::trades::TRADE_COLUMNS,
    )
}

/// Produces `frames` in chunks of `chunk` every `every`, in the background.
fn paced(broker: &Arc<Broker>, frames: Vec<Vec<u8>>, chunk: usize, every: Duration) -> tokio::task::JoinHandle<()> {
    let broker = broker.clone();
    tokio::spawn(async move {
        for part in frames.chunks(chunk) {
            broker.produce("trades_raw", part).await;
            tokio::time::sleep(every).await;
        }
    })
}

/// The frames of `frames` that carry at least one trade (not pings).
fn with_trades(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    frames.into_iter().filter(|f| !expected_trades(std::slice::from_ref(f)).is_empty()).collect()
}

/// A feed of `count` frames with two genuinely malformed ones among them.
fn feed_with_bad_frames(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut frames = generated(count, seed);
    frames.insert(count / 3, b"{not json".to_vec());
    frames.insert(2 * count / 3, b"[]".to_vec());
    frames
}

async fn bad_swap_is_rolled_back(bad_config: &str, prefix: &str) {
    let (broker, pg, table) = trades_setup(prefix, 2).await;
    let broker = Arc::new(broker);
    let dir = tempfile::tempdir().unwrap();
    let good = "config = { mode = \"echo\" }";
    let file = write_pipeline(dir.path(), "broken", &pipeline(&table, "g-rollback", good, ""));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;

    let frames = feed_with_bad_frames(1_500, 51);
    let expected = expected_trades(&frames);
    let feeding = paced(&broker, frames, 50, Duration::from_millis(100));
    // Some traffic under the good version first, then the broken one goes in.
    assert!(wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, &table).await > 200 }).await);
    let reloads = sluice.log_count("reload applied");
    write_pipeline(dir.path(), "broken", &pipeline(&table, "g-rollback", bad_config, ""));
    assert!(sluice.wait_log("reload applied", reloads).await, "the swap was not applied; log {}", sluice.log.display());
    assert!(sluice.wait_log("plugin version rolled back", 0).await, "no rollback; log {}", sluice.log.display());
    feeding.await.unwrap();

    let stored =
        wait_until(Duration::from_secs(90), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(
        stored,
        "{} of {} trades; log {}",
        count_rows(&pg.client, &table).await,
        expected.len(),
        sluice.log.display()
    );
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "every trade exactly once, by the good version");
    let dead = broker.consume("trades_dlq", 2, Duration::from_secs(10));
    let mut dead: Vec<Vec<u8>> = dead.iter().map(|m| m.payload().unwrap_or_default().to_vec()).collect();
    dead.sort();
    assert_eq!(dead, vec![b"[]".to_vec(), b"{not json".to_vec()], "only the feed's malformed frames are dead letters");

    let (_, status) = http(&admin, "GET", "/status");
    assert!(status.contains("\"rollbacks\":1"), "{status}");
    let (_, metrics) = http(&admin, "GET", "/metrics");
    assert!(metrics.contains("sluice_plugin_rollbacks_total{pipeline=\"broken\",plugin=\"chaos\"} 1"), "{metrics}");
    // The refused version does not come back with the next reload.
    let reloads = sluice.log_count("reload rejected");
    let (code, answer) = http(&admin, "POST", "/reload");
    assert_eq!(code, 200, "an unchanged file is no new version: {answer}");
    assert_eq!(sluice.log_count("reload rejected"), reloads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_to_a_version_that_loops_is_rolled_back_before_its_output_is_delivered() {
    bad_swap_is_rolled_back("config = { mode = \"loop\", trigger = \"*\" }\nlimits = { cpu_ms = 300 }", "rb_loop")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_to_a_version_that_fails_every_record_is_rolled_back() {
    bad_swap_is_rolled_back("config = { mode = \"error\", trigger = \"*\" }", "rb_error").await;
}

/// A broken version swapped in on a trickle (a record at a time, slower
/// than a batch fills) is judged on enough records before any of its
/// output is delivered: its batches gather until the error surge shows, it
/// is rolled back, nothing of it reaches the dead letters, and the good
/// version stores every trade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_version_on_a_trickle_is_judged_before_any_of_its_failures_is_delivered() {
    let (broker, pg, table) = trades_setup("rb_trickle", 1).await;
    let broker = Arc::new(broker);
    let dir = tempfile::tempdir().unwrap();
    let good = "config = { mode = \"echo\" }";
    let file = write_pipeline(dir.path(), "broken", &pipeline(&table, "g-trickle", good, ""));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let frames = with_trades(generated(60, 56));
    let expected = expected_trades(&frames);
    let (first, rest) = frames.split_at(20);
    broker.produce("trades_raw", first).await;
    let stored = expected_trades(first).len();
    assert!(wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, &table).await >= stored }).await);

    let reloads = sluice.log_count("reload applied");
    write_pipeline(
        dir.path(),
        "broken",
        &pipeline(&table, "g-trickle", "config = { mode = \"error\", trigger = \"*\" }", ""),
    );
    assert!(sluice.wait_log("reload applied", reloads).await, "the swap was not applied; log {}", sluice.log.display());
    paced(&broker, rest.to_vec(), 1, Duration::from_millis(400)).await.unwrap();
    assert!(sluice.wait_log("plugin version rolled back", 0).await, "no rollback; log {}", sluice.log.display());
    let all = wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, &table).await >= expected.len() });
    assert!(all.await, "{} of {} trades", count_rows(&pg.client, &table).await, expected.len());
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "every trade exactly once, by the good version");
    let dead = broker.consume("trades_dlq", 1, Duration::from_secs(3));
    assert!(dead.is_empty(), "the broken version's failures reached the dead letters: {} of them", dead.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_from_the_start_pauses_until_a_good_one_is_dropped_in() {
    let (broker, pg, table) = trades_setup("pause", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let bad = "config = { mode = \"trap\", trigger = \"*\" }";
    let file = write_pipeline(dir.path(), "broken", &pipeline(&table, "g-pause", bad, ""));
    let frames = generated(300, 52);
    broker.produce("trades_raw", &frames).await;
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;

    assert!(sluice.wait_log("pipeline paused on a failing plugin version", 0).await, "log {}", sluice.log.display());
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("paused: plugin chaos version") && health.contains("plugin trapped"), "{health}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(broker.committed("g-pause", "trades_raw", 1), vec![-1], "offsets moved while paused");
    assert_eq!(count_rows(&pg.client, &table).await, 0);
    assert!(
        broker.consume("trades_dlq", 1, Duration::from_secs(2)).is_empty(),
        "the failing version's records reached the dead letters"
    );

    write_pipeline(dir.path(), "broken", &pipeline(&table, "g-pause", "config = { mode = \"echo\" }", ""));
    let expected = expected_trades(&frames);
    let stored =
        wait_until(Duration::from_secs(90), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(
        stored,
        "{} of {} trades after the fix; log {}",
        count_rows(&pg.client, &table).await,
        expected.len(),
        sluice.log.display()
    );
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected);
    assert!(sluice.wait_log("pipeline resumed", 0).await);
    assert!(wait_until(Duration::from_secs(30), || async { http(&admin, "GET", "/health").0 == 200 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_policy_is_bounded_for_a_version_that_loops_on_everything() {
    let (broker, pg, table) = trades_setup("dl_policy", 1).await;
    let dir = tempfile::tempdir().unwrap();
    // One batch of 1,000 records; each record would take the whole CPU limit.
    let bad = "config = { mode = \"loop\", trigger = \"*\" }\nlimits = { cpu_ms = 200 }";
    let text = pipeline(&table, "g-dl", bad, "on_plugin_failure = \"dead_letter\"")
        .replace("batch_max_records = 100", "batch_max_records = 1000\nbatch_max_ms = 2000");
    let file = write_pipeline(dir.path(), "broken", &text);
    let frames = generated(1_000, 53);
    broker.produce("trades_raw", &frames).await;
    let started = Instant::now();
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    // Pings give the chaos stage nothing to run: every other frame is dead-lettered.
    let failing = with_trades(frames).len();
    let dead = broker.consume("trades_dlq", failing, Duration::from_secs(120));
    let took = started.elapsed();
    assert_eq!(dead.len(), failing, "log {}", sluice.log.display());
    // Unbounded, record-by-record isolation would take 1,000 × 200 ms.
    assert!(took < Duration::from_secs(100), "dead-lettering took {took:?}");
    let reasons: Vec<String> = dead.iter().filter_map(|m| header(m, "sluice.error")).collect();
    assert!(reasons.iter().any(|r| r.starts_with("CPU limit exceeded")), "{:?}", &reasons[..3]);
    assert!(reasons.iter().any(|r| r.starts_with("not run: the plugin version is failing")), "{:?}", &reasons[..3]);
    assert_eq!(count_rows(&pg.client, &table).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_rate_limited_and_counted() {
    let (broker, pg, table) = trades_setup("log_flood", 1).await;
    let dir = tempfile::tempdir().unwrap();
    // About 700,000 log calls in one batch: a CPU limit well above their cost
    // on a loaded machine, so that no batch is retried and every call is
    // counted once (written or suppressed).
    let flood = "config = { mode = \"log\", trigger = \"*\", log_lines = \"5000\" }\nlimits = { log_lines_per_s = 100, log_burst = 200, cpu_ms = 10000 }";
    let file = write_pipeline(dir.path(), "broken", &pipeline(&table, "g-log", flood, ""));
    let frames = generated(40, 54);
    let expected = expected_trades(&frames);
    broker.produce("trades_raw", &frames).await;
    let started = Instant::now();
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    let stored =
        wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(stored, "the records stopped flowing; log {}", sluice.log.display());
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected);

    // One more frame after a second: its batch reports the suppressed lines left.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let extra = with_trades(generated(20, 55)).into_iter().take(1).collect::<Vec<_>>();
    broker.produce("trades_raw", &extra).await;
    let logged_total = (expected.len() + expected_trades(&extra).len()) as u64 * 5_000;
    let counted = wait_until(Duration::from_secs(30), || async {
        let written = sluice.log_count("flooding as asked") as u64;
        let (_, metrics) = http(&admin, "GET", "/metrics");
        let suppressed: u64 = metrics
            .lines()
            .find(|l| l.starts_with("sluice_plugin_log_lines_suppressed_total{pipeline=\"broken\",plugin=\"chaos\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        written + suppressed == logged_total
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let written = sluice.log_count("flooding as asked") as f64;
    assert!(counted, "written + suppressed != {logged_total}; log {}", sluice.log.display());
    assert!(written <= 200.0 + 100.0 * elapsed + 1.0, "{written} lines in {elapsed:.1} s: over the bucket");
    assert!(sluice.log_count("suppressed") >= 1, "no summary line");
    let summary = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(summary.lines().any(|l| l.contains("log lines from broken/chaos in the last")), "summary line wording");
}

#[test]
fn plugin_test_rate_limits_plugin_logs_unless_asked_not_to() {
    let input = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(input.path(), "a\nb\nc\nd\ne\n").unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--cache-dir"])
            .arg(common::test_cache_dir())
            .args(["plugin", "test"])
            .arg(plugin_path("chaos"))
            .args(["-c", "mode=log", "-c", "trigger=*", "-c", "log_lines=2000", "-i"])
            .arg(input.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\nc\nd\ne\n", "the records still flow");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let limited = run(&[]);
    let written = limited.lines().filter(|l| l.contains("flooding as asked")).count();
    assert!((1_000..1_200).contains(&written), "{written} lines: the burst is 1,000, then 100 a second");
    let suppressed: usize =
        limited.lines().filter_map(|l| l.split("suppressed ").nth(1)?.split(' ').next()?.parse::<usize>().ok()).sum();
    assert_eq!(written + suppressed, 10_000, "every line is written or counted");
    let unlimited = run(&["--no-log-limit"]);
    assert_eq!(unlimited.lines().filter(|l| l.contains("flooding as asked")).count(), 10_000);
}

/// A version that sleeps 60 s on every record (in WASI's clock, a host call
/// the CPU limit's epochs cannot reach): each call ends at `cpu_ms`, the
/// pipeline pauses as for any failing version, and a reload and a shutdown
/// do not wait for the sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sleeping_in_a_host_call_keeps_reload_and_shutdown_prompt() {
    let (broker, _pg, table) = trades_setup("sleeper", 1).await;
    broker.produce("trades_raw", &generated(50, 93)).await;
    let dir = tempfile::tempdir().unwrap();
    let chaos = "config = { mode = \"sleep\", sleep_s = \"60\", trigger = \"*\" }\nlimits = { cpu_ms = 300 }";
    let file =
        write_pipeline(dir.path(), "broken", &pipeline(&table, "g-sleeper", chaos, "on_plugin_failure = \"pause\""));
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    assert!(sluice.wait_log("pipeline paused on a failing plugin version", 0).await, "log {}", sluice.log.display());
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(
        log.contains("CPU limit exceeded (300 ms per call)"),
        "the time limit stopped the sleep: log {}",
        sluice.log.display()
    );

    let started = Instant::now();
    let (code, body) = http(&admin, "POST", "/reload");
    assert_eq!(code, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "reload waited {:?} for the sleeping plugin",
        started.elapsed()
    );

    let started = Instant::now();
    assert_eq!(sluice.stop(), Some(0), "graceful exit");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown waited {:?} for the sleeping plugin",
        started.elapsed()
    );
}
