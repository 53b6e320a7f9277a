//! Trades and volume per symbol over event-time windows that overlap
//! (sliding) or follow the data (sessions), each emitted once when it
//! closes:
//!
//! `{"symbol":"A","start":60000,"end":120000,"trades":3,"volume":1.5}`
//!
//! key = the symbol, timestamp = the window's start.
//!
//! Config:
//! - `kind`: `sliding` (default) or `session`;
//! - `size_ms` and `slide_ms` (sliding): windows of `size_ms` every
//!   `slide_ms` (default 60000 and 30000), so a trade is counted in
//!   `size_ms / slide_ms` windows;
//! - `gap_ms` (session): a symbol's trades less than `gap_ms` apart make
//!   one session, which closes `gap_ms` after its last trade (default
//!   30000); a trade that bridges two sessions merges them.
//!
//! The stage needs `[transforms.event_time]`.

use serde::{Deserialize, Serialize};
use sluice_plugin::window::{Session, Sliding, Window};
use sluice_plugin::{export_transform, Config, Output, Record, Timer, Transform};

pub enum WindowStats {
    Sliding(Sliding),
    Session(Session),
}

#[derive(Deserialize)]
struct Trade {
    symbol: String,
    volume: f64,
    ts: i64,
}

/// A window's aggregate, as kept in state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub trades: u64,
    pub volume: f64,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.trades += other.trades;
        self.volume += other.volume;
    }
}

fn output(w: Window<Stats>) -> Output {
    let value = serde_json::json!({
        "symbol": w.key,
        "start": w.start,
        "end": w.end,
        "trades": w.value.trades,
        "volume": w.value.volume,
    });
    Output::new(value.to_string()).with_key(w.key.into_bytes()).with_timestamp(w.start)
}

impl Transform for WindowStats {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["kind", "size_ms", "slide_ms", "gap_ms"])?;
        let positive = |name: &str, default: i64| -> Result<i64, String> {
            let value = config.parse::<i64>(name)?.unwrap_or(default);
            match value > 0 {
                true => Ok(value),
                false => Err(format!("config `{name}` = {value}: must be positive")),
            }
        };
        match config.get("kind").unwrap_or("sliding") {
            "sliding" => {
                let (size, slide) = (positive("size_ms", 60_000)?, positive("slide_ms", 30_000)?);
                if slide > size {
                    return Err(format!("config `slide_ms` = {slide}: must be at most `size_ms` = {size}"));
                }
                Ok(WindowStats::Sliding(Sliding::new(size, slide)))
            }
            "session" => Ok(WindowStats::Session(Session::new(positive("gap_ms", 30_000)?))),
            other => Err(format!("config `kind` = {other:?}: expected \"sliding\" or \"session\"")),
        }
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        let t: Trade = serde_json::from_slice(&record.value).map_err(|e| format!("not a flattened trade: {e}"))?;
        let fold = |s: &mut Stats| {
            s.trades += 1;
            s.volume += t.volume;
        };
        match self {
            WindowStats::Sliding(w) => w.update(&t.symbol, t.ts, fold)?,
            WindowStats::Session(w) => w.update(&t.symbol, t.ts, fold, Stats::merge)?,
        }
        Ok(Vec::new())
    }

    fn on_timer(&mut self, timer: Timer) -> Result<Vec<Output>, String> {
        Ok(match self {
            WindowStats::Sliding(w) => w.close::<Stats>(&timer)?.into_iter().map(output).collect(),
            WindowStats::Session(w) => w.close::<Stats>(&timer)?.into_iter().map(output).collect(),
        })
    }
}

export_transform!(WindowStats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_checked() {
        let init = |pairs: &[(&str, &str)]| WindowStats::init(&pairs.iter().copied().collect()).err();
        assert!(init(&[("kind", "sliding"), ("size_ms", "10"), ("slide_ms", "20")]).is_some());
        assert!(init(&[("kind", "hopping")]).unwrap().contains("expected"));
        assert!(init(&[("kind", "session"), ("gap_ms", "0")]).unwrap().contains("positive"));
        assert!(init(&[("kind", "session"), ("gap_ms", "5")]).is_none());
    }
}
