//! Trades per second of the trade flattener compiled natively vs run through
//! the WASM runtime in batches, built against contract 0.1 and 0.2, and the
//! boundary's own cost per record (an echo plugin) for both contracts.
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench flatten`
//! (`BENCH_FRAMES=N` to change the workload; default 200,000 frames;
//! `BENCH_COMPARE=a.wasm,b.wasm` measures other builds of the flattener too;
//! `BENCH_PROFILE_BOUNDARY=N` only loops the 0.2 echo N times over, and
//! `BENCH_PROFILE_FLATTEN=N` the 0.2 flattener, for `perf`).

use sluice::feed::FeedGenerator;
use sluice::record::{Bytes, Origin, Record, Results};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BATCH: usize = 1000;

fn main() -> anyhow::Result<()> {
    let frames: usize = std::env::var("BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let mut feed = FeedGenerator::new(42);
    feed.ping_every = 0;
    let mut trades = 0usize;
    // One topic name for all the records, shared as the Kafka source shares it.
    let topic: std::sync::Arc<str> = "bench".into();
    // The boundary's cost per record apart from copying bytes: 64-byte values.
    let small_record = |i: usize| Record {
        value: vec![b'x'; 64].into(),
        origin: Origin { topic: topic.clone(), partition: 0, offset: i as i64 },
        ..Record::default()
    };
    let records: Vec<Record> = (0..frames)
        .map(|i| {
            let frame = feed.next_frame();
            trades += frame.trades;
            Record {
                value: frame.json.into(),
                origin: Origin { topic: topic.clone(), partition: 0, offset: i as i64 },
                ..Record::default()
            }
        })
        .collect();
    let bytes: usize = records.iter().map(|r| r.value.len()).sum();
    println!("workload: {frames} frames, {trades} trades, {:.1} MB, batches of {BATCH}", bytes as f64 / 1e6);

    // Native: the plugin's own logic linked into this binary, on the same
    // path its component runs (views of a batch buffer in, one results buffer
    // out), minus the sandbox.
    let batches: Vec<Vec<u8>> = records
        .chunks(BATCH)
        .map(|chunk| {
            let owned: Vec<sluice_plugin::Record> =
                chunk.iter().map(|r| sluice_plugin::Record::from_value(r.value.clone())).collect();
            sluice_plugin::abi::encode_batch(&owned)
        })
        .collect();
    let native = best_of(3, || {
        let mut out = 0;
        for buf in &batches {
            let batch = sluice_plugin::abi::Batch::parse(buf).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut outputs = sluice_plugin::Outputs::with_capacity(buf.len() * 2);
            for i in 0..batch.len() {
                let record = batch.get(i).map_err(|e| anyhow::anyhow!("{e}"))?;
                let result = trade_flattener::flatten_into(record.value, &mut outputs);
                outputs.end_record(result);
            }
            let results = outputs.finish();
            out += u32::from_le_bytes(results[8..12].try_into()?) as usize;
        }
        anyhow::ensure!(out == trades, "native produced {out} trades, expected {trades}");
        Ok(())
    })?;

    // WASM: the component through the runtime, as a pipeline runs it, built
    // against each contract.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release");
    let runtime = Runtime::new(None)?;
    // `BENCH_PROFILE_BOUNDARY=N`: only N passes of the 64-byte echo (0.2)
    // over the workload, for `perf record`; prints nothing else.
    if let Some(passes) = std::env::var("BENCH_PROFILE_BOUNDARY").ok().and_then(|v| v.parse::<usize>().ok()) {
        let mut echo = PluginInstance::new(
            Plugin::load(&runtime, &dir.join("chaos.wasm"))?,
            vec![],
            Limits::default(),
            Grants::default(),
            "bench",
        )?;
        let batch: Vec<Record> = (0..BATCH).map(small_record).collect();
        let start = Instant::now();
        for _ in 0..passes * frames / BATCH {
            outputs_of(echo.transform(&batch))?;
        }
        println!("{:.3} us per record", start.elapsed().as_secs_f64() * 1e6 / (passes * frames) as f64);
        return Ok(());
    }
    // `BENCH_PROFILE_FLATTEN=N`: only N passes of the 0.2 flattener.
    if let Some(passes) = std::env::var("BENCH_PROFILE_FLATTEN").ok().and_then(|v| v.parse::<usize>().ok()) {
        let mut flattener = PluginInstance::new(
            Plugin::load(&runtime, &dir.join("trade_flattener.wasm"))?,
            vec![],
            Limits::default(),
            Grants::default(),
            "bench",
        )?;
        let start = Instant::now();
        for _ in 0..passes {
            for chunk in records.chunks(BATCH) {
                outputs_of(flattener.transform(chunk))?;
            }
        }
        println!("{:.3} us per frame", start.elapsed().as_secs_f64() * 1e6 / (passes * frames) as f64);
        return Ok(());
    }
    let compile_start = Instant::now();
    let plugin = Plugin::load(&runtime, &dir.join("trade_flattener.wasm"))?;
    let compile = compile_start.elapsed();
    let inst_start = Instant::now();
    let mut v02 = PluginInstance::new(plugin, vec![], Limits::default(), Grants::default(), "bench")?;
    let instantiate = inst_start.elapsed();
    let mut v01 = PluginInstance::new(
        Plugin::load(&runtime, &dir.join("trade_flattener_v01.wasm"))?,
        vec![],
        Limits::default(),
        Grants::default(),
        "bench",
    )?;
    let run_on = |instance: &mut PluginInstance, records: &[Record], expected: usize| {
        best_of(3, || {
            let mut out = 0;
            for chunk in records.chunks(BATCH) {
                out += outputs_of(instance.transform(chunk))?;
            }
            anyhow::ensure!(out == expected, "produced {out} records, expected {expected}");
            Ok(())
        })
    };
    // As a pipeline runs it: each batch freshly read just before (a copy of
    // each value, as the Kafka source makes; not timed), so its records are
    // in cache, not among 200,000 records built long before.
    let fresh_on = |instance: &mut PluginInstance, records: &[Record], expected: usize| {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let (mut took, mut out) = (Duration::ZERO, 0);
            for chunk in records.chunks(BATCH) {
                let batch: Vec<Record> = chunk
                    .iter()
                    .map(|r| Record {
                        value: Bytes::copy_from_slice(&r.value),
                        origin: r.origin.clone(),
                        ..Record::default()
                    })
                    .collect();
                let start = Instant::now();
                out += outputs_of(instance.transform(&batch))?;
                took += start.elapsed();
            }
            anyhow::ensure!(out == expected, "produced {out} records, expected {expected}");
            best = best.min(took);
        }
        Ok::<_, anyhow::Error>(best)
    };
    let run = |instance: &mut PluginInstance, expected: usize| run_on(instance, &records, expected);
    let wasm_v01 = run(&mut v01, trades)?;
    let wasm_v02 = run(&mut v02, trades)?;
    // Other builds of the flattener on the same frames: `BENCH_COMPARE=a.wasm,b.wasm`
    // (`scripts/bench-wasm-opt.sh` passes it the builds wasm-opt made).
    let mut compared = Vec::new();
    for path in std::env::var("BENCH_COMPARE").unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
        let mut instance = PluginInstance::new(
            Plugin::load(&runtime, &PathBuf::from(path))?,
            vec![],
            Limits::default(),
            Grants::default(),
            "bench",
        )?;
        compared.push((path.to_string(), run(&mut instance, trades)?));
    }

    // The boundary alone: the same records through a plugin that echoes them.
    let mut echo_v01 = PluginInstance::new(
        Plugin::load(&runtime, &dir.join("chaos_v01.wasm"))?,
        vec![],
        Limits::default(),
        Grants::default(),
        "bench",
    )?;
    let mut echo_v02 = PluginInstance::new(
        Plugin::load(&runtime, &dir.join("chaos.wasm"))?,
        vec![],
        Limits::default(),
        Grants::default(),
        "bench",
    )?;
    let boundary_v01 = run(&mut echo_v01, frames)?;
    let boundary_v02 = run(&mut echo_v02, frames)?;
    // Its cost per record apart from copying bytes: as many 64-byte records.
    let small: Vec<Record> = (0..frames).map(small_record).collect();
    let small_v01 = run_on(&mut echo_v01, &small, frames)?;
    let small_v02 = run_on(&mut echo_v02, &small, frames)?;
    let fresh_v01 = fresh_on(&mut echo_v01, &records, frames)?;
    let fresh_v02 = fresh_on(&mut echo_v02, &records, frames)?;
    let fresh_small_v01 = fresh_on(&mut echo_v01, &small, frames)?;
    let fresh_small_v02 = fresh_on(&mut echo_v02, &small, frames)?;

    let rate = |d: Duration| trades as f64 / d.as_secs_f64();
    let per_record = |d: Duration| d.as_secs_f64() * 1e6 / frames as f64;
    println!(
        "compile (cache miss): {:.0} ms, instantiate + init: {:.2} ms",
        compile.as_secs_f64() * 1e3,
        instantiate.as_secs_f64() * 1e3
    );
    println!("native:    {:>12.0} trades/s  {:.2} us/frame", rate(native), per_record(native));
    println!(
        "wasm 0.1:  {:>12.0} trades/s  {:.2} us/frame  ratio to native {:.2}",
        rate(wasm_v01),
        per_record(wasm_v01),
        rate(wasm_v01) / rate(native)
    );
    println!(
        "wasm 0.2:  {:>12.0} trades/s  {:.2} us/frame  ratio to native {:.2} (goal >= 0.6)",
        rate(wasm_v02),
        per_record(wasm_v02),
        rate(wasm_v02) / rate(native)
    );
    for (path, time) in &compared {
        println!(
            "{path}:\n           {:>12.0} trades/s  {:.2} us/frame  ratio to native {:.2}",
            rate(*time),
            per_record(*time),
            rate(*time) / rate(native)
        );
    }
    println!("boundary (echo plugin), per record, batches freshly read (as in a pipeline):");
    println!(
        "  trade frames ({} bytes on average): 0.1 {:.3} us, 0.2 {:.3} us",
        bytes / frames,
        per_record(fresh_v01),
        per_record(fresh_v02)
    );
    println!(
        "  64-byte values:                    0.1 {:.3} us, 0.2 {:.3} us (goal <= 0.05)",
        per_record(fresh_small_v01),
        per_record(fresh_small_v02)
    );
    println!("boundary (echo plugin), per record, the {frames} records built beforehand (cold in memory):");
    println!(
        "  trade frames:                      0.1 {:.3} us, 0.2 {:.3} us",
        per_record(boundary_v01),
        per_record(boundary_v02)
    );
    println!(
        "  64-byte values:                    0.1 {:.3} us, 0.2 {:.3} us",
        per_record(small_v01),
        per_record(small_v02)
    );
    Ok(())
}

/// The outputs of a batch's results; an error if a record failed.
fn outputs_of(results: Results<String>) -> anyhow::Result<usize> {
    if let Some(error) = results.errors().next() {
        anyhow::bail!("{error}");
    }
    Ok(results.output_count())
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
