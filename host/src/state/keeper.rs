//! What commits a batch's state ([`StateKeeper`]): the exactly-once
//! postgres sink, in the transaction of its rows and offsets, or a store of
//! the state's own (`[state.postgres]`, [`super::postgres::PgKeeper`]).

use super::store::{Delta, StateStore};
use crate::record::{Origin, OutputRef, Refusals, Rejected};
use async_trait::async_trait;
use std::sync::Arc;

/// Commits a batch's state changes with the source positions they go to,
/// fenced, in one step: the pipeline hands it each batch's [`Delta`] after
/// every other sink has the batch.
#[async_trait]
pub trait StateKeeper: Send + Sync {
    /// Where the state is read back from.
    fn store(&self) -> Arc<dyn StateStore>;

    /// Takes the pipeline's state on: a keeper that forgets its positions
    /// (a sink that creates its table anew) forgets the state with them.
    fn take_on(&self) {}

    /// Commits `delta` (the batch's state changes and its partitions'
    /// positions), only if each partition's stored position is still where
    /// its fence says ([`super::Fenced`] otherwise, not retried). A keeper
    /// that is also a sink writes `batch` (the outputs routed to it, read
    /// at `origins`) in the same transaction, and hands what it refuses to
    /// `refusals` before it commits; a keeper of its own takes no records.
    async fn commit(
        &self,
        delta: &Delta,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>>;
}
