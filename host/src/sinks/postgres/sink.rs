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

use super::rows::{pg_type, Rows};
use crate::config::PostgresSinkConfig;
use crate::record::{Origin, OutputRef};
use crate::sinks::{Rejected, Sink};
use anyhow::Context;
use async_trait::async_trait;
use futures::pin_mut;
use std::collections::{BTreeMap, HashMap};
use tokio::sync::Mutex;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use crate::clients::postgres::{connect, target, Target};
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
}

/// `a.b` → `"a"."b"`, with quotes doubled.
pub fn quote_ident(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
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
        })
    }

    async fn connect(&self) -> anyhow::Result<(Client, Prepared)> {
        let (mut client, connection) = connect(&self.target).await?;
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%pipeline, %error, "postgres connection closed");
            }
        });
        // `IF NOT EXISTS` notices would fill the log on every reconnect.
        client.batch_execute("SET client_min_messages TO warning").await?;
        self.prepare_tables(&mut client).await?;
        // A column the table lacks shows here, once per connection.
        let prepared = self.prepare_statements(&client).await.with_context(|| format!("cannot prepare the statements that write {}", self.config.table))?;
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
                .batch_execute(&format!("CREATE TEMP TABLE IF NOT EXISTS sluice_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS", self.table))
                .await?;
            "sluice_stage".to_string()
        };
        let copy = client.prepare(&format!("COPY {target} ({}) FROM STDIN (FORMAT binary)", self.column_list)).await?;
        let offsets = match &self.offsets {
            None => None,
            Some(offsets) => Some(OffsetStatements {
                add: client
                    .prepare(&format!(
                        "INSERT INTO {offsets} (pipeline, sink, topic, partition, next_offset) \
                         SELECT $1, $2, t, p, 0 FROM unnest($3::text[], $4::int4[]) AS u(t, p) ON CONFLICT DO NOTHING"
                    ))
                    .await?,
                lock: client
                    .prepare(&format!(
                        "SELECT topic, partition, next_offset FROM {offsets} \
                         WHERE pipeline = $1 AND sink = $2 AND topic = ANY($3) AND partition = ANY($4) FOR UPDATE"
                    ))
                    .await?,
                advance: client
                    .prepare(&format!(
                        "UPDATE {offsets} o SET next_offset = GREATEST(o.next_offset, u.n), updated_at = now() \
                         FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, n) \
                         WHERE o.pipeline = $1 AND o.sink = $2 AND o.topic = u.t AND o.partition = u.p"
                    ))
                    .await?,
            }),
        };
        let commit = if self.config.upsert_key.is_empty() {
            "COMMIT".to_string()
        } else {
            let updates: Vec<String> = self
                .config
                .columns
                .iter()
                .filter(|c| !self.config.upsert_key.contains(&c.name))
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
                .collect();
            let action = if updates.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", updates.join(", ")) };
            format!(
                "INSERT INTO {} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM sluice_stage ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) DO {action}; COMMIT",
                self.table,
                cols = self.column_list,
                keys = self.key_list(),
            )
        };
        Ok(Prepared { copy, offsets, commit })
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
            tx.batch_execute(&self.create_table_sql()).await.with_context(|| format!("cannot create table {}", self.config.table))?;
        }
        if let Some(offsets) = &self.offsets {
            let name = offsets_table(&self.config);
            let exists: bool = tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[offsets]).await?.get(0);
            if !exists {
                let mut sql = String::new();
                if let Some((schema, _)) = name.rsplit_once('.') {
                    sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)));
                }
                sql.push_str(&format!(
                    "CREATE TABLE IF NOT EXISTS {offsets} (pipeline text NOT NULL, sink text NOT NULL, topic text NOT NULL, \
                     partition integer NOT NULL, next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
                     PRIMARY KEY (pipeline, sink, topic, partition))"
                ));
                tx.batch_execute(&sql).await.with_context(|| format!("cannot create the offsets table {name}"))?;
            }
            if created {
                let forgotten = tx
                    .execute(&format!("DELETE FROM {offsets} WHERE pipeline = $1 AND sink = $2"), &[&self.pipeline, &self.name])
                    .await?;
                if forgotten > 0 {
                    info!(
                        pipeline = %self.pipeline, sink = %self.name, table = %self.config.table, partitions = forgotten,
                        "created the table: forgot the source offsets stored with the rows of the old one"
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
        let mut defs: Vec<String> = self.config.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), c.kind.sql())).collect();
        if !self.config.upsert_key.is_empty() {
            defs.push(format!("PRIMARY KEY ({})", self.key_list()));
        }
        sql.push_str(&format!("CREATE TABLE IF NOT EXISTS {} ({});", self.table, defs.join(", ")));
        sql
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
    async fn copy(&self, client: &Client, prepared: &Prepared, rows: &Rows<'_>, origins: &[&Origin]) -> anyhow::Result<usize> {
        let mut keep = vec![true; rows.len()];
        // Next offset per (topic, partition) once this batch is in.
        let mut positions = BTreeMap::new();
        for o in origins {
            let next = positions.entry((&*o.topic, o.partition)).or_insert(0_i64);
            *next = (*next).max(o.offset + 1);
        }
        let topics: Vec<&str> = positions.keys().map(|(t, _)| *t).collect();
        let partitions: Vec<i32> = positions.keys().map(|(_, p)| *p).collect();
        let nexts: Vec<i64> = positions.values().copied().collect();
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
                    if moved < positions.len() as u64 {
                        anyhow::ensure!(!added, "the offsets table {} holds {moved} of this batch's {} partitions right after adding them: is something deleting its rows?", self.offsets.as_deref().unwrap_or_default(), positions.len());
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
                    let stored: HashMap<(&str, i32), i64> = locked.iter().map(|row| ((row.get(0), row.get(1)), row.get(2))).collect();
                    for (keep, o) in keep.iter_mut().zip(origins) {
                        *keep = o.offset >= stored.get(&(&*o.topic, o.partition)).copied().unwrap_or(0);
                    }
                    break sink;
                }
            }
        };
        // The rows (those marked in `keep`) into the table, or for upserts
        // the staging table merged into it.
        let writer = BinaryCopyInWriter::new(sink, &self.types);
        pin_mut!(writer);
        let mut refs: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(self.types.len());
        for i in (0..rows.len()).filter(|&i| keep[i]) {
            refs.clear();
            refs.extend(rows.row(i).iter().map(|c| c as &(dyn ToSql + Sync)));
            writer.as_mut().write(&refs).await?;
        }
        let (copied, committed) = futures::join!(writer.finish(), client.batch_execute(&prepared.commit));
        copied?;
        committed?;
        Ok(keep.iter().filter(|k| !**k).count())
    }
}

