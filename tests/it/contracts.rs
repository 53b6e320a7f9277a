//! The two plugin contracts side by side: 0.1 components (records lifted
//! field by field) and 0.2 components (a batch as one buffer each way) give
//! the same results, alone and chained; random batches survive encode →
//! guest echo → decode byte for byte in both; and 0.2 guests that break the
//! results layout are dead-lettered with a reason, never read out of bounds.

use crate::common;

use common::*;
use proptest::prelude::*;
use sluice::config::TransformSpec;
use sluice::record::{Header, Origin, Output, Record};
use sluice::runtime::{Contract, Grants, Limits, Plugin, PluginInstance, Runtime};
use sluice::transforms::Chain;

fn instance(runtime: &Runtime, name: &str, config: &[(&str, &str)]) -> PluginInstance {
    let plugin = Plugin::load(runtime, &plugin_path(name)).expect("plugin loads");
    let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    PluginInstance::new(plugin, config, Limits::default(), Grants::default(), "contracts").expect("plugin initialises")
}

fn spec(name: &str, config: &[(&str, &str)]) -> TransformSpec {
    TransformSpec {
        path: plugin_path(name),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        limits: Limits::default(),
        grants: Grants::default(),
        hash: String::new(),
        shadow: None,
        event_time: None,
    }
}

#[test]
fn the_contract_is_read_from_the_components_exports() {
    let (runtime, _) = runtime();
    for (name, contract) in [
        ("trade_flattener", Contract::V02),
        ("trade_flattener_v01", Contract::V01),
        ("chaos_v01", Contract::V01),
        ("raw_echo", Contract::V02),
    ] {
        assert_eq!(Plugin::load(&runtime, &plugin_path(name)).unwrap().contract, contract, "{name}");
    }
}

/// The flattener built against each contract: the same outputs, the same
/// dead-letter reasons, for good, empty, ping and bad frames.
#[test]
fn a_0_1_build_and_a_0_2_build_give_the_same_results() {
    let (runtime, _) = runtime();
    let frames = [
        r#"{"type":"trade","data":[{"s":"BINANCE:BTCUSDT","p":7296.89,"t":1575526691134,"v":0.011467,"c":["1","12"]},{"s":"A\"B","p":1,"t":2,"v":3}]}"#,
        r#"{"type":"ping"}"#,
        "not json",
        r#"{"type":"trade","data":[]}"#,
        r#"{"type":"trade","data":[{"s":"A","p":1,"t":2,"v":3},{"p":1,"t":2,"v":3}]}"#,
    ];
    let batch: Vec<Record> = frames.iter().enumerate().map(|(i, f)| record(f, i as i64)).collect();
    let v01 = instance(&runtime, "trade_flattener_v01", &[]).process(&batch);
    let v02 = instance(&runtime, "trade_flattener", &[]).process(&batch);
    assert_eq!(v01, v02);
    assert_eq!(v02[0].as_ref().unwrap().len(), 2);
    assert_eq!(v02[0].as_ref().unwrap()[1].key.as_deref(), Some(&b"A\"B"[..]));
    assert!(v02[2].as_ref().unwrap_err().contains("not a Finnhub frame"));
    assert!(
        v02[4].as_ref().unwrap_err().contains("missing field `s`"),
        "a bad trade fails its frame whole: {:?}",
        v02[4]
    );
}

