//! Recording a live stage (`sluice record`, through the admin API) and
//! replaying it (`sluice replay`): the candles stage of a running pipeline
//! is recorded while its feed grows, and replayed exactly, deterministically,
//! against a changed config, from a capture cut short, and traced by key.

use super::*;
use crate::common;
use common::services::*;
use std::io::Write;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn append(path: &std::path::Path, frames: &[Vec<u8>]) {
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
    for f in frames {
        file.write_all(f).unwrap();
        file.write_all(b"\n").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_candles_stage_replays_exactly_deterministically_and_shows_a_changed_config() {
    let pg = PgSchema::create("replay_candles").await;
    let table = format!("{}.candles", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames = common::trades::generated(3_000, 43);
    let feed = dir.path().join("feed.jsonl");
    append(&feed, &frames[..1_000]);
    let source = "[source]\ntype = \"file\"\npath = \"feed.jsonl\"";
    let text_of = ohlc_pipeline(source, &table, "allowed_lateness_ms = 2000", "[dead_letter]\ntype = \"stdout\"", "");
    let file = write_pipeline(dir.path(), "ohlc", &text_of);
    let mut run = SluiceProcess::run(&[&file], "127.0.0.1:9");
    let admin = run.admin_addr().await;
    // The stage holds state before the recording starts: the capture must carry it.
    let rows = || async {
        pg.client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.map_or(0, |r| r.get::<_, i64>(0))
    };
    assert!(wait_until(WAIT, || async { rows().await > 0 }).await, "no candle stored");

    // Unknown pipelines and stages are refused, before anything is recorded.
    let capture = dir.path().join("candles.capture");
    let cap = capture.to_str().unwrap();
    for (args, why) in [
        (&["nope", "--stage", "1"][..], "no pipeline \"nope\""),
        (&["ohlc"][..], "2 transforms: say which one"),
        (&["ohlc", "--stage", "3"][..], "has 2 transform(s), not 3"),
    ] {
        let refused = sluice(&[&["record"][..], args, &["--out", cap, "--records", "10", "--addr", &admin]].concat());
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
        assert!(text(&refused.stderr).contains(why), "{}", text(&refused.stderr));
    }

    let recording = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["record", "ohlc", "--stage", "2", "--out", cap, "--records", "4000", "--addr", &admin])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(run.wait_log("recording requested", 0).await);
    let busy = sluice(&["record", "ohlc", "--stage", "2", "--out", cap, "--records", "10", "--addr", &admin]);
    assert_eq!(busy.status.code(), Some(2));
    assert!(text(&busy.stderr).contains("already being recorded"), "{}", text(&busy.stderr));
    // The feed grows in steps, so that calls, batches and timers interleave.
    for chunk in frames[1_000..].chunks(250) {
        append(&feed, chunk);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let recorded = tokio::task::spawn_blocking(move || recording.wait_with_output()).await.unwrap().unwrap();
    assert!(started.elapsed() < WAIT);
    assert!(recorded.status.success(), "{}{}", text(&recorded.stdout), text(&recorded.stderr));
    assert!(text(&recorded.stdout).contains("record bound (--records) was reached"), "{}", text(&recorded.stdout));
    assert_eq!(run.stop(), Some(0));

    // What the capture holds: the header, the state held at the start, the
    // calls of records and of timers, and the end.
    let read = sluice::capture::Capture::read(&capture).unwrap();
    assert_eq!((read.header.pipeline.as_str(), read.header.stage), ("ohlc", 2));
    assert_eq!(read.header.plugin.name, "ohlc_candles");
    assert_eq!(read.header.config, vec![("window_ms".to_string(), "10000".to_string())]);
    assert!(read.header.event_time.is_some());
    let states = read.entries.iter().filter(|e| matches!(e, sluice::capture::Entry::State(_))).count();
    assert!(states >= 1, "the state held at the start is in the capture");
    let calls: Vec<_> = read.calls().collect();
    let records: usize = calls.iter().map(|c| c.inputs.len()).sum();
    assert!(records >= 4_000, "{records} records");
    let timers = calls.iter().filter(|c| c.cause != sluice::capture::Cause::Batch).count();
    assert!(timers > 0, "timer firings are recorded");
    let live_candles: usize = calls
        .iter()
        .flat_map(|c| &c.outputs)
        .map(|o| match o {
            sluice::capture::CallResult::Ok(outputs) => outputs.len(),
            sluice::capture::CallResult::Error(_) => 0,
        })
        .sum();
    assert!(live_candles > 0, "candles came out live");
    assert!(calls.iter().all(|c| !c.watermarks.is_empty()), "each call has its watermarks");
    assert!(read.end().is_some() && read.truncated.is_none());

    // The recorded version gives, call by call, what ran live.
    let diff = sluice(&["replay", cap, "--diff"]);
    assert_eq!(diff.status.code(), Some(0), "{}{}", text(&diff.stdout), text(&diff.stderr));
    assert!(text(&diff.stdout).contains("no differences"), "{}", text(&diff.stdout));
    assert!(text(&diff.stdout).contains(&format!("{} input records", records)), "{}", text(&diff.stdout));
    // Deterministic: the same bytes on every run.
    let (a, b) = (sluice(&["replay", cap, "--json"]), sluice(&["replay", cap, "--json"]));
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(text(&a.stdout).lines().filter(|l| l.contains("\"value\"")).count(), live_candles);

    // Another config (or version) against the live traffic: the differences.
    let changed = sluice(&["replay", cap, "--diff", "-c", "window_ms=5000"]);
    assert_eq!(changed.status.code(), Some(1), "{}{}", text(&changed.stdout), text(&changed.stderr));
    assert!(text(&changed.stdout).contains("differences; the first"), "{}", text(&changed.stdout));
    let json = sluice(&["replay", cap, "--diff", "--json", "-c", "window_ms=5000"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(report["differences"].as_array().is_some_and(|d| !d.is_empty()), "{report}");

    // A capture cut short (the recorder killed) replays up to its last whole entry.
    let bytes = std::fs::read(&capture).unwrap();
    let cut = dir.path().join("cut.capture");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let short = sluice(&["replay", cut.to_str().unwrap(), "--diff"]);
    assert_eq!(short.status.code(), Some(0), "{}{}", text(&short.stdout), text(&short.stderr));
    assert!(text(&short.stderr).contains("cut short at byte"), "{}", text(&short.stderr));

    // One symbol's story: the inputs that wrote its candles, values before and after, timers, outputs.
    let trace = sluice(&["replay", cap, "--trace", "BINANCE:BTCUSDT"]);
    let story = text(&trace.stdout);
    assert!(trace.status.success(), "{}", text(&trace.stderr));
    assert!(story.contains("wrote \"BINANCE:BTCUSDT\\u0000"), "{story}");
    assert!(story.contains("timer \"BINANCE:BTCUSDT\\u0000") && story.contains(" fired"), "{story}");
    assert!(story.contains("output of "), "{story}");

    // What cannot be replayed is named, with exit status 2.
    let garbage = dir.path().join("garbage.capture");
    std::fs::write(&garbage, b"\x05\x00\x00\x00hello, not a capture").unwrap();
    let mut newer = serde_json::to_value(&read.header).unwrap();
    newer["version"] = 2.into();
    let newer = serde_json::to_vec(&newer).unwrap();
    let future = dir.path().join("future.capture");
    std::fs::write(&future, [&(newer.len() as u32).to_le_bytes()[..], &newer].concat()).unwrap();
    let flattener = common::plugin_path("trade_flattener");
    for (args, why) in [
        (vec![garbage.to_str().unwrap()], "this is not a capture, or it is corrupt"),
        (vec![future.to_str().unwrap()], "capture format version 2: this build reads version 1"),
        (vec![cap, "--plugin", flattener.to_str().unwrap()], "keeps none: it cannot take the stage's place"),
    ] {
        let refused = sluice(&[&["replay"][..], &args].concat());
        assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
        assert!(text(&refused.stderr).contains(why), "{}", text(&refused.stderr));
    }

    // Another file of the same version (a copy, as on a laptop) replays the same.
    let copy = dir.path().join("ohlc_copy.wasm");
    std::fs::copy(common::plugin_path("ohlc_candles"), &copy).unwrap();
    let same = sluice(&["replay", cap, "--plugin", copy.to_str().unwrap(), "--diff"]);
    assert_eq!(same.status.code(), Some(0), "{}{}", text(&same.stdout), text(&same.stderr));
}

/// A plugin that reads WASI's wall clock and random numbers (chaos `clock`
/// mode, a stateless stage) replays to the same bytes every time: its clock
/// reads the call's recorded processing time, its random numbers a fixed
/// seed. Live, they were the real ones, so `--diff` shows them differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_reads_the_clock_and_random_numbers_replays_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let feed = dir.path().join("feed.jsonl");
    std::fs::write(&feed, "").unwrap();
    let text_of = format!(
        "name = \"clock\"\n[source]\ntype = \"file\"\npath = \"feed.jsonl\"\n[[transforms]]\nplugin = \"{}\"\n\
         config = {{ mode = \"clock\", trigger = \"*\" }}\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n",
        common::plugin_path("chaos").display()
    );
    let file = write_pipeline(dir.path(), "clock", &text_of);
    let mut run = SluiceProcess::run(&[&file], "127.0.0.1:9");
    let admin = run.admin_addr().await;
    let capture = dir.path().join("clock.capture");
    let cap = capture.to_str().unwrap();
    let mut record = Command::new(env!("CARGO_BIN_EXE_sluice"));
    record.args(["record", "clock", "--out", cap, "--records", "30", "--addr", &admin]);
    let recording = tokio::task::spawn_blocking(move || record.output());
    assert!(run.wait_log("recording requested", 0).await);
    for chunk in 0..5 {
        let lines: Vec<Vec<u8>> = (0..10).map(|i| format!("{{\"n\":{}}}", chunk * 10 + i).into_bytes()).collect();
        append(&feed, &lines);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let recorded = recording.await.unwrap().unwrap();
    assert!(recorded.status.success(), "{}{}", text(&recorded.stdout), text(&recorded.stderr));
    // A recording running when the instance stops gracefully gets its end.
    let stopped = dir.path().join("stopped.capture");
    let mut record = Command::new(env!("CARGO_BIN_EXE_sluice"));
    record.args(["record", "clock", "--out", stopped.to_str().unwrap(), "--for", "120s", "--addr", &admin]);
    let second = tokio::task::spawn_blocking(move || record.output());
    assert!(run.wait_log("recording requested", 1).await);
    append(&feed, &[b"{\"n\":-1}".to_vec()]);
    assert!(wait_until(WAIT, || async { std::fs::metadata(&stopped).is_ok_and(|m| m.len() > 0) }).await);
    assert_eq!(run.stop(), Some(0));
    let second = second.await.unwrap().unwrap();
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(text(&second.stdout).contains("stopped: the stage went away"), "{}", text(&second.stdout));

    let read = sluice::capture::Capture::read(&capture).unwrap();
    let (a, b) = (sluice(&["replay", cap, "--json"]), sluice(&["replay", cap, "--json"]));
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout, "two replays, the same bytes");
    let outputs: Vec<serde_json::Value> = text(&a.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let inputs: usize = read.calls().map(|c| c.inputs.len()).sum();
    assert_eq!(outputs.len(), inputs);
    for o in &outputs {
        let call = read.calls().find(|c| c.seq == o["call"].as_u64().unwrap()).unwrap();
        assert_eq!(o["value"]["wall_ms"].as_i64(), Some(call.now_ms), "the clock is the call's: {o}");
    }
    let diff = sluice(&["replay", cap, "--diff"]);
    assert_eq!(diff.status.code(), Some(1), "live, the random numbers were others: {}", text(&diff.stdout));
    assert!(text(&diff.stdout).contains("random: "), "{}", text(&diff.stdout));
}
