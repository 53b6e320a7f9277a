//! [`PgKeeper`]: commits a pipeline's state changes and positions into a
//! database of their own, in one fenced transaction per batch.

use super::store::state_table;
use super::store::{create_state_table, PgStateStore, StateStatements};
use super::STATE_KEEPER;
use crate::clients::postgres::offsets::{create_offsets_table, positions, OffsetStatements, Positions, StoredOffsets};
use crate::clients::postgres::{open, Target};
use crate::record::{Origin, OutputRef, Refusals, Rejected};
use crate::state::{Delta, StateKeeper, StateStore};
use anyhow::Context;
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tracing::info;

/// Keeps a pipeline's state in a database of its own (`[state.postgres]`):
/// a [`StateKeeper`] only, which takes no records.
pub struct PgKeeper {
    pipeline: String,
    target: Target,
    offsets_table: String,
    state_table: String,
    store: Arc<PgStateStore>,
    client: Mutex<Option<(Client, Prepared)>>,
}

/// The keeper's statements, prepared once per connection.
struct Prepared {
    offsets: OffsetStatements,
    state: StateStatements,
    /// The partitions whose rows this connection has added (or found).
    added: std::collections::HashSet<(String, i32)>,
}

impl PgKeeper {
    /// The keeper of `pipeline`'s state, with its offsets in `offsets_table`
    /// (unquoted) and the state beside it.
    pub fn new(target: Target, pipeline: &str, offsets_table: &str) -> Self {
        PgKeeper {
            pipeline: pipeline.to_string(),
            store: Arc::new(PgStateStore::new(target.clone(), pipeline, STATE_KEEPER, offsets_table)),
            target,
            offsets_table: offsets_table.to_string(),
            state_table: state_table(offsets_table),
            client: Mutex::new(None),
        }
    }

    async fn connect(&self) -> anyhow::Result<(Client, Prepared)> {
        let client = open(&self.target, &self.pipeline, "state store").await?;
        client
            .batch_execute("SELECT pg_advisory_lock(hashtext('sluice offsets table'))")
            .await
            .context("cannot lock the offsets table's creation")?;
        let created = create_offsets_table(&client, &self.offsets_table).await;
        client.batch_execute("SELECT pg_advisory_unlock(hashtext('sluice offsets table'))").await?;
        created?;
        create_state_table(&client, &self.state_table).await?;
        let offsets = OffsetStatements::prepare(&client, &self.offsets_table).await?;
        let state = StateStatements::prepare(&client, &self.state_table).await.with_context(|| {
            format!("cannot prepare the statements that write the state table {}", self.state_table)
        })?;
        info!(pipeline = %self.pipeline, endpoint = %self.target.endpoint, table = %self.state_table, "postgres state store connected");
        Ok((client, Prepared { offsets, state, added: Default::default() }))
    }

    /// One transaction, in two round trips: `BEGIN` and the lock of the
    /// batch's partitions' offsets; then, once the fence holds (each
    /// partition is where the batch's state started), the offsets' move,
    /// the changes and `COMMIT` together. Any error drops the connection
    /// (the server rolls back) and the delivery retries the batch; a broken
    /// fence is not retried ([`crate::state::Fenced`]).
    async fn commit_in(&self, client: &Client, prepared: &mut Prepared, delta: &Delta) -> anyhow::Result<()> {
        // Every partition of the batch: its position, or where its fence is.
        let Positions { topics, partitions, nexts } = positions(&[], delta.held());
        let key: [&(dyn ToSql + Sync); 4] = [&self.pipeline, &STATE_KEEPER, &topics, &partitions];
        let held = || topics.iter().zip(&partitions).map(|(t, p)| (t.to_string(), *p));
        if held().any(|partition| !prepared.added.contains(&partition)) {
            client.execute(&prepared.offsets.add, &key).await?;
            prepared.added.extend(held());
        }
        let (begun, locked) = futures::join!(client.batch_execute("BEGIN"), client.query(&prepared.offsets.lock, &key));
        begun?;
        let locked = locked?;
        let stored = StoredOffsets::read(&locked);
        delta.check(|topic, partition| stored.get(topic, partition))?;
        let advance: [&(dyn ToSql + Sync); 5] = [&self.pipeline, &STATE_KEEPER, &topics, &partitions, &nexts];
        let (moved, written, committed) = futures::join!(
            client.execute(&prepared.offsets.advance, &advance),
            async {
                if delta.changes.is_empty() {
                    return Ok(());
                }
                prepared.state.write(client, &self.pipeline, delta).await
            },
            client.batch_execute("COMMIT")
        );
        moved?;
        written?;
        committed?;
        Ok(())
    }
}

#[async_trait]
impl StateKeeper for PgKeeper {
    fn store(&self) -> Arc<dyn StateStore> {
        self.store.clone()
    }

    /// Commits `delta`; it takes no records, so it refuses none.
    async fn commit(
        &self,
        delta: &Delta,
        batch: &[OutputRef<'_>],
        _origins: &[&Origin],
        _refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        anyhow::ensure!(batch.is_empty(), "the state store takes no records ({} given)", batch.len());
        if delta.is_empty() {
            return Ok(Vec::new());
        }
        let mut guard = self.client.lock().await;
        // Out of the slot while it writes: a connection left mid-transaction
        // (an error, this future dropped) is not reused.
        let (client, mut prepared) = match guard.take() {
            Some(connection) if !connection.0.is_closed() => connection,
            _ => self.connect().await?,
        };
        self.commit_in(&client, &mut prepared, delta)
            .await
            .with_context(|| format!("cannot commit the state to {} ({})", self.state_table, self.target.endpoint))?;
        *guard = Some((client, prepared));
        Ok(Vec::new())
    }
}
