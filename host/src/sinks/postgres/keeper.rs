//! `[state.postgres]`: a PostgreSQL database that keeps a pipeline's keyed
//! state with the source offsets it goes to, for a pipeline whose sinks
//! cannot keep it (Kafka, stdout, a postgres sink that is not exactly-once).
//!
//! Each batch's state changes and its partitions' positions commit in one
//! transaction there, once every sink has the batch (the delivery writes the
//! [`StateKeeper`] last). A restart restores each partition's state as of
//! that commit and skips the records it includes, so the state counts each
//! record once; a sink's writes between its own ack and the commit are
//! written again after a crash (at-least-once for the sinks).
//!
//! The commit is fenced: it goes through only if the store still holds
//! each of the batch's partitions at the offset the batch's state started
//! from, so an instance that lost a partition to another cannot commit
//! over the other's state.
//!
//! The tables are the exactly-once sink's: the offsets table, under the
//! sink name [`STATE_KEEPER`], and `sluice_state` beside it.

use super::client::{open, target, Server, ServerConfig, Target};
use super::sink::{check_fence, create_offsets_table, positions, quote_ident, stored_offsets, Positions};
use super::state::{create_state_table, state_table, PgStateStore, StateStatements};
use crate::connector::Check;
use crate::record::{Origin, OutputRef};
use crate::secrets::Secret;
use crate::sinks::{Refusals, Rejected, Sink};
use crate::state::{Delta, StateStore};
use anyhow::Context;
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::info;

/// The offsets table's `sink` column for positions a state store of its
/// own keeps (a sink's name cannot be mistaken for it: no sink writes it).
pub const STATE_KEEPER: &str = "[state]";

/// `[state.postgres]`: a PostgreSQL database of the state's own. Each
/// batch's state changes and source offsets commit there in one
/// transaction, once every sink has the batch.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresStateConfig {
    /// Connection string, as a URL (`postgres://user@host:5432/db?sslmode=verify-full`)
    /// or libpq's `key=value` form, with the postgres sink's TLS options.
    pub url: String,
    /// Password, when it is not in `url`: best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub password: Option<Secret>,
    /// TLS mode, as the postgres sink's `sslmode` (libpq's modes).
    pub sslmode: Option<String>,
    /// PEM file of the CA certificates to trust, or `system` (with `verify-full`).
    pub sslrootcert: Option<String>,
    /// PEM file of this client's certificate, for mutual TLS.
    pub sslcert: Option<String>,
    /// PEM file of this client's private key, for mutual TLS.
    pub sslkey: Option<String>,
    /// The table of the source offsets the state goes to (optionally
    /// `schema.table`), created if missing; the state goes in
    /// `sluice_state` beside it. Default: `sluice_offsets`.
    pub offsets_table: Option<String>,
}

impl ServerConfig for PostgresStateConfig {
    fn server(&self) -> Server<'_> {
        Server {
            url: &self.url,
            password: self.password.as_ref(),
            sslmode: &self.sslmode,
            sslrootcert: &self.sslrootcert,
            sslcert: &self.sslcert,
            sslkey: &self.sslkey,
        }
    }
}

impl PostgresStateConfig {
    /// Checks the connection options (what `sluice check` verifies).
    pub fn check(&self, cx: &mut Check<'_>) {
        if let Err(errors) = target(self, cx.dir()) {
            for e in errors {
                cx.error_at_first(&[&[e.option], &["url"]], e.message);
            }
        }
    }

    fn offsets_table(&self) -> String {
        self.offsets_table.clone().unwrap_or_else(|| "sluice_offsets".to_string())
    }

