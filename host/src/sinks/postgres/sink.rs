//! Connection handling, table creation, the binary COPY and the offsets
//! that make it exactly-once.
//!
//! With `exactly_once` (the default) every batch is one transaction that
//! (1) locks the rows of `sluice_offsets` for the batch's partitions,
//! (2) drops the outputs whose source offset is below the stored one (they
//! were committed before: the source read them again after a crash, restart
//! or rebalance), (3) COPYs the rest and (4) moves the stored offsets past the
//! batch. A retry after an ambiguous COMMIT (connection lost while
//! committing) therefore writes nothing twice, and two instances briefly
//! owning one partition during a rebalance are serialised by the row locks.
//!
//! A batch costs two round trips to the server, with statements prepared
//! once per connection: `BEGIN`, the offsets' lock, read and move (the move
//! does not depend on what the lock reads) and the COPY's start go out
//! together; then the rows, the COPY's end and `COMMIT`. A partition the
//! offsets table has no row for yet costs four more, once. (It took eleven,
//! each statement parsed again for every batch: 3.6 ms per batch at p50,
//! on the latency bench, instead of 2.1 with four.)

use super::rows::{excerpt, pg_type, Rows};
use super::{Merge, PostgresSinkConfig};
use crate::clients::postgres::offsets::{
    create_offsets_table, positions, quote_ident, OffsetStatements, Positions, StoredOffsets,
};
use crate::clients::postgres::{open, target, Target};
use crate::record::{Origin, OutputRef, Refusals, Rejected};
use crate::sinks::Sink;
use crate::state::postgres::{create_state_table, state_table, PgStateStore, StateStatements};
use crate::state::{Delta, StateKeeper, StateStore};
use anyhow::Context;
use async_trait::async_trait;
use futures::pin_mut;

use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::DbError;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

pub struct PostgresSink {
    config: PostgresSinkConfig,
    pipeline: String,
    /// The sink's name in the pipeline: with the pipeline, the key of its offsets.
    name: String,
    /// The quoted offsets table, when exactly-once.
    offsets: Option<String>,
    /// Where the server is and how to reach it (TLS).
    target: Target,
    /// The connection with its prepared statements, opened on first use and
    /// reopened after a failure.
    client: Mutex<Option<(Client, Prepared)>>,
    types: Vec<Type>,
    table: String,
    column_list: String,
    /// Where plugins' keyed state is read back from, when exactly-once.
    state_store: Arc<PgStateStore>,
    /// Whether the pipeline's keyed state is kept with this sink's offsets
    /// ([`StateKeeper::take_on`]): forgotten with them.
    keeps_state: std::sync::atomic::AtomicBool,
}

