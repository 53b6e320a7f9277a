//! Operating Sluice: `/metrics`, `/health`, `/status`, the progress line and
//! `sluice top`, against a running instance with a real broker and PostgreSQL.

use crate::common;

use common::services::*;
use common::trades::*;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// The value of the sample `name` (with its labels, as written) in a scrape.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
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
        sample(&http(&admin, "GET", "/metrics").1, "sluice_records_in_total{pipeline=\"trades\"}")
            == Some(frames.len() as f64)
    })
    .await;
    // Lag comes from librdkafka's statistics, once a second.
    let lag_seen = wait_until(WAIT, || async {
        http(&admin, "GET", "/metrics").1.contains("sluice_consumer_lag{pipeline=\"trades\",topic=\"trades_raw\"")
    })
    .await;
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
    assert!(
        metrics.contains("sluice_plugin_info{pipeline=\"trades\",plugin=\"trade_flattener\",version=\""),
        "{metrics}"
    );

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
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to("public.trades", "g-health", 50, &pg.url(), ""));
    broker.produce("trades_raw", &generated(100, 91)).await;
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    assert!(
        wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 200 }).await,
        "{:?}",
        http(&admin, "GET", "/health")
    );

    pg.stop_server();
    broker.produce("trades_raw", &generated(100, 92)).await;
    assert!(
        wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 503 }).await,
        "unhealthy while PostgreSQL is down"
    );
    let (_, body) = http(&admin, "GET", "/health");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["trades"]["ready"], false);
    assert!(
        health["trades"]["reasons"][0].as_str().unwrap().starts_with("sink pg failing: cannot connect to PostgreSQL"),
        "{body}"
    );

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
    let started = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "30", &command])
        .status()
        .unwrap();
    assert!(started.success());
    let mut screen = String::new();
    let rate_seen = wait_until(WAIT, || {
        screen = tmux(&["capture-pane", "-p", "-t", &session]);
        let rate = screen.lines().find(|l| l.contains("trades") && l.contains("running")).and_then(|row| {
            row.split_whitespace().find_map(|w| w.strip_suffix("/s").and_then(|n| n.parse::<f64>().ok()))
        });
        async move { rate.is_some_and(|r| r > 0.0) }
    })
    .await;
    tmux(&["send-keys", "-t", &session, "q"]);
    let quit = wait_until(Duration::from_secs(10), || async {
        !Command::new("tmux").args(["has-session", "-t", &session]).status().unwrap().success()
    })
    .await;
    if !quit {
        tmux(&["kill-session", "-t", &session]);
    }
    feed.abort();
    assert!(rate_seen, "no pipeline row with a non-zero rate:\n{screen}");
    assert!(screen.contains("trade_flattener@"), "plugin version shown:\n{screen}");
    assert!(quit, "q quits sluice top");
    assert_eq!(sluice.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_refuses_other_sites_and_coalesces_reloads() {
    use std::io::{Read, Write};
    let (broker, _pg, table) = trades_setup("admin", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-admin", 100, "${SLUICE_PG_URL}", ""));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;

    // A page on another site: its POST carries its Origin (or Sec-Fetch-Site).
    let (code, body) = http_with(&admin, "POST", "/reload", &[("Origin", "http://evil.example")]);
    assert_eq!(code, 403, "{body}");
    let (code, _) = http_with(&admin, "POST", "/reload", &[("Sec-Fetch-Site", "cross-site")]);
    assert_eq!(code, 403);
    // DNS rebinding: the browser sends the attacker's name as Host.
    let (code, body) = http_with(&admin, "GET", "/status", &[("Host", "evil.example:8686")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--admin-host"), "{body}");
    assert!(!body.contains("trades"), "nothing of the status leaks: {body}");
    assert_eq!(http_with(&admin, "GET", "/status", &[("Host", "localhost")]).0, 200);
    let reloads = || {
        serde_json::from_str::<serde_json::Value>(&http(&admin, "GET", "/status").1).unwrap()["reloads_ok"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(reloads(), 0, "the refused requests reloaded nothing");

    // 20 reload requests at once: all answered, by at most two reloads (one
    // running, the rest sharing the one pending).
    let mut streams: Vec<std::net::TcpStream> =
        (0..20).map(|_| std::net::TcpStream::connect(&admin).unwrap()).collect();
    let text = request(&admin, "POST", "/reload", &[]);
    for s in &mut streams {
        s.write_all(text.as_bytes()).unwrap();
    }
    for s in &mut streams {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let (code, body) = parse_response(&response);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("reload applied"), "{body}");
    }
    let done = reloads();
    assert!((1..=2).contains(&done), "20 concurrent requests took {done} reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_guards_all_but_health_and_metrics_and_a_public_listener_needs_one() {
    let (broker, _pg, table) = trades_setup("admintoken", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-admintoken", 100, "${SLUICE_PG_URL}", ""));

    // Every interface, no token: refused at start, saying what to do.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--admin-addr", "0.0.0.0:0"])
        .arg(&file)
        .env("SLUICE_BROKERS", &broker.addr)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--admin-addr") && stderr.contains("--admin-token-file") && stderr.contains("--metrics-addr"),
        "{stderr}"
    );

    let token = "admin-tok-0123456789abcdef";
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    let token_file = dir.path().join("token").display().to_string();
    let sluice = SluiceProcess::run_with(&[&file], &broker.addr, &[("SLUICE_ADMIN_TOKEN_FILE", &token_file)]);
    let admin = sluice.admin_addr().await;
    assert_eq!(http(&admin, "POST", "/reload").0, 401);
    assert_eq!(http(&admin, "GET", "/status").0, 401);
    assert_eq!(http_with(&admin, "POST", "/reload", &[("Authorization", "Bearer wrong-token-0123456789")]).0, 401);
    let bearer = format!("Bearer {token}");
    let (code, body) = http_with(&admin, "POST", "/reload", &[("Authorization", &bearer)]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_with(&admin, "GET", "/status", &[("Authorization", &bearer)]).0, 200);
    assert_eq!(http(&admin, "GET", "/metrics").0, 200, "Prometheus needs no token");
    assert!(!std::fs::read_to_string(&sluice.log).unwrap().contains(token), "the token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_named_and_read_within_seconds_of_its_creation() {
    let broker = Broker::start();
    broker.create_topic("trades_dlq", 1).await;
    let pg = PgSchema::create("latetopic").await;
    let table = format!("{}.trades", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let file =
        write_pipeline(dir.path(), "trades", &trades_pipeline_to(&table, "g-latetopic", 100, "${SLUICE_PG_URL}", ""));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;

    let named = wait_until(WAIT, || async {
        let (code, body) = http(&admin, "GET", "/health");
        code == 503 && body.contains("subscribed topic \\\"trades_raw\\\" does not exist")
    })
    .await;
    assert!(named, "/health: {:?}", http(&admin, "GET", "/health"));
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") && l.contains("does not exist")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line: {errors:#?}");
    assert!(errors[0].contains("trades_raw") && errors[0].contains("--create --topic trades_raw"), "{}", errors[0]);

    broker.create_topic("trades_raw", 1).await;
    let created = std::time::Instant::now();
    let frames = generated(50, 87);
    broker.produce("trades_raw", &frames).await;
    let expected = expected_trades(&frames);
    let read =
        wait_until(Duration::from_secs(10), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(
        read,
        "{} of {} rows {:?} after the topic was created; log {}",
        count_rows(&pg.client, &table).await,
        expected.len(),
        created.elapsed(),
        sluice.log.display()
    );
    let healthy = wait_until(WAIT, || async { http(&admin, "GET", "/health").0 == 200 }).await;
    assert!(healthy, "{:?}", http(&admin, "GET", "/health"));
}
