//! Sources: where a pipeline's records come from. Each is one folder
//! holding its config, its checks and its running part, listed once in
//! [`SourceConfig`]: [`kafka`] (a consumer group), [`websocket`] (a live
//! feed), [`file`] (lines of files, to replay a captured feed).

pub mod file;
pub mod kafka;
pub mod read;
pub mod websocket;

pub use read::{Position, Range, RunOptions};

use crate::connector::{Build, Check};
use crate::record::Record;
use async_trait::async_trait;
use std::sync::Arc;

crate::registry! {
    /// A source, chosen by `type`.
    pub enum SourceConfig: dyn Connector {
        "kafka" => Kafka(kafka::KafkaSourceConfig),
        "websocket" => WebSocket(websocket::WebSocketSourceConfig),
        "file" => File(file::FileSourceConfig),
    }
}

/// A source's config, as the rest of Sluice uses it.
pub trait Connector: Send + Sync {
    /// Checks the `[source]` table (what `sluice check` verifies) and
    /// resolves it (relative paths, a named connection).
    fn check(&mut self, cx: &mut Check<'_>);

    /// Whether the records can be read again after a crash or a restart
    /// (what exactly-once sinks rely on). Default: yes.
    fn replays(&self) -> bool {
        true
    }

    /// Whether the source can read a past range of its input and end there
    /// (`sluice backfill`, [`Range`]). Default: no, and a
    /// build with a range is refused.
    fn reads_ranges(&self) -> bool {
        false
    }

    /// The running source, for a pipeline starting, reading as `options` say.
    fn build(&self, cx: &Build<'_>, options: &RunOptions) -> anyhow::Result<Arc<dyn Source>>;
}

/// A source is shared by a pipeline's two stages: the transform stage reads
/// batches while the delivery stage commits the ones the sinks have.
#[async_trait]
pub trait Source: Send + Sync {
    /// The next batch: at least one record, at most the configured count,
    /// closed after the configured time. Waits while there is nothing to
    /// read. An empty batch means the input has ended (a file under
    /// `--until-eof`): the pipeline delivers what it has and stops.
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>>;

    /// Marks every record of `batch` as done (every sink has it), so that a
    /// restart resumes after them. Called once per batch, in order.
    async fn commit(&self, batch: &[Record]) -> anyhow::Result<()>;

    /// Waits until every commit made so far is durable (on shutdown).
    async fn flush_commits(&self) -> anyhow::Result<()>;

    /// Changes whenever the partitions this instance owns change (a
    /// consumer-group rebalance): keyed state loaded for the old
    /// assignment is then read again from its store.
    fn generation(&self) -> u64 {
        0
    }

    /// The partitions this instance owns now, when the source knows them
    /// before reading (a consumer group's assignment): their keyed state
    /// is restored on assignment, so that timers fire in a partition that
    /// stays quiet. Empty: a partition's state is restored when a batch
    /// first holds it.
    fn assignment(&self) -> Vec<(String, i32)> {
        Vec::new()
    }

    /// Whether the last batch closed because nothing more was waiting to be
    /// read (`Some(true)`: a partition missing from it has no record in
    /// hand, and event time may take it for idle while the others stay
    /// busy), or was full or timed out (`Some(false)`: a missing partition
    /// may have records waiting, and its idle time starts over). `None`
    /// when the source cannot tell: idle partitions then move on only when
    /// no batch comes.
    fn drained(&self) -> Option<bool> {
        None
    }
}

/// A batch's record count, by default.
pub(crate) fn default_batch_max_records() -> usize {
    1000
}

/// A batch's time, by default.
pub(crate) fn default_batch_max_ms() -> u64 {
    50
}
