//! The Kafka source: a consumer group over one or more topics, committing
//! offsets only once every sink has the batch. Its client (properties, TLS,
//! SASL, named connections) is [`crate::clients::kafka`], shared with the
//! Kafka sink.
//!
//! - [`source`]: the consumer, its batches, commits and topic checks;
//! - [`range`]: a bounded read of the same topics, for `sluice backfill`.

pub mod range;
pub mod source;

pub use source::KafkaSource;

use super::{Connector, RunOptions, Source};
use crate::connector::{Build, Check};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `type = "kafka"`: a consumer group over one or more topics.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`). Give
    /// either `brokers` or `connection`.
    pub brokers: Option<String>,
    /// The named Kafka connection (`[connections.NAME]`) to read from.
    pub connection: Option<String>,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id. Default: `sluice-<pipeline name>`. Instances sharing
    /// a group share the partitions.
    pub group: Option<String>,
    /// Static group membership: a stable id of this instance within the
    /// group (e.g. `"${HOSTNAME}"`), unique per running instance. An instance
    /// restarting with the same id gets its partitions back at once instead
    /// of after the group's session timeout. Unset: dynamic membership.
    pub instance_id: Option<String>,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    #[serde(default)]
    pub offset_reset: OffsetReset,
    /// A batch closes at this many records, as soon as no further record
    /// is ready (a trickle goes out at once)...
    #[serde(default = "crate::sources::default_batch_max_records")]
    pub batch_max_records: usize,
    /// ...or this many milliseconds after its first record, whichever comes first.
    #[serde(default = "crate::sources::default_batch_max_ms")]
    pub batch_max_ms: u64,
    /// librdkafka consumer properties passed through as they are
    /// (e.g. `"session.timeout.ms" = "10000"`), over the connection's. Sluice
    /// owns `enable.auto.commit` (always false): offsets are committed only
    /// after every sink has the batch.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSourceConfig {
    /// The bootstrap servers (after validation, also those of a connection).
    pub fn brokers(&self) -> &str {
        self.brokers.as_deref().unwrap_or_default()
    }
}

/// Where a consumer group without committed offsets starts.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

impl KafkaSourceConfig {
    /// The consumer group: configured, or `sluice-<pipeline>`.
    pub fn group_of(&self, pipeline: &str) -> String {
        self.group.clone().unwrap_or_else(|| format!("sluice-{pipeline}"))
    }
}

impl Connector for KafkaSourceConfig {
    fn reads_ranges(&self) -> bool {
        true
    }

    fn check(&mut self, cx: &mut Check<'_>) {
        crate::clients::kafka::resolve(cx, &mut self.brokers, &self.connection, &mut self.properties);
        if self.topics.is_empty() {
            cx.error("`topics` is empty");
        }
        cx.range("batch_max_records", self.batch_max_records as u64, 1..=crate::connector::MAX_BATCH_RECORDS);
        cx.range("batch_max_ms", self.batch_max_ms, 1..=600_000);
        if self.properties.contains_key("enable.auto.commit") {
            cx.error_at(
                &["properties", "enable.auto.commit"],
                "`enable.auto.commit` is Sluice's: offsets are committed after the sinks have the data",
            );
        }
    }

    fn build(&self, cx: &Build<'_>, options: &RunOptions) -> anyhow::Result<Arc<dyn Source>> {
        match &options.range {
            Some(range) => Ok(Arc::new(range::RangeSource::new(self, range, cx.pipeline)?)),
            None => Ok(Arc::new(KafkaSource::new(self, &self.group_of(cx.pipeline), cx.pipeline)?)),
        }
    }
}
