//! `sluice plugin test` as a process: stdout, stderr, exit status.

use crate::common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn sluice_plugin_test(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["plugin", "test"])
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn flattens_stdin_and_reports_bad_lines() {
    let wasm = common::plugin_path("trade_flattener");
    let input = concat!(
        r#"{"type":"trade","data":[{"s":"BINANCE:BTCUSDT","p":7296.89,"t":1575526691134,"v":0.011467,"c":["1","12"]},{"s":"AAPL","p":1,"t":2,"v":3}]}"#,
        "\n",
        r#"{"type":"ping"}"#,
        "\n",
        "garbage\n",
        r#"{"type":"trade","data":[{"s":"X","p":1,"t":2}]}"#,
        "\n"
    );
    let out = sluice_plugin_test(&[wasm.to_str().unwrap()], input);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        concat!(
            r#"{"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.011467,"ts":1575526691134,"conditions":["1","12"]}"#,
            "\n",
            r#"{"symbol":"AAPL","price":1,"volume":3,"ts":2,"conditions":[]}"#,
            "\n"
        )
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with("line 3: not a Finnhub frame"), "{stderr}");
    assert!(lines[1].starts_with("line 4: bad trade in `data`: missing field `v`"), "{stderr}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn exit_zero_when_every_line_succeeds_and_input_file_works() {
    let wasm = common::plugin_path("trade_flattener");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("frames.jsonl");
    std::fs::write(
        &input,
        "{\"type\":\"ping\"}\r\n{\"type\":\"trade\",\"data\":[{\"s\":\"A\",\"p\":2,\"t\":3,\"v\":4}]}",
    )
    .unwrap();
    let out = sluice_plugin_test(&[wasm.to_str().unwrap(), "--input", input.to_str().unwrap()], "");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"symbol\":\"A\",\"price\":2,\"volume\":4,\"ts\":3,\"conditions\":[]}\n"
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn config_is_passed_and_rejections_exit_2() {
    let chaos = common::plugin_path("chaos");
    let out = sluice_plugin_test(&[chaos.to_str().unwrap(), "--config", "marker=v2:"], "a\nb\n");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "v2:a\nv2:b\n");
    assert_eq!(out.status.code(), Some(0));

    let flattener = common::plugin_path("trade_flattener");
    let out = sluice_plugin_test(&[flattener.to_str().unwrap(), "-c", "bogus=1"], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("plugin trade_flattener rejected its config: unknown config key(s): bogus"), "{stderr}");
}

#[test]
fn a_trapping_plugin_reports_the_line_and_goes_on() {
    let chaos = common::plugin_path("chaos");
    let out = sluice_plugin_test(&[chaos.to_str().unwrap(), "-c", "mode=trap"], "a\nboom\nc\n");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "a\nc\n");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("line 2: plugin trapped"), "{stderr}");
    assert_eq!(out.status.code(), Some(1));
}

