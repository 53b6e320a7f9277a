//! Sinks: where a pipeline's outputs go. Each is one folder holding its
//! config, its checks, its client and its running part, listed once in
//! [`SinkConfig`]: [`kafka`] (an idempotent producer), [`postgres`] (rows,
//! exactly once), [`stdout`] (one value per line).

pub mod kafka;
pub mod postgres;
pub mod stdout;

use crate::connector::{Build, Check, RunOptions};
use crate::record::{Origin, OutputRef};
use crate::state::{Delta, StateStore};
use async_trait::async_trait;
use std::sync::Arc;

crate::registry! {
    /// A sink, chosen by `type`.
    pub enum SinkConfig: dyn Connector {
        "kafka" => Kafka(kafka::KafkaSinkConfig),
        "postgres" => Postgres(postgres::PostgresSinkConfig),
        "stdout" => Stdout(stdout::StdoutSinkConfig),
    }
}

/// The sinks a `[dead_letter]` may be: they keep any bytes, with the
/// headers that say why.
pub const DEAD_LETTER_KINDS: &[&str] = &["kafka", "stdout"];

impl SinkConfig {
    /// Whether this sink may be a pipeline's `[dead_letter]`.
    pub fn holds_dead_letters(&self) -> bool {
        DEAD_LETTER_KINDS.contains(&self.kind())
    }
}

/// A sink's config, as the rest of Sluice uses it.
pub trait Connector: Send + Sync {
    /// Checks the sink's table (what `sluice check` verifies) and resolves
    /// it (relative paths, a named connection).
    fn check(&mut self, cx: &mut Check<'_>);

    /// The table or topic the sink writes to; `None` for a sink with no
    /// target to point elsewhere (stdout), which a backfill leaves as it is.
    fn target(&self) -> Option<&str> {
        None
    }

    /// Points the sink at `target` instead of its own (a backfill writes
    /// beside the live pipeline); returns the live target. Only a sink
    /// with a [`Connector::target`] is asked.
    fn redirect(&mut self, target: &str) -> Option<String> {
        let _ = target;
        None
    }

    /// The running sink `name`, for a pipeline starting.
    fn build(&self, name: &str, cx: &Build<'_>) -> anyhow::Result<Box<dyn Sink>>;
}

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

    /// Where the pipeline's keyed state can be kept with this sink's data,
    /// if it can (an exactly-once PostgreSQL sink).
    fn state_store(&self) -> Option<Arc<dyn StateStore>> {
        None
    }

    /// Whether a write commits the source positions of its records with
    /// the data (an exactly-once sink): a restart then skips what it passed,
    /// so what it refuses must be kept (dead-lettered) before it commits,
    /// through [`Refusals`]. The pipeline writes such sinks after the others.
    fn commits_positions(&self) -> bool {
        false
    }

    /// Marks this sink as the one the pipeline's keyed state is kept with:
    /// the state goes with its positions (forgotten with them).
    fn keeps_state(&self) {}

    /// [`Sink::write`] for a pipeline: with `delta` (the batch's keyed-state
    /// changes and its partitions' positions, for the sink that keeps the
    /// state) made durable in the same step, and the refused records handed
    /// to `refusals` before anything commits past them. A sink that commits
    /// no positions returns its refusals for the caller to keep.
    async fn write_committed(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        delta: Option<&Delta>,
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        let _ = refusals;
        anyhow::ensure!(delta.is_none(), "this sink cannot keep state");
        self.write(batch, origins).await
    }
}

/// Where a sink that commits source positions with its data
/// ([`Sink::commits_positions`]) puts the records it refuses before it
/// commits: the pipeline's dead letters. An `Err` means they may not be
/// kept: the sink must not commit (the caller retries the batch).
#[async_trait]
pub trait Refusals: Send + Sync {
    async fn keep(&self, refused: &[Rejected]) -> anyhow::Result<()>;
}

/// No keeper: the refusals are returned to the caller only (tests, tools).
#[async_trait]
impl Refusals for () {
    async fn keep(&self, _refused: &[Rejected]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Builds the sink `name` of `pipeline` from `config`, as a pipeline
/// starting does; `dir` (the pipeline file's folder) anchors relative paths.
pub async fn build(
    name: &str,
    config: &SinkConfig,
    pipeline: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Box<dyn Sink>> {
    let options = RunOptions::default();
    config.connector().build(name, &Build { pipeline, dir, options: &options })
}
