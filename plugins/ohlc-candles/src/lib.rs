//! OHLC candles per symbol, emitted once when their window closes.
//!
//! Each flattened trade (`{"symbol", "price", "volume", "ts"}`) is folded
//! into the candle of its symbol and window in the keyed state of its source
//! partition; when the partition's watermark passes the window's end, the
//! candle is emitted and its state deleted:
//!
//! `{"symbol":"BINANCE:BTCUSDT","window_start":1575526680000,"open":7296.89,"high":7297.1,"low":7290.2,"close":7295.0,"volume":1.52,"vwap":7294.3,"trades":12,"first_ts":1575526680113,"last_ts":1575526739870}`
//!
//! key = the symbol, timestamp = the window's start. A symbol's trades come
//! through several partitions, so each partition emits its partial candle;
//! the PostgreSQL sink's aggregating upsert combines them (`first`/`last`
//! by `first_ts`/`last_ts`, `max`, `min`, `sum`, and `weighted_mean` by
//! `volume` for the VWAP) in the transaction that stores the state and the
//! offsets. A candle is a pure function of the multiset of its trades:
//! ties on the timestamp go to the lowest price for the open and the
//! highest for the close.
//!
//! Config `window_ms`: the window (default 60000, one minute). The stage
//! needs `[transforms.event_time]`.
//!
//! # State versions
//!
//! State version 1 keeps an open candle as 72 bytes ([`Binary`]: nine
//! little-endian words), read and written for every trade without a JSON
//! round trip; version 0 kept it as JSON, and [`Transform::migrate`]
//! converts it, so a pipeline running a version 0 build swaps to this one
//! with its open windows. Test builds (features): `json-state` is the
//! version 0 build; `no-migrate` keeps version 1 without a migrate (a swap
//! to it from version 0 state is refused); `failing` corrupts the candles
//! it keeps and fails two trades in three (its batches are rolled back).

use serde::{Deserialize, Serialize};
use sluice_plugin::window::{Codec, Tumbling};
use sluice_plugin::{export_transform, Config, Output, Outputs, Record, RecordView, StateEntry, Timer, Transform};

pub struct OhlcCandles {
    window: Tumbling,
}

#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    symbol: std::borrow::Cow<'a, str>,
    price: f64,
    volume: f64,
    ts: i64,
}

/// A candle being built, as kept in state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candle {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    /// Σ price × volume, for the VWAP.
    pub turnover: f64,
    pub trades: u64,
    pub first_ts: i64,
    pub last_ts: i64,
}

impl Candle {
    /// Folds in one trade: open/close by time, ties by price (lowest open,
    /// highest close), so the order of arrival does not matter.
    pub fn add(&mut self, price: f64, volume: f64, ts: i64) {
        if self.trades == 0 {
            *self = Candle { open: price, high: price, low: price, close: price, first_ts: ts, last_ts: ts, ..*self };
        }
        if (ts, price) < (self.first_ts, self.open) {
            (self.first_ts, self.open) = (ts, price);
        }
        if (ts, price) > (self.last_ts, self.close) {
            (self.last_ts, self.close) = (ts, price);
        }
        self.high = self.high.max(price);
        self.low = self.low.min(price);
        self.volume += volume;
        self.turnover += price * volume;
        self.trades += 1;
    }

    /// The volume-weighted average price (the close when there is no volume).
    pub fn vwap(&self) -> f64 {
        if self.volume > 0.0 {
            self.turnover / self.volume
        } else {
            self.close
        }
    }
}

/// Version 1's encoding of a [`Candle`]: nine little-endian words (open,
/// high, low, close, volume, turnover as `f64`; trades as `u64`; first and
/// last timestamps as `i64`).
pub struct Binary;

