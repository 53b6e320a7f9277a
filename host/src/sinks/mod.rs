//! Sinks: where a pipeline's outputs go. A new sink is one module
//! implementing [`Sink`]; [`build`] maps a sink's config to it.

pub mod kafka;
pub mod postgres;
pub mod stdout;

use crate::config::SinkConfig;
use crate::record::{Origin, OutputRef};
use async_trait::async_trait;

/// A record the sink can never write (e.g. a value that does not fit the
/// table): it goes to the dead-letter destination instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index in the batch given to [`Sink::write`].
    pub index: usize,
    pub reason: String,
}

#[async_trait]
pub trait Sink: Send + Sync {
    /// Writes `batch` and returns once the destination has durably accepted
    /// every record not rejected. An `Err` means nothing can be assumed
    /// written: the caller retries the whole batch (a sink that may have
    /// written part of it must not write that part twice, or says it is
    /// at-least-once). `origins[i]` is where the source record of `batch[i]`
    /// was read: an exactly-once sink stores it with the data. The outputs
    /// are views (of the plugin's results buffer, mostly): a sink that keeps
    /// bytes past the call copies them.
    async fn write(&self, batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>>;
}

/// Builds the sink `name` of `pipeline`, described by `config`; `dir` (the
/// pipeline file's folder) anchors the relative paths of certificate files.
pub async fn build(
    name: &str,
    config: &SinkConfig,
    pipeline: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Box<dyn Sink>> {
    Ok(match config {
        SinkConfig::Kafka(c) => Box::new(kafka::KafkaSink::new(c, name, pipeline)?),
        SinkConfig::Postgres(c) => Box::new(postgres::PostgresSink::new(c.clone(), name, pipeline, dir)?),
        SinkConfig::Stdout(_) => Box::new(stdout::StdoutSink),
    })
}
