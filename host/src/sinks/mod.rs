//! Sinks: where a pipeline's outputs go. Each is one folder holding its
//! config, its checks, its client and its running part, listed once in
//! [`SinkConfig`]: [`kafka`] (an idempotent producer), [`postgres`] (rows,
//! exactly once), [`stdout`] (one value per line).

pub mod kafka;
pub mod postgres;
pub mod stdout;

use crate::connector::{Build, Check};
use crate::record::{Origin, OutputRef};
pub use crate::record::{Refusals, Rejected};
use crate::state::StateKeeper;
use async_trait::async_trait;
use futures::future::BoxFuture;

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

    /// Whether `a` and `b` name one target of this sink's server (a
    /// backfill must not write into the live one under another spelling).
    /// Default: when they are spelled alike. `dir` anchors relative paths.
    fn same_target<'a>(
        &'a self,
        a: &'a str,
        b: &'a str,
        dir: &'a std::path::Path,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        let _ = dir;
        Box::pin(async move { Ok(a == b) })
    }

    /// Whether the sink can keep the pipeline's keyed state with its data
    /// (`[state] sink = NAME`); the reason when it cannot.
    fn can_keep_state(&self) -> Result<(), String> {
        Err("it has no transactions; keep it in `[state.postgres]`".into())
    }

    /// The running sink `name`, for a pipeline starting.
    fn build(&self, name: &str, cx: &Build<'_>) -> anyhow::Result<Box<dyn Sink>>;
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

    /// Whether a write commits the source positions of its records with
    /// the data (an exactly-once sink): a restart then skips what it passed,
    /// so what it refuses must be kept (dead-lettered) before it commits,
    /// through [`Refusals`]. The pipeline writes such sinks after the others.
    fn commits_positions(&self) -> bool {
        false
    }

    /// The sink as a keeper of the pipeline's keyed state, if it can keep
    /// it with its data (an exactly-once PostgreSQL sink).
    fn state_keeper(&self) -> Option<&dyn StateKeeper> {
        None
    }

    /// [`Sink::write`] for a pipeline, with the refused records handed to
    /// `refusals` before anything commits past them. A sink that commits no
    /// positions returns its refusals for the caller to keep.
    async fn write_committed(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        let _ = refusals;
        self.write(batch, origins).await
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
    config.connector().build(name, &Build { pipeline, dir })
}