impl Codec<Candle> for Binary {
    fn encode(&self, c: &Candle) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(72);
        for word in [c.open, c.high, c.low, c.close, c.volume, c.turnover] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&c.trades.to_le_bytes());
        out.extend_from_slice(&c.first_ts.to_le_bytes());
        out.extend_from_slice(&c.last_ts.to_le_bytes());
        Ok(out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Candle, String> {
        let words: &[u8; 72] =
            bytes.try_into().map_err(|_| format!("a candle is 72 bytes, not {} (state version 1)", bytes.len()))?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&words[8 * i..8 * i + 8]);
            w
        };
        let [open, high, low, close, volume, turnover, trades, first_ts, last_ts] = std::array::from_fn(word);
        let f = f64::from_le_bytes;
        Ok(Candle {
            open: f(open),
            high: f(high),
            low: f(low),
            close: f(close),
            volume: f(volume),
            turnover: f(turnover),
            trades: u64::from_le_bytes(trades),
            first_ts: i64::from_le_bytes(first_ts),
            last_ts: i64::from_le_bytes(last_ts),
        })
    }
}

/// Version 0's encoding of a [`Candle`]: JSON.
pub use sluice_plugin::window::Json;

#[cfg(feature = "json-state")]
type Kept = Json;
#[cfg(feature = "json-state")]
const KEPT: Kept = Json;
#[cfg(not(feature = "json-state"))]
type Kept = Binary;
#[cfg(not(feature = "json-state"))]
const KEPT: Kept = Binary;

impl OhlcCandles {
    /// Folds one flattened trade into its candle.
    fn add(&mut self, value: &[u8]) -> Result<(), String> {
        let t: Trade = serde_json::from_slice(value).map_err(|e| format!("not a flattened trade: {e}"))?;
        self.window.update_with(&KEPT, &t.symbol, t.ts, |c: &mut Candle| c.add(t.price, t.volume, t.ts))?;
        #[cfg(feature = "failing")]
        {
            // A broken build: every candle it touches is corrupted, and two
            // trades in three fail.
            self.window.update_with(&KEPT, &t.symbol, t.ts, |c: &mut Candle| c.high = 1e12)?;
            if t.ts % 3 != 0 {
                return Err("failing build".to_string());
            }
        }

        Ok(())
    }
}

impl Transform for OhlcCandles {
    const STATE_VERSION: u32 = if cfg!(feature = "json-state") { 0 } else { 1 };
    const MIGRATES_FROM: &'static [u32] =
        if cfg!(any(feature = "json-state", feature = "no-migrate")) { &[] } else { &[0] };

    /// Version 0 (JSON) to version 1 (binary); a key that is not a
    /// window's stays as it is.
    fn migrate(from: u32, key: Vec<u8>, value: Vec<u8>) -> Result<Option<StateEntry>, String> {
        if from != 0 || sluice_plugin::window::parse_key(&key).is_none() {
            return Ok(Some((key, value)));
        }
        let candle: Candle = Json.decode(&value).map_err(|e| format!("a version 0 candle: {e}"))?;
        Ok(Some((key, Binary.encode(&candle)?)))
    }

    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["window_ms"])?;
        let window_ms = config.parse::<i64>("window_ms")?.unwrap_or(60_000);
        if window_ms <= 0 {
            return Err(format!("config `window_ms` = {window_ms}: must be positive"));
        }
        Ok(OhlcCandles { window: Tumbling::new(window_ms) })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        self.add(&record.value)?;
        Ok(Vec::new())
    }

    /// [`Transform::process`] on the borrowed record (no copy of it).
    fn process_view(&mut self, record: RecordView<'_>, _out: &mut Outputs) -> Result<(), String> {
        self.add(record.value)
    }

    fn on_timer(&mut self, timer: Timer) -> Result<Vec<Output>, String> {
        let Some(w) = self.window.close_with::<Candle>(&KEPT, &timer)? else { return Ok(Vec::new()) };
        let c = &w.value;
        let value = serde_json::json!({
            "symbol": w.key,
            "window_start": w.start,
            "open": c.open,
            "high": c.high,
            "low": c.low,
            "close": c.close,
            "volume": c.volume,
            "vwap": c.vwap(),
            "trades": c.trades,
            "first_ts": c.first_ts,
            "last_ts": c.last_ts,
        });
        Ok(vec![Output::new(value.to_string()).with_key(w.key.into_bytes()).with_timestamp(w.start)])
    }
}

