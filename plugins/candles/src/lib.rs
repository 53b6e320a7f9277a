//! Partial OHLC candles: each flattened trade (`{"symbol", "price",
//! "volume", "ts"}`, the trade flattener's output) becomes the candle of
//! its interval that holds only that trade:
//!
//! `{"symbol":"BINANCE:BTCUSDT","bucket":1575526680000,"open":7296.89,"high":7296.89,"low":7296.89,"close":7296.89,"volume":0.011467,"trades":1,"first_ts":1575526691134,"last_ts":1575526691134}`
//!
//! key = the symbol, timestamp = the bucket's start. The plugin keeps no
//! state: the PostgreSQL sink's aggregating upsert (`merge` on the
//! columns) combines the partials of a batch, then with the stored candle,
//! in the transaction that stores the source offsets, so every trade counts
//! exactly once whichever partition or instance it came through.
//!
//! Config `interval_ms`: the candle length (default 60000, one minute).
//! Buckets start at multiples of it since the Unix epoch.

use serde::Deserialize;
use sluice_plugin::{export_transform, Config, Output, Record, Transform};

pub struct Candles {
    interval_ms: i64,
}

#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    symbol: std::borrow::Cow<'a, str>,
    price: f64,
    volume: f64,
    ts: i64,
}

impl Candles {
    /// The partial candle of one flattened trade.
    pub fn candle(&self, trade: &[u8]) -> Result<Output, String> {
        let t: Trade = serde_json::from_slice(trade).map_err(|e| format!("not a flattened trade: {e}"))?;
        let bucket = t.ts - t.ts.rem_euclid(self.interval_ms);
        let value = serde_json::json!({
            "symbol": t.symbol,
            "bucket": bucket,
            "open": t.price,
            "high": t.price,
            "low": t.price,
            "close": t.price,
            "volume": t.volume,
            "trades": 1,
            "first_ts": t.ts,
            "last_ts": t.ts,
        });
        let mut out = Output::new(value.to_string()).with_key(t.symbol.as_bytes().to_vec());
        out.timestamp = Some(bucket);
        Ok(out)
    }
}

impl Transform for Candles {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["interval_ms"])?;
        let interval_ms = match config.get("interval_ms") {
            None => 60_000,
            Some(raw) => raw
                .parse::<i64>()
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| format!("config `interval_ms`: {raw:?} is not a positive integer"))?,
        };
        Ok(Candles { interval_ms })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        Ok(vec![self.candle(&record.value)?])
    }
}

export_transform!(Candles);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn candles(interval: Option<&str>) -> Candles {
        let config: Config = interval.map(|i| ("interval_ms", i)).into_iter().collect();
        Candles::init(&config).unwrap()
    }

    #[test]
    fn a_trade_is_the_candle_of_its_minute_holding_only_it() {
        let trade =
            br#"{"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.011467,"ts":1575526691134,"conditions":[]}"#;
        let out = candles(None).candle(trade).unwrap();
        let value: Value = serde_json::from_slice(&out.value).unwrap();
        assert_eq!(
            value,
            json!({"symbol":"BINANCE:BTCUSDT","bucket":1575526680000i64,"open":7296.89,"high":7296.89,"low":7296.89,
                   "close":7296.89,"volume":0.011467,"trades":1,"first_ts":1575526691134i64,"last_ts":1575526691134i64})
        );
        assert_eq!(out.key.as_deref(), Some(&b"BINANCE:BTCUSDT"[..]));
        assert_eq!(out.timestamp, Some(1575526680000));
    }

    #[test]
    fn buckets_start_at_multiples_of_the_interval_before_the_epoch_too() {
        let bucket = |ts: i64| {
            let trade = format!(r#"{{"symbol":"A","price":1,"volume":1,"ts":{ts}}}"#);
            let out = candles(Some("5000")).candle(trade.as_bytes()).unwrap();
            serde_json::from_slice::<Value>(&out.value).unwrap()["bucket"].as_i64().unwrap()
        };
        assert_eq!((bucket(0), bucket(4999), bucket(5000), bucket(-1)), (0, 0, 5000, -5000));
    }

    #[test]
    fn bad_trades_and_bad_config_are_errors() {
        assert!(candles(None).candle(b"{}").unwrap_err().starts_with("not a flattened trade"));
        for bad in ["0", "-5", "soon"] {
            assert!(Candles::init(&[("interval_ms", bad)].into_iter().collect()).is_err(), "{bad}");
        }
        assert!(Candles::init(&[("window", "1")].into_iter().collect()).is_err());
    }
}
