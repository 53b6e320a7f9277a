//! Hot-reload figures from one run: the pause a plugin swap adds to a running
//! pipeline, and the time from writing a new `.wasm` to the first batch
//! processed by it, with the compiled code in the cache (a version seen
//! before) and without (a version never seen: compiled on the spot).
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench reload`.
//! Needs `tansu` on PATH (`scripts/install-tansu.sh`).

/// The test kit of the integration tests: broker, PostgreSQL, plugins.
#[path = "../../tests/it/common/mod.rs"]
mod common;

use common::services::Broker;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use sluice::feed::FeedGenerator;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Replaces `target` atomically with `bytes`.
fn install(bytes: &[u8], target: &Path) -> anyhow::Result<()> {
    let aside = target.with_extension("new");
    std::fs::write(&aside, bytes)?;
    std::fs::rename(&aside, target)?;
    Ok(())
}

/// `wasm` with a custom section appended: the same code, a new version (hash).
fn new_version(wasm: &[u8], n: u32) -> Vec<u8> {
    let name = b"sluice-bench";
    let payload = n.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.push(size as u8); // < 128: one LEB128 byte
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

fn lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn field(line: &str, name: &str) -> Option<f64> {
    line.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Installs `bytes` and returns the time until a new version is live.
fn swap(bytes: &[u8], plugin: &Path, log: &Path) -> anyhow::Result<Duration> {
    let before = lines_with(log, "new plugin versions live").len();
    let start = Instant::now();
    install(bytes, plugin)?;
    while lines_with(log, "new plugin versions live").len() == before {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "swap never went live; see {}", log.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = root.join("target/wasm32-wasip2/release");
    let flattener = std::fs::read(release.join("trade_flattener.wasm"))?;
    let echo = std::fs::read(release.join("chaos.wasm"))?;

    let broker = Broker::start();
    let brokers = broker.addr.clone();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        for topic in ["raw", "out", "dlq"] {
            broker.create_topic(topic, 1).await;
        }
    });

    let dir = tempfile::tempdir()?;
    let plugin = dir.path().join("plugin.wasm");
    install(&flattener, &plugin)?;
    let pipeline = dir.path().join("bench.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"raw\"]\nbatch_max_records = 100\nbatch_max_ms = 10\n\
             [[transforms]]\nplugin = \"{}\"\n[sinks.out]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"out\"\n\
             [dead_letter]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"dlq\"\n",
            plugin.display()
        ),
    )?;
    let log = dir.path().join("sluice.log");
    let cache = dir.path().join("cache");
    let _sluice = Kill(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(["run", "--admin-addr", "off"])
            .arg(&pipeline)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );

    // A continuous feed, about 4,000 frames/s, until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (stop, brokers) = (stop.clone(), brokers.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let producer: ThreadedProducer<DefaultProducerContext> =
                ClientConfig::new().set("bootstrap.servers", &brokers).set("linger.ms", "2").create()?;
            let mut feed = FeedGenerator::new(1);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..40 {
                    let frame = feed.next_frame();
                    let _ = producer.send(BaseRecord::<(), _>::to("raw").payload(&frame.json));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            producer.flush(Duration::from_secs(10))?;
            Ok(())
        })
    };
    let warm = Instant::now();
    while lines_with(&log, "pipeline starting").is_empty() {
        anyhow::ensure!(warm.elapsed() < Duration::from_secs(60), "sluice did not start; see {}", log.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));

    // Versions seen before (compiled code in the cache): alternate two.
    swap(&echo, &plugin, &log)?; // first sight of the echo version: warms the cache
    swap(&flattener, &plugin, &log)?;
    let mut hit_ms = Vec::new();
    for i in 0..20 {
        let bytes = if i % 2 == 0 { &echo } else { &flattener };
        hit_ms.push(swap(bytes, &plugin, &log)?.as_secs_f64() * 1e3);
    }
    // Versions never seen: compiled during the reload.
    let mut miss_ms = Vec::new();
    for n in 0..5 {
        miss_ms.push(swap(&new_version(&flattener, n), &plugin, &log)?.as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = feeder.join();

    let mut pauses: Vec<f64> = lines_with(&log, "new plugin versions live")
        .iter()
        .filter_map(|l| field(l, "pause_us"))
        .map(|us| us / 1e3)
        .collect();
    let reload_ms: Vec<f64> = lines_with(&log, "reload applied").iter().filter_map(|l| field(l, "ms")).collect();
    let miss_reload = &reload_ms[reload_ms.len().saturating_sub(5)..];
    println!("swaps: {} ({} with a cached version, 5 never seen before)", pauses.len(), hit_ms.len());
    println!("pause per swap (old chain out, new chain in, between two batches): p50 {:.3} ms, p99 {:.3} ms (goal p99 < 50 ms)", percentile(&mut pauses.clone(), 0.5), percentile(&mut pauses, 0.99));
    println!(
        "file write -> new version live, cached:   p50 {:.0} ms, p99 {:.0} ms",
        percentile(&mut hit_ms.clone(), 0.5),
        percentile(&mut hit_ms, 0.99)
    );
    println!(
        "file write -> new version live, compiled: p50 {:.0} ms, max {:.0} ms",
        percentile(&mut miss_ms.clone(), 0.5),
        percentile(&mut miss_ms, 1.0)
    );
    println!(
        "reload (validate + compile + build) for a new version: {:?} ms",
        miss_reload.iter().map(|m| m.round()).collect::<Vec<_>>()
    );
    println!("(file write -> live includes the 250 ms debounce of the file watcher)");
    Ok(())
}
