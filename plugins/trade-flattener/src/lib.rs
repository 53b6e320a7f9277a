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
//!
//! Numbers and strings are copied into the output as the feed wrote them
//! (`7296.89` stays `7296.89`: no round trip through a float), after
//! serde_json has checked that they are valid JSON of the right kind.

use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_plugin::{export_transform, Config, Output, OutputMeta, Outputs, Record, RecordView, Transform};
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

/// One trade, its fields kept as their JSON text (checked in [`encode`]),
/// but for `t`, which becomes the output's timestamp.
#[derive(Deserialize)]
struct Trade<'a> {
    #[serde(borrow)]
    s: &'a RawValue,
    #[serde(borrow)]
    p: &'a RawValue,
    t: i64,
    #[serde(borrow)]
    v: &'a RawValue,
    #[serde(borrow, default)]
    c: Option<Vec<&'a RawValue>>,
}

/// Flattens one frame into one output per trade, or explains why the frame is bad.
pub fn flatten(frame: &[u8]) -> Result<Vec<Output>, String> {
    sluice_plugin::collect(|out| flatten_into(frame, out))
}

/// [`flatten`], writing each output straight into the results buffer.
pub fn flatten_into(frame: &[u8], out: &mut Outputs) -> Result<(), String> {
    // One UTF-8 check for the whole frame: serde_json then skips it for every
    // string and raw value it borrows.
    let frame = std::str::from_utf8(frame).map_err(|e| format!("not a Finnhub frame: not UTF-8: {e}"))?;
    // Fast path: one parse for a well-formed trade frame. Anything else (pings,
    // other types, bad frames) takes the strict path below, which also
    // produces the error message.
    if let Ok(TradeFrame { kind, data }) = serde_json::from_str::<TradeFrame>(frame) {
        if kind == "trade" {
            return encode(&data, out);
        }
    }
    let frame: Frame = serde_json::from_str(frame).map_err(|e| format!("not a Finnhub frame: {e}"))?;
    if frame.kind != "trade" {
        return Ok(());
    }
    let data = frame.data.ok_or("trade frame has no `data` array")?;
    let trades: Vec<Trade> = serde_json::from_str(data.get()).map_err(|e| format!("bad trade in `data`: {e}"))?;
    encode(&trades, out)
}

/// Writes one output per trade. On an error the caller's `Err` discards the
/// outputs already written for this frame.
fn encode(trades: &[Trade], out: &mut Outputs) -> Result<(), String> {
    for (i, trade) in trades.iter().enumerate() {
        let bad = |what: &str| format!("bad trade in `data` (trade {i}): {what}");
        let symbol = trade.s.get();
        if !symbol.starts_with('"') {
            return Err(bad(&format!("`s` must be a string, got {symbol}")));
        }
        let price = number(trade.p).map_err(|e| bad(&format!("`p` {e}")))?;
        #[cfg(feature = "round-prices")]
        let price: &str = &price.parse::<f64>().map_or(0.0, f64::round).to_string();
        let volume = number(trade.v).map_err(|e| bad(&format!("`v` {e}")))?;
        let conditions = trade.c.as_deref().unwrap_or_default();
        for c in conditions {
            if !c.get().starts_with('"') {
                return Err(bad(&format!("`c` must hold strings, got {}", c.get())));
            }
            unescape(c.get()).map_err(|e| bad(&format!("`c`: {e}")))?;
        }
        let key = unescape(symbol).map_err(|e| bad(&format!("`s`: {e}")))?;

        let mut ts = itoa::Buffer::new();
        let ts = ts.format(trade.t);
        out.write_with(
            OutputMeta { key: Some(key.as_bytes()), timestamp: Some(trade.t), ..OutputMeta::default() },
            |value| {
                for part in [
                    r#"{"symbol":"#,
                    symbol,
                    r#","price":"#,
                    price,
                    r#","volume":"#,
                    volume,
                    r#","ts":"#,
                    ts,
                    r#","conditions":["#,
                ] {
                    value.extend_from_slice(part.as_bytes());
                }
                for (n, c) in conditions.iter().enumerate() {
                    if n > 0 {
                        value.push(b',');
                    }
                    value.extend_from_slice(c.get().as_bytes());
                }
                value.extend_from_slice(b"]}");
            },
        );
    }
    Ok(())
}

/// The text of a JSON number that fits an f64, or why it is not one.
fn number(raw: &RawValue) -> Result<&str, String> {
    let text = raw.get();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(format!("must be a number, got {text}"));
    }
    // Only an exponent or hundreds of digits can leave the f64 range.
    if (text.len() > 300 || text.contains(['e', 'E'])) && !text.parse::<f64>().is_ok_and(f64::is_finite) {
        return Err(format!("is out of range for a double: {text}"));
    }
    Ok(text)
}

/// The text of the JSON string literal `literal` (with its quotes). Strings
/// without escapes are borrowed; the others are decoded, which also rejects
/// what serde_json's skipping lets through (lone UTF-16 surrogates).
fn unescape(literal: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    let inner = &literal[1..literal.len() - 1];
    if inner.contains('\\') {
        serde_json::from_str(literal).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(inner))
    }
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

    fn process_view(&mut self, record: RecordView<'_>, out: &mut Outputs) -> Result<(), String> {
        flatten_into(record.value, out)
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
        assert_eq!(
            values(frame)[1],
            json!({"symbol":"AAPL","price":189,"volume":100,"ts":1575526691135_i64,"conditions":[]})
        );
    }

    /// Numbers and strings reach the output as the feed wrote them.
    #[test]
    fn values_are_copied_as_written() {
        let frame = br#"{"type":"trade","data":[{"c":["1", "12"],"v":0.0114670, "t":1575526691134,"p":7296.89,"s":"BINANCE:BTCUSDT"},{"s":"A\"B","p":-1E+2,"t":-5,"v":0}]}"#;
        let out = flatten(frame).unwrap();
        assert_eq!(
            std::str::from_utf8(&out[0].value).unwrap(),
            r#"{"symbol":"BINANCE:BTCUSDT","price":7296.89,"volume":0.0114670,"ts":1575526691134,"conditions":["1","12"]}"#
        );
        assert_eq!(
            std::str::from_utf8(&out[1].value).unwrap(),
            r#"{"symbol":"A\"B","price":-1E+2,"volume":0,"ts":-5,"conditions":[]}"#
        );
        assert_eq!(out[1].key.as_deref(), Some(&b"A\"B"[..]), "the key is the decoded symbol");
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
            (r#"{"type":"trade","data":[{"s":"A","p":"1","t":2,"v":3}]}"#, "`p` must be a number"),
            (r#"{"type":"trade","data":[{"s":1,"p":1,"t":2,"v":3}]}"#, "`s` must be a string"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":null}]}"#, "(trade 0): `v` must be a number"),
            (r#"{"type":"trade","data":[{"s":"A","p":1e400,"t":2,"v":3}]}"#, "out of range"),
            (r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":3,"c":["1",2]}]}"#, "`c` must hold strings, got 2"),
            (
                r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":3,"c":["\ud800"]}]}"#,
                "`c`: unexpected end of hex escape",
            ),
            (
                r#"{"type":"trade","data":[{"s":"\udc00","p":1,"t":2,"v":3}]}"#,
                "`s`: lone leading surrogate in hex escape",
            ),
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