export_transform!(OhlcCandles);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use sluice_plugin::state::testing::take_timers;
    use sluice_plugin::Origin;

    fn trade(symbol: &str, price: f64, volume: f64, ts: i64) -> Record {
        Record::from_value(format!(r#"{{"symbol":"{symbol}","price":{price},"volume":{volume},"ts":{ts}}}"#))
    }

    #[test]
    fn a_candle_is_emitted_once_when_its_window_closes() {
        let mut plugin = OhlcCandles::init(&[("window_ms", "60000")].into_iter().collect()).unwrap();
        for (price, volume, ts) in [(10.0, 1.0, 60_500), (12.0, 1.0, 61_000), (9.0, 2.0, 119_000), (11.0, 1.0, 119_000)]
        {
            assert!(plugin.process(trade("A", price, volume, ts)).unwrap().is_empty(), "nothing before the close");
        }
        let timers = take_timers();
        assert!(timers.iter().all(|(_, at)| *at == 120_000), "{timers:?}");
        let timer = Timer { key: timers[0].0.clone(), at: 120_000, origin: Origin::default() };
        let out = plugin.on_timer(timer.clone()).unwrap();
        let c: Value = serde_json::from_slice(&out[0].value).unwrap();
        assert_eq!(out[0].timestamp, Some(60_000));
        assert_eq!(
            (c["open"].as_f64(), c["close"].as_f64()),
            (Some(10.0), Some(11.0)),
            "a tie goes to the highest close"
        );
        assert_eq!((c["high"].as_f64(), c["low"].as_f64(), c["trades"].as_u64()), (Some(12.0), Some(9.0), Some(4)));
        assert_eq!(c["vwap"].as_f64(), Some((10.0 + 12.0 + 18.0 + 11.0) / 5.0));
        assert!(plugin.on_timer(timer).unwrap().is_empty(), "a window closes once");
    }

    #[test]
    fn a_candle_does_not_depend_on_the_order_of_its_trades() {
        let trades = [(5.0, 1.0, 10), (7.0, 0.5, 10), (6.0, 2.0, 40), (4.0, 1.0, 40), (8.0, 1.0, 20)];
        let fold = |order: &[usize]| {
            let mut c = Candle::default();
            for &i in order {
                let (p, v, t) = trades[i];
                c.add(p, v, t);
            }
            c
        };
        let a = fold(&[0, 1, 2, 3, 4]);
        let b = fold(&[4, 3, 2, 1, 0]);
        assert_eq!((a.open, a.close, a.high, a.low, a.trades), (b.open, b.close, b.high, b.low, b.trades));
        assert_eq!((a.open, a.close), (5.0, 6.0));
    }

    #[test]
    fn a_version_0_candle_migrates_to_the_binary_encoding() {
        let mut c = Candle::default();
        c.add(10.5, 2.0, 61_000);
        c.add(9.25, 1.0, 62_000);
        let key = b"A\x0060000".to_vec();
        let json = serde_json::to_vec(&c).unwrap();
        let (k, v) = OhlcCandles::migrate(0, key.clone(), json).unwrap().unwrap();
        assert_eq!((k, Binary.decode(&v).unwrap()), (key, c));
        assert!(OhlcCandles::migrate(0, b"A\x001".to_vec(), b"not json".to_vec()).is_err());
        let other = (b"not a window".to_vec(), b"x".to_vec());
        assert_eq!(OhlcCandles::migrate(0, other.0.clone(), other.1.clone()).unwrap(), Some(other));
        assert!(Binary.decode(&[0; 71]).unwrap_err().contains("72 bytes"));
    }

    #[test]
    fn the_window_must_be_positive() {
        assert!(OhlcCandles::init(&[("window_ms", "0")].into_iter().collect()).is_err());
        assert!(OhlcCandles::init(&[("size", "1")].into_iter().collect()).is_err());
    }
}
