//! The trade flattener, Sluice's default plugin.
//!
//! Input: a Finnhub websocket frame,
//! `{"type":"trade","data":[{"s":"BINANCE:BTCUSDT","p":7296.89,"t":1575526691134,"v":0.011467,"c":["1","12"]}]}`.
//! Output: one record per trade, value
//! `{"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.011467,"ts":1575526691134,"conditions":["1","12"]}`,
//! key = the symbol, timestamp = `t`.
//!
//! Rules:
//! - a frame whose `type` is not `"trade"` (`ping`, `error`, …) gives nothing, without error;
//! - a frame that is not a JSON object with a string `type`, a trade frame whose
//!   `data` is not an array, or any trade lacking `s` (string), `p` (number),
//!   `t` (integer) or `v` (number) is an error for the whole frame: no partial output;
//! - `c` may be absent or null (→ `[]`), otherwise it is an array of strings;
//! - `data: []` gives nothing.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice_plugin::{export_transform, Config, Output, Record, Transform};
use std::borrow::Cow;

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// The common case, parsed in one pass: a trade frame with its trades.
#[derive(Deserialize)]
struct TradeFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: Vec<Trade<'a>>,
}

#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    s: Cow<'a, str>,
    p: f64,
    t: i64,
    v: f64,
    #[serde(default)]
    c: Option<Vec<Cow<'a, str>>>,
}

/// The flattened trade, as written to the output value.
#[derive(Serialize)]
struct FlatTrade<'t> {
    symbol: &'t str,
    price: f64,
    volume: f64,
    ts: i64,
    conditions: &'t [Cow<'t, str>],
}

/// Flattens one frame into one output per trade, or explains why the frame is bad.
pub fn flatten(frame: &[u8]) -> Result<Vec<Output>, String> {
    // Fast path: one parse for a well-formed trade frame. Anything else (pings,
    // other types, bad frames) takes the strict path below, which also
    // produces the error message.
    if let Ok(TradeFrame { kind, data }) = serde_json::from_slice::<TradeFrame>(frame) {
        if kind == "trade" {
            return encode(&data);
        }
    }
    let frame: Frame = serde_json::from_slice(frame).map_err(|e| format!("not a Finnhub frame: {e}"))?;
    if frame.kind != "trade" {
        return Ok(Vec::new());
    }
    let data = frame.data.ok_or("trade frame has no `data` array")?;
    let trades: Vec<Trade> =
        serde_json::from_str(data.get()).map_err(|e| format!("bad trade in `data`: {e}"))?;
    encode(&trades)
}

fn encode(trades: &[Trade]) -> Result<Vec<Output>, String> {
    let mut out = Vec::with_capacity(trades.len());
    for trade in trades {
        let flat = FlatTrade {
            symbol: &trade.s,
            price: trade.p,
            volume: trade.v,
            ts: trade.t,
            conditions: trade.c.as_deref().unwrap_or_default(),
        };
        let value = serde_json::to_vec(&flat).map_err(|e| format!("cannot encode trade: {e}"))?;
        out.push(Output::new(value).with_key(trade.s.as_bytes()).with_timestamp(trade.t));
    }
    Ok(out)
}

/// The plugin: stateless, takes no configuration.
pub struct TradeFlattener;

impl Transform for TradeFlattener {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[])?;
        Ok(TradeFlattener)
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        flatten(&record.value)
    }
}

export_transform!(TradeFlattener);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn values(frame: &str) -> Vec<Value> {
        flatten(frame.as_bytes())
            .expect("frame should flatten")
            .iter()
            .map(|o| serde_json::from_slice(&o.value).unwrap())
            .collect()
    }

    #[test]
    fn one_record_per_trade_with_key_and_timestamp() {
        let frame = r#"{"type":"trade","data":[
            {"s":"BINANCE:BTCUSDT","p":7296.89,"t":1575526691134,"v":0.011467,"c":["1","12"]},
            {"s":"AAPL","p":189,"t":1575526691135,"v":100}]}"#;
        let out = flatten(frame.as_bytes()).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key.as_deref(), Some(&b"BINANCE:BTCUSDT"[..]));
        assert_eq!(out[0].timestamp, Some(1575526691134));
        assert_eq!(
            serde_json::from_slice::<Value>(&out[0].value).unwrap(),
            json!({"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.011467,"ts":1575526691134_i64,"conditions":["1","12"]})
        );
        assert_eq!(values(frame)[1], json!({"symbol":"AAPL","price":189.0,"volume":100.0,"ts":1575526691135_i64,"conditions":[]}));
    }

    #[test]
    fn non_trade_frames_and_empty_data_give_nothing() {
        assert!(values(r#"{"type":"ping"}"#).is_empty());
        assert!(values(r#"{"type":"error","msg":"Subscribing to too many symbols"}"#).is_empty());
        assert!(values(r#"{"type":"trade","data":[]}"#).is_empty());
    }

    #[test]
    fn null_conditions_and_escaped_unicode_symbols() {
        let v = values(r#"{"type":"trade","data":[{"s":"\u00e9t\u00e9:\"X\"","p":1,"t":2,"v":3,"c":null}]}"#);
        assert_eq!(v[0]["symbol"], "été:\"X\"");
        assert_eq!(v[0]["conditions"], json!([]));
    }

    #[test]
    fn every_bad_frame_is_an_error_for_the_whole_frame() {
        let cases = [
            ("not json", "not a Finnhub frame"),
            (r#"{"data":[]}"#, "missing field `type`"),
            (r#"{"type":"trade"}"#, "no `data` array"),
            (r#"{"type":"trade","data":{"s":"A"}}"#, "bad trade in `data`"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":3},{"p":1,"t":2,"v":3}]}"#, "missing field `s`"),
            (r#"{"type":"trade","data":[{"s":"A","p":"1","t":2,"v":3}]}"#, "expected f64"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2.5,"v":3}]}"#, "expected i64"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2}]}"#, "missing field `v`"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":3,"c":"1"}]}"#, "bad trade"),
        ];
        for (frame, expected) in cases {
            let err = flatten(frame.as_bytes()).expect_err(frame);
            assert!(err.contains(expected), "{frame}: {err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn rejects_unknown_config() {
        let config: Config = [("symbols", "A")].into_iter().collect();
        assert!(TradeFlattener::init(&config).is_err());
        assert!(TradeFlattener::init(&Config::default()).is_ok());
    }
}