impl PostgresSink {
    /// The sink `name` of `pipeline`; `dir` anchors relative certificate paths.
    pub fn new(config: PostgresSinkConfig, name: &str, pipeline: &str, dir: &std::path::Path) -> anyhow::Result<Self> {
        let target = target(&config, dir).map_err(|errors| {
            anyhow::anyhow!("{}", errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "))
        })?;
        let types = config.columns.iter().map(|c| pg_type(c.kind)).collect();
        let table = quote_ident(&config.table);
        let column_list = config.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let offsets = config.exactly_once.then(|| quote_ident(&offsets_table(&config)));
        // Read only when the sink keeps state (exactly-once): it connects on first use.
        let state_store = Arc::new(PgStateStore::new(target.clone(), pipeline, name, &offsets_table(&config)));
        Ok(PostgresSink {
            config,
            pipeline: pipeline.to_string(),
            name: name.to_string(),
            offsets,
            target,
            client: Mutex::new(None),
            types,
            table,
            column_list,
            state_store,
            keeps_state: Default::default(),
        })
    }

    async fn connect(&self) -> anyhow::Result<(Client, Prepared)> {
        let mut client = open(&self.target, &self.pipeline, "sink").await?;
        self.prepare_tables(&mut client).await?;
        // A column the table lacks shows here, once per connection.
        let prepared = self
            .prepare_statements(&client)
            .await
            .with_context(|| format!("cannot prepare the statements that write {}", self.config.table))?;
        info!(pipeline = %self.pipeline, table = %self.config.table, endpoint = %self.target.endpoint, "postgres sink connected");
        Ok((client, prepared))
    }

    /// The statements every batch runs, prepared once for the connection.
    async fn prepare_statements(&self, client: &Client) -> anyhow::Result<Prepared> {
        let target = if self.config.upsert_key.is_empty() {
            self.table.clone()
        } else {
            // The staging table lives as long as the connection.
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS sluice_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                    self.table
                ))
                .await?;
            "sluice_stage".to_string()
        };
        let copy = client.prepare(&format!("COPY {target} ({}) FROM STDIN (FORMAT binary)", self.column_list)).await?;
        let offsets = match &self.offsets {
            None => None,
            Some(_) => Some(OffsetStatements::prepare(client, &offsets_table(&self.config)).await?),
        };
        let merge = if self.config.upsert_key.is_empty() {
            None
        } else if self.config.aggregates() {
            Some(self.aggregating_merge())
        } else {
            let updates: Vec<String> = self
                .config
                .columns
                .iter()
                .filter(|c| !self.config.upsert_key.contains(&c.name))
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
                .collect();
            let action =
                if updates.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", updates.join(", ")) };
            Some(format!(
                "INSERT INTO {} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM sluice_stage ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) DO {action}",
                self.table,
                cols = self.column_list,
                keys = self.key_list(),
            ))
        };
        let commit = merge.as_ref().map_or_else(|| "COMMIT".to_string(), |merge| format!("{merge}; COMMIT"));
        Ok(Prepared { copy, offsets, commit, merge, state: None })
    }

    /// Creates the table (with `create_table`) and the offsets table (with
    /// `exactly_once`) in one transaction, under an advisory lock so that
    /// instances starting together agree on who created the table. Offsets
    /// stored for this pipeline and sink belong to the rows of an older table
    /// of that name when this call creates the table: they are forgotten, or
    /// every replayed row would be skipped as already written.
    async fn prepare_tables(&self, client: &mut Client) -> anyhow::Result<()> {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('sluice table ' || $1))", &[&self.table]).await?;
        let mut created = false;
        if self.config.create_table {
            created = tx.query_one("SELECT to_regclass($1) IS NULL", &[&self.table]).await?.get(0);
            tx.batch_execute(&self.create_table_sql())
                .await
                .with_context(|| format!("cannot create table {}", self.config.table))?;
        }
        if let Some(offsets) = &self.offsets {
            let name = offsets_table(&self.config);
            create_offsets_table(&tx, &name).await?;
            if created {
                let forgotten = tx
                    .execute(
                        &format!("DELETE FROM {offsets} WHERE pipeline = $1 AND sink = $2"),
                        &[&self.pipeline, &self.name],
                    )
                    .await?;
                // The plugins' state goes to those offsets, when it is kept
                // with this sink (and only then: another sink's table is no
                // reason to forget it).
                if forgotten > 0 && self.keeps_state.load(std::sync::atomic::Ordering::Relaxed) {
                    let state = state_table(&offsets_table(&self.config));
                    let has_state: bool = tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&state]).await?.get(0);
                    if has_state {
                        tx.execute(
                            &format!("DELETE FROM {} WHERE pipeline = $1", quote_ident(&state)),
                            &[&self.pipeline],
                        )
                        .await?;
                    }
                }
                if forgotten > 0 {
                    info!(
                        pipeline = %self.pipeline, sink = %self.name, table = %self.config.table, partitions = forgotten,
                        "created the table: forgot the source offsets stored with the rows of the old one (and the plugins' state)"
                    );
                }
            }
        }
        tx.commit().await.with_context(|| format!("cannot prepare table {}", self.config.table))?;
        Ok(())
    }

    fn create_table_sql(&self) -> String {
        let mut sql = String::new();
        if let Some((schema, _)) = self.config.table.rsplit_once('.') {
            sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)));
        }
        let mut defs: Vec<String> =
            self.config.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), c.kind.sql())).collect();
        if !self.config.upsert_key.is_empty() {
            defs.push(format!("PRIMARY KEY ({})", self.key_list()));
        }
        sql.push_str(&format!("CREATE TABLE IF NOT EXISTS {} ({});", self.table, defs.join(", ")));
        sql
    }

    /// The merge of an aggregating upsert: the staged rows of a batch are
    /// aggregated per key (each column by its `merge`), then combined with
    /// the stored row the same way. Both steps are associative, so a batch
    /// written in parts (a refused row sifted out) gives the same row.
    fn aggregating_merge(&self) -> String {
        let mut select = Vec::new();
        let mut updates = Vec::new();
        for c in &self.config.columns {
            let col = quote_ident(&c.name);
            if self.config.upsert_key.contains(&c.name) {
                select.push(col);
                continue;
            }
            let by = c.by.as_deref().map(quote_ident).unwrap_or_default();
            let (staged, combined) = match c.merge {
                Merge::Replace => (format!("(array_agg({col} ORDER BY ctid DESC))[1]"), format!("EXCLUDED.{col}")),
                Merge::Sum => {
                    (format!("sum({col})"), format!("COALESCE(sluice_old.{col} + EXCLUDED.{col}, sluice_old.{col}, EXCLUDED.{col})"))
                }
                Merge::Min => (format!("min({col})"), format!("LEAST(sluice_old.{col}, EXCLUDED.{col})")),
                Merge::Max => (format!("max({col})"), format!("GREATEST(sluice_old.{col}, EXCLUDED.{col})")),
                Merge::First => (
                    format!("(array_agg({col} ORDER BY {by} ASC NULLS LAST, {col} ASC NULLS LAST))[1]"),
                    format!(
                        "CASE WHEN sluice_old.{by} IS NULL OR EXCLUDED.{by} < sluice_old.{by} OR (EXCLUDED.{by} = sluice_old.{by} AND EXCLUDED.{col} < sluice_old.{col}) \
                         THEN EXCLUDED.{col} ELSE sluice_old.{col} END"
                    ),
                ),
                Merge::Last => (
                    format!("(array_agg({col} ORDER BY {by} DESC NULLS LAST, {col} DESC NULLS LAST))[1]"),
                    format!(
                        "CASE WHEN sluice_old.{by} IS NULL OR EXCLUDED.{by} > sluice_old.{by} OR (EXCLUDED.{by} = sluice_old.{by} AND EXCLUDED.{col} > sluice_old.{col}) \
                         THEN EXCLUDED.{col} ELSE sluice_old.{col} END"
                    ),
                ),
                Merge::WeightedMean => (
                    format!("sum({col} * {by}) / NULLIF(sum({by}), 0)"),
                    format!(
                        "CASE WHEN COALESCE(sluice_old.{by}, 0) + COALESCE(EXCLUDED.{by}, 0) = 0 THEN EXCLUDED.{col} \
                         ELSE (COALESCE(sluice_old.{col} * sluice_old.{by}, 0) + COALESCE(EXCLUDED.{col} * EXCLUDED.{by}, 0)) \
                         / (COALESCE(sluice_old.{by}, 0) + COALESCE(EXCLUDED.{by}, 0)) END"
                    ),
                ),
            };
            select.push(format!("{staged} AS {col}"));
            updates.push(format!("{col} = {combined}"));
        }
        let action =
            if updates.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", updates.join(", ")) };
        format!(
            "INSERT INTO {} AS sluice_old ({}) SELECT {} FROM sluice_stage GROUP BY {keys} ON CONFLICT ({keys}) DO {action}",
            self.table,
            self.column_list,
            select.join(", "),
            keys = self.key_list(),
        )
    }

    fn key_list(&self) -> String {
        self.config.upsert_key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
    }

    /// Writes `rows` (from the records at `origins`) in one transaction;
    /// returns how many were skipped as written before.
    ///
    /// Two round trips: `BEGIN`, the offsets' lock, read and move, and the
    /// COPY's start go out together; the rows, the COPY's end (with an
    /// upsert's merge) and `COMMIT` go out together. tokio-postgres sends
    /// requests in the order they are first polled and answers them in that
    /// order; an error aborts the transaction, so the statements after it fail
    /// or (`COMMIT`) roll back. Without a `Transaction` guard: any error drops
    /// the connection (the caller's), and the server rolls back.
    async fn copy(
        &self,
        client: &Client,
        prepared: &Prepared,
        rows: &Rows<'_>,
        origins: &[&Origin],
        delta: Option<&Delta>,
    ) -> anyhow::Result<usize> {
        let mut keep = vec![true; rows.len()];
        let Positions { topics, partitions, nexts } = positions(origins, delta.into_iter().flat_map(Delta::held));
        let key: [&(dyn ToSql + Sync); 4] = [&self.pipeline, &self.name, &topics, &partitions];
        let advance: [&(dyn ToSql + Sync); 5] = [&self.pipeline, &self.name, &topics, &partitions, &nexts];
        let sink = match &prepared.offsets {
            None => {
                let (begun, sink) = futures::join!(client.batch_execute("BEGIN"), client.copy_in(&prepared.copy));
                begun?;
                sink?
            }
            Some(statements) => {
                let mut added = false;
                loop {
                    // Lock the partitions' rows, read them, move them past the batch.
                    let (begun, locked, moved, sink) = futures::join!(
                        client.batch_execute("BEGIN"),
                        client.query(&statements.lock, &key),
                        client.execute(&statements.advance, &advance),
                        client.copy_in(&prepared.copy)
                    );
                    begun?;
                    let (locked, moved, sink) = (locked?, moved?, sink?);
                    if moved < topics.len() as u64 {
                        anyhow::ensure!(!added, "the offsets table {} holds {moved} of this batch's {} partitions right after adding them: is something deleting its rows?", self.offsets.as_deref().unwrap_or_default(), topics.len());
                        // A partition new to the offsets table: end the empty
                        // COPY and the transaction, add the partition's row,
                        // and start over (once per partition).
                        let empty = BinaryCopyInWriter::new(sink, &self.types);
                        pin_mut!(empty);
                        empty.finish().await?;
                        client.batch_execute("ROLLBACK").await?;
                        client.execute(&statements.add, &key).await?;
                        added = true;
                        continue;
                    }
                    let stored = StoredOffsets::read(&locked);
                    check_fence(delta, &stored)?;
                    mark_written(&mut keep, origins, &stored);
                    break sink;
                }
            }
        };
        // The rows (those marked in `keep`) into the table, or for upserts
        // the staging table merged into it.
        let writer = BinaryCopyInWriter::new(sink, &self.types);
        pin_mut!(writer);
        put_rows(writer.as_mut(), rows, (0..rows.len()).filter(|&i| keep[i])).await?;
        crate::crash::point("postgres-before-commit");
        let (copied, state, committed) = futures::join!(
            writer.finish(),
            self.write_state(client, prepared, delta),
            client.batch_execute(&prepared.commit)
        );
        copied?;
        state?;
        committed?;
        crate::crash::point("postgres-committed");
        Ok(keep.iter().filter(|k| !**k).count())
    }

    /// The batch again, after PostgreSQL refused a value in it: one
    /// transaction, like [`Self::copy`]'s, in which ranges of rows are
    /// written under a savepoint, and a range PostgreSQL refuses is halved
    /// until each refused row stands alone. Returns how many rows were
    /// skipped as written before, and the refused rows (indices in `rows`)
    /// with PostgreSQL's reason (indexed in the batch: `row_index[row]`),
    /// handed to `refusals` before the commit. About
    /// 2·k·log2(n) round trips for k refused rows of n; the conversion
    /// refuses what it can know beforehand, so this path is rare.
    #[allow(clippy::too_many_arguments)]
    async fn copy_sifting(
        &self,
        client: &Client,
        prepared: &Prepared,
        rows: &Rows<'_>,
        origins: &[&Origin],
        row_index: &[usize],
        delta: Option<&Delta>,
        refusals: &dyn Refusals,
    ) -> anyhow::Result<(usize, Vec<Rejected>)> {
        let Positions { topics, partitions, nexts } = positions(origins, delta.into_iter().flat_map(Delta::held));
        let key: [&(dyn ToSql + Sync); 4] = [&self.pipeline, &self.name, &topics, &partitions];
        let advance: [&(dyn ToSql + Sync); 5] = [&self.pipeline, &self.name, &topics, &partitions, &nexts];
        let mut keep = vec![true; rows.len()];
        if let Some(statements) = &prepared.offsets {
            client.execute(&statements.add, &key).await?;
        }
        client.batch_execute("BEGIN").await?;
        if let Some(statements) = &prepared.offsets {
            let locked = client.query(&statements.lock, &key).await?;
            let stored = StoredOffsets::read(&locked);
            check_fence(delta, &stored)?;
            client.execute(&statements.advance, &advance).await?;
            mark_written(&mut keep, origins, &stored);
        }
        let kept: Vec<usize> = (0..rows.len()).filter(|&i| keep[i]).collect();
        let mut sifted = Vec::new();
        // Ranges of `kept` still to write, the next one last (so the rows
        // keep their order: an upsert's last row per key wins).
        let mut ranges = Vec::new();
        ranges.push(0..kept.len());
        while let Some(range) = ranges.pop() {
            if range.is_empty() {
                continue;
            }
            client.batch_execute("SAVEPOINT sluice_rows").await?;
            match self.write_rows(client, prepared, rows, &kept[range.clone()]).await {
                Ok(()) => client.batch_execute("RELEASE SAVEPOINT sluice_rows").await?,
                Err(error) => {
                    let reason = refused_data(&error).map(refused_reason).ok_or(error)?;
                    client.batch_execute("ROLLBACK TO SAVEPOINT sluice_rows").await?;
                    if range.len() == 1 {
                        sifted.push(Rejected { index: row_index[kept[range.start]], reason });
                    } else {
                        let mid = range.start + range.len() / 2;
                        ranges.push(mid..range.end);
                        ranges.push(range.start..mid);
                    }
                }
            }
        }
        self.write_state(client, prepared, delta).await?;
        // The offsets about to commit pass the refused records: they are
        // dead-lettered first (a crash between the two writes them again).
        if !sifted.is_empty() {
            refusals.keep(&sifted).await.context("cannot dead-letter the rows PostgreSQL refuses")?;
        }
        crate::crash::point("postgres-before-commit");
        client.batch_execute("COMMIT").await?;
        crate::crash::point("postgres-committed");
        Ok((rows.len() - kept.len(), sifted))
    }

    /// The batch's keyed-state changes, in the transaction under way.
    async fn write_state(
        &self,
        client: &Client,
        prepared: &Prepared,
        delta: Option<&Delta>,
    ) -> Result<(), tokio_postgres::Error> {
        match (delta, &prepared.state) {
            (Some(delta), Some(statements)) if !delta.changes.is_empty() => {
                statements.write(client, &self.pipeline, delta).await
            }
            _ => Ok(()),
        }
    }

    /// COPYs rows `which` of `rows` (an upsert's merged, and its staging
    /// table emptied for the next range).
    async fn write_rows(
        &self,
        client: &Client,
        prepared: &Prepared,
        rows: &Rows<'_>,
        which: &[usize],
    ) -> anyhow::Result<()> {
        let writer = BinaryCopyInWriter::new(client.copy_in(&prepared.copy).await?, &self.types);
        pin_mut!(writer);
        put_rows(writer.as_mut(), rows, which.iter().copied()).await?;
        writer.finish().await?;
        if let Some(merge) = &prepared.merge {
            client.batch_execute(&format!("{merge}; DELETE FROM sluice_stage")).await?;
        }
        Ok(())
    }
}