/// A chain mixing contracts: 0.2 flattener → 0.1 echo → 0.2 router, and the
/// faults of a 0.1 stage still fail only their record.
#[test]
fn chains_mix_0_1_and_0_2_stages() {
    let (runtime, _) = runtime();
    let specs = [
        spec("trade_flattener", &[]),
        spec("chaos_v01", &[("mode", "trap"), ("trigger", "never")]),
        spec("symbol_router", &[("routes", "BTC=btc")]),
        spec("chaos", &[("mode", "mirror")]),
    ];
    let mut chain = Chain::new(&runtime, &specs, "mixed").unwrap();
    let batch = vec![
        record(
            r#"{"type":"trade","data":[{"s":"BINANCE:BTCUSDT","p":1,"t":5,"v":2},{"s":"X:ETH","p":1,"t":6,"v":2}]}"#,
            0,
        ),
        record("bad", 1),
    ];
    let results = chain.process(&batch).into_records();
    let outputs = results[0].as_ref().unwrap();
    assert_eq!(outputs.iter().map(|o| o.route.as_deref()).collect::<Vec<_>>(), [Some("btc"), None]);
    assert_eq!(outputs[0].key.as_deref(), Some(&b"BINANCE:BTCUSDT"[..]), "the router's key crossed the 0.1 stage");
    assert!(results[1].as_ref().unwrap_err().error.contains("not a Finnhub frame"));

    let mut trapping =
        Chain::new(&runtime, &[spec("chaos_v01", &[("mode", "trap")]), spec("chaos", &[])], "mixed").unwrap();
    let results = trapping.process(&[record("a", 0), record("boom", 1), record("c", 2)]).into_records();
    assert_eq!(results[0].as_ref().unwrap()[0].value, "a");
    assert!(results[1].as_ref().unwrap_err().error.contains("chaos: trapping as asked"), "{:?}", results[1]);
    assert_eq!(results[2].as_ref().unwrap()[0].value, "c");
}

/// 0.2 guests that break the results layout: the host reports what is
/// wrong, per record where it can, and never reads outside the buffer.
#[test]
fn hostile_0_2_guests_are_dead_lettered_with_a_reason() {
    let (runtime, _) = runtime();
    let batch: Vec<Record> = (0..5).map(|i| record(format!("record {i}"), i)).collect();

    // A bad range inside one output fails only its record.
    for (corrupt, reason) in [
        ("offset", "output 0's value at"),
        ("overflow", "output 0's value at 4294967294+4294967295"),
        ("headers", "output 0's headers 0+1000"),
    ] {
        let results = instance(&runtime, "raw_echo", &[("corrupt", corrupt)]).process(&batch);
        let error = results[0].as_ref().unwrap_err();
        assert!(error.contains("plugin broke the contract") && error.contains(reason), "{corrupt}: {error}");
        for (i, result) in results.iter().enumerate().skip(1) {
            assert_eq!(result.as_ref().unwrap()[0].value, format!("record {i}").into_bytes(), "{corrupt}");
        }
    }

    // A buffer the host cannot read at all fails the call; isolation then
    // finds every record failing the same way and gives up after a streak.
    for (corrupt, reason) in [("count", "0 results for 1 records"), ("truncated", "table"), ("magic", "not the magic")]
    {
        let mut plugin = instance(&runtime, "raw_echo", &[("corrupt", corrupt)]);
        let results = plugin.process(&batch);
        for result in &results[..3] {
            let error = result.as_ref().unwrap_err();
            assert!(error.contains("plugin broke the contract") && error.contains(reason), "{corrupt}: {error}");
        }
        assert!(
            results[4].as_ref().unwrap_err().contains("not run: the plugin version is failing"),
            "{corrupt}: {:?}",
            results[4]
        );
        assert!(plugin.take_failing().is_some(), "{corrupt}: the version is failing");
    }

    // The correct raw echo (written from the WIT alone) round-trips.
    let results = instance(&runtime, "raw_echo", &[]).process(&batch);
    assert!(results.iter().all(Result::is_ok));
}

/// The limits and the dead-letter reasons read the same in both contracts.
#[test]
fn limits_and_reasons_are_the_same_in_both_contracts() {
    let (runtime, _) = runtime();
    let batch = vec![record("ok", 0), record("boom", 1)];
    for mode in ["trap", "loop", "error", "many", "big"] {
        let config = [("mode", mode), ("many", "200001"), ("big_mib", "17")];
        let mut limits = Limits::default();
        if mode == "loop" {
            limits.cpu_ms = 200;
        }
        let load = |name: &str| {
            let plugin = Plugin::load(&runtime, &plugin_path(name)).unwrap();
            PluginInstance::new(
                plugin,
                config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                limits.clone(),
                Grants::default(),
                "c",
            )
            .unwrap()
        };
        let (v01, v02) = (load("chaos_v01").process(&batch), load("chaos").process(&batch));
        assert_eq!(v01[0], v02[0], "{mode}");
        let (e01, e02) = (v01[1].as_ref().unwrap_err(), v02[1].as_ref().unwrap_err());
        // Trap locations name different functions; the reason's head is the same.
        let head = |e: &str| e.split(" (in ").next().unwrap_or(e).to_string();
        assert_eq!(head(e01), head(e02), "{mode}");
    }
}

