//! Event time: idle partitions, late records and far-future timestamps.

use super::*;
use crate::common;
use common::fixture::Fixture;
use common::services::*;
use std::time::Duration;

/// A quiet partition closes its last window by `idle_timeout` while the
/// other partition stays busy (its batches come every 200 ms, so the
/// pipeline is never without a batch for long): QUIET's candle is stored
/// while BUSY's feed still runs, and every candle is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_partition_closes_its_window_while_another_stays_busy() {
    let fx = Fixture::new("ohlc_quiet", &[("trades_raw", 2)]).await;
    let (broker, pg) = (&fx.broker, &fx.pg);
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

/// `sluice plugin test` of ohlc-candles, over what `plugin test` of the
/// flattener makes of a capture, prints the candles the pipeline stores in
/// PostgreSQL for the same capture (the same transform step, event time and
/// lateness; the sums to 1e-9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_test_prints_the_candles_the_pipeline_stores() {
    let pg = PgSchema::create("ohlc_plugin_test").await;
    let table = format!("{}.candles", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames = common::trades::generated(2_000, 41);
    let capture = dir.path().join("capture.jsonl");
    std::fs::write(&capture, frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect::<Vec<u8>>())
        .unwrap();
    let source = "[source]\ntype = \"file\"\npath = \"capture.jsonl\"";
    let text = ohlc_pipeline(source, &table, "allowed_lateness_ms = 2000", "[dead_letter]\ntype = \"stdout\"", "");
    let out = run_until_eof(&write_pipeline(dir.path(), "ohlc", &text));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dead: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    let stored = stored_candles(&pg.client, &table).await;

    let plugin_test = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--cache-dir")
            .arg(common::test_cache_dir())
            .args(["plugin", "test"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let flattener = common::plugin_path("trade_flattener");
    let (_, trades, failed) = plugin_test(&[flattener.to_str().unwrap(), "-i", capture.to_str().unwrap()]);
    let trades_file = dir.path().join("trades.jsonl");
    std::fs::write(&trades_file, trades).unwrap();
    let candles = common::plugin_path("ohlc_candles");
    let args = [candles.to_str().unwrap(), "-i", trades_file.to_str().unwrap(), "-c", "window_ms=10000"];
    let (code, printed, late) =
        plugin_test(&[&args[..], &["--json", "--event-time", "ts", "--allowed-lateness-ms", "2000"]].concat());
    // The pipeline dead-letters the malformed frames (and a frame with a
    // late trade whole); plugin test fails them as lines.
    assert_eq!(failed.lines().count(), dead.len(), "malformed frames: {failed}");
    assert_eq!((code, late.as_str()), (Some(0), ""), "no trade of the capture is late");
    let printed: BTreeMap<(String, i64), Candle> = String::from_utf8(printed)
        .unwrap()
        .lines()
        .map(|line| {
            let o: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(o["line"].is_null() && o["timer"]["at"].is_i64(), "a candle comes from a timer: {o}");
            let v = &o["value"];
            let f = |field: &str| v[field].as_f64().unwrap();
            let key = (v["symbol"].as_str().unwrap().to_string(), v["window_start"].as_i64().unwrap());
            (key, (f("open"), f("high"), f("low"), f("close"), f("volume"), f("vwap"), v["trades"].as_i64().unwrap()))
        })
        .collect();
    assert!(printed.len() > 10, "{} candles", printed.len());
    assert_candles(&printed, &stored);
    assert_candles(&printed, &expected_candles(&frames, 10_000));
}
