//! Keyed plugin state in PostgreSQL, beside an exactly-once sink's rows or
//! in a database of its own (`[state.postgres]`): the table `sluice_state`
//! (in the schema of the offsets table), one row per stage, partition and
//! key. A batch's changes are written by its keeper in the transaction of
//! its offsets (and the sink's rows) ([`StateStatements`]); a partition
//! is read back, with the offset its state goes to, by [`PgStateStore`],
//! over a connection of its own (a load happens on assignment only).

use crate::clients::postgres::offsets::quote_ident;
use crate::clients::postgres::{open, Target};
use crate::state::stored;
use crate::state::{Delta, Filter, Loaded, Partition, StateStore, Stored};
use anyhow::Context;
use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

/// The state table's name: `sluice_state` beside the offsets table.
pub fn state_table(offsets_table: &str) -> String {
    match offsets_table.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.sluice_state"),
        None => "sluice_state".to_string(),
    }
}

/// The DDL of the state table (and its schema).
fn create_sql(name: &str) -> String {
    let mut sql = String::new();
    if let Some((schema, _)) = name.rsplit_once('.') {
        sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)));
    }
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {} (pipeline text NOT NULL, stage integer NOT NULL, topic text NOT NULL, \
         partition integer NOT NULL, key bytea NOT NULL, value bytea NOT NULL, \
         PRIMARY KEY (pipeline, stage, topic, partition, key))",
        quote_ident(name)
    ));
    sql
}

/// The statements that write a batch's state changes, prepared once per
/// connection (on the first batch that has changes).
pub struct StateStatements {
    put: Statement,
    delete: Statement,
}

impl StateStatements {
    pub async fn prepare(client: &Client, table: &str) -> anyhow::Result<Self> {
        let table = quote_ident(table);
        let put = client
            .prepare(&format!(
                "INSERT INTO {table} (pipeline, stage, topic, partition, key, value) \
                 SELECT $1, s, t, p, k, v FROM unnest($2::int4[], $3::text[], $4::int4[], $5::bytea[], $6::bytea[]) AS u(s, t, p, k, v) \
                 ON CONFLICT (pipeline, stage, topic, partition, key) DO UPDATE SET value = EXCLUDED.value"
            ))
            .await?;
        let delete = client
            .prepare(&format!(
                "DELETE FROM {table} st USING unnest($2::int4[], $3::text[], $4::int4[], $5::bytea[]) AS u(s, t, p, k) \
                 WHERE st.pipeline = $1 AND st.stage = u.s AND st.topic = u.t AND st.partition = u.p AND st.key = u.k"
            ))
            .await?;
        Ok(StateStatements { put, delete })
    }

    /// Writes `delta`'s changes (in the caller's transaction): one statement
    /// for the values put, one for the keys deleted, sent together.
    pub async fn write(&self, client: &Client, pipeline: &str, delta: &Delta) -> Result<(), tokio_postgres::Error> {
        let (mut puts, mut deletes) = (Columns::default(), Columns::default());
        for c in &delta.changes {
            let into = if c.value.is_some() { &mut puts } else { &mut deletes };
            into.stages.push(c.stage as i32);
            into.topics.push(&c.partition.0);
            into.partitions.push(c.partition.1);
            into.keys.push(&c.key);
            if let Some(v) = &c.value {
                into.values.push(v);
            }
        }
        let put: [&(dyn ToSql + Sync); 6] =
            [&pipeline, &puts.stages, &puts.topics, &puts.partitions, &puts.keys, &puts.values];
        let delete: [&(dyn ToSql + Sync); 5] =
            [&pipeline, &deletes.stages, &deletes.topics, &deletes.partitions, &deletes.keys];
        let (put, delete) = futures::join!(
            async {
                if puts.stages.is_empty() {
                    return Ok(0);
                }
                client.execute(&self.put, &put).await
            },
            async {
                if deletes.stages.is_empty() {
                    return Ok(0);
                }
                client.execute(&self.delete, &delete).await
            }
        );
        put?;
        delete?;
        Ok(())
    }
}

