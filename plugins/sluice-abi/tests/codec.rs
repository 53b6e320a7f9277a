//! The codec tested once, for both sides: random batches and random outputs
//! survive encode → decode exactly, and hostile results buffers are
//! reported, never read out of bounds.

use proptest::prelude::*;
use sluice_abi::results::{plain_parts, plain_prefix};
use sluice_abi::testing::{payload_at, results};
use sluice_abi::{Batch, Encoder, OutputMeta, RecordIn, Results, Status, Writer};

/// A record as both sides see it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp: Option<i64>,
    topic: String,
    partition: i32,
    offset: i64,
}

fn encode<'a>(encoder: &'a mut Encoder, records: &'a [Rec]) -> &'a [u8] {
    encoder
        .encode(records.iter().map(|r| RecordIn {
            key: r.key.as_deref(),
            value: &r.value,
            headers: r.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            timestamp: r.timestamp,
            topic: &r.topic,
            partition: r.partition,
            offset: r.offset,
        }))
        .expect("a small batch encodes")
}

fn decode(buf: &[u8]) -> Vec<Rec> {
    let batch = Batch::parse(buf).expect("the batch parses");
    batch
        .iter()
        .map(|r| {
            let r = r.expect("every record reads");
            Rec {
                key: r.key.map(<[u8]>::to_vec),
                value: r.value.to_vec(),
                headers: r.headers.iter().map(|(n, v)| (String::from_utf8(n.to_vec()).unwrap(), v.to_vec())).collect(),
                timestamp: r.timestamp,
                topic: r.origin.topic.to_string(),
                partition: r.origin.partition,
                offset: r.origin.offset,
            }
        })
        .collect()
}

fn any_rec() -> impl Strategy<Value = Rec> {
    (
        prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(("[a-zé]{0,6}", prop::collection::vec(any::<u8>(), 0..8)), 0..4),
        prop::option::of(any::<i64>()),
        prop::sample::select(vec!["a", "b", "tópic", ""]),
        any::<i32>(),
        any::<i64>(),
    )
        .prop_map(|(key, value, headers, timestamp, topic, partition, offset)| Rec {
            key,
            value,
            headers,
            timestamp,
            topic: topic.to_string(),
            partition,
            offset,
        })
}

/// An output as the writer takes it, owned; `Err` is a failed record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp: Option<i64>,
    route: Option<String>,
}

fn any_out() -> impl Strategy<Value = Out> {
    (
        prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(("[a-z]{0,6}", prop::collection::vec(any::<u8>(), 0..8)), 0..3),
        prop::option::of(any::<i64>()),
        prop::option::of("[a-z]{1,8}"),
    )
        .prop_map(|(key, value, headers, timestamp, route)| Out { key, value, headers, timestamp, route })
}

fn write(records: &[Result<Vec<Out>, String>]) -> Vec<u8> {
    let mut writer = Writer::for_batch(records.len(), 64);
    for record in records {
        match record {
            Ok(outputs) => {
                for o in outputs {
                    let headers: Vec<(&str, &[u8])> =
                        o.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                    let meta = OutputMeta {
                        key: o.key.as_deref(),
                        timestamp: o.timestamp,
                        route: o.route.as_deref(),
                        headers: &headers,
                    };
                    writer.write(meta, &o.value);
                }
                writer.end_record(Ok(()));
            }
            Err(message) => {
                // Partial outputs are discarded with the error.
                writer.write(OutputMeta::default(), b"partial");
                writer.end_record(Err(message.clone()));
            }
        }
    }
    writer.finish()
}

