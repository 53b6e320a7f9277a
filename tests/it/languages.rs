//! Plugins in three languages: the Python (`plugins/py-enrich`) and
//! JavaScript (`plugins/js-router`) plugins under the runtime, chained after
//! the Rust trade flattener in a real pipeline (Tansu + PostgreSQL), and the
//! skeletons `sluice plugin new` writes, built with their own `build.sh` and
//! run by `sluice plugin test`.

use crate::common;

use common::services::*;
use common::trades::*;
use common::{instance, plugin_path, runtime};
use rdkafka::Message;
use sluice::record::{Header, Origin, Output, Record};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

fn record(value: &str) -> Record {
    Record {
        key: Some("k".into()),
        value: value.to_string().into(),
        headers: vec![Header { name: "trace".into(), value: b"abc".to_vec() }],
        timestamp: Some(1_700_000_000_000),
        origin: Origin { topic: "t".into(), partition: 0, offset: 1 },
        ..Record::default()
    }
}

fn init_error(name: &str, config: &[(&str, &str)]) -> String {
    let (runtime, ()) = runtime();
    let plugin = Plugin::load(&runtime, &plugin_path(name)).unwrap();
    let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    match PluginInstance::new(plugin, config, Limits::default(), Grants::default(), "test") {
        Ok(_) => panic!("{name} accepted a bad config"),
        Err(error) => format!("{error:#}"),
    }
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.value).unwrap()
}

