//! The Kafka source: a consumer group with manual commits.
//!
//! Offsets are committed only for batches every sink has (see
//! [`Source::commit`]). When the group takes partitions away (another
//! instance joined, or this one leaves), the commits made so far are flushed
//! synchronously before the partitions go, so the next owner starts right
//! after the last delivered batch; batches still in flight are delivered but
//! their commits are refused by the group, so the next owner reads them again
//! (at-least-once; the PostgreSQL sink skips rows it already has).
//!
//! A subscribed topic that does not exist is named: while some subscribed
//! topic has no partition here and nothing arrives, the broker's topics are
//! looked up every [`TOPIC_CHECK`] until all are found; a missing one is one ERROR line and the
//! pipeline's `/health` reason, and once it exists the source subscribes
//! again, so it is read within seconds rather than at librdkafka's next
//! metadata refresh (5 minutes by default).

use super::{KafkaSourceConfig, OffsetReset};
use crate::clients::kafka::{client_config, is_connection_error, ClientEvents, Role};
use crate::record::{Bytes, Header, Origin, Record};
use crate::sources::Source;
use crate::telemetry::telemetry;
use anyhow::Context;
use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};

/// How often, while waiting for records, the subscribed topics are checked
/// for existence (only while one of them has no partition here).
pub const TOPIC_CHECK: Duration = Duration::from_secs(2);

/// Group events: logs assignments and failed commits, and flushes commits
/// before partitions are revoked.
pub struct GroupContext {
    pipeline: String,
    /// Connection errors, classified and logged once per interval.
    events: ClientEvents,
    /// The offsets of the last commit, repeated synchronously on revocation and shutdown.
    last_commit: Mutex<Option<TopicPartitionList>>,
    /// The partitions this instance owns now, as `topic/partition`.
    assignment: Arc<Mutex<Vec<(String, i32)>>>,
    /// Counts the rebalances ([`Source::generation`]).
    generation: std::sync::atomic::AtomicU64,
}