/// Every output read back in full, through the fast path where it applies.
fn read(buf: &[u8], inputs: usize) -> Vec<Result<Vec<Out>, String>> {
    let results = Results::parse(buf, inputs).expect("the writer's buffer parses");
    let outputs = results.outputs();
    let (plain, _) = plain_prefix(buf.len(), outputs);
    let mut next = 0;
    (0..results.len())
        .map(|i| match results.status(i) {
            Status::Ok(n) => {
                let mine = next..next + n;
                next += n;
                Ok(mine
                    .map(|j| {
                        let full = results.output(j, &outputs[j]).expect("the writer's outputs read");
                        if j < plain {
                            let (key, value, timestamp) = plain_parts(&outputs[j]);
                            assert_eq!(key.map(|(s, l)| s..s + l), full.key);
                            assert_eq!((value.0..value.0 + value.1, timestamp), (full.value.clone(), full.timestamp));
                        }
                        Out {
                            key: full.key.map(|k| buf[k].to_vec()),
                            value: buf[full.value].to_vec(),
                            headers: full.headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect(),
                            timestamp: full.timestamp,
                            route: full.route.map(str::to_string),
                        }
                    })
                    .collect())
            }
            Status::Error(message) => Err(String::from_utf8(message.unwrap().to_vec()).unwrap()),
            Status::Unknown(s) => panic!("status {s}"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Random batches decode to what was encoded, with the encoder reused.
    #[test]
    fn batches_round_trip(first in prop::collection::vec(any_rec(), 0..30), second in prop::collection::vec(any_rec(), 0..30)) {
        let mut encoder = Encoder::default();
        prop_assert_eq!(decode(encode(&mut encoder, &first)), first);
        prop_assert_eq!(decode(encode(&mut encoder, &second)), second);
    }

    /// Random results (outputs, errors, partial outputs) read back exactly.
    #[test]
    fn results_round_trip(records in prop::collection::vec(
        prop_oneof![4 => prop::collection::vec(any_out(), 0..4).prop_map(Ok), 1 => "[a-z ]{0,20}".prop_map(Err)],
        0..20,
    )) {
        let buf = write(&records);
        prop_assert!(!buf.windows(7).any(|w| w == b"partial"), "discarded outputs are gone");
        prop_assert_eq!(read(&buf, records.len()), records);
    }

    /// Any bytes at all: the reader reports or reads, never panics or reads
    /// out of bounds.
    #[test]
    fn arbitrary_bytes_are_reported_not_read(mut buf in prop::collection::vec(any::<u8>(), 0..400), inputs in 0usize..4) {
        if buf.len() >= 4 {
            buf[..4].copy_from_slice(b"SLO2");
        }
        if let Ok(results) = Results::parse(&buf, inputs) {
            for (j, e) in results.outputs().iter().enumerate() {
                let _ = results.output(j, e);
            }
            for i in 0..results.len() {
                let _ = results.status(i);
            }
        }
        if buf.len() >= 4 {
            buf[..4].copy_from_slice(b"SLB2");
        }
        if let Ok(batch) = Batch::parse(&buf) {
            for r in batch.iter().flatten() {
                let _ = r.headers.iter().count();
            }
        }
    }
}

#[test]
fn the_encoders_buffer_is_reused() {
    let records: Vec<Rec> = (0..20)
        .map(|i| Rec {
            key: (i % 2 == 0).then(|| vec![i as u8; i]),
            value: format!("value {i}").into_bytes(),
            headers: (0..i % 4).map(|h| (format!("h{h}"), vec![7; h])).collect(),
            timestamp: (i % 3 == 0).then_some(i as i64),
            topic: ["a", "b", "ü"][i % 3].into(),
            partition: i as i32,
            offset: 1 << 40,
        })
        .collect();
    let mut encoder = Encoder::default();
    encode(&mut encoder, &records);
    let capacity = encoder.capacity();
    assert_eq!(decode(encode(&mut encoder, &records)), records);
    assert_eq!(encoder.capacity(), capacity, "the buffer is reused");
    assert!(Batch::parse(encode(&mut encoder, &[])).unwrap().is_empty());
}

#[test]
fn malformed_batches_are_refused() {
    let mut encoder = Encoder::default();
    let records = [Rec {
        key: None,
        value: b"v".to_vec(),
        headers: vec![("h".into(), b"1".to_vec())],
        timestamp: None,
        topic: "t".into(),
        partition: 0,
        offset: 0,
    }];
    let good = encode(&mut encoder, &records).to_vec();
    assert!(Batch::parse(&good[..20]).is_err(), "short header");
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
    assert!(Batch::parse(&bad).is_err(), "records table past the end");
    let batch = Batch::parse(&good).unwrap();
    assert!(batch.get(1).is_err(), "a record past the count");
}

#[test]
fn hostile_results_are_reported_not_read() {
    // A value range past the end: the buffer reads, the output does not.
    let bad_value = results(&[[0, 1, 0], [1, 0, 0]], &[[0, 0, 0, 0, 0, 0, 0, 0, 1000, 5, 0, 0]], b"");
    let parsed = Results::parse(&bad_value, 2).unwrap();
    assert_eq!(plain_prefix(bad_value.len(), parsed.outputs()).0, 0, "not plain: outside");
    let error = parsed.output(0, &parsed.outputs()[0]).unwrap_err();
    assert!(error.contains("output 0's value at 1000+5 is outside"), "{error}");
    assert_eq!(parsed.status(1), Status::Error(Ok(&b""[..])));
    // An offset + length that overflows 32 bits.
    let overflow = results(&[[0, 1, 0]], &[[0, 0, 0, 0, 0, 0, 0, 0, u32::MAX, u32::MAX, 0, 0]], b"");
    let parsed = Results::parse(&overflow, 1).unwrap();
    assert!(parsed.output(0, &parsed.outputs()[0]).unwrap_err().contains("outside"));
    // Whole-buffer violations.
    let two = results(&[[0, 0, 0], [0, 0, 0]], &[], b"");
    assert_eq!(Results::parse(&two, 3).unwrap_err().0, "2 results for 3 records");
    assert!(Results::parse(&two[..20], 2).unwrap_err().0.contains("shorter than its 32-byte header"));
    assert!(Results::parse(&two[..40], 2).unwrap_err().0.contains("results table"));
    let miscount = results(&[[0, 3, 0]], &[], b"");
    assert!(Results::parse(&miscount, 1).unwrap_err().0.contains("add up to 3"));
    let mut magic = two.clone();
    magic[0] = b'X';
    assert!(Results::parse(&magic, 2).unwrap_err().0.contains("magic"));
    let mut huge = results(&[[0, 0, 0]], &[], b"");
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Results::parse(&huge, 1).unwrap_err().0.contains("outputs table"));
    // A route that is not UTF-8; headers outside their table; an unknown
    // status; an error message read back, and one outside the buffer.
    let route = results(&[[0, 1, 0]], &[[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32 + 12 + 48, 2]], &[0xff, 0xfe]);
    let parsed = Results::parse(&route, 1).unwrap();
    assert!(parsed.output(0, &parsed.outputs()[0]).unwrap_err().contains("route is not UTF-8"));
    let headers = results(&[[0, 1, 0]], &[[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]], b"");
    let parsed = Results::parse(&headers, 1).unwrap();
    assert!(parsed.output(0, &parsed.outputs()[0]).unwrap_err().contains("headers 0+2 are outside the 0-entry"));
    assert_eq!(Results::parse(&results(&[[7, 0, 0]], &[], b""), 1).unwrap().status(0), Status::Unknown(7));
    let message = results(&[[1, 44, 3]], &[], b"bad");
    assert_eq!(Results::parse(&message, 1).unwrap().status(0), Status::Error(Ok(&b"bad"[..])));
    let lost = results(&[[1, 44, 30]], &[], b"bad");
    let Status::Error(Err(error)) = Results::parse(&lost, 1).unwrap().status(0) else { panic!("outside") };
    assert!(error.contains("error message of result 0 at 44+30 is outside"), "{error}");
}

/// The fast path takes the leading plain outputs and counts their bytes;
/// the first with a route, headers or a bad range stops it.
#[test]
fn plain_outputs_are_a_prefix() {
    let tail = b"k1v1routev3";
    let at = payload_at(1, 3);
    let outputs = [
        [3, 0, 0, 0, 7, 0, at(0), 2, at(2), 2, 0, 0],
        [4, 0, 0, 0, 0, 0, 0, 0, at(2), 2, at(4), 5],
        [0, 0, 0, 0, 0, 0, 99, 99, at(9), 2, 0, 0],
    ];
    let buf = results(&[[0, 3, 0]], &outputs, tail);
    let parsed = Results::parse(&buf, 1).unwrap();
    assert_eq!(plain_prefix(buf.len(), parsed.outputs()), (1, 4));
    assert_eq!(plain_parts(&parsed.outputs()[0]), (Some((at(0) as usize, 2)), (at(2) as usize, 2), Some(7)));
    assert_eq!(parsed.output(1, &parsed.outputs()[1]).unwrap().route, Some("route"));
    // No key flag: the key's words are ignored, the output is plain.
    assert_eq!(plain_prefix(buf.len(), &parsed.outputs()[2..]), (1, 2));
    assert!(parsed.all_ok() && parsed.most_outputs() == 3);
}
