//! A realistic Finnhub-style trade feed, for the demo, tests and benchmarks
//! (there is no internet on the machines Sluice is tested on).
//!
//! Frames look like the Finnhub websocket's: `trade` frames carrying one to
//! `max_trades` trades of several symbols with random-walk prices, and, every
//! so often, a `ping` frame. [`websocket`] serves them the way Finnhub does.

pub mod websocket;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The symbols traded, with their starting prices.
pub const SYMBOLS: &[(&str, f64)] = &[
    ("BINANCE:BTCUSDT", 67_000.0),
    ("BINANCE:ETHUSDT", 3_400.0),
    ("BINANCE:SOLUSDT", 150.0),
    ("COINBASE:BTC-USD", 67_010.0),
    ("KRAKEN:XBTUSD", 66_990.0),
    ("AAPL", 190.0),
];

/// Generates frames deterministically from a seed.
pub struct FeedGenerator {
    rng: StdRng,
    prices: Vec<f64>,
    clock_ms: i64,
    /// One frame in `ping_every` is a ping (0: never).
    pub ping_every: u32,
    /// Trades per trade frame are drawn from 1..=max_trades.
    pub max_trades: usize,
}

/// One generated frame and how many trades it carries.
pub struct Frame {
    pub json: String,
    pub trades: usize,
}

impl FeedGenerator {
    pub fn new(seed: u64) -> Self {
        FeedGenerator {
            rng: StdRng::seed_from_u64(seed),
            prices: SYMBOLS.iter().map(|(_, p)| *p).collect(),
            clock_ms: 1_700_000_000_000,
            ping_every: 20,
            max_trades: 5,
        }
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> Frame {
        self.clock_ms += self.rng.random_range(1..50);
        if self.ping_every > 0 && self.rng.random_range(0..self.ping_every) == 0 {
            return Frame { json: r#"{"type":"ping"}"#.to_string(), trades: 0 };
        }
        let n = self.rng.random_range(1..=self.max_trades.max(1));
        let data: Vec<_> = (0..n)
            .map(|_| {
                let i = self.rng.random_range(0..SYMBOLS.len());
                // Random walk: ±0.1 % per trade, rounded to cents.
                let step = 1.0 + self.rng.random_range(-0.001..0.001);
                self.prices[i] = (self.prices[i] * step * 100.0).round() / 100.0;
                let volume = (self.rng.random_range(0.0001..5.0_f64) * 1e6).round() / 1e6;
                let conditions: Vec<String> = match self.rng.random_range(0..4) {
                    0 => vec![],
                    1 => vec!["1".into()],
                    _ => vec!["1".into(), "12".into()],
                };
                json!({"s": SYMBOLS[i].0, "p": self.prices[i], "t": self.clock_ms, "v": volume, "c": conditions})
            })
            .collect();
        Frame { json: json!({"type": "trade", "data": data}).to_string(), trades: n }
    }
}

impl Iterator for FeedGenerator {
    type Item = Frame;
    fn next(&mut self) -> Option<Frame> {
        Some(self.next_frame())
    }
}
