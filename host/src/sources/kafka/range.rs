//! A bounded read of a Kafka source's topics, for `sluice backfill`: every
//! partition from a start to an end, then the input ends.
//!
//! The bounds are Kafka's: per partition, the range starts at the first
//! record whose timestamp is at or after `from` and ends before the first
//! record whose timestamp is at or after `to` (what
//! `kafka-consumer-groups --reset-offsets --to-datetime` and
//! `offsets_for_times` mean), or at the partition's end offset when the
//! range was resolved (`latest`), or at the offsets given per partition. The partitions are assigned, not
//! subscribed: the read joins no consumer group and commits nothing, so the
//! live pipeline's offsets are untouched. What the sinks have is theirs to
//! track: the PostgreSQL sink's offsets table (keyed by the backfill's own
//! pipeline name) makes a rerun, or a restart after a crash, skip the rows
//! it already wrote.
//!
//! The start is found with the broker's time index (`ListOffsets`) and then
//! checked record by record, so a broker whose index is coarse (one that
//! answers with an earlier offset) costs reading, not correctness.

use super::KafkaSourceConfig;
use crate::clients::kafka::{client_config, ClientEvents, Role};
use crate::record::Record;
use crate::sources::Source;
use crate::sources::{Position, Range};
use crate::telemetry::telemetry;
use anyhow::Context;
use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a broker request of the resolution may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One partition's part of the range, as read so far.
#[derive(Debug)]
struct Part {
    topic: Arc<str>,
    partition: i32,
    /// The end offset (exclusive) when the range was resolved.
    end: i64,
    /// The offset after the last record read.
    next: i64,
    /// The first record of the range has been read (when the range starts
    /// at a time, records before the first one at or after it are not part
    /// of it).
    started: bool,
    done: bool,
}

impl Part {
    /// Whether the record at `offset` with `timestamp` belongs to `range`
    /// (and marks the partition done when the range ends with it).
    fn admit(&mut self, offset: i64, timestamp: Option<i64>, range: &Range) -> bool {
        if self.done {
            return false;
        }
        self.next = offset + 1;
        if offset >= self.end || matches!((range.to.time(), timestamp), (Some(to), Some(t)) if t >= to) {
            self.done = true;
            return false;
        }
        if !self.started {
            self.started = match (range.from.time(), timestamp) {
                (Some(from), Some(t)) => t >= from,
                // A record without a timestamp is not before any time.
                _ => true,
            };
        }
        if offset + 1 >= self.end {
            self.done = true;
        }
        self.started
    }
}

/// Logs the client's errors like the other Kafka clients.
pub struct RangeContext {
    events: ClientEvents,
}

impl ClientContext for RangeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.events.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.events.error(error, reason)
    }
}

impl ConsumerContext for RangeContext {}

/// The Kafka source, bounded: see the module docs.
pub struct RangeSource {
    consumer: StreamConsumer<RangeContext>,
    range: Range,
    topics: Vec<String>,
    pipeline: String,
    max_records: usize,
    max_wait: Duration,
    /// The read so far, from the first batch on.
    read: Mutex<Option<Read>>,
}

/// A range being read: its partitions, since when, how many records so far.
struct Read {
    parts: Vec<Part>,
    started: Instant,
    delivered: u64,
}