fn any_record() -> impl Strategy<Value = Record> {
    let bytes = |max: usize| prop::collection::vec(any::<u8>(), 0..max);
    (
        prop_oneof![Just(None), Just(Some(Vec::new())), bytes(40).prop_map(Some)],
        prop_oneof![8 => bytes(200), 1 => Just(vec![0x5a; 1 << 20])],
        prop::collection::vec((prop_oneof![Just("dup".to_string()), "\\PC{0,12}"], bytes(30)), 0..8),
        prop::option::of(any::<i64>()),
        prop_oneof![Just("trades".to_string()), Just("prix-€-价格".to_string()), "\\PC{0,20}"],
        any::<i32>(),
        any::<i64>(),
    )
        .prop_map(|(key, value, headers, timestamp, topic, partition, offset)| Record {
            key: key.map(Into::into),
            value: value.into(),
            headers: headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
            timestamp,
            origin: Origin { topic: topic.into(), partition, offset },
            rejected: None,
        })
}

/// What an echo of `r` must give back.
fn echoed(r: &Record) -> Output {
    Output {
        key: r.key.clone(),
        value: r.value.clone(),
        headers: r.headers.clone(),
        timestamp: r.timestamp,
        route: None,
    }
}

fn mirrors() -> Vec<PluginInstance> {
    let (runtime, _) = runtime();
    vec![
        instance(&runtime, "chaos_v01", &[("mode", "mirror")]),
        instance(&runtime, "chaos", &[("mode", "mirror")]),
        instance(&runtime, "raw_echo", &[]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random batches survive encode → guest echo → decode byte for byte, in
    /// both contracts (the SDK's views and a raw guest for 0.2).
    #[test]
    fn batches_round_trip_through_both_contracts(batch in prop::collection::vec(any_record(), 0..40)) {
        thread_local! {
            static MIRRORS: std::cell::RefCell<Vec<PluginInstance>> = std::cell::RefCell::new(mirrors());
        }
        let big = batch.iter().filter(|r| r.value.len() == 1 << 20).count();
        prop_assume!(big <= 3);
        let expected: Vec<Result<Vec<Output>, String>> = batch.iter().map(|r| Ok(vec![echoed(r)])).collect();
        MIRRORS.with(|mirrors| {
            for mirror in mirrors.borrow_mut().iter_mut() {
                let results = mirror.process(&batch);
                prop_assert_eq!(&results, &expected, "{}", mirror.plugin().name);
            }
            Ok(())
        })?;
    }
}

#[test]
fn ten_thousand_records_and_an_empty_batch_round_trip() {
    let batch: Vec<Record> = (0..10_000)
        .map(|i| Record {
            key: (i % 3 != 0).then(|| format!("key-{i}").into()),
            value: format!("value {i} ✓").into(),
            headers: (0..i % 4).map(|h| Header { name: "dup".into(), value: vec![h as u8] }).collect(),
            timestamp: (i % 2 == 0).then_some(i),
            origin: Origin { topic: ["a", "ü"][i as usize % 2].into(), partition: 3, offset: i },
            rejected: None,
        })
        .collect();
    let expected: Vec<Result<Vec<Output>, String>> = batch.iter().map(|r| Ok(vec![echoed(r)])).collect();
    for mut mirror in mirrors() {
        assert!(mirror.process(&batch) == expected, "{}", mirror.plugin().name);
        assert!(mirror.process(&[]).is_empty(), "{}", mirror.plugin().name);
    }
}
