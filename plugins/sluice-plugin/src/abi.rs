//! The guest side of contract 0.2 (`wit/transform.wit`), on the shared codec
//! [`sluice_abi`]: borrowed views of the records in the host's batch buffer,
//! and [`Outputs`], the writer of the results buffer. Pure Rust, so it runs
//! (and is tested) natively too.
//!
//! A plugin sees [`RecordView`]s and writes through [`Outputs`]; the owned
//! [`Record`]/[`Output`] API of [`crate::Transform::process`] is built on them.

use crate::{Header, Origin, Output, Record};
pub use sluice_abi::{Batch, Headers, Malformed, OriginView, OutputMeta, RecordView};
use sluice_abi::{Encoder, RecordIn, Writer};

impl From<RecordView<'_>> for Record {
    /// The record, copied into the owned type [`crate::Transform::process`] takes.
    fn from(view: RecordView<'_>) -> Self {
        Record {
            key: view.key.map(<[u8]>::to_vec),
            value: view.value.to_vec(),
            headers: view
                .headers
                .iter()
                .map(|(name, value)| Header { name: String::from_utf8_lossy(name).into_owned(), value: value.to_vec() })
                .collect(),
            timestamp: view.timestamp,
            origin: Origin {
                topic: view.origin.topic.to_string(),
                partition: view.origin.partition,
                offset: view.origin.offset,
            },
        }
    }
}

/// Where one input record's outputs go. Bytes are written straight into the
/// results buffer the host reads.
#[derive(Debug)]
pub struct Outputs(Writer);

impl Outputs {
    /// An empty results buffer, with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Outputs(Writer::with_capacity(capacity))
    }

    /// An empty results buffer for a batch of `records` records (its tables
    /// sized for one output each), with room for about `capacity` bytes.
    pub fn for_batch(records: usize, capacity: usize) -> Self {
        Outputs(Writer::for_batch(records, capacity))
    }

    /// Adds an output of the current record.
    pub fn push(&mut self, output: Output) {
        let headers: Vec<(&str, &[u8])> =
            output.headers.iter().map(|h| (h.name.as_str(), h.value.as_slice())).collect();
        let meta = OutputMeta {
            key: output.key.as_deref(),
            timestamp: output.timestamp,
            route: output.route.as_deref(),
            headers: &headers,
        };
        self.0.write(meta, &output.value);
    }

    /// Adds an output from borrowed parts.
    #[inline]
    pub fn write(&mut self, meta: OutputMeta<'_>, value: &[u8]) {
        self.0.write(meta, value);
    }

    /// Adds an output whose value `value` appends to the buffer it is given
    /// (the results buffer itself: the value is never copied again).
    #[inline]
    pub fn write_with(&mut self, meta: OutputMeta<'_>, value: impl FnOnce(&mut Vec<u8>)) {
        self.0.write_with(meta, value);
    }

    /// Ends the current record: its outputs, or `error` (which discards them).
    pub fn end_record(&mut self, result: Result<(), String>) {
        self.0.end_record(result);
    }

    /// The results buffer, for the host.
    pub fn finish(self) -> Vec<u8> {
        self.0.finish()
    }

    /// The current record's outputs so far, as owned values (for native
    /// tests); they are taken out of the buffer.
    pub fn take_owned(&mut self) -> Vec<Output> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let outputs = self
            .0
            .current()
            .into_iter()
            .map(|o| Output {
                key: o.key.map(<[u8]>::to_vec),
                value: o.value.to_vec(),
                headers: o.headers.iter().map(|(n, v)| Header { name: text(n), value: v.to_vec() }).collect(),
                timestamp: o.timestamp,
                route: o.route.map(text),
            })
            .collect();
        self.0.discard_current();
        outputs
    }
}

/// Runs `f` against a scratch [`Outputs`] and returns what it wrote, owned: how
/// a zero-copy transform's logic is unit-tested natively.
pub fn collect(f: impl FnOnce(&mut Outputs) -> Result<(), String>) -> Result<Vec<Output>, String> {
    let mut out = Outputs::with_capacity(256);
    f(&mut out)?;
    Ok(out.take_owned())
}

/// Encodes `records` as the host does (for native tests and benchmarks).
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    let mut encoder = Encoder::default();
    let encoded = encoder.encode(records.iter().map(|r| RecordIn {
        key: r.key.as_deref(),
        value: &r.value,
        headers: r.headers.iter().map(|h| (h.name.as_str(), h.value.as_slice())),
        timestamp: r.timestamp,
        topic: &r.origin.topic,
        partition: r.origin.partition,
        offset: r.origin.offset,
    }));
    match encoded {
        Ok(buf) => buf.to_vec(),
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: i64) -> Record {
        Record {
            key: (i % 2 == 0).then(|| format!("k{i}").into_bytes()),
            value: format!("v{i}").into_bytes(),
            headers: (0..i % 3).map(|h| Header { name: format!("h{h}"), value: vec![h as u8; h as usize] }).collect(),
            timestamp: (i % 3 != 0).then_some(i * 1000),
            origin: Origin { topic: format!("tópic-{}", i % 2), partition: i as i32, offset: -i },
        }
    }

    #[test]
    fn views_copy_into_the_records_that_were_encoded() {
        let records: Vec<Record> = (0..50).map(record).collect();
        let buf = encode_batch(&records);
        let batch = Batch::parse(&buf).unwrap();
        assert_eq!(batch.len(), 50);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(&Record::from(batch.get(i).unwrap()), r);
        }
    }

    #[test]
    fn owned_outputs_are_written_and_taken_back_whole() {
        let out = collect(|out| {
            out.push(Output::new("a").with_key("k").with_header("h", "v").with_route("r").with_timestamp(3));
            out.write(
                OutputMeta { key: Some(b"k"), timestamp: Some(5), route: None, headers: &[("a", b"1")] },
                b"value",
            );
            Ok(())
        })
        .unwrap();
        assert_eq!(
            out,
            vec![
                Output::new("a").with_key("k").with_header("h", "v").with_route("r").with_timestamp(3),
                Output::new("value").with_key("k").with_timestamp(5).with_header("a", "1")
            ]
        );
        assert_eq!(collect(|_| Err("bad".into())), Err("bad".to_string()));
    }
}
