//! Hot reload in a running `sluice run`: plugin swaps under a continuous feed
//! (between 0.1 and 0.2 builds too), broken versions rejected, pipeline files
//! added, changed and removed.

use crate::common;

use common::plugin_path;
use common::services::*;
use rdkafka::Message;
use sluice::feed::FeedGenerator;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// Frames of exactly one trade each, with increasing, distinct timestamps.
fn single_trade_frames(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut generator = FeedGenerator::new(seed);
    generator.ping_every = 0;
    generator.max_trades = 1;
    generator.take(count).map(|f| f.json.into_bytes()).collect()
}

/// Replaces `target` atomically (write aside, then rename), as a deploy would.
fn install(source: &Path, target: &Path) {
    let aside = target.with_extension("wasm.new");
    std::fs::copy(source, &aside).unwrap();
    std::fs::rename(&aside, target).unwrap();
}

fn kafka_pipeline(plugin: &Path, config: &str, sink_topic: &str, group: &str) -> String {
    format!(
        r#"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["raw"]
group = "{group}"
batch_max_records = 20
[[transforms]]
plugin = "{plugin}"
{config}
[sinks.out]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "{sink_topic}"
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "dlq"
"#,
        plugin = plugin.display()
    )
}

/// The trade timestamp an output carries, and which version made it:
/// `true` for the flattener (`{"symbol":…,"ts":…}`), `false` for the echo (the raw frame).
fn stamp(value: &[u8]) -> (i64, bool) {
    let v: serde_json::Value = serde_json::from_slice(value).unwrap();
    match v.get("ts") {
        Some(ts) => (ts.as_i64().unwrap(), true),
        None => (v["data"][0]["t"].as_i64().unwrap(), false),
    }
}

/// A broker with topics `raw`, `out` and `dlq`, and a running `sluice run`
/// of pipeline `name` whose one plugin is `plugin.wasm` in a temporary
/// folder, initially the trade flattener.
struct SwapRig {
    broker: Arc<Broker>,
    dir: tempfile::TempDir,
    plugin: std::path::PathBuf,
    file: std::path::PathBuf,
    sluice: SluiceProcess,
}

