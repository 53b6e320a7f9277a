//! The PostgreSQL sink's column extraction alone: nanoseconds per row to
//! turn the trade flattener's outputs into the cells of
//! `pipelines/trades.toml`'s five columns (no database).
//!
//! Run: `cargo bench -p sluice --bench pg_rows` (`BENCH_FRAMES=N`, default 20,000 frames).

use sluice::feed::FeedGenerator;
use sluice::sinks::postgres::rows::Rows;
use sluice::sinks::postgres::{ColumnConfig, ColumnType};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let frames: usize = std::env::var("BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let column = |name: &str, kind, field: Option<&str>| ColumnConfig {
        name: name.into(),
        kind,
        field: field.map(str::to_string),
        merge: Default::default(),
        by: None,
    };
    let columns = [
        column("symbol", ColumnType::Text, None),
        column("price", ColumnType::Double, None),
        column("volume", ColumnType::Double, None),
        column("traded_at", ColumnType::Timestamptz, Some("ts")),
        column("conditions", ColumnType::TextArray, None),
    ];
    let mut feed = FeedGenerator::new(42);
    feed.ping_every = 0;
    let mut values = Vec::new();
    for _ in 0..frames {
        let outputs = trade_flattener::flatten(feed.next_frame().json.as_bytes()).map_err(anyhow::Error::msg)?;
        values.extend(outputs.into_iter().map(|o| o.value));
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for batch in values.chunks(1000) {
            let mut rows = Rows::with_capacity(batch.len(), columns.len());
            for value in batch {
                rows.push(value, &columns).map_err(anyhow::Error::msg)?;
            }
            std::hint::black_box(&rows);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("{} rows (the flattener's outputs of {frames} frames), batches of 1000", values.len());
    println!("column extraction: {:.0} ns per row (best of 5)", best * 1e9 / values.len() as f64);
    Ok(())
}