/// A connection's prepared statements.
struct Prepared {
    /// The binary COPY into the table (or, for upserts, the staging table).
    copy: Statement,
    offsets: Option<OffsetStatements>,
    /// `COMMIT`, after an upsert's merge of the staging table.
    commit: String,
}

/// The offsets table's statements, for `exactly_once`.
struct OffsetStatements {
    /// Adds a row at offset 0 for each partition that has none.
    add: Statement,
    /// Locks and reads the batch's partitions' rows.
    lock: Statement,
    /// Moves them past the batch (never back); returns how many it moved.
    advance: Statement,
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
        let mut rows = Rows::with_capacity(batch.len(), self.config.columns.len());
        let mut row_origins = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, out) in batch.iter().enumerate() {
            match rows.push(out.value, &self.config.columns) {
                Ok(()) => row_origins.push(origins[index]),
                Err(reason) => rejected.push(Rejected { index, reason }),
            }
        }
        if rows.is_empty() {
            return Ok(rejected);
        }
        let mut guard = self.client.lock().await;
        // Out of the slot while it writes: if this future is dropped
        // mid-transaction, so is the connection, and the server rolls back.
        let (client, prepared) = match guard.take() {
            Some(connection) if !connection.0.is_closed() => connection,
            _ => self.connect().await?,
        };
        let skipped = self.copy(&client, &prepared, &rows, &row_origins).await.with_context(|| format!("cannot write {} rows to {}", rows.len(), self.config.table))?;
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