impl RangeSource {
    pub fn new(config: &KafkaSourceConfig, range: &Range, pipeline: &str) -> anyhow::Result<Self> {
        let mut properties = config.properties.clone();
        // No group: nothing is committed, nothing is rebalanced.
        properties.remove("group.id");
        properties.remove("group.instance.id");
        let mut client = client_config(config.brokers(), &properties);
        client
            .set("group.id", format!("sluice-{pipeline}"))
            .set("client.id", format!("sluice-{pipeline}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true");
        let context = RangeContext { events: ClientEvents::new(pipeline, Role::Source, config.brokers()) };
        let consumer = client.create_with_context(context).context("cannot create the Kafka consumer")?;
        Ok(RangeSource {
            consumer,
            range: range.clone(),
            topics: config.topics.clone(),
            pipeline: pipeline.to_string(),
            max_records: config.batch_max_records,
            max_wait: Duration::from_millis(config.batch_max_ms),
            read: Mutex::new(None),
        })
    }

    /// The first offset at or after `time` in each of `partitions`, within
    /// its watermarks (one request for all); the end offset where there is none.
    fn offsets_at(&self, time: i64, partitions: &[(Arc<str>, i32, (i64, i64))]) -> anyhow::Result<Vec<i64>> {
        let mut query = TopicPartitionList::new();
        for (topic, partition, _) in partitions {
            query.add_partition_offset(topic, *partition, Offset::Offset(time))?;
        }
        let found = self
            .consumer
            .offsets_for_times(query, REQUEST_TIMEOUT)
            .with_context(|| format!("cannot look up the offsets of {}", Position::Time(time)))?;
        Ok(partitions
            .iter()
            .map(|(topic, partition, (low, high))| match found.find_partition(topic, *partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o.clamp(*low, *high),
                // No record at or after the time: the range is empty there.
                _ => *high,
            })
            .collect())
    }

    /// Finds every partition's bounds and assigns the partitions that have
    /// records in the range.
    fn resolve(&self) -> anyhow::Result<Vec<Part>> {
        let mut partitions = Vec::new();
        for topic in &self.topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                .with_context(|| format!("cannot read the metadata of topic {topic:?}"))?;
            let ids: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            anyhow::ensure!(!ids.is_empty(), "topic {topic:?} does not exist (or has no partitions)");
            let name: Arc<str> = Arc::from(topic.as_str());
            for partition in ids {
                let marks = self
                    .consumer
                    .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                    .with_context(|| format!("cannot read the offsets of {topic}/{partition}"))?;
                partitions.push((name.clone(), partition, marks));
            }
        }
        // A watermark per partition; a range ending at a time ends at the
        // first record at or after it, read up to the end offset now. Given
        // offsets are kept within the watermarks; a partition a start does
        // not list is left out, one an end does not list is read to the end.
        let bound = |position: &Position| -> Vec<i64> {
            partitions
                .iter()
                .map(|(_, partition, (low, high))| match (position, position.offset(*partition)) {
                    (Position::Earliest, _) => *low,
                    (_, Some(Some(offset))) => offset.clamp(*low, *high),
                    // `latest`, or a partition the offsets leave out.
                    _ => *high,
                })
                .collect()
        };
        let starts = match &self.range.from {
            Position::Time(time) => self.offsets_at(*time, &partitions)?,
            from => bound(from),
        };
        let ends = bound(&self.range.to);
        let mut parts = Vec::new();
        let mut assign = TopicPartitionList::new();
        let mut total = 0i64;
        for (((topic, partition, _), start), end) in partitions.iter().zip(starts).zip(ends) {
            let done = start >= end;
            if !done {
                total += end - start;
                assign.add_partition_offset(topic, *partition, Offset::Offset(start))?;
            }
            parts.push(Part { topic: topic.clone(), partition: *partition, end, next: start, started: false, done });
        }
        info!(
            pipeline = %self.pipeline,
            from = %self.range.from,
            to = %self.range.to,
            partitions = assign.count(),
            at_most_records = total,
            "backfill range resolved"
        );
        let assigned: Vec<(String, i32)> =
            assign.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        telemetry().assigned(&self.pipeline, &assigned);
        self.consumer.assign(&assign).context("cannot assign the partitions of the range")?;
        Ok(parts)
    }

    /// After the end of `partition` (of any topic) was reached: the parts
    /// there whose position is past their end are done.
    fn reached_end(&self, parts: &mut [Part], partition: i32) {
        let Ok(positions) = self.consumer.position() else { return };
        for part in parts.iter_mut().filter(|p| p.partition == partition && !p.done) {
            if let Some(Offset::Offset(at)) = positions.find_partition(&part.topic, partition).map(|e| e.offset()) {
                if at >= part.end {
                    part.done = true;
                }
            }
        }
    }

