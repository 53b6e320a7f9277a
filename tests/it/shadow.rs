//! Shadow runs end to end: a candidate beside the live flattener on a paced
//! feed, its outputs diffed key by key and discarded; the report, the
//! metrics and the admin actions behind the token; promotion by hand and by
//! `promote_after`, each the ordinary hot swap with nothing lost or doubled;
//! a looping candidate dropped while the live path delivers everything.

use crate::common;

use common::plugin_path;
use common::services::*;
use common::trades::*;
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "shadow-test-token-0123456789";

/// The trades pipeline with `shadow` (a TOML value) on its flattener.
fn shadow_pipeline(table: &str, group: &str, shadow: &str, transform_extra: &str) -> String {
    let flattener = format!("plugin = \"{}\"", plugin_path("trade_flattener").display());
    trades_pipeline_to(table, group, 5, PG_URL, "")
        .replace(&flattener, &format!("{flattener}\nshadow = {shadow}\n{transform_extra}"))
}

/// Produces `frames` in chunks of `chunk` with a pause between them (a paced feed).
async fn paced(broker: &Broker, frames: &[Vec<u8>], chunk: usize) {
    for part in frames.chunks(chunk) {
        broker.produce("trades_raw", part).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /pipelines/trades/shadow` with the token: the first report.
fn report(addr: &str) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_with(addr, "GET", "/pipelines/trades/shadow", &[("Authorization", &auth)]);
    assert_eq!(code, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{body}");
    reports[0].clone()
}

/// `sluice shadow ARGS`: exit code, stdout, stderr.
fn shadow_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("shadow").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn rows_reach(pg: &PgSchema, table: &str, n: usize) -> bool {
    wait_until(Duration::from_secs(90), || async { count_rows(&pg.client, table).await >= n }).await
}

fn rounded(trades: &[Trade]) -> Vec<Trade> {
    trades.iter().map(|(s, p, v, t)| (s.clone(), p.round(), *v, *t)).collect()
}

fn sorted(mut trades: Vec<Trade>) -> Vec<Trade> {
    trades.sort_by(|a, b| a.partial_cmp(b).unwrap());
    trades
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rounding_candidate_is_diffed_key_by_key_on_live_traffic_then_promoted_without_loss() {
    let (broker, pg, table) = trades_setup("shadow_round", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let candidate = plugin_path("trade_flattener_rounding");
    let text = shadow_pipeline(&table, "g-shadow", &format!("\"{}\"", candidate.display()), "");
    let file = write_pipeline(dir.path(), "trades", &text);
    let token_env = token.display().to_string();
    let sluice = SluiceProcess::run_with(&[&file], &broker.addr, &[("SLUICE_ADMIN_TOKEN_FILE", &token_env)]);
    let addr = sluice.admin_addr().await;

    let before = generated(40, 61);
    let expected = expected_trades(&before);
    paced(&broker, &before, 8).await;
    assert!(rows_reach(&pg, &table, expected.len()).await, "the live rows did not arrive");
    // The candidate compares on its own thread: wait for it to catch up.
    assert!(
        wait_until(Duration::from_secs(30), || async { report(&addr)["records"] == before.len() }).await,
        "the candidate did not compare every frame: {}",
        report(&addr)
    );
    let r = report(&addr);
    let changed = expected.iter().filter(|t| t.1.round() != t.1).count();
    assert!(changed > 0, "the feed should have fractional prices");
    assert_eq!(r["state"], "running");
    assert_eq!(r["batches_skipped"], 0, "{r}");
    assert_eq!(r["counts"]["different"], changed, "{r}");
    assert_eq!(r["counts"]["identical"], expected.len() - changed, "{r}");
    for k in ["only_live", "only_candidate", "live_errors", "candidate_errors"] {
        assert_eq!(r["counts"][k], 0, "{k}: {r}");
    }
    // Each sample names its record's origin, its key and the one field.
    let messages = broker.consume("trades_raw", before.len(), Duration::from_secs(30));
    let samples = r["samples"].as_array().unwrap();
    assert_eq!(samples.len(), changed.min(20));
    for s in samples {
        let origin = s["origin"].as_str().unwrap();
        let (partition, offset) = origin.strip_prefix("trades_raw/").unwrap().split_once('@').unwrap();
        let message = messages
            .iter()
            .find(|m| {
                use rdkafka::Message;
                m.partition().to_string() == partition && m.offset().to_string() == offset
            })
            .unwrap_or_else(|| panic!("no record at {origin}"));
        let frame = rdkafka::Message::payload(message).unwrap();
        let fields = s["fields"].as_array().unwrap();
        assert_eq!(fields.len(), 1, "{s}");
        assert_eq!(fields[0]["path"], "price");
        let live: f64 = fields[0]["live"].as_str().unwrap().parse().unwrap();
        let shadow: f64 = fields[0]["candidate"].as_str().unwrap().parse().unwrap();
        assert_eq!(shadow, live.round());
        let symbol = s["key"].as_str().unwrap();
        assert!(
            expected_trades(&[frame.to_vec()]).iter().any(|t| t.0 == symbol && t.1 == live),
            "{origin} holds no {symbol} trade at {live}"
        );
    }
    // The live table has the live version's rows only.
    let client = &pg.client;
    assert_eq!(stored_trades_in(client, &table).await, expected);
    let series = r#"sluice_shadow_outputs_total{pipeline="trades",plugin="trade_flattener",result="different"}"#;
    assert_eq!(metric(&addr, series), Some(changed as f64));

    // The report and promotion need the token.
    assert_eq!(http(&addr, "GET", "/pipelines/trades/shadow").0, 401);
    assert_eq!(http(&addr, "POST", "/pipelines/trades/shadow/promote").0, 401);
    let (code, _, stderr) = shadow_cli(&["report", "trades", "--addr", &addr]);
    assert_ne!(code, 0);
    assert!(stderr.contains("Authorization: Bearer"), "{stderr}");
    let token_arg = token.to_str().unwrap();
    let (code, stdout, stderr) = shadow_cli(&["report", "trades", "--addr", &addr, "--token-file", token_arg]);
    assert_eq!(code, 0, "{stderr}");
    eprintln!("sluice shadow report trades:\n{stdout}");
    assert!(stdout.contains(&format!("{} identical, {changed} different", expected.len() - changed)), "{stdout}");
    assert!(stdout.contains("price: "), "{stdout}");

    // Promotion: the file names the candidate, and the reload swaps it in.
    let swaps = sluice.log_count("new plugin versions live");
    let (code, stdout, stderr) = shadow_cli(&["promote", "trades", "--addr", &addr, "--token-file", token_arg]);
    assert_eq!(code, 0, "{stderr}");
    // (The file watcher may apply the change before the reload that the
    // promotion asks for, which then finds nothing to do.)
    assert!(stdout.contains("now runs") && stdout.contains("reload applied"), "{stdout}");
    let promoted = std::fs::read_to_string(&file).unwrap();
    assert!(promoted.contains(&format!("plugin = \"{}\"", candidate.display())), "{promoted}");
    assert!(!promoted.contains("shadow ="), "{promoted}");
    assert!(report(&addr)["state"].as_str().unwrap().starts_with("promoted"));

    // The reload has handed the new chain over: it goes live before the next
    // batch, so every later record goes through it, none lost or doubled.
    let after = generated(30, 62);
    paced(&broker, &after, 10).await;
    assert!(sluice.wait_log("new plugin versions live", swaps).await);
    let all = expected.len() + expected_trades(&after).len();
    assert!(rows_reach(&pg, &table, all).await, "the rows after the promotion did not arrive");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let want = sorted([expected, rounded(&expected_trades(&after))].concat());
    assert_eq!(stored_trades_in(client, &table).await, want);

    // A shadow started and stopped from the command line: the file says so.
    let exact = plugin_path("trade_flattener");
    let exact_arg = exact.to_str().unwrap();
    let (code, stdout, stderr) =
        shadow_cli(&["start", "trades", exact_arg, "--addr", &addr, "--token-file", token_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&format!("now shadows {exact_arg}")), "{stdout}");
    assert!(std::fs::read_to_string(&file).unwrap().contains(&format!("shadow = \"{exact_arg}\"")));
    assert_eq!(report(&addr)["candidate"], exact_arg);
    assert_eq!(report(&addr)["state"], "running");
    let (code, stdout, stderr) = shadow_cli(&["stop", "trades", "--addr", &addr, "--token-file", token_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("no longer shadows"), "{stdout}");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("shadow ="));
    let (code, _, stderr) = shadow_cli(&["stop", "trades", "--addr", &addr, "--token-file", token_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no shadow"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_equivalent_build_shows_no_difference_and_promotes_itself() {
    let (broker, pg, table) = trades_setup("shadow_same", 2).await;
    let dir = tempfile::tempdir().unwrap();
    // The contract 0.1 build of the flattener: another version, the same outputs.
    let candidate = plugin_path("trade_flattener_v01");
    let shadow =
        format!("{{ plugin = \"{}\", promote_after = {{ batches = 3, max_diff_ratio = 0.0 }} }}", candidate.display());
    let file = write_pipeline(dir.path(), "trades", &shadow_pipeline(&table, "g-same", &shadow, ""));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let frames = generated(40, 63);
    paced(&broker, &frames, 5).await;
    assert!(sluice.wait_log("shadow candidate promoted (promote_after met)", 0).await);
    assert!(sluice.wait_log("new plugin versions live", 0).await);
    let rewritten = std::fs::read_to_string(&file).unwrap();
    assert!(rewritten.contains(&format!("plugin = \"{}\"", candidate.display())), "{rewritten}");
    let expected = expected_trades(&frames);
    assert!(rows_reach(&pg, &table, expected.len()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = &pg.client;
    assert_eq!(stored_trades_in(client, &table).await, expected);
    let r = {
        let addr = sluice.admin_addr().await;
        let (code, body) = http(&addr, "GET", "/pipelines/trades/shadow");
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone()
    };
    assert!(r["batches_compared"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["counts"]["identical"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["counts"]["different"], 0, "{r}");
    assert_eq!(r["diff_ratio"], 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_candidate_is_dropped_while_the_live_path_delivers_everything() {
    let (broker, pg, table) = trades_setup("shadow_loop", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let shadow = format!(
        "{{ plugin = \"{}\", config = {{ mode = \"loop\", trigger = \"*\" }} }}",
        plugin_path("chaos").display()
    );
    let file =
        write_pipeline(dir.path(), "trades", &shadow_pipeline(&table, "g-loop", &shadow, "limits = { cpu_ms = 200 }"));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let frames = generated(60, 64);
    paced(&broker, &frames, 6).await;
    let expected = expected_trades(&frames);
    assert!(rows_reach(&pg, &table, expected.len()).await, "the live path stalled behind the candidate");
    assert!(sluice.wait_log("shadow candidate failing: dropped", 0).await);
    let client = &pg.client;
    assert_eq!(stored_trades_in(client, &table).await, expected);
    let addr = sluice.admin_addr().await;
    let (_, body) = http(&addr, "GET", "/status");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shadow = &status["pipelines"][0]["shadows"][0];
    assert!(shadow["state"].as_str().unwrap().starts_with("dropped: "), "{shadow}");
    assert!(shadow["counts"]["candidate_errors"].as_u64().unwrap() > 0, "{shadow}");
    // Nothing of the candidate reached the dead letters.
    assert_eq!(status["pipelines"][0]["dead_lettered"], 0, "{status}");
}

/// `sluice check` reports a shadow's bad settings at their line.
#[test]
fn bad_shadow_settings_are_reported_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let shadow = format!("{{ plugin = \"{}\", sample = 1.5 }}", plugin_path("trade_flattener_v01").display());
    let text = shadow_pipeline("s.trades", "g", &shadow, "");
    let file = write_pipeline(dir.path(), "trades", &text);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--cache-dir", common::test_cache_dir().to_str().unwrap(), "check"])
        .arg(&file)
        .env("SLUICE_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.starts_with("shadow = ")).unwrap() + 1;
    assert!(
        stderr.contains(&format!(
            "trades.toml:{line}:10: transform 1 shadow: sample = 1.5 must be above 0 and at most 1"
        )),
        "{stderr}"
    );
    let typo = text.replace("sample = 1.5", "smaple = 1");
    write_pipeline(dir.path(), "trades", &typo);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(&file)
        .env("SLUICE_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `smaple`"), "{stderr}");
}

/// `POST path` with a JSON body: (status, body).
fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    parse_response(&response)
}

/// What an admin caller gives is never expanded and never leaves the file
/// broken: a candidate path with `${SECRET}` or `${file:/dev/zero}` is
/// refused before the file is touched, without the secret in the answer;
/// a candidate that exists but fails to load leaves the file as it was; a
/// symlinked pipeline file stays a link, its target edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_actions_write_what_they_are_given_as_a_literal_and_undo_a_failed_edit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), "{\"type\":\"trade\",\"data\":[]}\n").unwrap();
    let text = format!(
        "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[[transforms]]\nplugin = \"{}\"\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n",
        plugin_path("trade_flattener").display()
    );
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("in.jsonl"), "{\"type\":\"trade\",\"data\":[]}\n").unwrap();
    let target = write_pipeline(&real, "p", &text);
    let file = dir.path().join("p.toml");
    std::os::unix::fs::symlink(&target, &file).unwrap();
    let secret = "s3cr3t-value-31415";
    let mut sluice = SluiceProcess::run_with(&[&file], "127.0.0.1:9", &[("SECRET", secret)]);
    let addr = sluice.admin_addr().await;
    assert!(sluice.wait_log("plugin ready", 0).await);
    for plugin in ["/opt/${SECRET}.wasm", "${file:/dev/zero}", "/nonexistent/x.wasm"] {
        let body = serde_json::json!({ "plugin": plugin }).to_string();
        let (code, answer) = post_json(&addr, "/pipelines/p/shadow/start", &body);
        assert_eq!(code, 422, "{plugin}: {answer}");
        assert!(!answer.contains(secret), "{plugin}: the secret leaked: {answer}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), text, "{plugin}: the file is untouched");
    }
    // A file that is there but is no component: the edit is undone.
    let junk = dir.path().join("${SECRET}.wasm");
    std::fs::write(&junk, "not a component").unwrap();
    let body = serde_json::json!({ "plugin": junk.display().to_string() }).to_string();
    let (code, answer) = post_json(&addr, "/pipelines/p/shadow/start", &body);
    assert_eq!(code, 422, "{answer}");
    assert!(!answer.contains(secret) && answer.contains("left as it was"), "{answer}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), text, "the failed edit is undone");
    // A real candidate: the link stays a link, its target says so.
    let candidate = plugin_path("trade_flattener_rounding");
    let body = serde_json::json!({ "plugin": candidate.display().to_string() }).to_string();
    let (code, answer) = post_json(&addr, "/pipelines/p/shadow/start", &body);
    assert_eq!(code, 200, "{answer}");
    assert!(std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink(), "still a link");
    assert!(std::fs::read_to_string(&target).unwrap().contains(&format!("shadow = \"{}\"", candidate.display())));
    sluice.stop();
}

/// A shadow of a stateful stage with event time (the candles, which set a
/// timer per window) runs: its timers are taken, not refused as "set-timer
/// needs event time" (which dropped every such shadow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_of_a_stage_with_timers_runs() {
    let pg = PgSchema::create("shadow_timers").await;
    let table = format!("{}.candles", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Vec<u8>> =
        (0..50).map(|i| crate::state::trade_frame("A", 1.0 + i as f64, 1_700_000_000_000 + i * 1_000)).collect();
    std::fs::write(dir.path().join("in.jsonl"), frames.join(&b'\n')).unwrap();
    let source = "default_sink = \"pg\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\nbatch_max_records = 5";
    let candles = plugin_path("ohlc_candles").display().to_string();
    let text = crate::state::ohlc_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\"", "").replacen(
        &format!("plugin = \"{candles}\""),
        &format!("plugin = \"{candles}\"\nshadow = \"{candles}\""),
        1,
    );
    let file = write_pipeline(dir.path(), "ohlc", &text);
    let mut sluice = SluiceProcess::run(&[&file], "127.0.0.1:9");
    let addr = sluice.admin_addr().await;
    assert!(wait_until(Duration::from_secs(60), || async { pg.count("candles").await > 0 }).await, "no candle");
    let (code, body) = http(&addr, "GET", "/pipelines/ohlc/shadow");
    assert_eq!(code, 200, "{body}");
    let reports: serde_json::Value = serde_json::from_str(&body).unwrap();
    let state = reports[0]["state"].as_str().unwrap_or_default().to_string();
    assert!(state.starts_with("running"), "{body}");
    assert_eq!(sluice.stop(), Some(0));
}

/// A shadow of a stateful stage, started on a running pipeline, starts
/// from a copy of the live state of each partition: a candles candidate
/// identical to the live build closes the window the live stage opened
/// before it started with the same candle (the live stage's fired timers
/// are handed to it as records), so it shows no difference from its first
/// batch. From empty state its first candle would hold half the trades.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_of_a_stateful_stage_starts_from_a_copy_of_the_live_state() {
    let pg = PgSchema::create("shadow_copy").await;
    let table = format!("{}.candles", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frame = |i: i64| crate::state::trade_frame("A", 1.0 + i as f64, 1_700_000_000_000 + i * 1_000);
    let lines =
        |range: std::ops::Range<i64>| -> Vec<u8> { range.flat_map(|i| frame(i).into_iter().chain([b'\n'])).collect() };
    // 25 s of trades: the windows of 0-10 s and 10-20 s close, 20-30 s is open.
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, lines(0..25)).unwrap();
    let source = "default_sink = \"pg\"\n[source]\ntype = \"file\"\npath = \"in.jsonl\"\nbatch_max_records = 5";
    let text = crate::state::ohlc_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\"", "");
    let file = write_pipeline(dir.path(), "ohlc", &text);
    let mut sluice = SluiceProcess::run(&[&file], "127.0.0.1:9");
    let addr = sluice.admin_addr().await;
    let candles = || async { pg.count("candles").await };
    assert!(wait_until(Duration::from_secs(60), || async { candles().await >= 2 }).await, "no candle");

    // The same build as a candidate, started while the 20-30 s window is open.
    let candidate = plugin_path("ohlc_candles").display().to_string();
    let body = serde_json::json!({ "plugin": candidate, "stage": 2 }).to_string();
    let (code, answer) = post_json(&addr, "/pipelines/ohlc/shadow/start", &body);
    assert_eq!(code, 200, "{answer}");
    let report = || {
        let (code, body) = http(&addr, "GET", "/pipelines/ohlc/shadow");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone()
    };
    let running = wait_until(Duration::from_secs(60), || async {
        report()["state"].as_str().is_some_and(|s| s.starts_with("running"))
    })
    .await;
    assert!(running, "{}", report());
    let mut appended = std::fs::OpenOptions::new().append(true).open(&input).unwrap();
    std::io::Write::write_all(&mut appended, &lines(25..45)).unwrap();
    // Two more windows close (20-30 s and 30-40 s), both compared.
    assert!(wait_until(Duration::from_secs(60), || async { candles().await >= 4 }).await, "no later candle");
    let identical = || report()["counts"]["identical"].as_u64().unwrap_or(0);
    let compared = wait_until(Duration::from_secs(60), || async { identical() >= 2 }).await;
    let report = report();
    assert!(compared, "{report}");
    let counts = &report["counts"];
    assert_eq!(
        (&counts["different"], &counts["only_live"], &counts["only_candidate"], &counts["candidate_errors"]),
        (&0.into(), &0.into(), &0.into(), &0.into()),
        "{report}"
    );
    assert_eq!(sluice.stop(), Some(0));
}
