//! Operating Sluice: `/metrics`, `/health`, `/status`, the progress line and
//! `sluice top`, against a running instance with a real broker and PostgreSQL.

mod common;

use common::services::*;
use common::trades::*;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// The value of the sample `name` (with its labels, as written) in a scrape.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_the_records_fed_and_dead_lettered() {
    let (broker, pg, table) = trades_setup("ops", 2).await;
    let malformed: Vec<Vec<u8>> = vec![b"garbage".to_vec(), Vec::new(), br#"{"type":"trade"}"#.to_vec()];
    let mut frames = generated(600, 81);
    frames.extend(malformed.iter().cloned());
    let expected = expected_trades(&frames);
    broker.produce("trades_raw", &frames).await;

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-ops", 100, "${SLUICE_PG_URL}", ""));
    let mut sluice = SluiceProcess::run_with(&[&file], &broker.addr, &[("SLUICE_PROGRESS_SECS", "1")]);
    let admin = sluice.admin_addr().await;
    assert!(wait_until(WAIT, || async { count_rows(&pg.client, &table).await >= expected.len() }).await);
    // Counters are updated right after each commit: wait for the last one.
    let settled = wait_until(WAIT, || async {
        sample(&http(&admin, "GET", "/metrics").1, "sluice_records_in_total{pipeline=\"trades\"}") == Some(frames.len() as f64)
    })
    .await;
    // Lag comes from librdkafka's statistics, once a second.
    let lag_seen = wait_until(WAIT, || async { http(&admin, "GET", "/metrics").1.contains("sluice_consumer_lag{pipeline=\"trades\",topic=\"trades_raw\"") }).await;
    let (code, metrics) = http(&admin, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(lag_seen, "consumer lag per partition:\n{metrics}");
    assert!(settled, "records_in should reach {}:\n{metrics}", frames.len());
    let get = |name: &str| sample(&metrics, name).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
    assert_eq!(get("sluice_records_dead_lettered_total{pipeline=\"trades\"}"), malformed.len() as f64);
    assert_eq!(get("sluice_records_out_total{pipeline=\"trades\",sink=\"pg\"}"), expected.len() as f64);
    assert_eq!(get("sluice_records_out_total{pipeline=\"trades\",sink=\"dead_letter\"}"), malformed.len() as f64);
    assert!(get("sluice_batches_total{pipeline=\"trades\"}") >= 1.0);
    assert!(get("sluice_batch_seconds_count{pipeline=\"trades\"}") >= 1.0);
    assert!(get("sluice_plugin_call_seconds_count{pipeline=\"trades\",plugin=\"trade_flattener\"}") >= 1.0);
    assert!(get("sluice_sink_write_seconds_count{pipeline=\"trades\",sink=\"pg\"}") >= 1.0);
    assert!(metrics.contains("sluice_plugin_info{pipeline=\"trades\",plugin=\"trade_flattener\",version=\""), "{metrics}");

    let (code, status) = http(&admin, "GET", "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let p = &status["pipelines"][0];
    assert_eq!(p["name"], "trades");
    assert_eq!(p["consuming"], true);
    assert_eq!(p["records_in"], frames.len() as u64);
    assert_eq!(p["records_out"], expected.len() as u64);
    assert_eq!(p["dead_lettered"], malformed.len() as u64);
    let mut assignment: Vec<&str> = p["assignment"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assignment.sort();
    assert_eq!(assignment, ["trades_raw/0", "trades_raw/1"]);

    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 200, "{health}");
    // A progress line a second, which soon counts every record.
    let all_in = format!("records_in={} ", frames.len());
    let seen = wait_until(WAIT, || async {
        let log = std::fs::read_to_string(&sluice.log).unwrap_or_default();
        log.lines().any(|l| l.contains("progress") && l.contains("pipeline=trades") && l.contains(&all_in))
    })
    .await;
    assert!(seen, "no progress line with {all_in}");
    assert_eq!(sluice.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_when_postgresql_stops_and_back_when_it_returns() {
    let pg = PrivatePostgres::start();
    let broker = Broker::start();
    create_trades_topics(&broker, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to("public.trades", "g-health", 50, &pg.url(), ""));
    broker.produce("trades_raw", &generated(100, 91)).await;
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    assert!(wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 200 }).await, "{:?}", http(&admin, "GET", "/health"));

    pg.stop_server();
    broker.produce("trades_raw", &generated(100, 92)).await;
    assert!(wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 503 }).await, "unhealthy while PostgreSQL is down");
    let (_, body) = http(&admin, "GET", "/health");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["trades"]["ready"], false);
    assert!(health["trades"]["reasons"][0].as_str().unwrap().starts_with("sink pg failing: cannot connect to PostgreSQL"), "{body}");

    pg.start_server();
    assert!(wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 200 }).await, "healthy again");
    let client = pg.client().await;
    let expected = expected_trades(&[generated(100, 91), generated(100, 92)].concat());
    assert!(wait_until(WAIT, || async { count_rows(&client, "public.trades").await >= expected.len() }).await);
    assert_eq!(sluice.stop(), Some(0));
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_top_under_tmux_shows_the_pipeline_with_a_rate() {
    let (broker, _pg, table) = trades_setup("top", 1).await; // the schema lives until the end
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-top", 50, "${SLUICE_PG_URL}", ""));
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    // A steady feed while the dashboard watches.
    let addr = broker.addr.clone();
    let feed = tokio::spawn(async move {
        for seed in 0..40 {
            produce_to(&addr, "trades_raw", &generated(250, 100 + seed), &[]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let session = format!("sluice-top-{}", std::process::id());
    let command = format!("{} top --addr {admin} --interval-ms 500", env!("CARGO_BIN_EXE_sluice"));
    let started = Command::new("tmux").args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "30", &command]).status().unwrap();
    assert!(started.success());
    let mut screen = String::new();
    let rate_seen = wait_until(WAIT, || {
        screen = tmux(&["capture-pane", "-p", "-t", &session]);
        let rate = screen
            .lines()
            .find(|l| l.contains("trades") && l.contains("running"))
            .and_then(|row| row.split_whitespace().find_map(|w| w.strip_suffix("/s").and_then(|n| n.parse::<f64>().ok())));
        async move { rate.is_some_and(|r| r > 0.0) }
    })
    .await;
    tmux(&["send-keys", "-t", &session, "q"]);
    let quit = wait_until(Duration::from_secs(10), || async { !Command::new("tmux").args(["has-session", "-t", &session]).status().unwrap().success() }).await;
    if !quit {
        tmux(&["kill-session", "-t", &session]);
    }
    feed.abort();
    assert!(rate_seen, "no pipeline row with a non-zero rate:\n{screen}");
    assert!(screen.contains("trade_flattener@"), "plugin version shown:\n{screen}");
    assert!(quit, "q quits sluice top");
    assert_eq!(sluice.stop(), Some(0));
}