    /// Waits so that the records delivered so far keep to `max_rate`.
    async fn throttle(&self, read: &Read) {
        let Some(rate) = self.range.max_rate.filter(|r| *r > 0) else { return };
        let due = Duration::from_secs_f64(read.delivered as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(read.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[async_trait]
impl Source for RangeSource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        let taken = self.read.lock().ok().and_then(|mut r| r.take());
        let mut read = match taken {
            Some(read) => read,
            None => {
                let parts = tokio::task::block_in_place(|| self.resolve())?;
                Read { parts, started: Instant::now(), delivered: 0 }
            }
        };
        self.throttle(&read).await;
        let parts = &mut read.parts;
        let mut batch = Vec::with_capacity(self.max_records);
        let mut topic = None;
        let mut deadline: Option<Instant> = None;
        let mut delay = Duration::from_millis(100);
        while batch.len() < self.max_records && parts.iter().any(|p| !p.done) {
            let wait = match deadline {
                // The first record is waited for as long as it takes.
                None => Duration::from_secs(3600),
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => break,
                },
            };
            let received = match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(received) => received,
                Err(_) => continue,
            };
            match received {
                Ok(m) => {
                    let Some(part) = parts.iter_mut().find(|p| *p.topic == *m.topic() && p.partition == m.partition())
                    else {
                        continue;
                    };
                    if part.admit(m.offset(), m.timestamp().to_millis(), &self.range) {
                        batch.push(super::source::to_record(&m, &mut topic));
                        deadline.get_or_insert_with(|| Instant::now() + self.max_wait);
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => self.reached_end(parts, partition),
                Err(error) => {
                    let error = crate::secrets::redact(&error.to_string());
                    warn!(pipeline = %self.pipeline, %error, retry_in = ?delay, "kafka consumer error; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.consumer.context().events.ok();
        read.delivered += batch.len() as u64;
        // What is left of each partition, as its lag (progress and ETA).
        for p in &read.parts {
            let left = if p.done { 0 } else { (p.end - p.next).max(0) };
            telemetry().set_lag(&self.pipeline, &p.topic, p.partition, left);
        }
        if read.parts.iter().all(|p| p.done) {
            let _ = self.consumer.unassign();
        }
        if let Ok(mut slot) = self.read.lock() {
            *slot = Some(read);
        }
        // Empty: every partition is read to its end.
        Ok(batch)
    }

    /// The sinks track what they have (the PostgreSQL sink's offsets
    /// table); the range commits nothing to a group.
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

    fn part(end: i64) -> Part {
        Part { topic: Arc::from("t"), partition: 0, end, next: 0, started: false, done: false }
    }

    fn range(from: Position, to: Position) -> Range {
        Range { from, to, max_rate: None }
    }

    #[test]
    fn a_range_starts_at_the_first_record_at_or_after_from_and_ends_before_the_first_at_or_after_to() {
        let (mut p, r) = (part(100), range(Position::Time(10), Position::Time(20)));
        // Before the start (a coarse time index started the read early).
        assert!(!p.admit(0, Some(5), &r));
        assert!(p.admit(1, Some(10), &r));
        // After the start, a late record is part of the range (Kafka's offsets).
        assert!(p.admit(2, Some(3), &r));
        assert!(p.admit(3, Some(19), &r));
        assert!(!p.admit(4, Some(20), &r));
        assert!(p.done);
        assert!(!p.admit(5, Some(15), &r), "the range has ended");
    }

    #[test]
    fn a_range_ends_at_its_end_offset() {
        let (mut p, r) = (part(3), range(Position::Earliest, Position::Latest));
        assert!(p.admit(1, None, &r));
        assert!(!p.done);
        assert!(p.admit(2, None, &r));
        assert!(p.done, "offset 2 was the last before 3");
        let (mut p, r) = (part(3), range(Position::Earliest, Position::Latest));
        assert!(!p.admit(7, None, &r), "past the end (a gap in the offsets)");
        assert!(p.done);
    }
}
