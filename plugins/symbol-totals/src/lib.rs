//! Running totals per symbol, kept in keyed state (contract 0.3): each
//! flattened trade (`{"symbol", "price", "volume", "ts"}`) adds to its
//! symbol's totals in the state of the trade's source partition, and the
//! plugin emits them:
//!
//! `{"symbol":"BINANCE:BTCUSDT","partition":1,"trades":12,"volume":0.52,"last_price":7296.89,"last_ts":1575526691134}`
//!
//! key = `symbol/partition`. Into a PostgreSQL table keyed by (symbol,
//! partition) with `merge = "replace"`, the rows are the totals of every
//! partition, and `sum(trades)` per symbol counts each trade exactly once
//! through crashes and rebalances: the state changes are committed with
//! the rows and the offsets.
//!
//! The latest trade wins `last_price`: the latest by `ts`, then the
//! highest price (so that the totals do not depend on arrival order).

use serde::{Deserialize, Serialize};
use sluice_plugin::{export_transform, state, Config, Output, Record, Transform};

pub struct SymbolTotals;

#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    symbol: std::borrow::Cow<'a, str>,
    price: f64,
    volume: f64,
    ts: i64,
}

/// A symbol's totals in one partition, as kept in state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub trades: u64,
    pub volume: f64,
    pub last_price: f64,
    pub last_ts: i64,
}

impl Totals {
    /// These totals with `price`, `volume` at `ts` added.
    pub fn add(&mut self, price: f64, volume: f64, ts: i64) {
        if self.trades == 0 || (ts, price) > (self.last_ts, self.last_price) {
            self.last_ts = ts;
            self.last_price = price;
        }
        self.trades += 1;
        self.volume += volume;
    }
}

impl Transform for SymbolTotals {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[])?;
        Ok(SymbolTotals)
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        let t: Trade = serde_json::from_slice(&record.value).map_err(|e| format!("not a flattened trade: {e}"))?;
        let key = t.symbol.as_bytes();
        let mut totals: Totals = state::get_json(key)?.unwrap_or_default();
        totals.add(t.price, t.volume, t.ts);
        state::put_json(key, &totals)?;
        let value = serde_json::json!({
            "symbol": t.symbol,
            "partition": record.origin.partition,
            "trades": totals.trades,
            "volume": totals.volume,
            "last_price": totals.last_price,
            "last_ts": totals.last_ts,
        });
        let key = format!("{}/{}", t.symbol, record.origin.partition);
        Ok(vec![Output::new(value.to_string()).with_key(key).with_timestamp(t.ts)])
    }
}

export_transform!(SymbolTotals);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn trade(symbol: &str, price: f64, volume: f64, ts: i64) -> Record {
        Record::from_value(format!(r#"{{"symbol":"{symbol}","price":{price},"volume":{volume},"ts":{ts}}}"#))
    }

    #[test]
    fn totals_add_up_per_symbol_across_records() {
        let mut plugin = SymbolTotals::init(&Config::default()).unwrap();
        let last = |outs: Vec<Output>| serde_json::from_slice::<Value>(&outs[0].value).unwrap();
        plugin.process(trade("A", 10.0, 1.5, 5)).unwrap();
        plugin.process(trade("B", 3.0, 1.0, 1)).unwrap();
        let a = last(plugin.process(trade("A", 9.0, 0.5, 4)).unwrap());
        assert_eq!((a["trades"].as_u64(), a["volume"].as_f64()), (Some(2), Some(2.0)));
        assert_eq!(a["last_price"].as_f64(), Some(10.0), "the later trade (ts 5) stays the last");
        let b = last(plugin.process(trade("B", 4.0, 1.0, 1)).unwrap());
        assert_eq!(
            (b["trades"].as_u64(), b["last_price"].as_f64()),
            (Some(2), Some(4.0)),
            "a tie goes to the higher price"
        );
        assert!(plugin.process(Record::from_value("nope")).unwrap_err().contains("not a flattened trade"));
    }
}
