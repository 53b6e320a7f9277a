//! Plugins in Rust, Python and JavaScript side by side: component size,
//! compile time (cache miss), cold instantiation (instantiate + init of an
//! instance of an already compiled component) and throughput on flattened
//! trades, relative to Rust.
//!
//! Two comparisons:
//! 1. the *same* transform in each language: the skeleton `sluice plugin new`
//!    writes (parse a JSON object, add a field, write JSON), built by the
//!    skeleton's own `build.sh` into `target/bench-skeletons/`;
//! 2. the repository's plugins: Rust `symbol-router` beside Python
//!    `py-enrich` and JavaScript `js-router` (similar work: parse a trade,
//!    compute or route, write it), and the Rust trade flattener on frames.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench languages`
//! (`BENCH_TRADES=N`, default 50,000; `BENCH_REBUILD=1` rebuilds the skeletons;
//! `BENCH_COMPARE=a.wasm,b.wasm` measures more components on the same trades).

use sluice::feed::FeedGenerator;
use sluice::record::{Origin, Record};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use sluice::scaffold::{new_plugin, Lang};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BATCH: usize = 1000;

struct Figures {
    size: u64,
    compile: Duration,
    instantiate: Duration,
    per_sec: f64,
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let plugins = root.join("target/wasm32-wasip2/release");
    let wanted: usize = std::env::var("BENCH_TRADES").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);

    let mut feed = FeedGenerator::new(42);
    feed.ping_every = 0;
    let mut frames = Vec::new();
    let mut trades = Vec::new();
    while trades.len() < wanted {
        let frame = feed.next_frame().json.into_bytes();
        for output in trade_flattener::flatten(&frame).map_err(anyhow::Error::msg)? {
            trades.push(record(output.value, trades.len()));
        }
        frames.push(record(frame, frames.len()));
    }
    println!("workload: {} flattened trades ({} frames), batches of {BATCH}, best of 3\n", trades.len(), frames.len());

    println!("1. The same transform (the `sluice plugin new` skeleton: JSON object + one field) in each language");
    let skeletons = root.join("target/bench-skeletons");
    let mut rows = Vec::new();
    for (lang, label) in
        [(Lang::Rust, "Rust"), (Lang::Python, "Python (componentize-py)"), (Lang::Js, "JavaScript (componentize-js)")]
    {
        let wasm = build_skeleton(&skeletons, lang)?;
        rows.push((label.to_string(), measure(&wasm, &[("label", "bench")], &trades)?));
    }
    print_table("records/s", &rows);

    println!("\n2. The repository's plugins");
    let rows = vec![
        (
            "Rust symbol-router (trades)".to_string(),
            measure(&plugins.join("symbol_router.wasm"), &[("routes", "BTC=btc")], &trades)?,
        ),
        (
            "Python py-enrich (trades)".to_string(),
            measure(&plugins.join("py_enrich.wasm"), &[("min_notional", "0")], &trades)?,
        ),
        ("JavaScript js-router (trades)".to_string(), measure(&plugins.join("js_router.wasm"), &[], &trades)?),
        ("Rust trade-flattener (frames)".to_string(), measure(&plugins.join("trade_flattener.wasm"), &[], &frames)?),
    ];
    print_table("inputs/s", &rows);

    // Any other components, on the same trades: `BENCH_COMPARE=a.wasm,b.wasm`
    // (e.g. echo plugins built against contract 0.1 and 0.2, side by side).
    if let Some(list) = std::env::var_os("BENCH_COMPARE") {
        println!("\n3. BENCH_COMPARE");
        let mut rows = Vec::new();
        for path in list.to_string_lossy().split(',').filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            let plugin = Plugin::load(&Runtime::new(None)?, &path)?;
            let label =
                format!("{} (contract {})", path.file_name().unwrap_or_default().to_string_lossy(), plugin.contract);
            rows.push((label, measure(&path, &[], &trades)?));
        }
        print_table("records/s", &rows);
    }
    Ok(())
}

fn record(value: Vec<u8>, offset: usize) -> Record {
    Record {
        value: value.into(),
        origin: Origin { topic: "bench".into(), partition: 0, offset: offset as i64 },
        ..Record::default()
    }
}

/// Writes and builds the skeleton for `lang` (once; `BENCH_REBUILD=1` again).
fn build_skeleton(dir: &Path, lang: Lang) -> anyhow::Result<PathBuf> {
    let name = format!("bench-{}", format!("{lang:?}").to_lowercase());
    let root = dir.join(&name);
    let wasm = root.join(format!("{name}.wasm"));
    if wasm.exists() && std::env::var_os("BENCH_REBUILD").is_none() {
        return Ok(wasm);
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    new_plugin(&root, &name, lang)?;
    let status = std::process::Command::new(root.join("build.sh")).status()?;
    anyhow::ensure!(status.success(), "{} failed", root.join("build.sh").display());
    Ok(wasm)
}

fn measure(wasm: &Path, config: &[(&str, &str)], inputs: &[Record]) -> anyhow::Result<Figures> {
    let config: Vec<(String, String)> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let size = std::fs::metadata(wasm)?.len();
    let runtime = Runtime::new(None)?;
    let start = Instant::now();
    let plugin = Plugin::load(&runtime, wasm)?;
    let compile = start.elapsed();
    // Cold instantiation: a new instance of the compiled component, its
    // memory initialised and its init run, as a pipeline start or a hot swap does.
    let mut samples: Vec<Duration> = (0..5)
        .map(|_| {
            let start = Instant::now();
            PluginInstance::new(plugin.clone(), config.clone(), Limits::default(), Grants::default(), "bench")
                .map(|_| start.elapsed())
        })
        .collect::<Result<_, _>>()?;
    samples.sort();
    let mut instance = PluginInstance::new(plugin, config, Limits::default(), Grants::default(), "bench")?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for chunk in inputs.chunks(BATCH) {
            if let Some(error) = instance.transform(chunk).errors().next() {
                anyhow::bail!("{error}");
            }
        }
        best = best.min(start.elapsed());
    }
    Ok(Figures {
        size,
        compile,
        instantiate: samples[samples.len() / 2],
        per_sec: inputs.len() as f64 / best.as_secs_f64(),
    })
}

fn print_table(unit: &str, rows: &[(String, Figures)]) {
    let reference = rows[0].1.per_sec;
    println!("| plugin | component | compile (cache miss) | cold instantiation (p50 of 5) | {unit} | vs first row |");
    println!("|---|---|---|---|---|---|");
    for (label, f) in rows {
        println!(
            "| {label} | {:.1} MB | {:.0} ms | {:.2} ms | {:.0} | {:.2} |",
            f.size as f64 / 1e6,
            f.compile.as_secs_f64() * 1e3,
            f.instantiate.as_secs_f64() * 1e3,
            f.per_sec,
            f.per_sec / reference
        );
    }
}
