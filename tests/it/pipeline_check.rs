//! `sluice check` on broken pipeline files: every error, with file:line:column.

use crate::common;

use std::process::Command;

fn check(files: &[(&str, String)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = files
        .iter()
        .map(|(name, text)| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .arg("check")
        .args(&paths)
        .env_remove("SLUICE_TEST_UNSET")
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap().replace(&format!("{}/", dir.path().display()), "");
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap(), stderr)
}

const SOURCE: &str = "[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"in\"]\n";
const DLQ: &str = "[dead_letter]\ntype = \"stdout\"\n";

#[test]
fn every_error_is_reported_with_its_place() {
    let flattener = common::plugin_path("trade_flattener");
    let chaos = common::plugin_path("chaos");
    let (code, _, stderr) = check(&[
        ("unknown-key.toml", format!("colour = \"red\"\n{SOURCE}[sinks.out]\ntype = \"stdout\"\n{DLQ}")),
        ("bad-sink-key.toml", format!("{SOURCE}[sinks.out]\ntype = \"stdout\"\nformat = \"json\"\n{DLQ}")),
        ("env.toml", format!("[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_TEST_UNSET}}\"\ntopics = [\"in\"]\n[sinks.out]\ntype = \"stdout\"\n{DLQ}")),
        (
            "semantic.toml",
            format!(
                "default_sink = \"nowhere\"\n{SOURCE}[[transforms]]\nplugin = \"{}\"\nconfig = {{ symbols = \"BTC\" }}\n[[transforms]]\nplugin = \"missing.wasm\"\n[[transforms]]\nplugin = \"{}\"\nconfig = {{ mode = \"init-trap\" }}\n[sinks.a]\ntype = \"stdout\"\n[sinks.b]\ntype = \"stdout\"\n[dead_letter]\ntype = \"postgres\"\nurl = \"x\"\ntable = \"t\"\ncolumns = []\n",
                flattener.display(),
                chaos.display()
            ),
        ),
        ("no-sinks.toml", format!("{SOURCE}[sinks]\n{DLQ}")),
        ("syntax.toml", "[source\n".to_string()),
    ]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        "unknown-key.toml:1:1: unknown field `colour`, expected one of `name`, `source`, `transforms`, `sinks`, `default_sink`, `dead_letter`, `on_plugin_failure`, `state`, `connections`",
        "bad-sink-key.toml:5:1: unknown field `format`, there are no fields",
        "env.toml:3:12: environment variable `SLUICE_TEST_UNSET` is not set (write `${SLUICE_TEST_UNSET:-default}` for a default)",
        "semantic.toml:7:10: plugin trade_flattener rejected its config: unknown config key(s): symbols (this plugin takes no config)",
        "semantic.toml:10:10: plugin file",
        "semantic.toml:12:10: plugin chaos failed in init: plugin trapped",
        "semantic.toml:1:16: default_sink \"nowhere\" is not a sink of this pipeline (sinks: a, b)",
        "semantic.toml:18:1: [dead_letter]: type \"postgres\" cannot hold dead letters; use \"kafka\" or \"stdout\"",
        "no-sinks.toml:1:1: no sinks: add at least one `[sinks.NAME]` table",
        "syntax.toml:1:8: unclosed table, expected `]`",
    ];
    for want in expected {
        assert!(lines.iter().any(|l| l.starts_with(want)), "missing {want:?} in:\n{stderr}");
    }
    assert!(stderr.contains("missing.wasm does not exist"), "{stderr}");
    assert!(stderr.ends_with(&format!("sluice: {} error(s) in pipeline files\n", lines.len() - 1)), "{stderr}");
}

/// Every numeric setting has a range: a value that cannot work (a batch of
/// 10^15 records, 2^44 MiB that would wrap, no time at all) is refused by
/// `sluice check` at its place, not by the run.
#[test]
fn numbers_out_of_their_range_are_reported_at_their_place() {
    let flattener = common::plugin_path("trade_flattener");
    let (code, _, stderr) = check(&[
        (
            "batch.toml",
            format!("[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\ntopics = [\"in\"]\nbatch_max_records = 1000000000000000\n[sinks.out]\ntype = \"stdout\"\n{DLQ}"),
        ),
        (
            "limits.toml",
            format!(
                "{SOURCE}[[transforms]]\nplugin = \"{}\"\n[[transforms]]\nplugin = \"{}\"\n[transforms.limits]\ncpu_ms = 0\nmemory_mib = 17592186044416\nstate_mib = 17592186044416\n[sinks.out]\ntype = \"stdout\"\n{DLQ}",
                flattener.display(),
                flattener.display()
            ),
        ),
        (
            "file.toml",
            format!("[source]\ntype = \"file\"\npath = \"*.jsonl\"\nmax_line_bytes = 0\n[sinks.out]\ntype = \"stdout\"\n{DLQ}"),
        ),
    ]);
    assert_eq!(code, 1);
    for want in [
        "batch.toml:5:21: [source]: `batch_max_records` = 1000000000000000 is out of its range, 1 to 1000000",
        "limits.toml:10:10: transform 2 limits: `cpu_ms` = 0 is out of its range, 1 to 3600000",
        "limits.toml:11:14: transform 2 limits: `memory_mib` = 17592186044416 is out of its range, 1 to 4096",
        "limits.toml:12:13: transform 2 limits: `state_mib` = 17592186044416 is out of its range, 0 to 1048576",
        "file.toml:4:18: [source]: `max_line_bytes` = 0 is out of its range, 1 to 1073741824",
    ] {
        assert!(stderr.lines().any(|l| l.starts_with(want)), "missing {want:?} in:\n{stderr}");
    }
}

#[test]
fn connection_and_tls_errors_are_reported_at_their_place_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let empty_secret = dir.path().join("empty");
    std::fs::write(&empty_secret, "").unwrap();
    // Addresses nothing listens on: check must not try them.
    let secured = format!(
        r#"default_sink = "pg"
[connections.prod]
type = "kafka"
brokers = "10.255.255.1:9093"
tls = {{ ca = "/nonexistent/ca.pem", cert = "client.pem", key = "/nonexistent/client.key" }}
sasl = {{ mechanism = "SCRAM-SHA-512", username = "u", password = "${{file:/nonexistent/kafka_password}}" }}
properties = {{ "security.protocol" = "sasl_tls", "no.such.property" = "1" }}

[source]
type = "kafka"
connection = "prod"
topics = ["in"]
properties = {{ "fetch.wait.max.ms" = "soon", "ssl.key.location" = "missing.key" }}

[sinks.pg]
type = "postgres"
url = "postgres://u@10.255.255.1/db?sslmode=verify_full"
table = "t"
columns = [{{ name = "a", type = "text" }}]

[sinks.pg2]
type = "postgres"
url = "postgres://u@10.255.255.1/db"
sslmode = "verify-full"
sslrootcert = "/nonexistent/root.crt"
password = "${{file:{}}}"
table = "t"
columns = [{{ name = "a", type = "text" }}]

[sinks.out]
type = "kafka"
connection = "nope"
topic = "out"
compression = "brotli"

[dead_letter]
type = "kafka"
brokers = "10.255.255.1:9092"
connection = "prod"
topic = "dlq"
"#,
        empty_secret.display()
    );
    let (code, _, stderr) = check(&[("secured.toml", secured.clone())]);
    assert_eq!(code, 1, "{stderr}");
    let expected = [
        "secured.toml:6:67: cannot read secret file /nonexistent/kafka_password: No such file or directory",
        "secured.toml:26:13: secret file",
    ];
    for want in expected {
        assert!(stderr.lines().any(|l| l.starts_with(want)), "missing {want:?} in:\n{stderr}");
    }
    // The expansion errors stop the file there; with them fixed, the rest.
    let (code, _, stderr) = check(&[(
        "secured.toml",
        secured
            .replace("${file:/nonexistent/kafka_password}", "hunter2-secret")
            .replace(&format!("${{file:{}}}", empty_secret.display()), "pg-secret-value")
            .replace("\"brotli\"", "\"zstd\""),
    )]);
    assert_eq!(code, 1, "{stderr}");
    let expected = [
        "secured.toml:5:14: [connections.prod]: `ssl.ca.location`: file /nonexistent/ca.pem does not exist",
        "secured.toml:5:44: [connections.prod]: `ssl.certificate.location`: file client.pem does not exist",
        "secured.toml:5:64: [connections.prod]: `ssl.key.location`: file /nonexistent/client.key does not exist",
        "secured.toml:7:38: [connections.prod].properties: Invalid value \"sasl_tls\" for configuration property \"security.protocol\"",
        "secured.toml:7:71: [connections.prod].properties: No such configuration property: \"no.such.property\"",
        "secured.toml:13:38: [source].properties: Invalid value for configuration property \"fetch.wait.max.ms\"",
        "secured.toml:13:67: [source].properties: `ssl.key.location`: file missing.key does not exist",
        "secured.toml:17:7: [sinks.pg]: sslmode \"verify_full\" is not one of disable, prefer, require, verify-ca, verify-full",
        "secured.toml:25:15: [sinks.pg2]: sslrootcert file /nonexistent/root.crt does not exist",
        "secured.toml:32:14: [sinks.out]: no connection \"nope\" in this file (connections: prod)",
        "secured.toml:39:14: [dead_letter]: give `brokers` or `connection`, not both (the connection has the brokers)",
    ];
    for want in expected {
        assert!(stderr.lines().any(|l| l.starts_with(want)), "missing {want:?} in:\n{stderr}");
    }
    for secret in ["hunter2-secret", "pg-secret-value"] {
        assert!(!stderr.contains(secret), "check shows a secret:\n{stderr}");
    }
}

