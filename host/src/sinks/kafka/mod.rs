//! The Kafka sink: an idempotent producer writing to one topic; keys,
//! headers and timestamps kept. Its client (properties, TLS, SASL, named
//! connections) is [`crate::clients::kafka`], shared with the Kafka source.
//!
//! - [`sink`]: the producer and its writes.

pub mod sink;

pub use sink::KafkaSink;

use super::{Connector, Sink};
use crate::connector::{Build, Check};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

/// `type = "kafka"`: an idempotent producer writing to one topic; keys,
/// headers and timestamps are kept.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, comma-separated. Give either `brokers` or `connection`.
    pub brokers: Option<String>,
    /// The named Kafka connection (`[connections.NAME]`) to write to.
    pub connection: Option<String>,
    /// Destination topic.
    pub topic: String,
    /// Compression of the batches written: `none`, `gzip`, `snappy`, `lz4`
    /// (default) or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// librdkafka producer properties passed through as they are, over the connection's.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSinkConfig {
    /// The bootstrap servers (after validation, also those of a connection).
    pub fn brokers(&self) -> &str {
        self.brokers.as_deref().unwrap_or_default()
    }
}

impl Connector for KafkaSinkConfig {
    fn check(&mut self, cx: &mut Check<'_>) {
        if self.topic.is_empty() {
            cx.error_at(&["topic"], "`topic` is empty");
        }
        crate::clients::kafka::resolve(cx, &mut self.brokers, &self.connection, &mut self.properties);
    }

    fn target(&self) -> Option<&str> {
        Some(&self.topic)
    }

    fn redirect(&mut self, target: &str) -> Option<String> {
        Some(std::mem::replace(&mut self.topic, target.to_string()))
    }

    fn build(&self, name: &str, cx: &Build<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(KafkaSink::new(self, name, cx.pipeline)?))
    }
}

/// A Kafka producer's compression codec (`compression.type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}
