//! The PostgreSQL sink: one row per output record, binary COPY in one
//! transaction per batch, with the source offsets in the same transaction
//! (exactly once); optional table creation and upsert.
//!
//! - [`rows`]: converting output JSON into typed column values that
//!   PostgreSQL accepts, or a rejection;
//! - [`sink`]: the DDL, the COPY and the offsets, and the keyed state kept
//!   with them (a [`crate::state::StateKeeper`]).
//!
//! The connection (libpq's TLS modes) and the offsets table are
//! [`crate::clients::postgres`]'s, shared with the state store.

pub mod rows;
pub mod sink;

pub use sink::PostgresSink;

/// Whether tables `a` and `b` of `config`'s database are one table as
/// PostgreSQL resolves their names: an unqualified name is in the schema
/// the connection creates tables in (`current_schema()`, from the search
/// path), and each part is compared as Sluice quotes it (exactly). So
/// `t` and `public.t` are one table on a default search path, and `T`
/// and `t` are two. `dir` anchors relative certificate paths.
pub async fn same_table(config: &PostgresSinkConfig, dir: &std::path::Path, a: &str, b: &str) -> anyhow::Result<bool> {
    let target = target(config, dir).map_err(|errors| {
        anyhow::anyhow!("{}", errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; "))
    })?;
    let client = open(&target, "backfill", "check").await?;
    let schema: Option<String> = client.query_one("SELECT current_schema()", &[]).await?.get(0);
    let schema = schema.unwrap_or_else(|| "public".to_string());
    let resolved = |name: &str| match name.rsplit_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => (schema.clone(), name.to_string()),
    };
    Ok(resolved(a) == resolved(b))
}

use super::{Connector, Sink};
use crate::clients::postgres::{open, target};
use crate::connector::{Build, Check};
use schemars::JsonSchema;
use serde::Deserialize;

crate::postgres_config! {
    /// `type = "postgres"`: rows into a table, one per output record, written
    /// with binary COPY in one transaction per batch. Output values must be JSON
    /// objects; each column takes the field of its `field` (default: its name).
    #[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct PostgresSinkConfig {
        /// Destination table (optionally `schema.table`).
        pub table: String,
        /// Create the table (and schema) if missing, from `columns`.
        #[serde(default)]
        pub create_table: bool,
        /// The table's columns and where each takes its value from.
        pub columns: Vec<ColumnConfig>,
        /// Columns of a unique key: rows whose key exists are updated instead of
        /// inserted (`INSERT … ON CONFLICT … DO UPDATE`). Empty: plain inserts.
        /// Each other column's `merge` says how its new value combines with the
        /// stored one (default: replaces it).
        #[serde(default)]
        pub upsert_key: Vec<String>,
        /// Exactly-once: each batch's rows and the source offsets they came from
        /// are committed in one transaction (into `offsets_table`), and rows of
        /// records read again after a crash, restart or rebalance are skipped.
        /// `false`: at-least-once, one statement fewer per batch. Behind a
        /// WebSocket source (which cannot read anything again) the offsets are
        /// those of the run's frames: a batch written again after an ambiguous
        /// `COMMIT` stores no row twice (one offsets row per run).
        #[serde(default = "default_true")]
        pub exactly_once: bool,
        /// The table holding the source offsets of the rows written, keyed by
        /// pipeline, sink, topic and partition; created if missing. Default:
        /// `sluice_offsets` in the schema of `table`.
        pub offsets_table: Option<String>,
    }
}

/// One column of a PostgreSQL sink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// Column name.
    pub name: String,
    /// Column type; decides how the JSON field is converted.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Top-level field of the output JSON object (default: the column name).
    /// A missing or null field gives NULL.
    pub field: Option<String>,
    /// With `upsert_key`: how the values of rows with one key combine, those
    /// of a batch with each other and then with the stored row's, in the
    /// transaction that stores the source offsets (so each record counts
    /// once). `replace` (default: the newest value), `sum`, `min`, `max`,
    /// `first` or `last` (the value of the row whose `by` column is the
    /// smallest or the largest, ties to the smallest or largest value), or
    /// `weighted_mean` (the mean weighted by the `by` column, which merges
    /// by `sum`: a VWAP by the volume).
    #[serde(default)]
    pub merge: Merge,
    /// With `merge = "first"` or `"last"`: the column that orders the rows
    /// (e.g. an event time); it must itself merge by `min` (for `first`) or
    /// `max` (for `last`), so that the stored row remembers it. With
    /// `merge = "weighted_mean"`: the weight column, merging by `sum`.
    pub by: Option<String>,
}