/// `[state]` says one place that can keep the state: a sink that has
/// transactions, or a database of its own behind a source that can replay.
#[test]
fn state_errors_are_reported_at_their_place() {
    let pg = "[sinks.pg]\ntype = \"postgres\"\nurl = \"postgres://u@10.255.255.1/db\"\ntable = \"t\"\ncolumns = [{ name = \"a\", type = \"text\" }]\n";
    let out = "[sinks.out]\ntype = \"stdout\"\n";
    let websocket = "[source]\ntype = \"websocket\"\nurl = \"ws://127.0.0.1:9/\"\n";
    let (code, _, stderr) = check(&[
        ("stdout.toml", format!("default_sink = \"pg\"\n{SOURCE}{pg}{out}{DLQ}[state]\nsink = \"out\"\n")),
        ("unknown.toml", format!("{SOURCE}{out}{DLQ}[state]\nsink = \"rows\"\n")),
        ("neither.toml", format!("{SOURCE}{out}{DLQ}[state]\n")),
        (
            "both.toml",
            format!("{SOURCE}{pg}{DLQ}[state]\nsink = \"pg\"\n[state.postgres]\nurl = \"postgres://u@h/db\"\n"),
        ),
        ("tls.toml", format!("{SOURCE}{out}{DLQ}[state.postgres]\nurl = \"postgres://u@h/db?sslmode=verify_full\"\n")),
        ("replay.toml", format!("{websocket}{out}{DLQ}[state.postgres]\nurl = \"postgres://u@h/db\"\n")),
        ("ws-sink.toml", format!("{websocket}{pg}{DLQ}[state]\nsink = \"pg\"\n")),
    ]);
    assert_eq!(code, 1, "{stderr}");
    let expected = [
        "stdout.toml:16:8: [state]: sink \"out\" (stdout) cannot keep the state: it has no transactions; keep it in `[state.postgres]`",
        "unknown.toml:10:8: [state]: \"rows\" is not a sink of this pipeline (sinks: out)",
        "neither.toml:9:1: [state]: say where the state is kept: `sink = \"NAME\"` (an exactly-once postgres sink) or a `[state.postgres]` table",
        "both.toml:12:1: [state.postgres]: say one of `state.sink` and `[state.postgres]`, not both",
        "tls.toml:10:7: [state.postgres]: sslmode \"verify_full\" is not one of disable, prefer, require, verify-ca, verify-full",
        "replay.toml:8:2: [state.postgres]: a websocket source cannot read anything again",
        "ws-sink.toml:12:8: [state]: sink \"pg\" cannot keep the state: a websocket source cannot read anything again, so state kept with its offsets could not be restored to match them",
    ];
    for want in expected {
        assert!(stderr.lines().any(|l| l.starts_with(want)), "missing {want:?} in:\n{stderr}");
    }
}