async fn swap_rig(name: &str) -> SwapRig {
    let broker = Arc::new(Broker::start());
    for t in ["raw", "out", "dlq"] {
        broker.create_topic(t, 1).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin.wasm");
    install(&plugin_path("trade_flattener"), &plugin);
    let file = write_pipeline(dir.path(), name, &kafka_pipeline(&plugin, "", "out", &format!("g-{name}")));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    assert!(sluice.wait_log("pipeline starting", 0).await);
    SwapRig { broker, dir, plugin, file, sluice }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_a_continuous_feed_process_every_record_exactly_once_in_order() {
    let SwapRig { broker, dir: _dir, plugin, mut sluice, .. } = swap_rig("swap").await;
    // The swaps also cross contracts: each plugin is built against 0.2 and 0.1.
    let (flattener, echo) = (plugin_path("trade_flattener"), plugin_path("chaos"));
    let (flattener_v01, echo_v01) = (plugin_path("trade_flattener_v01"), plugin_path("chaos_v01"));
    let frames = single_trade_frames(2400, 5);

    let feeder = {
        let (broker, frames) = (broker.clone(), frames.clone());
        tokio::spawn(async move {
            for chunk in frames.chunks(20) {
                broker.produce("raw", chunk).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    for swap in 0..20 {
        // Wait for this version's swap itself, not for any reload: a late
        // event of the previous install can start a reload that finds nothing
        // new, and two installs inside one debounce are rightly one swap.
        let before = sluice_swaps_logged(&sluice);
        install([&echo, &flattener_v01, &echo_v01, &flattener][swap % 4], &plugin);
        assert!(sluice.wait_log("plugin swap ready", before).await, "swap {swap} was not applied");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    feeder.await.unwrap();

    let out = broker.consume("out", frames.len(), WAIT);
    assert_eq!(sluice.stop(), Some(0));
    let stamps: Vec<(i64, bool)> = out.iter().map(|m| stamp(m.payload().unwrap())).collect();
    let mut want: Vec<i64> = frames.iter().map(|f| stamp(&trade_flattener::flatten(f).unwrap()[0].value).0).collect();
    want.sort();
    let got: Vec<i64> = stamps.iter().map(|s| s.0).collect();
    assert_eq!(got, want, "one output per input, in partition order");
    let version_changes = stamps.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert!(version_changes >= 5, "the outputs show the swaps ({version_changes} version changes)");
    assert_eq!(sluice_swaps_logged(&sluice), 20);
}

fn sluice_swaps_logged(sluice: &SluiceProcess) -> usize {
    sluice.log_count("plugin swap ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_rejected_and_the_old_one_keeps_running() {
    let SwapRig { broker, dir, plugin, mut sluice, .. } = swap_rig("p").await;
    let frames = single_trade_frames(200, 9);
    broker.produce("raw", &frames[..50]).await;

    // 1. Not WASM at all.
    let before = sluice.log_count("reload rejected");
    std::fs::write(dir.path().join("garbage"), b"definitely not a component").unwrap();
    install(&dir.path().join("garbage"), &plugin);
    assert!(sluice.wait_log("reload rejected", before).await);
    broker.produce("raw", &frames[50..100]).await;
    // 2. A plugin that traps in init; 3. one that rejects its config.
    let chaos = plugin_path("chaos");
    for config in ["config = { mode = \"init-trap\" }", "config = { mode = \"no-such-mode\" }"] {
        let before = sluice.log_count("reload rejected");
        write_pipeline(dir.path(), "p", &kafka_pipeline(&chaos, config, "out", "g-p"));
        assert!(sluice.wait_log("reload rejected", before).await, "{config} was not rejected");
    }
    broker.produce("raw", &frames[100..]).await;

    let out = broker.consume("out", frames.len(), WAIT);
    assert_eq!(sluice.stop(), Some(0));
    assert_eq!(out.len(), frames.len(), "no record lost");
    assert!(out.iter().all(|m| stamp(m.payload().unwrap()).1), "every record went through the old version");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(log.contains("is not a usable WebAssembly component"), "{log}");
    assert!(log.contains("plugin chaos failed in init"), "{log}");
    assert!(log.contains("rejected its config: unknown mode"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_files_are_added_changed_and_removed_while_running() {
    let broker = Broker::start();
    for t in ["raw", "out_a", "out_b", "out_c", "dlq"] {
        broker.create_topic(t, 1).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let flattener = plugin_path("trade_flattener");
    write_pipeline(dir.path(), "a", &kafka_pipeline(&flattener, "", "out_a", "g-a"));
    let mut sluice = SluiceProcess::run(&[dir.path()], &broker.addr);
    assert!(sluice.wait_log("pipeline starting", 0).await);
    let frames = single_trade_frames(300, 13);

    broker.produce("raw", &frames[..100]).await;
    assert_eq!(broker.consume("out_a", 100, WAIT).len(), 100);

    // Add b: it starts, and its own group reads the topic from the start.
    let before = sluice.log_count("reload applied");
    write_pipeline(dir.path(), "b", &kafka_pipeline(&flattener, "", "out_b", "g-b"));
    assert!(sluice.wait_log("reload applied", before).await);
    assert_eq!(broker.consume("out_b", 100, WAIT).len(), 100);

    // Change b's sink: b restarts gracefully and resumes where it stopped.
    let before = sluice.log_count("reload applied");
    write_pipeline(dir.path(), "b", &kafka_pipeline(&flattener, "", "out_c", "g-b"));
    assert!(sluice.wait_log("reload applied", before).await);
    broker.produce("raw", &frames[100..200]).await;
    assert_eq!(broker.consume("out_c", 100, WAIT).len(), 100, "b's new records go to its new sink");

    // Remove b: it stops; a goes on.
    let before = sluice.log_count("reload applied");
    std::fs::remove_file(dir.path().join("b.toml")).unwrap();
    assert!(sluice.wait_log("reload applied", before).await);
    broker.produce("raw", &frames[200..]).await;
    assert_eq!(broker.consume("out_a", 300, WAIT).len(), 300);
    assert_eq!(sluice.stop(), Some(0));
    assert_eq!(broker.consume("out_b", 100, Duration::from_secs(2)).len(), 100, "b wrote nothing after its change");
    assert_eq!(broker.consume("out_c", 100, Duration::from_secs(2)).len(), 100, "b wrote nothing after its removal");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(log.contains("stopped=[\"b\"]"), "{log}");
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_reports_versions_and_reloads_on_request() {
    let SwapRig { dir: _dir, plugin, file, mut sluice, .. } = swap_rig("p").await;
    let admin = sluice.admin_addr().await;

    let (code, body) = http(&admin, "GET", "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["pipelines"][0]["name"], "p");
    assert_eq!(status["pipelines"][0]["plugins"][0]["version"], sha256_hex(&plugin_path("trade_flattener")));

    let (code, body) = tokio::task::spawn_blocking({
        let admin = admin.clone();
        move || http(&admin, "POST", "/reload")
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("reload applied") && body.contains("unchanged [\"p\"]"), "{body}");

    // A new plugin version, picked up by the watcher, shows in the status.
    let before = sluice.log_count("reload applied");
    install(&plugin_path("chaos"), &plugin);
    assert!(sluice.wait_log("reload applied", before).await);
    let status: serde_json::Value = serde_json::from_str(&http(&admin, "GET", "/status").1).unwrap();
    assert_eq!(status["pipelines"][0]["plugins"][0]["version"], sha256_hex(&plugin_path("chaos")));

    // An invalid file: POST /reload answers 422 with the `sluice check` message.
    std::fs::write(&file, "[source]\ntype = \"kafka\"\nbogus = 1\n").unwrap();
    let (code, body) = tokio::task::spawn_blocking(move || http(&admin, "POST", "/reload")).await.unwrap();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("p.toml:1:1: unknown field `bogus`"), "{body}");
    assert_eq!(sluice.stop(), Some(0));
}

/// Kubernetes mounts a secret as `token -> ..data/token`, `..data -> ..<time>`,
/// and rotates it by pointing `..data` at a new folder: no event names the
/// token, yet the watcher reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_secret_rotation_is_seen_within_seconds() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("..2026_12_01_a")).unwrap();
    std::fs::write(secrets.join("..2026_12_01_a/token"), "first-token-1111").unwrap();
    symlink("..2026_12_01_a", secrets.join("..data")).unwrap();
    symlink("..data/token", secrets.join("token")).unwrap();
    let file = write_pipeline(
        dir.path(),
        "live",
        &format!(
            "[source]\ntype = \"websocket\"\nurl = \"ws://127.0.0.1:9/\"\nheaders = {{ Authorization = \"${{file:{}}}\" }}\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n",
            secrets.join("token").display()
        ),
    );
    let pipelines = sluice::config::load_dir_or_files(std::slice::from_ref(&file), None).unwrap();
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = sluice::config::watcher::Watcher::new(&[file], &pipelines, tx).unwrap();

    // The rotation, as the kubelet does it: a new folder, a new link, renamed over `..data`.
    std::fs::create_dir_all(secrets.join("..2026_12_02_b")).unwrap();
    std::fs::write(secrets.join("..2026_12_02_b/token"), "second-token-2222").unwrap();
    symlink("..2026_12_02_b", secrets.join("..data_tmp")).unwrap();
    std::fs::rename(secrets.join("..data_tmp"), secrets.join("..data")).unwrap();
    std::fs::remove_dir_all(secrets.join("..2026_12_01_a")).unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
    let changed = seen.expect("no change reported within 5 s").unwrap();
    assert_eq!(changed.file_name().unwrap(), "token", "{changed:?}");
    let reread = sluice::config::load_dir_or_files(&[dir.path().join("live.toml")], None).unwrap();
    assert_eq!(reread[0].secret_files.len(), 1);
    assert_eq!(std::fs::read_to_string(secrets.join("token")).unwrap(), "second-token-2222");
}

/// A pipeline folder mounted from a ConfigMap: `p.toml -> ..data/p.toml`,
/// rotated by pointing `..data` at a new folder. No event names `p.toml`,
/// yet the watcher reports it, for a folder given to `sluice run` and for
/// the file given by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_rotation_of_the_pipeline_files_is_seen_within_seconds() {
    use std::os::unix::fs::symlink;
    let text = |name: &str| {
        format!("name = \"{name}\"\n[source]\ntype = \"websocket\"\nurl = \"ws://127.0.0.1:9/\"\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n")
    };
    for given_by_name in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("pipelines");
        std::fs::create_dir_all(mount.join("..2026_12_01_a")).unwrap();
        std::fs::write(mount.join("..2026_12_01_a/p.toml"), text("first")).unwrap();
        symlink("..2026_12_01_a", mount.join("..data")).unwrap();
        symlink("..data/p.toml", mount.join("p.toml")).unwrap();
        let given = if given_by_name { mount.join("p.toml") } else { mount.clone() };
        let pipelines = sluice::config::load_dir_or_files(std::slice::from_ref(&given), None).unwrap();
        assert_eq!(pipelines[0].name, "first");
        let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = sluice::config::watcher::Watcher::new(std::slice::from_ref(&given), &pipelines, tx).unwrap();

        std::fs::create_dir_all(mount.join("..2026_12_02_b")).unwrap();
        std::fs::write(mount.join("..2026_12_02_b/p.toml"), text("second")).unwrap();
        symlink("..2026_12_02_b", mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        std::fs::remove_dir_all(mount.join("..2026_12_01_a")).unwrap();

        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        let changed = seen.unwrap_or_else(|_| panic!("given by name: {given_by_name}: no change within 5 s")).unwrap();
        assert_eq!(changed.file_name().unwrap(), "p.toml", "{changed:?}");
        let reread = sluice::config::load_dir_or_files(&[given], None).unwrap();
        assert_eq!(reread[0].name, "second");
    }
}