/// `sluice plugin test` over `input` (a file written here), with `args`.
fn plugin_test_file(args: &[&str], input: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.jsonl");
    std::fs::write(&path, input).unwrap();
    let mut all = vec!["-i", path.to_str().unwrap()];
    all.extend_from_slice(args);
    (sluice_plugin_test(&all, ""), dir)
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn trade(symbol: &str, price: f64, ts: i64) -> String {
    format!("{{\"symbol\":\"{symbol}\",\"price\":{price},\"volume\":1,\"ts\":{ts}}}\n")
}

/// ohlc-candles (contract 0.3) through the pipeline's transform step: event
/// time from the `ts` field, batches of two, timers fired after the batch
/// whose watermark passes them and the rest at the end, a late trade
/// reported as its line; the candles as computed by hand.
#[test]
fn a_stateful_plugin_gets_state_event_time_and_timers() {
    let candles = common::plugin_path("ohlc_candles");
    let input = [
        trade("A", 10.0, 60_500),
        trade("B", 5.0, 61_000),
        trade("A", 12.0, 119_000),
        trade("A", 11.0, 120_500), // the watermark passes 120000: the first minute closes
        trade("A", 9.0, 30_000),   // late
        trade("A", 13.0, 121_000),
    ]
    .concat();
    let (out, _dir) =
        plugin_test_file(&[candles.to_str().unwrap(), "--json", "--event-time", "ts", "--batch-size", "2"], &input);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("line 5: late record: timestamp 30000 is 90500 ms behind the watermark 120500"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let outputs = json_lines(&out);
    // (from a timer, its time, symbol, window start, [open, high, low, close], trades)
    type Seen<'a> = (bool, i64, &'a str, i64, [f64; 4], u64);
    let seen: Vec<Seen> = outputs
        .iter()
        .map(|o| {
            let v = &o["value"];
            let f = |field: &str| v[field].as_f64().unwrap();
            (
                o["line"].is_null(),
                o["timer"]["at"].as_i64().unwrap(),
                v["symbol"].as_str().unwrap(),
                v["window_start"].as_i64().unwrap(),
                [f("open"), f("high"), f("low"), f("close")],
                v["trades"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (true, 120_000, "A", 60_000, [10.0, 12.0, 10.0, 12.0], 2),
            (true, 120_000, "B", 60_000, [5.0, 5.0, 5.0, 5.0], 1),
            (true, 180_000, "A", 120_000, [11.0, 13.0, 11.0, 13.0], 2),
        ],
        "{outputs:?}"
    );
    assert!(outputs.iter().all(|o| o["timer"]["partition"] == 0), "{outputs:?}");
}

/// `--state-out` then `--state-in`: a run over the first trades and a run
/// over the rest from its state end where one run over all of them ends;
/// `--partition-by` keys each record into a partition (with a state of its
/// own) as Kafka's default partitioner would.
#[test]
fn state_carries_over_between_runs_and_partitions_come_from_a_field() {
    let totals = common::plugin_path("symbol_totals");
    let trades = [trade("A", 1.0, 1), trade("B", 2.0, 2), trade("A", 3.0, 3), trade("B", 4.0, 4), trade("A", 5.0, 5)];
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.jsonl");
    let (state_arg, plugin) = (state.to_str().unwrap(), totals.to_str().unwrap());
    let common_args = [plugin, "--json", "--event-time", "ts", "--partition-by", "symbol", "--partitions", "8"];
    let run = |extra: &[&str], input: &str| {
        let mut args = common_args.to_vec();
        args.extend_from_slice(extra);
        let (out, _dir) = plugin_test_file(&args, input);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        json_lines(&out)
    };
    let whole = run(&[], &trades.concat());
    run(&["--state-out", state_arg], &trades[..3].concat());
    let saved = std::fs::read_to_string(&state).unwrap();
    // murmur2 puts "A" in partition 2 and "B" in partition 0 of 8.
    assert!(saved.contains(r#""partition":2,"key_hex":"0041""#), "{saved}");
    let rest = run(&["--state-in", state_arg], &trades[3..].concat());
    let last = |outputs: &[serde_json::Value]| outputs.last().unwrap()["value"].clone();
    assert_eq!(last(&rest), last(&whole));
    assert_eq!(last(&whole)["trades"], 3);
    assert_eq!((whole[1]["value"]["partition"].clone(), whole[1]["key"].clone()), (0.into(), "B/0".into()));

    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"stage\":0}\n").unwrap();
    let (out, _dir) = plugin_test_file(&[plugin, "--state-in", broken.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.jsonl:1: not a state line"));
}

#[test]
fn state_options_on_a_stateless_plugin_are_refused() {
    let flattener = common::plugin_path("trade_flattener");
    let out = sluice_plugin_test(&[flattener.to_str().unwrap(), "--state-out", "x.jsonl"], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--state-out is for a stateful plugin (contract 0.3)"), "{stderr}");
}

/// `--expect`: `--update` writes the golden file (outputs and the failing
/// line), a run against it passes, a changed output fails with the field
/// that differs, and `--tolerance` / `--ignore` relax the comparison.
#[test]
fn golden_files_pass_fail_with_a_diff_and_update() {
    let flattener = common::plugin_path("trade_flattener");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("frames.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"type":"trade","data":[{"s":"A","p":1.5,"t":3,"v":4},{"s":"B","p":2,"t":3,"v":1}]}"#,
            "\ngarbage\n"
        ),
    )
    .unwrap();
    let golden = dir.path().join("expected.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![flattener.to_str().unwrap(), "-i", input.to_str().unwrap()];
        args.extend(["--expect", golden.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let out = sluice_plugin_test(&args, "");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, stdout) = run(&[]);
    assert_eq!(code, Some(2), "no golden file yet: {stdout}");
    assert_eq!(run(&["--update"]), (Some(0), format!("wrote 3 outputs to {}\n", golden.display())));
    let written = std::fs::read_to_string(&golden).unwrap();
    assert!(written.lines().nth(2).unwrap().starts_with(r#"{"line":2,"error":"not a Finnhub frame"#), "{written}");
    assert_eq!(run(&[]), (Some(0), format!("all 3 outputs match {}\n", golden.display())));

    std::fs::write(&golden, written.replacen(r#""price":1.5"#, r#""price":1.5000001"#, 1)).unwrap();
    let (code, stdout) = run(&[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("line 1, key \"A\": differs\n    price: expected 1.5000001, got 1.5\n"), "{stdout}");
    assert!(stdout.contains("1 of 3 outputs differ (1 different, 0 missing, 0 unexpected)"), "{stdout}");
    assert_eq!(run(&["--tolerance", "1e-6"]).0, Some(0));
    assert_eq!(run(&["--ignore", "price"]).0, Some(0));

    std::fs::write(&golden, written.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let (code, stdout) = run(&[]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("line 2: unexpected failure: \"not a Finnhub frame"), "{stdout}");
}

/// `--trace A` with one line a batch: each line that changed a window of
/// symbol A, the window's value before and after, its timer set, fired and
/// cleared, and the candle it output; nothing of B.
#[test]
fn a_trace_follows_the_keys_of_a_prefix_line_by_line() {
    let candles = common::plugin_path("ohlc_candles");
    let input =
        [trade("A", 10.0, 60_500), trade("B", 5.0, 61_000), trade("A", 12.0, 119_000), trade("A", 11.0, 120_500)]
            .concat();
    let args = [candles.to_str().unwrap(), "--event-time", "ts", "--batch-size", "1", "--trace", "A"];
    let (out, _dir) = plugin_test_file(&args, &input);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let trace = String::from_utf8(out.stdout).unwrap();
    let window = r#""A\u000060000""#;
    for said in [
        "batch 1: line 1: {\"symbol\":\"A\",\"price\":10,\"volume\":1,\"ts\":60500}\n".to_string(),
        format!("  {window} (stage 1, partition 0): (none) -> 0x"),
        format!("  timer {window} at 120000 set (stage 1, partition 0)"),
        "batch 3: line 3: ".to_string(),
        "batch 4: line 4: ".to_string(),
        format!("  timer {window} at 120000 fired (partition 0)\n    output of the timer, key \"A\": {{"),
        "(72 bytes) -> (deleted)\n".to_string(),
        format!("  timer {window} at 120000 cleared (stage 1, partition 0)"),
        "batch 5: no lines (timers only)\n  timer \"A\\u0000120000\" at 180000 fired".to_string(),
    ] {
        assert!(trace.contains(&said), "{said:?} in:\n{trace}");
    }
    assert!(!trace.contains("batch 2") && !trace.contains("\"B"), "B's line touched no A key:\n{trace}");
}

fn traded(symbol: &str, volume: f64, ts: i64) -> String {
    format!("{{\"symbol\":\"{symbol}\",\"price\":1,\"volume\":{volume},\"ts\":{ts}}}\n")
}

/// window-stats' windows as `(symbol, start, end, trades, volume)`, in the
/// order they came out, with whether each came from a timer.
fn windows(out: &Output) -> Vec<(bool, String, i64, i64, u64, f64)> {
    json_lines(out)
        .iter()
        .map(|o| {
            let v = &o["value"];
            (
                o["line"].is_null(),
                v["symbol"].as_str().unwrap().to_string(),
                v["start"].as_i64().unwrap(),
                v["end"].as_i64().unwrap(),
                v["trades"].as_u64().unwrap(),
                v["volume"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Sliding windows of 60 s every 30 s: a trade counts in two windows; the
/// windows the watermark passes close after the batch, the rest at the
/// end of the input. As computed by hand.
#[test]
fn sliding_windows_count_each_trade_in_every_window_that_holds_it() {
    let plugin = common::plugin_path("window_stats");
    let input = [traded("A", 1.0, 10_000), traded("A", 2.0, 40_000), traded("A", 4.0, 70_000)].concat();
    let args = [plugin.to_str().unwrap(), "--json", "--event-time", "ts", "-c", "kind=sliding"];
    let (out, _dir) = plugin_test_file(&[&args[..], &["-c", "size_ms=60000", "-c", "slide_ms=30000"]].concat(), &input);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let a = |start: i64, trades: u64, volume: f64| (true, "A".to_string(), start, start + 60_000, trades, volume);
    // One batch: its watermark (70 000) closes the windows ending at 30 000
    // and 60 000; the input's end closes the two others.
    assert_eq!(windows(&out), vec![a(-30_000, 1, 1.0), a(0, 2, 3.0), a(30_000, 2, 6.0), a(60_000, 1, 4.0)]);
}

/// Sessions with a 30 s gap: a late-arriving trade that falls within the
/// gap of two of A's sessions merges them; a timer set for a session that
/// was extended since closes nothing. As computed by hand.
#[test]
fn session_windows_follow_the_data_and_a_bridging_trade_merges_two() {
    let plugin = common::plugin_path("window_stats");
    let input = [
        traded("A", 1.0, 0),
        traded("A", 2.0, 50_000),   // a second session: 50 000 is past 0 + gap
        traded("B", 8.0, 30_000),   // on time: the watermark is 20 000
        traded("A", 4.0, 25_000),   // within the gap of both: one session [0, 50 000]
        traded("A", 16.0, 200_000), // the watermark (170 000) closes the first sessions
    ]
    .concat();
    let args = [plugin.to_str().unwrap(), "--json", "--event-time", "ts", "--allowed-lateness-ms", "30000"];
    let config = ["-c", "kind=session", "-c", "gap_ms=30000", "--batch-size", "1"];
    let (out, _dir) = plugin_test_file(&[&args[..], &config[..]].concat(), &input);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let w = |symbol: &str, start: i64, end: i64, trades: u64, volume: f64| {
        (true, symbol.to_string(), start, end, trades, volume)
    };
    assert_eq!(
        windows(&out),
        vec![w("B", 30_000, 60_000, 1, 8.0), w("A", 0, 80_000, 3, 7.0), w("A", 200_000, 230_000, 1, 16.0)]
    );
}
