//! Connection handling, table creation and the binary COPY.

use super::rows::{pg_type, to_row, Cell};
use crate::config::PostgresSinkConfig;
use crate::record::Output;
use crate::sinks::{Rejected, Sink};
use anyhow::Context;
use async_trait::async_trait;
use futures::pin_mut;
use tokio::sync::Mutex;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

pub struct PostgresSink {
    config: PostgresSinkConfig,
    pipeline: String,
    /// The connection, opened on first use and reopened after a failure.
    client: Mutex<Option<Client>>,
    types: Vec<Type>,
    table: String,
    column_list: String,
}

/// `a.b` → `"a"."b"`, with quotes doubled.
pub fn quote_ident(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

impl PostgresSink {
    pub fn new(config: PostgresSinkConfig, pipeline: &str) -> Self {
        let types = config.columns.iter().map(|c| pg_type(c.kind)).collect();
        let table = quote_ident(&config.table);
        let column_list = config.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        PostgresSink { config, pipeline: pipeline.to_string(), client: Mutex::new(None), types, table, column_list }
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::connect(&self.config.url, NoTls)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL for table {}", self.config.table))?;
        let pipeline = self.pipeline.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%pipeline, %error, "postgres connection closed");
            }
        });
        if self.config.create_table {
            client.batch_execute(&self.create_table_sql()).await.with_context(|| format!("cannot create table {}", self.config.table))?;
        }
        info!(pipeline = %self.pipeline, table = %self.config.table, "postgres sink connected");
        Ok(client)
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

    async fn copy(&self, client: &mut Client, rows: &[Vec<Cell>]) -> anyhow::Result<()> {
        let tx = client.transaction().await?;
        let upsert = !self.config.upsert_key.is_empty();
        let target = if upsert {
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS sluice_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                self.table
            ))
            .await?;
            "sluice_stage".to_string()
        } else {
            self.table.clone()
        };
        let sink = tx.copy_in(&format!("COPY {target} ({}) FROM STDIN (FORMAT binary)", self.column_list)).await?;
        let writer = BinaryCopyInWriter::new(sink, &self.types);
        pin_mut!(writer);
        for row in rows {
            let refs: Vec<&(dyn ToSql + Sync)> = row.iter().map(|c| c.as_ref() as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await?;
        }
        writer.finish().await?;
        if upsert {
            let updates: Vec<String> = self
                .config
                .columns
                .iter()
                .filter(|c| !self.config.upsert_key.contains(&c.name))
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
                .collect();
            let action = if updates.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", updates.join(", ")) };
            tx.batch_execute(&format!(
                "INSERT INTO {} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM sluice_stage ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) DO {action}",
                self.table,
                cols = self.column_list,
                keys = self.key_list(),
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn write(&self, batch: &[Output]) -> anyhow::Result<Vec<Rejected>> {
        let mut rows = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, out) in batch.iter().enumerate() {
            match to_row(&out.value, &self.config.columns) {
                Ok(row) => rows.push(row),
                Err(reason) => rejected.push(Rejected { index, reason }),
            }
        }
        if rows.is_empty() {
            return Ok(rejected);
        }
        let mut guard = self.client.lock().await;
        let client = match guard.as_mut() {
            Some(client) if !client.is_closed() => client,
            _ => guard.insert(self.connect().await?),
        };
        if let Err(error) = self.copy(client, &rows).await {
            *guard = None;
            return Err(error).with_context(|| format!("cannot write {} rows to {}", rows.len(), self.config.table));
        }
        Ok(rejected)
    }
}