#[test]
fn python_plugin_enriches_filters_and_dead_letters_under_the_runtime() {
    let (runtime, ()) = runtime();
    let mut enrich = instance(&runtime, "py_enrich", &[("min_notional", "100")]);
    let results = enrich.process(&[
        record(r#"{"symbol":"BINANCE:BTCUSDT","price":67000.5,"volume":0.25,"ts":1}"#),
        record(r#"{"symbol":"AAPL","price":190.0,"volume":0.5,"ts":2}"#),
        record("{not json"),
        record(r#"{"symbol":"X","price":"1","volume":2}"#),
    ]);
    assert_eq!(results.len(), 4);
    let kept = results[0].as_ref().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(json(&kept[0])["notional"], 67000.5 * 0.25);
    assert_eq!((kept[0].key.as_deref(), kept[0].timestamp), (Some(&b"k"[..]), Some(1_700_000_000_000)));
    assert_eq!(kept[0].headers, [Header { name: "trace".into(), value: b"abc".to_vec() }], "headers kept");
    assert!(results[1].as_ref().unwrap().is_empty(), "notional 95 < 100 is dropped");
    let bad_json = results[2].as_ref().unwrap_err();
    assert!(bad_json.contains("JSONDecodeError"), "{bad_json}");
    assert!(results[3].as_ref().unwrap_err().contains("must be numbers"), "{:?}", results[3]);

    let error = init_error("py_enrich", &[("min_notional", "lots")]);
    assert!(error.contains("config `min_notional` = 'lots'"), "{error}");
    let error = init_error("py_enrich", &[("treshold", "1")]);
    assert!(error.contains("unknown config key(s): treshold"), "{error}");
}

#[test]
fn javascript_plugin_routes_by_exchange_under_the_runtime() {
    let (runtime, ()) = runtime();
    let mut router = instance(&runtime, "js_router", &[("routes", "BINANCE=bn"), ("fallback", "rest")]);
    let results = router.process(&[
        record(r#"{"symbol":"BINANCE:BTCUSDT","price":1}"#),
        record(r#"{"symbol":"KRAKEN:XBTUSD","price":1}"#),
        record("[1,2]"),
    ]);
    let routes: Vec<_> = results[..2].iter().map(|r| r.as_ref().unwrap()[0].route.clone()).collect();
    assert_eq!(routes, [Some("bn".to_string()), Some("rest".to_string())]);
    let first = &results[0].as_ref().unwrap()[0];
    assert_eq!(first.value, r#"{"symbol":"BINANCE:BTCUSDT","price":1}"#, "value passed through untouched");
    assert_eq!((first.key.as_deref(), first.timestamp), (Some(&b"k"[..]), Some(1_700_000_000_000)));
    assert_eq!(first.headers, [Header { name: "trace".into(), value: b"abc".to_vec() }], "headers kept");
    assert!(results[2].as_ref().unwrap_err().contains("not a flattened trade"), "{:?}", results[2]);

    let mut by_prefix = instance(&runtime, "js_router", &[]);
    let out = by_prefix.process(&[record(r#"{"symbol":"COINBASE:BTC-USD"}"#), record(r#"{"symbol":"AAPL"}"#)]);
    assert_eq!(out[0].as_ref().unwrap()[0].route.as_deref(), Some("coinbase"));
    assert_eq!(out[1].as_ref().unwrap()[0].route, None, "no exchange prefix: the default sink");

    let error = init_error("js_router", &[("routes", "BINANCE")]);
    assert!(error.contains("\"BINANCE\" is not EXCHANGE=SINK"), "{error}");
}

/// Long runs at the default limits: the interpreters' heaps settle below the
/// memory limit (SpiderMonkey's passed 64 MiB over 60 batches of 1,000).
#[test]
fn python_and_javascript_plugins_run_long_at_the_default_limits() {
    let (runtime, ()) = runtime();
    let trades: Vec<Record> = generated(25_000, 77)
        .iter()
        .filter_map(|frame| trade_flattener::flatten(frame).ok())
        .flatten()
        .take(60_000)
        .map(|o| record(std::str::from_utf8(&o.value).unwrap()))
        .collect();
    assert_eq!(trades.len(), 60_000);
    for (name, config) in [("js_router", vec![]), ("py_enrich", vec![("min_notional", "0")])] {
        let mut plugin = instance(&runtime, name, &config);
        for batch in trades.chunks(1000) {
            for result in plugin.process(batch) {
                assert!(result.is_ok(), "{name}: {result:?}");
            }
        }
        assert_eq!(plugin.replacements, 0, "{name}: no instance was replaced after a fault");
    }
}

/// Kafka → flattener (Rust) → enrich (Python) → router (JavaScript) → Binance
/// trades to PostgreSQL, the others to a Kafka topic; frames the flattener
/// rejects to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_python_and_javascript_plugins_chain_into_two_sinks() {
    const MIN_NOTIONAL: f64 = 1000.0;
    let broker = Broker::start();
    for topic in ["raw", "others", "dlq"] {
        broker.create_topic(topic, 2).await;
    }
    let pg = PgSchema::create("langs").await;
    let mut frames = generated(400, 41);
    frames.insert(100, b"not a frame".to_vec());
    broker.produce("raw", &frames).await;

    let kept: Vec<(Trade, f64)> = expected_trades(&frames)
        .into_iter()
        .map(|t| {
            let notional = t.1 * t.2;
            (t, notional)
        })
        .filter(|(_, notional)| *notional >= MIN_NOTIONAL)
        .collect();
    let (binance, others): (Vec<_>, Vec<_>) = kept.iter().cloned().partition(|(t, _)| t.0.starts_with("BINANCE:"));
    assert!(!binance.is_empty() && !others.is_empty() && kept.len() < expected_trades(&frames).len());

    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "langs",
        &format!(
            r#"
name = "langs"
default_sink = "others"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["raw"]
group = "g-langs"
batch_max_records = 50
[[transforms]]
plugin = "{flattener}"
[[transforms]]
plugin = "{enrich}"
config = {{ min_notional = {MIN_NOTIONAL} }}
[[transforms]]
plugin = "{router}"
config = {{ routes = "BINANCE=binance" }}
[sinks.binance]
type = "postgres"
url = "${{SLUICE_PG_URL}}"
table = "{schema}.binance"
create_table = true
columns = [
  {{ name = "symbol", type = "text" }},
  {{ name = "price", type = "double precision" }},
  {{ name = "volume", type = "double precision" }},
  {{ name = "traded_at", type = "timestamptz", field = "ts" }},
  {{ name = "notional", type = "double precision" }},
]
[sinks.others]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "others"
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "dlq"
"#,
            flattener = plugin_path("trade_flattener").display(),
            enrich = plugin_path("py_enrich").display(),
            router = plugin_path("js_router").display(),
            schema = pg.name,
        ),
    );
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let stored = wait_until(WAIT, || async { pg.count("binance").await as usize >= binance.len() }).await;
    assert!(stored, "rows: {} of {}; log {}", pg.count("binance").await, binance.len(), sluice.log.display());
    let other_records = broker.consume("others", others.len(), WAIT);
    let dead = broker.consume("dlq", 1, WAIT);
    assert_eq!(sluice.stop(), Some(0), "graceful exit");

    let rows = pg
        .client
        .query(
            &format!("SELECT symbol, price, volume, (extract(epoch from traded_at) * 1000)::bigint, notional FROM {}.binance", pg.name),
            &[],
        )
        .await
        .unwrap();
    let mut got: Vec<(Trade, f64)> =
        rows.iter().map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3)), r.get(4))).collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_same(&got, &binance, "every Binance trade worth at least {MIN_NOTIONAL}, once, with its notional");

    let mut got: Vec<(Trade, f64)> = other_records
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let symbol = v["symbol"].as_str().unwrap().to_string();
            assert_eq!(m.key(), Some(symbol.as_bytes()), "the flattener's key survives the chain");
            (
                (symbol, v["price"].as_f64().unwrap(), v["volume"].as_f64().unwrap(), v["ts"].as_i64().unwrap()),
                v["notional"].as_f64().unwrap(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_same(&got, &others, "every other trade worth at least {MIN_NOTIONAL}, once, to the default sink");

    // Both plugins log through the WIT `log` import, tagged with their names.
    let logged = |plugin: &str, message: &str| {
        std::fs::read_to_string(&sluice.log)
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!("langs/{plugin}")) && l.contains(message))
    };
    assert!(logged("py_enrich", "adding `notional`, dropping trades under 1000.0"), "py-enrich's init log line");
    assert!(
        logged("js_router", "routing BINANCE: to binance; others to the default sink"),
        "js-router's init log line"
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(&b"not a frame"[..]));
    assert_eq!(header(&dead[0], "sluice.plugin").as_deref(), Some("trade_flattener"));
}

/// Equal lists of trades, or a short account of the first difference.
fn assert_same(got: &[(Trade, f64)], want: &[(Trade, f64)], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        let at = first.map(|i| format!("first difference at {i}: got {:?}, want {:?}", got[i], want[i]));
        panic!(
            "{what}: got {} rows, want {}; {}",
            got.len(),
            want.len(),
            at.unwrap_or_else(|| "one list is a prefix of the other".into())
        );
    }
}

/// `sluice plugin new NAME --lang LANG`, then the skeleton's `build.sh` (which
/// ends with the golden test), then `sluice plugin test` on its sample
/// input: two outputs labelled by the config, and the line that is not JSON
/// reported as failed (exit status 1); against the golden file, a changed
/// label fails with the field that differs, and `--update` accepts it.
fn new_plugin_builds_and_passes_plugin_test(lang: &str) {
    let work = tempfile::tempdir().unwrap();
    let name = format!("hello-{lang}");
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let created =
        Command::new(sluice).args(["plugin", "new", &name, "--lang", lang]).current_dir(work.path()).output().unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let dir = work.path().join(&name);

    // Rust skeletons share one target folder, so the SDK's dependencies build once per run.
    let built = Command::new(dir.join("build.sh"))
        .env("CARGO_TARGET_DIR", common::root().join("target/skeletons"))
        .env("SLUICE", sluice)
        .output()
        .unwrap();
    let log = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    assert!(built.status.success(), "build.sh failed:\n{}", log(&built));
    assert!(log(&built).contains(&format!("built {name}.wasm")), "{}", log(&built));
    assert!(log(&built).contains("all 3 outputs match sample.expected.jsonl"), "the golden test: {}", log(&built));

    let tested = Command::new(sluice)
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["plugin", "test", "--json", "-c", "label=demo", "-i"])
        .arg(dir.join("sample.jsonl"))
        .arg(dir.join(format!("{name}.wasm")))
        .output()
        .unwrap();
    assert_eq!(tested.status.code(), Some(1), "one sample line fails: {}", log(&tested));
    let outputs: Vec<serde_json::Value> =
        String::from_utf8(tested.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(outputs.len(), 2, "{}", log(&tested));
    assert_eq!(outputs[0]["value"]["symbol"], "BINANCE:BTCUSDT");
    assert!(outputs.iter().all(|o| o["value"]["label"] == "demo" && o["route"].is_null()), "{outputs:?}");
    let stderr = String::from_utf8_lossy(&tested.stderr);
    assert!(stderr.contains("line 3: expected a JSON object"), "{stderr}");

    let golden = |extra: &[&str]| {
        let out = Command::new(sluice)
            .arg("--cache-dir")
            .arg(common::test_cache_dir())
            .args(["plugin", "test", "-c", "label=other", "-i", "sample.jsonl", "--expect", "sample.expected.jsonl"])
            .arg(format!("{name}.wasm"))
            .args(extra)
            .current_dir(&dir)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, diff) = golden(&[]);
    assert_eq!(code, Some(1), "{diff}");
    assert!(diff.contains(&format!("line 1: differs\n    label: expected \"{name}\", got \"other\"")), "{diff}");
    assert!(diff.contains("2 of 3 outputs differ (2 different, 0 missing, 0 unexpected)"), "{diff}");
    assert_eq!(golden(&["--update"]).0, Some(0));
    assert_eq!(golden(&[]), (Some(0), "all 3 outputs match sample.expected.jsonl\n".to_string()));
    assert_readme_names_every_file(&dir);
}

fn assert_readme_names_every_file(dir: &Path) {
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for file in ["build.sh", "sample.jsonl", "sample.expected.jsonl", "wit/transform.wit"] {
        assert!(readme.contains(&format!("`{file}`")), "README lists {file}");
    }
}

#[test]
fn new_rust_plugin_builds_and_passes_plugin_test() {
    new_plugin_builds_and_passes_plugin_test("rust");
}

#[test]
fn new_python_plugin_builds_and_passes_plugin_test() {
    new_plugin_builds_and_passes_plugin_test("python");
}

#[test]
fn new_javascript_plugin_builds_and_passes_plugin_test() {
    new_plugin_builds_and_passes_plugin_test("js");
}