/// How an upsert combines a column's values for one key.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Merge {
    /// The newest value replaces the stored one.
    #[default]
    Replace,
    /// The sum of the values (`bigint`, `double precision`).
    Sum,
    /// The smallest value (`bigint`, `double precision`, `timestamptz`, `text`).
    Min,
    /// The largest value (`bigint`, `double precision`, `timestamptz`, `text`).
    Max,
    /// The value of the row first by `by`.
    First,
    /// The value of the row last by `by`.
    Last,
    /// The mean of the values weighted by `by` (which merges by `sum`):
    /// e.g. a VWAP weighted by the volume (`double precision`).
    WeightedMean,
}

impl Merge {
    /// Whether `kind` can be merged this way.
    fn takes(self, kind: ColumnType) -> bool {
        use ColumnType::*;
        match self {
            Merge::Replace => true,
            Merge::Sum => matches!(kind, BigInt | Double),
            Merge::Min | Merge::Max => matches!(kind, BigInt | Double | Timestamptz | Text),
            Merge::First | Merge::Last => kind != TextArray,
            Merge::WeightedMean => kind == Double,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Merge::Replace => "replace",
            Merge::Sum => "sum",
            Merge::Min => "min",
            Merge::Max => "max",
            Merge::First => "first",
            Merge::Last => "last",
            Merge::WeightedMean => "weighted_mean",
        }
    }
}

impl PostgresSinkConfig {
    /// Whether some column merges by more than replacing: the upsert then
    /// aggregates each batch per key before it combines with the table.
    pub fn aggregates(&self) -> bool {
        self.columns.iter().any(|c| c.merge != Merge::Replace)
    }

    /// Checks the columns' `merge` and `by`.
    fn check_merges(&self, cx: &mut Check<'_>) {
        for c in &self.columns {
            let is_key = self.upsert_key.contains(&c.name);
            if c.merge != Merge::Replace && (self.upsert_key.is_empty() || is_key) {
                let why = if is_key { "is part of `upsert_key`" } else { "has no `upsert_key` to merge by" };
                cx.error(format!("column {:?} cannot merge by {}: it {why}", c.name, c.merge.name()));
                continue;
            }
            if !c.merge.takes(c.kind) {
                cx.error(format!("column {:?}: a {} column cannot merge by {}", c.name, c.kind.sql(), c.merge.name()));
            }
            if self.aggregates() && c.kind == ColumnType::TextArray && !is_key {
                cx.error(format!(
                    "column {:?}: a text[] column cannot be part of an aggregating upsert (another column merges by more than replace)",
                    c.name
                ));
            }
            match (c.merge, &c.by) {
                (Merge::First | Merge::Last, None) => {
                    cx.error(format!("column {:?} merges by {}: say by which column with `by`", c.name, c.merge.name()))
                }
                (Merge::First | Merge::Last, Some(by)) => {
                    let want = if c.merge == Merge::First { Merge::Min } else { Merge::Max };
                    match self.columns.iter().find(|o| &o.name == by) {
                        Some(o) if o.merge == want && Merge::Min.takes(o.kind) => {}
                        Some(_) => cx.error(format!(
                            "column {:?} merges by {} of {by:?}: {by:?} must merge by {} (and be a bigint, double precision, timestamptz or text column)",
                            c.name,
                            c.merge.name(),
                            want.name()
                        )),
                        None => cx.error(format!("column {:?}: `by` column {by:?} is not among `columns`", c.name)),
                    }
                }
                (Merge::WeightedMean, None) => {
                    cx.error(format!("column {:?} merges by weighted_mean: say which column weighs with `by`", c.name))
                }
                (Merge::WeightedMean, Some(by)) => match self.columns.iter().find(|o| &o.name == by) {
                    Some(o) if o.merge == Merge::Sum => {}
                    Some(_) => cx.error(format!(
                        "column {:?} merges by weighted_mean of {by:?}: {by:?} must merge by sum",
                        c.name
                    )),
                    None => cx.error(format!("column {:?}: `by` column {by:?} is not among `columns`", c.name)),
                },
                (_, Some(_)) => cx.error(format!(
                    "column {:?}: `by` goes with merge = \"first\", \"last\" or \"weighted_mean\" only",
                    c.name
                )),
                _ => {}
            }
        }
    }
}