/// A delta's changes as the statements' arrays.
#[derive(Default)]
struct Columns<'a> {
    stages: Vec<i32>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    keys: Vec<&'a [u8]>,
    values: Vec<&'a [u8]>,
}

/// Reads a partition's state back: its entries and the offset stored with
/// them, in one snapshot.
pub struct PgStateStore {
    target: Target,
    pipeline: String,
    /// The sink's name (or `[state]`): with the pipeline, the key of the offsets.
    sink: String,
    offsets_table: String,
    state_table: String,
    client: Mutex<Option<Client>>,
}

impl PgStateStore {
    /// The state of `pipeline` kept with the offsets of `sink` in
    /// `offsets_table` (unquoted), in [`state_table`] beside it.
    pub fn new(target: Target, pipeline: &str, sink: &str, offsets_table: &str) -> Self {
        PgStateStore {
            target,
            pipeline: pipeline.to_string(),
            sink: sink.to_string(),
            offsets_table: offsets_table.to_string(),
            state_table: state_table(offsets_table),
            client: Mutex::new(None),
        }
    }

    /// The open connection (or a new one), out of its slot while it is
    /// used: the caller puts it back when its work succeeded, so that a
    /// connection left in a failed transaction is dropped.
    async fn take_client(&self) -> anyhow::Result<(tokio::sync::MutexGuard<'_, Option<Client>>, Client)> {
        let mut guard = self.client.lock().await;
        let client = match guard.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.connect().await?,
        };
        Ok((guard, client))
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let client = open(&self.target, &self.pipeline, "state reader").await?;
        create_state_table(&client, &self.state_table).await?;
        Ok(client)
    }
}

/// Creates the state table `name` (and its schema) when missing, under an
/// advisory lock held to the end of the statements' transaction: an
/// instance starting at the same time waits, then finds the table made
/// (a lock released before the commit would let it try to make it again:
/// "duplicate key value violates unique constraint pg_type_typname_nsp_index").
pub async fn create_state_table(client: &Client, name: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&format!("SELECT pg_advisory_xact_lock(hashtext('sluice state table'));\n{}", create_sql(name)))
        .await
        .with_context(|| format!("cannot create the state table {name}"))
}

#[async_trait]
impl StateStore for PgStateStore {
    async fn scan(&self, filter: &Filter) -> anyhow::Result<Vec<Stored>> {
        let (mut guard, client) = self.take_client().await?;
        let stage = filter.stage.map(|s| s as i32);
        let entry = filter.key.as_ref().map(|k| stored::entry(k));
        let rows = client
            .query(
                &format!(
                    "SELECT stage, topic, partition, key, value FROM {} WHERE pipeline = $1 \
                     AND ($2::int4 IS NULL OR stage = $2) AND ($3::int4 IS NULL OR partition = $3) \
                     AND ($4::bytea IS NULL OR key = $4 OR (get_byte(key, 0) = 1 AND substring(key from 10) = substring($4 from 2))) \
                     ORDER BY stage, topic, partition, key",
                    quote_ident(&self.state_table)
                ),
                &[&self.pipeline, &stage, &filter.partition, &entry],
            )
            .await
            .with_context(|| format!("cannot read the state table {}", self.state_table))?;
        *guard = Some(client);
        Ok(rows
            .into_iter()
            .map(|row| Stored {
                stage: row.get::<_, i32>(0) as u32,
                partition: (row.get::<_, String>(1).into(), row.get(2)),
                key: row.get(3),
                value: row.get(4),
            })
            .collect())
    }

    async fn stages(&self) -> anyhow::Result<std::collections::BTreeSet<u32>> {
        let (mut guard, client) = self.take_client().await?;
        let rows = client
            .query(
                &format!("SELECT DISTINCT stage FROM {} WHERE pipeline = $1", quote_ident(&self.state_table)),
                &[&self.pipeline],
            )
            .await
            .with_context(|| format!("cannot read the state table {}", self.state_table))?;
        *guard = Some(client);
        Ok(rows.into_iter().map(|row| row.get::<_, i32>(0) as u32).collect())
    }