/// Writes rows `which` of `rows` into a COPY.
async fn put_rows(
    mut writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    rows: &Rows<'_>,
    which: impl Iterator<Item = usize>,
) -> Result<(), tokio_postgres::Error> {
    let mut refs: Vec<&(dyn ToSql + Sync)> = Vec::new();
    for i in which {
        refs.clear();
        refs.extend(rows.row(i).iter().map(|c| c as &(dyn ToSql + Sync)));
        writer.as_mut().write(&refs).await?;
    }
    Ok(())
}

/// Clears `keep` for the rows whose offsets are below the ones stored:
/// written before.
fn mark_written(keep: &mut [bool], origins: &[&Origin], stored: &StoredOffsets<'_>) {
    for (keep, o) in keep.iter_mut().zip(origins) {
        // A fired timer's output (offset -1) is written once by the state:
        // the timer is deleted in the transaction that writes it.
        *keep = !o.is_source() || o.offset >= stored.get(&o.topic, o.partition).unwrap_or(0);
    }
}

/// The error PostgreSQL gave for a row it refuses, if that is what `error`
/// is: no retry can write that row. What an error means for the batch is
/// told by its SQLSTATE class:
/// - data: 22 (data exception), 23 (integrity constraint violation), P0 (a
///   PL/pgSQL `RAISE`, as a trigger that checks rows does) and 54 (a
///   program limit, e.g. an index row too large): the rows PostgreSQL
///   refuses are sifted out and dead-lettered, the rest committed;
/// - anything else (the server unreachable or restarting, a missing table
///   or privilege): the batch is written again later, with back-off, and
///   the sink is reported failing until it goes through.
fn refused_data(error: &anyhow::Error) -> Option<&DbError> {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .filter_map(tokio_postgres::Error::as_db_error)
        .find(|db| matches!(db.code().code().get(..2), Some("22" | "23" | "P0" | "54")))
}