/// The column types the PostgreSQL sink converts JSON into.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum ColumnType {
    /// From a JSON string.
    #[serde(rename = "text")]
    Text,
    /// From a JSON number.
    #[serde(rename = "double precision")]
    Double,
    /// From a JSON integer.
    #[serde(rename = "bigint")]
    BigInt,
    /// From a JSON boolean.
    #[serde(rename = "boolean")]
    Boolean,
    /// From a JSON integer of milliseconds since the Unix epoch.
    #[serde(rename = "timestamptz")]
    Timestamptz,
    /// From a JSON array of strings.
    #[serde(rename = "text[]")]
    TextArray,
    /// From any JSON value.
    #[serde(rename = "jsonb")]
    Jsonb,
}

impl ColumnType {
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Double => "double precision",
            ColumnType::BigInt => "bigint",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::TextArray => "text[]",
            ColumnType::Jsonb => "jsonb",
        }
    }
}

fn default_true() -> bool {
    true
}

impl Connector for PostgresSinkConfig {
    fn target(&self) -> Option<&str> {
        Some(&self.table)
    }

    /// One table as PostgreSQL resolves the names ([`same_table`]).
    fn same_target<'a>(
        &'a self,
        a: &'a str,
        b: &'a str,
        dir: &'a std::path::Path,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(same_table(self, dir, a, b))
    }

    fn can_keep_state(&self) -> Result<(), String> {
        match self.exactly_once {
            true => Ok(()),
            false => Err("it is not exactly-once (exactly_once = false)".into()),
        }
    }

    /// A side table, made when missing.
    fn redirect(&mut self, target: &str) -> Option<String> {
        self.create_table = true;
        Some(std::mem::replace(&mut self.table, target.to_string()))
    }

    fn check(&mut self, cx: &mut Check<'_>) {
        if let Err(errors) = target(self, cx.dir()) {
            for e in errors {
                // An option the sink does not set came from the URL.
                cx.error_at_first(&[&[e.option], &["url"]], e.message);
            }
        }
        if self.columns.is_empty() {
            cx.error("`columns` is empty");
        }
        for key in &self.upsert_key {
            if !self.columns.iter().any(|c| &c.name == key) {
                cx.error(format!("upsert_key column {key:?} is not among `columns`"));
            }
        }
        self.check_merges(cx);
    }

    /// Exactly-once stores the source offsets with the rows and skips what
    /// a source reads again; a source that cannot read again (whose offsets
    /// restart with each connection) has its rows written as they come.
    fn build(&self, name: &str, cx: &Build<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(PostgresSink::new(self.clone(), name, cx.pipeline, cx.dir)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_shows_as_a_mask_and_is_redacted_once_read() {
        let sink: PostgresSinkConfig = toml::from_str(
            "url = \"postgres://u@h/db\"\npassword = \"debug-hidden-pw-3\"\ntable = \"t\"\ncolumns = [{ name = \"a\", type = \"text\" }]\n",
        )
        .unwrap();
        let shown = format!("{sink:?}");
        assert!(!shown.contains("debug-hidden-pw-3") && shown.contains("password: Some(***)"), "{shown}");
        assert_eq!(crate::secrets::redact("x debug-hidden-pw-3 y"), "x *** y", "registered when read");
    }
}
