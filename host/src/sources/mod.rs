//! Sources: where a pipeline's records come from. A new source is one module
//! implementing [`Source`]: [`kafka`] (a consumer group), [`websocket`] (a live feed).

pub mod kafka;
pub mod websocket;

use crate::record::Record;
use async_trait::async_trait;

/// A source is shared by a pipeline's two stages: the transform stage reads
/// batches while the delivery stage commits the ones the sinks have.
#[async_trait]
pub trait Source: Send + Sync {
    /// The next batch: at least one record, at most the configured count,
    /// closed after the configured time. Waits while there is nothing to read.
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>>;

    /// Marks every record of `batch` as done (every sink has it), so that a
    /// restart resumes after them. Called once per batch, in order.
    async fn commit(&self, batch: &[Record]) -> anyhow::Result<()>;

    /// Waits until every commit made so far is durable (on shutdown).
    async fn flush_commits(&self) -> anyhow::Result<()>;
}
