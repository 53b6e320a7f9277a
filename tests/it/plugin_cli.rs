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
