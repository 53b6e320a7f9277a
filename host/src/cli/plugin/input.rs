//! `sluice plugin test`'s input: values one per line ([`Lines`]), and for a
//! stateful plugin the source the transform step reads them from
//! ([`LinesSource`]), with each record's event time and partition taken
//! from JSON fields.

use crate::record::{Origin, Record};
use crate::sources::Source;
use anyhow::Context;
use async_trait::async_trait;
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Input lines as records: origin `topic` (the same whatever the input, so
/// that a state saved by one run is found by the next), partition 0, offset
/// the line number (from 1); a trailing `\r` is dropped.
pub struct Lines {
    input: Box<dyn BufRead + Send>,
    topic: Arc<str>,
    line: i64,
}

impl Lines {
    /// `path`, or stdin when `None`, as records of `topic`.
    pub fn open(path: Option<&Path>, topic: &str) -> anyhow::Result<Self> {
        let input: Box<dyn BufRead + Send> = match path {
            Some(path) => {
                let file =
                    std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
                Box::new(std::io::BufReader::new(file))
            }
            None => Box::new(std::io::BufReader::new(std::io::stdin())),
        };
        Ok(Lines { input, topic: topic.into(), line: 0 })
    }

    /// The next line as a record; `None` at the end of the input.
    pub fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        let mut value = Vec::new();
        if self.input.read_until(b'\n', &mut value).context("cannot read input")? == 0 {
            return Ok(None);
        }
        if value.last() == Some(&b'\n') {
            value.pop();
            if value.last() == Some(&b'\r') {
                value.pop();
            }
        }
        self.line += 1;
        let origin = Origin { topic: self.topic.clone(), partition: 0, offset: self.line };
        Ok(Some(Record { value: value.into(), origin, ..Record::default() }))
    }
}

/// Where a stateful run takes each record's event time and partition from.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    /// A JSON field (dotted path) holding the record's timestamp, in ms.
    pub event_time: Option<String>,
    /// A JSON field (dotted path) whose value picks the record's partition
    /// among `partitions`, as Kafka's default partitioner places a record
    /// keyed by that value: murmur2 of its bytes (a string's UTF-8, else its
    /// JSON text), positive, modulo the count.
    pub partition_by: Option<String>,
    pub partitions: u32,
}

/// The lines as a source, in batches of `batch_size`: a record whose
/// fields cannot be read is rejected with the reason (it fails as its line).
pub struct LinesSource {
    inner: Mutex<Reading>,
    batch_size: usize,
}

struct Reading {
    lines: Lines,
    fields: Fields,
}

impl LinesSource {
    pub fn new(lines: Lines, fields: Fields, batch_size: usize) -> Self {
        LinesSource { inner: Mutex::new(Reading { lines, fields }), batch_size: batch_size.max(1) }
    }
}

impl Reading {
    fn place(&mut self, record: &mut Record) {
        if self.fields.event_time.is_none() && self.fields.partition_by.is_none() {
            return;
        }
        match serde_json::from_slice::<Value>(&record.value) {
            Err(e) => record.rejected = Some(format!("not JSON, so it has no event time or partition field: {e}")),
            Ok(json) => {
                if let Err(reason) = self.place_json(record, &json) {
                    record.rejected = Some(reason);
                }
            }
        }
    }

    fn place_json(&mut self, record: &mut Record, json: &Value) -> Result<(), String> {
        if let Some(field) = &self.fields.event_time {
            let value = lookup(json, field).ok_or_else(|| format!("no field `{field}` (--event-time)"))?;
            record.timestamp = Some(timestamp(value).ok_or_else(|| {
                format!("field `{field}` (--event-time) is not a timestamp in ms since the Unix epoch: {value}")
            })?);
        }
        if let Some(field) = &self.fields.partition_by {
            let value = lookup(json, field).ok_or_else(|| format!("no field `{field}` (--partition-by)"))?;
            let bytes = match value {
                Value::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            };
            record.origin.partition = kafka_partition(&bytes, self.fields.partitions);
        }
        Ok(())
    }
}

/// The partition Kafka's default partitioner gives a record with `key`
/// among `partitions` (at least 1): `toPositive(murmur2(key)) % partitions`.
pub fn kafka_partition(key: &[u8], partitions: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1)) as i32
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// `json`'s field at a dotted `path`.
fn lookup<'a>(json: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(json, |v, part| v.get(part))
}

/// An integer number of milliseconds (a float without a fraction counts).
fn timestamp(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18).map(|f| f as i64))
}

#[async_trait]
impl Source for LinesSource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        tokio::task::block_in_place(|| {
            let mut reading = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut batch = Vec::with_capacity(self.batch_size);
            while batch.len() < self.batch_size {
                let Some(mut record) = reading.lines.next_record()? else { break };
                reading.place(&mut record);
                batch.push(record);
            }
            Ok(batch)
        })
    }

    async fn commit(&self, _batch: &[Record]) -> anyhow::Result<()> {
        Ok(())
    }

    async fn flush_commits(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_and_partition_come_from_fields_and_a_missing_one_is_named() {
        let mut reading = Reading {
            lines: Lines { input: Box::new(&b""[..]), topic: "in".into(), line: 0 },
            fields: Fields { event_time: Some("t.ms".into()), partition_by: Some("s".into()), partitions: 3 },
        };
        let mut place = |value: &str| {
            let mut record = Record { value: value.to_string().into(), ..Record::default() };
            reading.place(&mut record);
            (record.timestamp, record.origin.partition, record.rejected)
        };
        let (a, b) = (kafka_partition(b"A", 3), kafka_partition(b"B", 3));
        assert_eq!(place(r#"{"t":{"ms":5},"s":"A"}"#), (Some(5), a, None));
        assert_eq!(place(r#"{"t":{"ms":6.0},"s":"B"}"#), (Some(6), b, None));
        assert_eq!(place(r#"{"t":{"ms":7},"s":"A"}"#), (Some(7), a, None));
        let (_, _, missing) = place(r#"{"s":"A"}"#);
        assert_eq!(missing.as_deref(), Some("no field `t.ms` (--event-time)"));
        let (_, _, fraction) = place(r#"{"t":{"ms":1.5},"s":"A"}"#);
        assert!(fraction.unwrap().contains("not a timestamp"));
        let (_, _, garbage) = place("garbage");
        assert!(garbage.unwrap().starts_with("not JSON"));
    }

    /// Kafka's own test vectors (`UtilsTest.testMurmur2`).
    #[test]
    fn murmur2_is_kafkas() {
        for (key, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
        assert_eq!(kafka_partition(b"21", 1), 0);
    }
}
