//! Where a pipeline's state is kept ([`StateStore`]), and what a delivered
//! batch changes there ([`Delta`], fenced by [`Fenced`]).

use super::Partition;
use async_trait::async_trait;
use std::collections::HashMap;

/// A partition's state as its store holds it: the stored keys (see
/// [`super::stored`]: plugin entries, timers and the clock) and their values.
#[derive(Debug, Default)]
pub struct Loaded {
    pub entries: HashMap<Vec<u8>, Vec<u8>>,
    /// The offset after the last record the entries include: a record below
    /// it was applied (and its rows written) before.
    pub next_offset: i64,
}

/// Where a pipeline's state is kept: read per partition on assignment,
/// written with each batch (see [`super::StateKeeper`]).
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Stage `stage`'s entries for `partition`, and how far they go.
    async fn load(&self, stage: u32, partition: &Partition) -> anyhow::Result<Loaded>;

    /// Every stored key of the pipeline that `filter` lets through, in
    /// order (for `sluice state`).
    async fn scan(&self, filter: &Filter) -> anyhow::Result<Vec<Stored>>;

    /// The state versions ([`stored::VERSION`]) of stage `stage`'s
    /// partitions that hold entries, in every partition (those other
    /// instances own too).
    async fn versions(&self, stage: u32) -> anyhow::Result<std::collections::BTreeSet<u32>>;

    /// The stages (transform indices, from 0) the pipeline's store holds
    /// keys of.
    async fn stages(&self) -> anyhow::Result<std::collections::BTreeSet<u32>>;

    /// Moves stage `from`'s stored state to stage `to` (which must hold
    /// none), for a stage whose place in the chain changed; returns how
    /// many rows moved.
    async fn move_stage(&self, from: u32, to: u32) -> anyhow::Result<u64>;

    /// Deletes stage `stage`'s stored state; returns how many rows went.
    async fn drop_stage(&self, stage: u32) -> anyhow::Result<u64>;
}

/// Which stored keys [`StateStore::scan`] returns: `None` is any.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub stage: Option<u32>,
    pub partition: Option<i32>,
    /// A plugin key: its entry and its timers.
    pub key: Option<Vec<u8>>,
}

/// One stored key (see [`super::stored`]) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub stage: u32,
    pub partition: Partition,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// What one delivered batch changed, for the store: per stage and
/// partition, each key's new value (`None`: deleted), and every partition
/// of the batch with the offset after its last record (the store moves the
/// partition's stored offset there even when no row came of it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    pub changes: Vec<Change>,
    pub positions: Vec<(Partition, i64)>,
    /// The fence: every partition the batch holds (records or fired
    /// timers), with the offset its state went to before the batch. The
    /// store commits the batch only if it still holds each partition at
    /// that offset; else another instance committed the partition since
    /// this one read it ([`Fenced`]).
    pub fences: Vec<(Partition, i64)>,
}

/// A batch's state was computed from a partition's state that another
/// instance has moved on since (a consumer-group hand-over in which the
/// old owner's last batch committed after the new owner read the state):
/// committing it would apply records twice, or fire a timer again. The
/// batch is not committed; the pipeline starts again and reads the state
/// as committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the state of {topic}/{partition} was committed up to offset {stored} by another instance, and this batch was computed from it at offset {expected}: another instance owns the partition now (a rebalance)")]
pub struct Fenced {
    pub topic: String,
    pub partition: i32,
    pub expected: i64,
    pub stored: i64,
}

impl Delta {
    /// The first fence `stored` breaks: `stored` gives a partition's
    /// offset in the store (`None`: none stored, which is 0).
    pub fn fenced(&self, stored: impl Fn(&str, i32) -> Option<i64>) -> Option<Fenced> {
        self.fences.iter().find_map(|((topic, partition), expected)| {
            let stored = stored(topic, *partition).unwrap_or(0);
            (stored != *expected).then(|| Fenced {
                topic: topic.to_string(),
                partition: *partition,
                expected: *expected,
                stored,
            })
        })
    }
}

/// One stored key's change (see [`super::stored`] for the keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub stage: u32,
    pub partition: Partition,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Delta {
    /// [`Delta::fenced`] as a result.
    pub fn check(&self, stored: impl Fn(&str, i32) -> Option<i64>) -> Result<(), Fenced> {
        self.fenced(stored).map_or(Ok(()), Err)
    }

    /// Every partition the batch holds, as an offsets table takes them:
    /// where each goes (its position), and where each fenced one is.
    pub fn held(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.positions.iter().chain(&self.fences).map(|((topic, partition), n)| (&**topic, *partition, *n))
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.positions.is_empty() && self.fences.is_empty()
    }
}