#[test]
fn the_shipped_pipelines_are_valid() {
    common::plugin_path("trade_flattener");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .arg("check")
        .arg(common::root().join("pipelines"))
        .arg(common::root().join("pipelines/examples"))
        .env("FINNHUB_TOKEN", "test-token")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok: pipeline trades [trade_flattener] -> sinks [pg] (default pg)"), "{stdout}");
    assert!(stdout.contains("ok: pipeline finnhub-ingest [] -> sinks [raw] (default raw)"), "{stdout}");
    assert!(!stdout.contains("test-token"), "{stdout}");
    assert!(
        stdout.contains(
            "ok: pipeline btc-router [trade_flattener -> symbol_router] -> sinks [btc, other] (default other)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: pipeline three-languages [trade_flattener -> py_enrich -> js_router] -> sinks [binance, other] (default other)"),
        "{stdout}"
    );
}

/// GitHub's and mdBook's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every relative link of the README and the book names a file of the
/// repository, and every `#anchor` a heading of its page: a moved chapter
/// or a renamed heading fails the build.
#[test]
fn the_readme_and_the_book_have_no_broken_link() {
    let root = common::root();
    let mut pages = vec![root.join("README.md")];
    let mut chapters: Vec<_> = std::fs::read_dir(root.join("docs/src")).unwrap().map(|e| e.unwrap().path()).collect();
    chapters.sort();
    pages.extend(chapters.into_iter().filter(|p| p.extension().is_some_and(|e| e == "md")));
    let headings = |page: &std::path::Path| -> Vec<String> {
        let text = std::fs::read_to_string(page).unwrap();
        let mut fenced = false;
        let mut found = Vec::new();
        for line in text.lines() {
            if line.starts_with("```") {
                fenced = !fenced;
            } else if !fenced && line.starts_with('#') {
                found.push(anchor(line.trim_start_matches('#')));
            }
        }
        found
    };
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (n, line) in text.lines().enumerate() {
            for part in line.split("](").skip(1) {
                let Some(target) = part.split(')').next() else { continue };
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
                let linked = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
                if !linked.exists() {
                    broken.push(format!("{}:{}: {target}: no such file", page.display(), n + 1));
                } else if !fragment.is_empty()
                    && linked.extension().is_some_and(|e| e == "md")
                    && !headings(&linked).iter().any(|h| h == fragment)
                {
                    broken.push(format!("{}:{}: {target}: no such heading", page.display(), n + 1));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(pages.len() > 5, "the book's chapters are there");
}

/// The JSON Schema the repository ships for editors, and the book's
/// reference chapter, are what the code generates: neither can drift.
#[test]
fn the_shipped_schema_and_reference_are_generated_from_the_code() {
    let sluice = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let root = common::root();
    let schema = sluice(&["schema"]);
    let shipped = std::fs::read_to_string(root.join("pipelines/sluice.schema.json")).unwrap_or_default();
    assert!(
        shipped == schema,
        "pipelines/sluice.schema.json is stale: run `sluice schema > pipelines/sluice.schema.json`"
    );
    let reference = sluice(&["schema", "--markdown"]);
    let chapter = std::fs::read_to_string(root.join("docs/src/reference.md")).unwrap_or_default();
    assert!(
        chapter == reference,
        "docs/src/reference.md is stale: run `sluice schema --markdown > docs/src/reference.md`"
    );

    let schema: serde_json::Value = serde_json::from_str(&schema).unwrap();
    assert_eq!(schema["additionalProperties"], false, "unknown keys are errors, in the schema too");
    let keys: Vec<&str> = schema["properties"].as_object().unwrap().keys().map(String::as_str).collect();
    for key in
        ["name", "source", "transforms", "sinks", "default_sink", "dead_letter", "on_plugin_failure", "connections"]
    {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    for table in [
        "SourceConfig",
        "SinkConfig",
        "TransformConfig",
        "LimitsConfig",
        "GrantsConfig",
        "ColumnConfig",
        "KafkaTlsConfig",
    ] {
        assert!(reference.contains(&format!("## {table}\n")), "{table} missing from the reference");
    }
    for kind in ["kafka", "websocket", "postgres", "stdout"] {
        assert!(reference.contains(&format!("- `type = \"{kind}\"`: ")), "{kind} missing from the reference");
    }
    assert!(
        reference.contains("`batch_output_mib`") && reference.contains("`buffer_bytes`"),
        "every key, with its doc comment"
    );
}
