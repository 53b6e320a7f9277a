//! Trades per second of the trade flattener compiled natively vs run through
//! the WASM runtime in batches, and their ratio.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench flatten`
//! (`BENCH_FRAMES=N` to change the workload; default 200,000 frames).

use sluice::feed::FeedGenerator;
use sluice::record::{Origin, Record};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;

fn main() -> anyhow::Result<()> {
    let frames: usize = std::env::var("BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let mut feed = FeedGenerator::new(42);
    feed.ping_every = 0;
    let mut trades = 0usize;
    let records: Vec<Record> = (0..frames)
        .map(|i| {
            let frame = feed.next_frame();
            trades += frame.trades;
            Record {
                value: frame.json.into_bytes(),
                origin: Origin { topic: "bench".into(), partition: 0, offset: i as i64 },
                ..Record::default()
            }
        })
        .collect();
    let bytes: usize = records.iter().map(|r| r.value.len()).sum();
    println!("workload: {frames} frames, {trades} trades, {:.1} MB, batches of {BATCH}", bytes as f64 / 1e6);

    // Native: the plugin's own logic, linked into this binary.
    let native = best_of(3, || {
        let mut out = 0;
        for r in &records {
            out += trade_flattener::flatten(&r.value).map_err(anyhow::Error::msg)?.len();
        }
        anyhow::ensure!(out == trades, "native produced {out} trades, expected {trades}");
        Ok(())
    })?;

    // WASM: the component through the runtime, as a pipeline runs it.
    let wasm_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release/trade_flattener.wasm");
    let runtime = Runtime::new(None)?;
    let compile_start = Instant::now();
    let plugin = Plugin::load(&runtime, &wasm_path)?;
    let compile = compile_start.elapsed();
    let inst_start = Instant::now();
    let mut instance = PluginInstance::new(plugin, vec![], Limits::default(), Grants::default(), "bench")?;
    let instantiate = inst_start.elapsed();
    let wasm = best_of(3, || {
        let mut out = 0;
        for chunk in records.chunks(BATCH) {
            for result in instance.process(chunk) {
                out += result.map_err(anyhow::Error::msg)?.len();
            }
        }
        anyhow::ensure!(out == trades, "wasm produced {out} trades, expected {trades}");
        Ok(())
    })?;

    // Boundary cost alone: the same records through a plugin that echoes them.
    let chaos_path = wasm_path.with_file_name("chaos.wasm");
    let mut echo = PluginInstance::new(Plugin::load(&runtime, &chaos_path)?, vec![], Limits::default(), Grants::default(), "bench")?;
    let boundary = best_of(3, || {
        for chunk in records.chunks(BATCH) {
            for result in echo.process(chunk) {
                result.map_err(anyhow::Error::msg)?;
            }
        }
        Ok(())
    })?;

    let rate = |d: Duration| trades as f64 / d.as_secs_f64();
    println!("compile (cache miss): {:.0} ms, instantiate + init: {:.2} ms", compile.as_secs_f64() * 1e3, instantiate.as_secs_f64() * 1e3);
    println!("native: {:>12.0} trades/s", rate(native));
    println!("wasm:   {:>12.0} trades/s", rate(wasm));
    println!("echo plugin (boundary only): {:.0} frames/s, {:.2} us/frame", frames as f64 / boundary.as_secs_f64(), boundary.as_secs_f64() * 1e6 / frames as f64);
    println!("flatten native: {:.2} us/frame, wasm: {:.2} us/frame", native.as_secs_f64() * 1e6 / frames as f64, wasm.as_secs_f64() * 1e6 / frames as f64);
    println!("ratio wasm/native: {:.2} (goal >= 0.80)", rate(wasm) / rate(native));
    Ok(())
}

/// The fastest of `runs` runs.
fn best_of(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}
