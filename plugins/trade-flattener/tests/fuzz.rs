//! Property tests (the fuzzing of issue #5): whatever bytes arrive, the
//! flattener answers with outputs or an error, never a panic, and a valid
//! frame always gives exactly one output per trade.

use proptest::prelude::*;
use serde_json::{json, Value};
use trade_flattener::flatten;

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("data".to_string()),
                    Just("s".to_string()),
                    Just("p".to_string()),
                    Just("t".to_string()),
                    Just("v".to_string()),
                    Just("c".to_string()),
                    ".{0,4}".prop_map(String::from)
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid trade.
fn trade() -> impl Strategy<Value = Value> {
    (".{1,20}", -1e9..1e9f64, any::<i64>(), 0.0..1e6f64, prop::option::of(prop::collection::vec(".{0,3}", 0..4)))
        .prop_map(|(s, p, t, v, c)| match c {
            Some(c) => json!({"s": s, "p": p, "t": t, "v": v, "c": c}),
            None => json!({"s": s, "p": p, "t": t, "v": v}),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = flatten(&bytes);
    }

    /// Outputs are assembled from the frame's own JSON text: whatever got
    /// through is valid JSON again, strings included (escapes, any Unicode).
    #[test]
    fn every_output_is_valid_json(s in ".{0,12}", c in prop::collection::vec(".{0,6}", 0..4), escaped in any::<bool>()) {
        let mut frame = json!({"type": "trade", "data": [{"s": s, "p": 1.5, "t": 7, "v": 2, "c": c}]}).to_string();
        if escaped {
            // The same frame with every non-ASCII character written as \u escapes.
            frame = frame.chars().map(|ch| if ch.is_ascii() { ch.to_string() } else {
                ch.encode_utf16(&mut [0; 2]).iter().map(|u| format!("\\u{u:04x}")).collect()
            }).collect();
        }
        let outputs = flatten(frame.as_bytes()).expect("a valid frame flattens");
        let v: Value = serde_json::from_slice(&outputs[0].value).expect("output is JSON");
        prop_assert_eq!(&v["symbol"], &Value::from(s.clone()));
        prop_assert_eq!(&v["conditions"], &json!(c));
        prop_assert_eq!(outputs[0].key.as_deref(), Some(s.as_bytes()));
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let text = value.to_string();
        if let Ok(outputs) = flatten(text.as_bytes()) {
            // Only a trade frame gives outputs, one per element of `data`.
            if !outputs.is_empty() {
                prop_assert_eq!(&value["type"], "trade");
                prop_assert_eq!(outputs.len(), value["data"].as_array().map_or(0, Vec::len));
            }
        }
    }

    #[test]
    fn trade_frames_give_one_output_per_trade(trades in prop::collection::vec(trade(), 0..20)) {
        let frame = json!({"type": "trade", "data": trades}).to_string();
        let outputs = flatten(frame.as_bytes()).expect("a valid frame flattens");
        prop_assert_eq!(outputs.len(), trades.len());
        for (out, trade) in outputs.iter().zip(&trades) {
            let v: Value = serde_json::from_slice(&out.value).unwrap();
            prop_assert_eq!(&v["symbol"], &trade["s"]);
            prop_assert_eq!(&v["ts"], &trade["t"]);
            prop_assert_eq!(v["price"].as_f64(), trade["p"].as_f64());
            prop_assert_eq!(v["volume"].as_f64(), trade["v"].as_f64());
            let no_conditions = Value::Array(vec![]);
            prop_assert_eq!(&v["conditions"], trade.get("c").unwrap_or(&no_conditions));
            prop_assert_eq!(out.key.as_deref(), trade["s"].as_str().map(str::as_bytes));
        }
    }

    #[test]
    fn truncated_frames_are_errors_not_panics(cut in 0usize..200) {
        let frame = r#"{"type":"trade","data":[{"s":"BINANCE:BTCUSDT","p":7296.89,"t":1575526691134,"v":0.011467,"c":["1","12"]}]}"#;
        let cut = cut.min(frame.len() - 1);
        prop_assert!(flatten(&frame.as_bytes()[..cut]).is_err());
    }
}

#[test]
fn hostile_inputs_are_errors_with_reasons() {
    // Deeply nested JSON: an error (serde_json's recursion limit), not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(flatten(deep.as_bytes()).unwrap_err().starts_with("not a Finnhub frame"));
    let deep_object = format!(r#"{}{{"type":"trade"}}{}"#, r#"{"a":"#.repeat(50_000), "}".repeat(50_000));
    assert!(flatten(deep_object.as_bytes()).unwrap_err().starts_with("not a Finnhub frame"));
    let deep_data = format!(r#"{{"type":"trade","data":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    assert!(flatten(deep_data.as_bytes()).is_err());
    // Not UTF-8.
    assert!(flatten(b"\xff\xfe{\"type\":\"trade\"}").unwrap_err().starts_with("not a Finnhub frame"));
    // Empty value.
    assert!(flatten(b"").unwrap_err().starts_with("not a Finnhub frame"));
    // A 10 MB value: a string of 10 MB is no frame; 10 MB of trades is fine.
    let big = format!(r#"{{"type":"trade","data":"{}"}}"#, "x".repeat(10 << 20));
    assert!(flatten(big.as_bytes()).is_err());
    let many = json!({"type": "trade", "data": vec![json!({"s":"A","p":1.0,"t":1,"v":1.0}); 350_000]}).to_string();
    assert!(many.len() > 10_000_000);
    assert_eq!(flatten(many.as_bytes()).unwrap().len(), 350_000);
}
