//! Keyed state of stateful plugins (contract 0.3, `wit/0.3/transform.wit`).
//!
//! Each stateful stage of a pipeline has one [`StageState`]: per source
//! partition, the entries as of the batches handed to delivery, and the
//! source offset they include records up to. A plugin call reads through
//! its own changes, then those of earlier calls of the same batch, then the
//! entries; its writes land in the call's changes ([`CallState`]). A call
//! that faults is forgotten; a batch whose results are delivered is applied
//! ([`StageState::apply`]) and its [`Delta`] goes to the state's
//! [`StateKeeper`] (the exactly-once PostgreSQL sink, in the transaction of
//! the batch's rows and offsets, or `[state.postgres]`); a batch that is run
//! again (a rollback) is discarded.
//!
//! A partition is loaded from the store ([`StateStore::load`]) the first
//! time a batch holds it, and forgotten when the source's assignment
//! changes (a rebalance), so that it is read again as committed.
//!
//! # Layout
//! - [`store`]: the [`StateStore`] trait, and a batch's [`Delta`] and fence;
//! - [`keeper`]: the [`StateKeeper`] trait (commits a delta, fenced);
//! - [`stage`]: one stage's state in memory; [`call`]: one plugin call's;
//! - [`pipeline`]: every stage of a pipeline, restored and applied per batch;
//! - [`stored`]: how entries, timers and clocks are encoded in a store;
//! - [`time`]: event time, watermarks and timers; [`version`]: state versions;
//! - [`postgres`]: `[state.postgres]`, the PostgreSQL store and keeper;
//! - [`memory`]: a store and keeper in memory (`sluice plugin test`).

pub mod call;
pub mod keeper;
pub mod memory;
pub mod pipeline;
pub mod postgres;
pub mod stage;
pub mod store;
pub mod stored;
#[cfg(test)]
mod tests;
pub mod time;
pub mod version;

pub use call::{CallState, Unmigrated};
pub use keeper::StateKeeper;
pub use pipeline::{positions, PipelineState};
pub use stage::{lock, now_ms, SharedState, StageState};
pub use store::{Change, Delta, Fenced, Filter, Loaded, StateStore, Stored};
pub use version::StateVersion;

use std::sync::Arc;
use std::time::Duration;

/// A source partition: the scope of a stage's state.
pub type Partition = (Arc<str>, i32);

/// What a stateful stage may hold (`[transforms.limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLimits {
    /// Bytes of keys, values, timers and deadlines.
    pub bytes: usize,
    /// How long a key lives after its last write (processing time);
    /// `None`: for ever.
    pub ttl: Option<Duration>,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits { bytes: 256 << 20, ttl: None }
    }
}

/// Why a state call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state limit of {limit_mib} MiB reached (limits.state_mib): the stage's state would hold {bytes} bytes")]
    Limit { limit_mib: u64, bytes: usize },
    #[error("state call names record {index}, but the batch has {len} records")]
    NoRecord { index: u32, len: usize },
    #[error("this instance has no state")]
    Unavailable,
    #[error("set-timer needs event time: add [transforms.event_time] to the stage in the pipeline file")]
    NoEventTime,
    #[error("the state of {topic}/{partition} is version {from}, and this plugin keeps version {to} without a migrate from {from}")]
    NoMigrate { topic: String, partition: i32, from: u32, to: u32 },
    #[error("migrating the state of {topic}/{partition} from version {from} to {to} failed: {reason}")]
    Migrate { topic: String, partition: i32, from: u32, to: u32, reason: String },
}