fn partitions(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

fn describe(list: &[(String, i32)]) -> String {
    list.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(",")
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.events.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.events.error(error, reason)
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    telemetry().set_lag(&self.pipeline, topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            info!(pipeline = %self.pipeline, partitions = %describe(&partitions(list)), "partitions revoked");
            if let Some(last) = self.last_commit.lock().ok().and_then(|mut l| l.take()) {
                if let Err(error) = consumer.commit(&last, CommitMode::Sync) {
                    warn!(pipeline = %self.pipeline, %error, "cannot flush offset commits before the revocation");
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(list) => {
                let now = partitions(list);
                info!(pipeline = %self.pipeline, partitions = %describe(&now), "partitions assigned");
                telemetry().assigned(&self.pipeline, &now);
                if let Ok(mut a) = self.assignment.lock() {
                    *a = now;
                }
            }
            Rebalance::Revoke(_) => {
                if let Ok(mut a) = self.assignment.lock() {
                    a.clear();
                }
                telemetry().assigned(&self.pipeline, &[]);
            }
            Rebalance::Error(error) => warn!(pipeline = %self.pipeline, %error, "consumer group rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // The batches are in the sinks; they will be read again (at-least-once).
            warn!(pipeline = %self.pipeline, %error, partitions = %describe(&partitions(offsets)), "offset commit refused");
            telemetry().error(&self.pipeline, &format!("offset commit refused: {error}"));
        }
    }
}

pub struct KafkaSource {
    consumer: StreamConsumer<GroupContext>,
    max_records: usize,
    max_wait: Duration,
    pipeline: String,
    topics: Vec<String>,
    /// The group is joined on the first read, not when the source is built:
    /// a pipeline restarting on reload builds its new source while the old
    /// one still runs, and two members of one group would split the partitions.
    subscribed: AtomicBool,
    /// The last batch closed with nothing more waiting ([`Source::drained`]).
    drained: AtomicBool,
    brokers: String,
    /// Subscribed topics the broker did not have at the last check.
    missing: Mutex<Vec<String>>,
    /// Every subscribed topic was found: no more checks (an instance of a
    /// group larger than a topic's partition count has none of them).
    topics_found: AtomicBool,
}

impl KafkaSource {
    pub fn new(config: &KafkaSourceConfig, group: &str, pipeline: &str) -> anyhow::Result<Self> {
        let mut client = client_config(config.brokers(), &config.properties);
        // Lag per partition for the metrics, once a second (overridable).
        if !config.properties.contains_key("statistics.interval.ms") {
            client.set("statistics.interval.ms", "1000");
        }
        client
            .set("group.id", group)
            .set("client.id", format!("sluice-{pipeline}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                match config.offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            );
        // An instance that restarts with the same id gets its partitions
        // back at once (static membership) instead of after a rebalance.
        if let Some(id) = config.instance_id.as_deref().filter(|id| !id.is_empty()) {
            client.set("group.instance.id", id);
        }
        let context = GroupContext {
            pipeline: pipeline.to_string(),
            events: ClientEvents::new(pipeline, Role::Source, config.brokers()),
            last_commit: Mutex::new(None),
            assignment: Arc::default(),
            generation: Default::default(),
        };
        let consumer: StreamConsumer<GroupContext> =
            client.create_with_context(context).context("cannot create the Kafka consumer")?;
        Ok(KafkaSource {
            consumer,
            topics: config.topics.clone(),
            subscribed: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            brokers: config.brokers().to_string(),
            missing: Mutex::default(),
            topics_found: AtomicBool::new(false),
            max_records: config.batch_max_records,
            max_wait: Duration::from_millis(config.batch_max_ms),
            pipeline: pipeline.to_string(),
        })
    }

    /// The partitions this instance owns now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumer.context().assignment.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn subscribe(&self) -> anyhow::Result<()> {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics).with_context(|| format!("cannot subscribe to {topics:?}"))
    }

    /// While a subscribed topic has no partition here, asks the broker which
    /// of them exist: names the missing ones, and subscribes again once they
    /// all exist.
    fn check_topics(&self) -> anyhow::Result<()> {
        let assigned = self.assignment();
        let was_missing = self.missing.lock().map(|m| !m.is_empty()).unwrap_or(false);
        let covered = self.topics.iter().all(|t| assigned.iter().any(|(a, _)| a == t));
        if self.topics_found.load(Ordering::Relaxed) || (!was_missing && covered) {
            return Ok(());
        }
        let metadata = match tokio::task::block_in_place(|| self.consumer.fetch_metadata(None, Duration::from_secs(5)))
        {
            Ok(metadata) => metadata,
            // The broker is down or slow: the client's own errors say so.
            Err(_) => return Ok(()),
        };
        let exists = |t: &str| metadata.topics().iter().any(|m| m.name() == t && m.error().is_none());
        let missing: Vec<String> = self.topics.iter().filter(|t| !exists(t)).cloned().collect();
        let Ok(mut known) = self.missing.lock() else { return Ok(()) };
        if missing.is_empty() {
            self.topics_found.store(true, Ordering::Relaxed);
        }
        if missing == *known {
            return Ok(());
        }
        if missing.is_empty() {
            info!(pipeline = %self.pipeline, topics = ?known, "the missing topics exist now: subscribing again");
            known.clear();
            drop(known);
            telemetry().source_ok(&self.pipeline);
            return self.subscribe();
        }
        let reason = format!(
            "subscribed topic{} {} do{} not exist on {}: create {} (e.g. `kafka-topics.sh --bootstrap-server {} --create --topic {}`), or fix `topics` in the pipeline file",
            if missing.len() > 1 { "s" } else { "" },
            missing.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", "),
            if missing.len() > 1 { "" } else { "es" },
            self.brokers,
            if missing.len() > 1 { "them" } else { "it" },
            self.brokers,
            missing[0],
        );
        error!(pipeline = %self.pipeline, topics = ?missing, "{reason}");
        telemetry().source_failed(&self.pipeline, &reason);
        *known = missing;
        Ok(())
    }
}

/// `topic` is the topic of the record before: its name is shared, not
/// allocated per record.
pub(super) fn to_record(m: &BorrowedMessage<'_>, topic: &mut Option<Arc<str>>) -> Record {
    let topic = match topic {
        Some(t) if **t == *m.topic() => t.clone(),
        _ => topic.insert(Arc::from(m.topic())).clone(),
    };
    Record {
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| Header { name: h.key.to_string(), value: h.value.map(<[u8]>::to_vec).unwrap_or_default() })
                    .collect()
            })
            .unwrap_or_default(),
        timestamp: m.timestamp().to_millis(),
        origin: Origin { topic, partition: m.partition(), offset: m.offset() },
        rejected: None,
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        if !self.subscribed.swap(true, Ordering::SeqCst) {
            self.subscribe()?;
        }
        let mut batch = Vec::with_capacity(self.max_records);
        let mut topic = None;
        // Wait as long as needed for the first record...
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u64;
        while batch.is_empty() {
            let received = tokio::select! {
                received = self.consumer.recv() => received,
                _ = tokio::time::sleep(TOPIC_CHECK) => {
                    self.check_topics()?;
                    continue;
                }
            };
            match received {
                Ok(m) => batch.push(to_record(&m, &mut topic)),
                Err(error) => {
                    // Logged on the first failure and then at each backoff
                    // doubling, so a lasting fault does not fill the log.
                    failures += 1;
                    if failures.is_power_of_two() && !is_connection_error(&error) {
                        let error = crate::secrets::redact(&error.to_string());
                        warn!(pipeline = %self.pipeline, %error, failures, retry_in = ?delay, "kafka consumer error; retrying");
                        telemetry().error(&self.pipeline, &format!("kafka consumer error: {error}"));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.consumer.context().events.ok();
        // ...then take what is ready, until the batch is full, nothing more
        // is waiting (a trickle goes out at once; a backlog, which
        // librdkafka prefetches, still fills whole batches) or its time is up.
        let deadline = std::time::Instant::now() + self.max_wait;
        let mut drained = false;
        while batch.len() < self.max_records && std::time::Instant::now() < deadline {
            match futures::FutureExt::now_or_never(self.consumer.recv()) {
                Some(Ok(m)) => batch.push(to_record(&m, &mut topic)),
                Some(Err(error)) => {
                    warn!(pipeline = %self.pipeline, %error, "kafka consumer error");
                    break;
                }
                None => {
                    drained = true;
                    break;
                }
            }
        }
        self.drained.store(drained, Ordering::SeqCst);
        Ok(batch)
    }

    async fn commit(&self, batch: &[Record]) -> anyhow::Result<()> {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for r in batch {
            let entry = next.entry((&*r.origin.topic, r.origin.partition)).or_insert(0);
            *entry = (*entry).max(r.origin.offset + 1);
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        // Asynchronous: librdkafka sends commits in order in the background,
        // so the next batch does not wait for a round trip. `flush_commits`
        // makes them durable on shutdown.
        self.consumer.commit(&list, CommitMode::Async).context("cannot commit consumer offsets")?;
        if let Ok(mut last) = self.consumer.context().last_commit.lock() {
            *last = Some(list);
        }
        Ok(())
    }

    async fn flush_commits(&self) -> anyhow::Result<()> {
        let last = self.consumer.context().last_commit.lock().ok().and_then(|mut l| l.take());
        match last {
            Some(list) => tokio::task::block_in_place(|| self.consumer.commit(&list, CommitMode::Sync))
                .context("cannot commit consumer offsets"),
            None => Ok(()),
        }
    }

    fn generation(&self) -> u64 {
        self.consumer.context().generation.load(Ordering::SeqCst)
    }

    fn drained(&self) -> Option<bool> {
        Some(self.drained.load(Ordering::SeqCst))
    }

    fn assignment(&self) -> Vec<(String, i32)> {
        KafkaSource::assignment(self)
    }
}