    /// The keeper of `pipeline`'s state; `dir` anchors relative certificate paths.
    pub fn build(&self, pipeline: &str, dir: &std::path::Path) -> anyhow::Result<Box<dyn Sink>> {
        let target = target(self, dir).map_err(|errors| {
            anyhow::anyhow!("{}", errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "))
        })?;
        let offsets_table = self.offsets_table();
        let state_table = state_table(&offsets_table);
        let store = Arc::new(PgStateStore {
            target: target.clone(),
            pipeline: pipeline.to_string(),
            sink: STATE_KEEPER.to_string(),
            offsets_table: offsets_table.clone(),
            state_table: state_table.clone(),
            client: Mutex::new(None),
        });
        Ok(Box::new(StateKeeper {
            pipeline: pipeline.to_string(),
            target,
            offsets_table,
            state_table,
            store,
            client: Mutex::new(None),
        }))
    }
}

/// Writes a pipeline's state changes and positions into a database of
/// their own: a [`Sink`] that takes no records, only
/// [`Sink::write_committed`].
pub struct StateKeeper {
    pipeline: String,
    target: Target,
    offsets_table: String,
    state_table: String,
    store: Arc<PgStateStore>,
    client: Mutex<Option<(Client, Prepared)>>,
}

/// The keeper's statements, prepared once per connection.
struct Prepared {
    /// Adds a row at offset 0 for each partition that has none.
    add: Statement,
    /// Locks and reads the batch's partitions' rows.
    lock: Statement,
    /// Moves them on (never back).
    advance: Statement,
    state: StateStatements,
    /// The partitions whose rows this connection has added (or found).
    added: std::collections::HashSet<(String, i32)>,
}

impl StateKeeper {
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
        let offsets = quote_ident(&self.offsets_table);
        let prepare = |sql: String| {
            let client = &client;
            async move {
                client.prepare(&sql).await.with_context(|| {
                    format!("cannot prepare the statements that move the offsets in {}", self.offsets_table)
                })
            }
        };
        let add = prepare(format!(
            "INSERT INTO {offsets} (pipeline, sink, topic, partition, next_offset) \
             SELECT $1, $2, t, p, 0 FROM unnest($3::text[], $4::int4[]) AS u(t, p) ON CONFLICT DO NOTHING"
        ))
        .await?;
        let lock = prepare(format!(
            "SELECT topic, partition, next_offset FROM {offsets} \
             WHERE pipeline = $1 AND sink = $2 AND topic = ANY($3) AND partition = ANY($4) FOR UPDATE"
        ))
        .await?;
        let advance = prepare(format!(
            "UPDATE {offsets} o SET next_offset = GREATEST(o.next_offset, u.n), updated_at = now() \
             FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, n) \
             WHERE o.pipeline = $1 AND o.sink = $2 AND o.topic = u.t AND o.partition = u.p"
        ))
        .await?;
        let state = StateStatements::prepare(&client, &self.state_table).await.with_context(|| {
            format!("cannot prepare the statements that write the state table {}", self.state_table)
        })?;
        info!(pipeline = %self.pipeline, endpoint = %self.target.endpoint, table = %self.state_table, "postgres state store connected");
        Ok((client, Prepared { add, lock, advance, state, added: Default::default() }))
    }

    /// One transaction, in two round trips: `BEGIN` and the lock of the
    /// batch's partitions' offsets; then, once the fence holds (each
    /// partition is where the batch's state started), the offsets' move,
    /// the changes and `COMMIT` together. Any error drops the connection
    /// (the server rolls back) and the delivery retries the batch; a broken
    /// fence is not retried ([`crate::state::Fenced`]).
    async fn commit(&self, client: &Client, prepared: &mut Prepared, delta: &Delta) -> anyhow::Result<()> {
        // Every partition of the batch: its position, or where its fence is.
        let Positions { topics, partitions, nexts } = positions(&[], Some(delta));
        let key: [&(dyn ToSql + Sync); 4] = [&self.pipeline, &STATE_KEEPER, &topics, &partitions];
        let held = || topics.iter().zip(&partitions).map(|(t, p)| (t.to_string(), *p));
        if held().any(|partition| !prepared.added.contains(&partition)) {
            client.execute(&prepared.add, &key).await?;
            prepared.added.extend(held());
        }
        let (begun, locked) = futures::join!(client.batch_execute("BEGIN"), client.query(&prepared.lock, &key));
        begun?;
        check_fence(Some(delta), &stored_offsets(&locked?))?;
        let advance: [&(dyn ToSql + Sync); 5] = [&self.pipeline, &STATE_KEEPER, &topics, &partitions, &nexts];
        let (moved, written, committed) = futures::join!(
            client.execute(&prepared.advance, &advance),
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
impl Sink for StateKeeper {
    async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        anyhow::ensure!(batch.is_empty(), "the state store takes no records ({} given)", batch.len());
        Ok(Vec::new())
    }

    fn state_store(&self) -> Option<Arc<dyn StateStore>> {
        Some(self.store.clone())
    }

    fn commits_positions(&self) -> bool {
        true
    }

    /// Commits `delta` (it takes no records, so it refuses none).
    async fn write_committed(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        delta: Option<&Delta>,
        _refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        self.write(batch, origins).await?;
        let Some(delta) = delta.filter(|delta| !delta.is_empty()) else {
            return Ok(Vec::new());
        };
        let mut guard = self.client.lock().await;
        // Out of the slot while it writes: a connection left mid-transaction
        // (an error, this future dropped) is not reused.
        let (client, mut prepared) = match guard.take() {
            Some(connection) if !connection.0.is_closed() => connection,
            _ => self.connect().await?,
        };
        self.commit(&client, &mut prepared, delta)
            .await
            .with_context(|| format!("cannot commit the state to {} ({})", self.state_table, self.target.endpoint))?;
        *guard = Some((client, prepared));
        Ok(Vec::new())
    }
}
