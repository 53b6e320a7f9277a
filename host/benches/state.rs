//! Keyed state (contract 0.3), measured without a broker:
//!
//! 1. what a state access costs inside a plugin call: `symbol-totals` (one
//!    get and one put per trade) on batches of 1,000 flattened trades
//!    whose keys repeat (6 symbols: after the first, every access is served
//!    by the SDK's cache in the guest) and whose keys are all distinct (each
//!    get crosses to the host, each put is handed over at the batch's end),
//!    beside the stateless `candles` plugin on the same batches;
//! 2. the state of 10,000 symbols with two open 1-minute windows each
//!    (`ohlc-candles`): keys and bytes held;
//! 3. restoring a partition of 100,000 keys from PostgreSQL (the
//!    exactly-once sink's state table).
//!
//! Run: `scripts/build-plugins.sh && cargo bench -p sluice --bench state`.
//! Needs PostgreSQL at 127.0.0.1:5432.

use sluice::record::{Origin, Record};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use sluice::state::time::{EventTime, LatePolicy};
use sluice::state::{lock, Partition, StageState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

fn plugin(runtime: &Runtime, name: &str) -> anyhow::Result<PluginInstance> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/wasm32-wasip2/release/{name}.wasm"));
    let plugin = Plugin::load(runtime, &path)?;
    Ok(PluginInstance::new(plugin, Vec::new(), Limits::default(), Grants::default(), "bench")?)
}

fn trade(symbol: &str, price: f64, ts: i64, offset: i64) -> Record {
    Record {
        value: format!(r#"{{"symbol":"{symbol}","price":{price},"volume":0.5,"ts":{ts}}}"#).into(),
        origin: Origin { topic: "raw".into(), partition: 0, offset },
        ..Record::default()
    }
}

/// µs per record of `instance` over `batches`, after a warm-up pass.
fn per_record(instance: &mut PluginInstance, batches: &[Vec<Record>]) -> f64 {
    for batch in batches.iter().take(2) {
        instance.transform(batch);
    }
    let started = Instant::now();
    let mut records = 0;
    for batch in batches {
        let results = instance.transform(batch);
        assert_eq!(results.errors().count(), 0, "{:?}", results.errors().next());
        records += batch.len();
    }
    started.elapsed().as_secs_f64() * 1e6 / records as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runtime = Runtime::new(Runtime::default_cache_dir())?;

    // 1. The cost of an access.
    let batch = |symbol: &dyn Fn(usize) -> String, n: usize| -> Vec<Vec<Record>> {
        (0..n)
            .map(|b| (0..1000).map(|i| trade(&symbol(b * 1000 + i), 100.0, 1_700_000_000_000, i as i64)).collect())
            .collect()
    };
    let repeating = batch(&|i| format!("SYM{}", i % 6), 50);
    let distinct = batch(&|i| format!("SYM{i}"), 50);
    let mut stateless = plugin(&runtime, "candles")?;
    let base = per_record(&mut stateless, &repeating);
    let mut totals = plugin(&runtime, "symbol_totals")?;
    let cached = per_record(&mut totals, &repeating);
    let mut totals = plugin(&runtime, "symbol_totals")?;
    let crossing = per_record(&mut totals, &distinct);
    println!("stateless candles plugin:                  {base:.2} µs per trade");
    println!("symbol-totals, 6 keys (get+put, cached):    {cached:.2} µs per trade");
    println!("symbol-totals, every key new (get+put cross the sandbox): {crossing:.2} µs per trade");
    println!(
        "  a state access that crosses to the host costs {:.2} µs (half the difference: one get, one put)",
        (crossing - cached) / 2.0
    );

    // 2. 10,000 symbols with two open windows each.
    let mut candles = plugin(&runtime, "ohlc_candles")?;
    let shared = StageState::scratch(1 << 30);
    lock(&shared).set_event_time(Some(EventTime {
        max_ahead_ms: i64::MAX,
        allowed_lateness_ms: 3_600_000,
        idle_timeout: None,
        late: LatePolicy::Drop,
    }));
    candles.attach_state(shared.clone());
    let t0 = 1_700_000_040_000;
    let two_windows: Vec<Record> = (0..20_000)
        .map(|i| trade(&format!("EXCHANGE:SYM{:05}", i % 10_000), 100.0 + i as f64, t0 + (i / 10_000) * 60_000, i))
        .collect();
    let started = Instant::now();
    for chunk in two_windows.chunks(1000) {
        let results = candles.transform(chunk);
        assert_eq!(results.errors().count(), 0, "{:?}", results.errors().next());
    }
    let (keys, bytes) = {
        let state = lock(&shared);
        (state.keys(), state.bytes())
    };
    println!(
        "ohlc-candles, 10,000 symbols x 2 open windows: {keys} keys, {:.1} MiB ({:.0} bytes a key, timers included), {:.2} µs per trade",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / keys.max(1) as f64,
        started.elapsed().as_secs_f64() * 1e6 / two_windows.len() as f64
    );

    // 3. Restoring 100,000 keys.
    let dir = tempfile::tempdir()?;
    let schema = format!("bench_state_{}", std::process::id());
    let file = dir.path().join("restore.toml");
    std::fs::write(
        &file,
        format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ntopics = [\"raw\"]\n[sinks.pg]\ntype = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\ntable = \"{schema}.t\"\ncolumns = [{{ name = \"a\", type = \"text\" }}]\n[dead_letter]\ntype = \"stdout\"\n"
        ),
    )?;
    let spec = sluice::config::load_pipeline(&file, None).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let sink = sluice::sinks::build("pg", &spec.sinks["pg"], "restore", dir.path()).await?;
    let store = sink.state_keeper().ok_or_else(|| anyhow::anyhow!("no state store"))?.store();
    let (pg, connection) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/postgres", tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    pg.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
    let partition: Partition = (Arc::from("raw"), 0);
    store.load(1, &partition).await?; // creates the state table
    pg.batch_execute(&format!(
        "INSERT INTO {schema}.sluice_state SELECT 'restore', 1, 'raw', 0, '\\x00'::bytea || convert_to('EXCHANGE:SYM' || i || '\\x00' || 1700000040000, 'UTF8'), convert_to(repeat('x', 180), 'UTF8') FROM generate_series(1, 100000) AS i"
    ))
    .await?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let loaded = store.load(1, &partition).await?;
        times.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(loaded.entries.len() == 100_000, "restored {} keys", loaded.entries.len());
        let mut state = StageState::new(1, 1 << 30);
        let started = Instant::now();
        state.restore(partition.clone(), loaded);
        times.push(started.elapsed().as_secs_f64());
    }
    println!(
        "restore of 100,000 keys (180-byte values): read {:.0} ms, {:.0} ms, {:.0} ms from PostgreSQL; {:.0} ms, {:.0} ms, {:.0} ms into the stage's state",
        times[0] * 1e3,
        times[2] * 1e3,
        times[4] * 1e3,
        times[1] * 1e3,
        times[3] * 1e3,
        times[5] * 1e3
    );
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    Ok(())
}