    async fn move_stage(&self, from: u32, to: u32) -> anyhow::Result<u64> {
        let (mut guard, client) = self.take_client().await?;
        let table = quote_ident(&self.state_table);
        let moved = async {
            client.batch_execute("BEGIN").await?;
            let held: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE pipeline = $1 AND stage = $2"),
                    &[&self.pipeline, &(to as i32)],
                )
                .await?
                .get(0);
            if held > 0 {
                client.batch_execute("ROLLBACK").await?;
                anyhow::bail!("transform {} holds state already ({held} rows): drop it first", to + 1);
            }
            let moved = client
                .execute(
                    &format!("UPDATE {table} SET stage = $3 WHERE pipeline = $1 AND stage = $2"),
                    &[&self.pipeline, &(from as i32), &(to as i32)],
                )
                .await?;
            client.batch_execute("COMMIT").await?;
            Ok(moved)
        };
        let moved = moved.await.with_context(|| format!("cannot move the state in {}", self.state_table))?;
        *guard = Some(client);
        Ok(moved)
    }

    async fn drop_stage(&self, stage: u32) -> anyhow::Result<u64> {
        let (mut guard, client) = self.take_client().await?;
        let dropped = client
            .execute(
                &format!("DELETE FROM {} WHERE pipeline = $1 AND stage = $2", quote_ident(&self.state_table)),
                &[&self.pipeline, &(stage as i32)],
            )
            .await
            .with_context(|| format!("cannot delete from {}", self.state_table))?;
        *guard = Some(client);
        Ok(dropped)
    }

    async fn versions(&self, stage: u32) -> anyhow::Result<std::collections::BTreeSet<u32>> {
        let (mut guard, client) = self.take_client().await?;
        let table = quote_ident(&self.state_table);
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT v.value FROM (SELECT DISTINCT topic, partition FROM {table} \
                     WHERE pipeline = $1 AND stage = $2 AND get_byte(key, 0) = {entry}) e \
                     LEFT JOIN {table} v ON v.pipeline = $1 AND v.stage = $2 AND v.topic = e.topic \
                     AND v.partition = e.partition AND v.key = $3",
                    entry = stored::ENTRY
                ),
                &[&self.pipeline, &(stage as i32), &vec![stored::VERSION]],
            )
            .await
            .with_context(|| format!("cannot read the state versions from {}", self.state_table))?;
        *guard = Some(client);
        Ok(rows
            .into_iter()
            .map(|row| row.get::<_, Option<Vec<u8>>>(0).map_or(0, |v| stored::parse_version(&v)))
            .collect())
    }

    async fn load(&self, stage: u32, partition: &Partition) -> anyhow::Result<Loaded> {
        let (mut guard, client) = self.take_client().await?;
        let read = async {
            client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
            let offsets = quote_ident(&self.offsets_table);
            let exists: bool =
                client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.offsets_table]).await?.get(0);
            let next_offset: i64 = if exists {
                client
                    .query_opt(
                        &format!(
                            "SELECT next_offset FROM {offsets} WHERE pipeline = $1 AND sink = $2 AND topic = $3 AND partition = $4"
                        ),
                        &[&self.pipeline, &self.sink, &&*partition.0, &partition.1],
                    )
                    .await?
                    .map_or(0, |row| row.get(0))
            } else {
                0
            };
            let rows = client
                .query(
                    &format!(
                        "SELECT key, value FROM {} WHERE pipeline = $1 AND stage = $2 AND topic = $3 AND partition = $4",
                        quote_ident(&self.state_table)
                    ),
                    &[&self.pipeline, &(stage as i32), &&*partition.0, &partition.1],
                )
                .await?;
            client.batch_execute("COMMIT").await?;
            let entries = rows.into_iter().map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1))).collect();
            Ok::<_, anyhow::Error>(Loaded { entries, next_offset })
        };
        let loaded = read.await.with_context(|| {
            format!("cannot read the state of stage {stage}, {}/{} from {}", partition.0, partition.1, self.state_table)
        })?;
        *guard = Some(client);
        Ok(loaded)
    }
}