/// A refused row's reason: PostgreSQL's message, code, column and detail.
fn refused_reason(db: &DbError) -> String {
    let mut reason =
        format!("postgres sink: PostgreSQL refused the row: {} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(column) = db.column() {
        reason.push_str(&format!(", column {column:?}"));
    }
    if let Some(place) = db.where_() {
        reason.push_str(&format!(" [{}]", excerpt(place, 200)));
    }
    if let Some(detail) = db.detail() {
        reason.push_str(&format!(": {}", excerpt(detail, 200)));
    }
    reason
}

/// A connection's prepared statements.
struct Prepared {
    /// The binary COPY into the table (or, for upserts, the staging table).
    copy: Statement,
    offsets: Option<OffsetStatements>,
    /// `COMMIT`, after an upsert's merge of the staging table.
    commit: String,
    /// An upsert's merge of the staging table into the table.
    merge: Option<String>,
    /// The state changes' statements, prepared on the first batch with changes.
    state: Option<StateStatements>,
}

/// The offsets table's name: as configured, else `sluice_offsets` beside the table.
fn offsets_table(config: &PostgresSinkConfig) -> String {
    match (&config.offsets_table, config.table.rsplit_once('.')) {
        (Some(name), _) => name.clone(),
        (None, Some((schema, _))) => format!("{schema}.sluice_offsets"),
        (None, None) => "sluice_offsets".to_string(),
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn write(&self, batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        self.write_batch(batch, origins, None, &()).await
    }

    fn commits_positions(&self) -> bool {
        self.offsets.is_some()
    }

    fn state_keeper(&self) -> Option<&dyn StateKeeper> {
        self.offsets.is_some().then_some(self as &dyn StateKeeper)
    }

    async fn write_committed(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        self.write_batch(batch, origins, None, refusals).await
    }
}

/// An exactly-once sink keeps the pipeline's state in the transactions of
/// its rows and offsets.
#[async_trait]
impl StateKeeper for PostgresSink {
    fn store(&self) -> Arc<dyn StateStore> {
        self.state_store.clone()
    }

    fn take_on(&self) {
        self.keeps_state.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn commit(
        &self,
        delta: &Delta,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        self.write_batch(batch, origins, Some(delta), refusals).await
    }
}

/// Refuses a batch whose state was computed from a partition's state that
/// another instance has committed past since ([`crate::state::Fenced`]):
/// `stored` is read under lock, before anything moved it.
fn check_fence(delta: Option<&Delta>, stored: &StoredOffsets<'_>) -> Result<(), crate::state::Fenced> {
    delta.map_or(Ok(()), |delta| delta.check(|topic, partition| stored.get(topic, partition)))
}

impl PostgresSink {
    /// Writes `batch` (and `delta`, the batch's state changes) in one
    /// transaction; what it refuses goes to `refusals` before it commits.
    async fn write_batch(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        delta: Option<&Delta>,
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        let mut rows = Rows::with_capacity(batch.len(), self.config.columns.len());
        let mut row_origins = Vec::with_capacity(batch.len());
        // Each row's index in the batch.
        let mut row_index = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, out) in batch.iter().enumerate() {
            match rows.push(out.value, &self.config.columns) {
                Ok(()) => {
                    row_origins.push(origins[index]);
                    row_index.push(index);
                }
                Err(reason) => rejected.push(Rejected { index, reason }),
            }
        }
        if rows.is_empty() && delta.is_none_or(Delta::is_empty) {
            return Ok(rejected);
        }
        // Refused before the transaction: kept before it commits past them.
        if !rejected.is_empty() {
            refusals.keep(&rejected).await.context("cannot dead-letter the records the sink refuses")?;
        }
        let mut guard = self.client.lock().await;
        // Out of the slot while it writes: if this future is dropped
        // mid-transaction, so is the connection, and the server rolls back.
        let (client, mut prepared) = match guard.take() {
            Some(connection) if !connection.0.is_closed() => connection,
            _ => self.connect().await?,
        };
        if prepared.state.is_none() && delta.is_some_and(|d| !d.changes.is_empty()) {
            let table = state_table(&offsets_table(&self.config));
            // The store creates it when it first loads a partition; a sink
            // does not count on that.
            create_state_table(&client, &table).await?;
            let statements = StateStatements::prepare(&client, &table)
                .await
                .with_context(|| format!("cannot prepare the statements that write the state table {table}"))?;
            prepared.state = Some(statements);
        }
        let skipped = match self.copy(&client, &prepared, &rows, &row_origins, delta).await {
            Ok(skipped) => skipped,
            Err(error) if refused_data(&error).is_some() => {
                // A value PostgreSQL refuses that the conversion let through
                // (a CHECK constraint, a trigger, a column of another type):
                // find the rows it refuses, and write the rest with the offsets.
                warn!(
                    pipeline = %self.pipeline, sink = %self.name, table = %self.config.table, error = %error.root_cause(),
                    "postgres refused a value of the batch; writing it again row range by row range to find the rows it refuses"
                );
                client.batch_execute("ROLLBACK").await.context("cannot roll back the refused batch")?;
                let (skipped, refused) = self
                    .copy_sifting(&client, &prepared, &rows, &row_origins, &row_index, delta, refusals)
                    .await
                    .with_context(|| format!("cannot write {} rows to {}", rows.len(), self.config.table))?;
                rejected.extend(refused);
                rejected.sort_by_key(|r| r.index);
                skipped
            }
            Err(error) => {
                return Err(error.context(format!("cannot write {} rows to {}", rows.len(), self.config.table)))
            }
        };
        *guard = Some((client, prepared));
        if skipped > 0 {
            info!(
                pipeline = %self.pipeline,
                sink = %self.name,
                rows = skipped,
                "skipped rows already in the table (their records were read again after a restart or rebalance)"
            );
        }
        Ok(rejected)
    }
}
