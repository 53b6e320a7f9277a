//! The offsets table: where an exactly-once postgres sink and a state
//! store of its own (`[state.postgres]`) keep the source offsets their
//! data goes to, one row per pipeline, sink (or `[state]`), topic and
//! partition. Both lock a batch's rows, check the state's fence against
//! what they read, and move them on in the transaction of their data.

use crate::record::Origin;
use anyhow::Context;
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::{Client, Statement};

/// `a.b` → `"a"."b"`, with quotes doubled.
pub fn quote_ident(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// Creates the offsets table `name` (and its schema) when missing, in the
/// transaction under way: keyed by pipeline, sink (or `[state]` for a
/// state store of its own), topic and partition.
pub async fn create_offsets_table(client: &impl tokio_postgres::GenericClient, name: &str) -> anyhow::Result<()> {
    let offsets = quote_ident(name);
    let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&offsets]).await?.get(0);
    if exists {
        return Ok(());
    }
    // Under a lock held to the end of the transaction (the caller's, or
    // these statements' own): instances starting together make it once.
    let mut sql = String::from("SELECT pg_advisory_xact_lock(hashtext('sluice offsets table'));\n");
    if let Some((schema, _)) = name.rsplit_once('.') {
        sql.push_str(&format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)));
    }
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {offsets} (pipeline text NOT NULL, sink text NOT NULL, topic text NOT NULL, \
         partition integer NOT NULL, next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
         PRIMARY KEY (pipeline, sink, topic, partition))"
    ));
    client.batch_execute(&sql).await.with_context(|| format!("cannot create the offsets table {name}"))
}

/// The offsets table's statements, prepared once per connection. Each
/// takes `$1` pipeline, `$2` sink, `$3` topics and `$4` partitions (and
/// `advance` `$5`, the offsets), as [`Positions`] holds them.
pub struct OffsetStatements {
    /// Adds a row at offset 0 for each partition that has none.
    pub add: Statement,
    /// Locks and reads the batch's partitions' rows.
    pub lock: Statement,
    /// Moves them past the batch (never back); returns how many it moved.
    pub advance: Statement,
}

impl OffsetStatements {
    /// Prepares the statements on the offsets table `table` (unquoted).
    pub async fn prepare(client: &Client, table: &str) -> anyhow::Result<Self> {
        let offsets = quote_ident(table);
        let prepare = |sql: String| async move {
            client
                .prepare(&sql)
                .await
                .with_context(|| format!("cannot prepare the statements that move the offsets in {table}"))
        };
        Ok(OffsetStatements {
            add: prepare(format!(
                "INSERT INTO {offsets} (pipeline, sink, topic, partition, next_offset) \
                 SELECT $1, $2, t, p, 0 FROM unnest($3::text[], $4::int4[]) AS u(t, p) ON CONFLICT DO NOTHING"
            ))
            .await?,
            lock: prepare(format!(
                "SELECT topic, partition, next_offset FROM {offsets} \
                 WHERE pipeline = $1 AND sink = $2 AND topic = ANY($3) AND partition = ANY($4) FOR UPDATE"
            ))
            .await?,
            advance: prepare(format!(
                "UPDATE {offsets} o SET next_offset = GREATEST(o.next_offset, u.n), updated_at = now() \
                 FROM unnest($3::text[], $4::int4[], $5::int8[]) AS u(t, p, n) \
                 WHERE o.pipeline = $1 AND o.sink = $2 AND o.topic = u.t AND o.partition = u.p"
            ))
            .await?,
        })
    }
}

/// A batch's partitions and the offset each is at once the batch is in, as
/// the offsets statements take them.
#[derive(Debug, PartialEq)]
pub struct Positions<'a> {
    pub topics: Vec<&'a str>,
    pub partitions: Vec<i32>,
    pub nexts: Vec<i64>,
}

/// The partitions of the records at `origins`, each past its last record,
/// and those of `more` (the state's positions and fences: a partition the
/// batch holds without a row) at least where it says.
pub fn positions<'a>(origins: &[&'a Origin], more: impl Iterator<Item = (&'a str, i32, i64)>) -> Positions<'a> {
    let mut next = BTreeMap::new();
    // A fired timer's output (offset -1) comes from no source record.
    for o in origins.iter().filter(|o| o.is_source()) {
        let at = next.entry((&*o.topic, o.partition)).or_insert(0_i64);
        *at = (*at).max(o.offset + 1);
    }
    for (topic, partition, n) in more {
        let at = next.entry((topic, partition)).or_insert(0_i64);
        *at = (*at).max(n);
    }
    Positions {
        topics: next.keys().map(|(t, _)| *t).collect(),
        partitions: next.keys().map(|(_, p)| *p).collect(),
        nexts: next.values().copied().collect(),
    }
}

/// The stored offset of each partition, from the offsets table's rows
/// (topic, partition, next_offset) the lock statement read.
pub struct StoredOffsets<'a>(HashMap<(&'a str, i32), i64>);

impl<'a> StoredOffsets<'a> {
    pub fn read(locked: &'a [tokio_postgres::Row]) -> Self {
        StoredOffsets(locked.iter().map(|row| ((row.get(0), row.get(1)), row.get(2))).collect())
    }

    /// `partition`'s stored offset, if it has a row.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.get(&(topic, partition)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_past_each_partitions_last_record_and_at_least_the_states() {
        let origins = [
            Origin { topic: "t".into(), partition: 0, offset: 4 },
            Origin { topic: "t".into(), partition: 0, offset: 9 },
            Origin { topic: "t".into(), partition: 1, offset: -1 },
        ];
        let refs: Vec<&Origin> = origins.iter().collect();
        let more = [("t", 1, 3), ("t", 0, 2), ("u", 0, 7)];
        let got = positions(&refs, more.into_iter());
        assert_eq!(got.topics, vec!["t", "t", "u"]);
        assert_eq!(got.partitions, vec![0, 1, 0]);
        assert_eq!(got.nexts, vec![10, 3, 7]);
        assert_eq!(quote_ident("a.b\"c"), "\"a\".\"b\"\"c\"");
    }
}
