//! What every connector (a source or a sink) is given by the rest of
//! Sluice, and the macro that lists them.
//!
//! A connector is one folder under `sources/` or `sinks/` holding its config
//! struct (whose doc comments become the reference), its checks, its client
//! and its running part. It meets the rest through two calls:
//!
//! - **check**, when a pipeline file is read (`sluice check`, `run`, a
//!   reload): the connector looks at its own table and reports each problem
//!   through [`Check`], which knows where in the file the table is;
//! - **build**, when the pipeline starts: [`Build`] gives it the pipeline's
//!   name, folder and run options.
//!
//! [`registry!`] lists the connectors of one kind: the one line a new
//! connector adds. This module depends on nothing else of Sluice's, so that
//! `config`, `sources` and `sinks` can all use it without a loop.

use std::collections::BTreeMap;
use std::path::Path;

/// Where problems found in a pipeline file are reported: the validator's
/// side of [`Check`].
pub trait Report {
    /// The span of the value at `path` (keys from the top of the file), if written.
    fn span_of(&self, path: &[&str]) -> Option<std::ops::Range<usize>>;
    /// Reports `message` at `span` of the file.
    fn at(&mut self, span: std::ops::Range<usize>, message: String);
    /// How many problems were reported so far.
    fn count(&self) -> usize;
}

/// A Kafka cluster as a named connection resolves it: its bootstrap
/// servers and librdkafka properties (from `tls`, `sasl` and `properties`),
/// already checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaConnection {
    pub brokers: String,
    pub properties: BTreeMap<String, String>,
}

/// What a connector's check is given: its table's place in the file, the
/// file's folder (relative paths are resolved against it) and the file's
/// named connections.
pub struct Check<'a> {
    /// The table's keys from the top of the file, e.g. `["sinks", "pg"]`.
    table: Vec<String>,
    span: std::ops::Range<usize>,
    dir: &'a Path,
    connections: &'a BTreeMap<String, KafkaConnection>,
    report: &'a mut dyn Report,
}

impl<'a> Check<'a> {
    pub fn new(
        table: &[&str],
        span: std::ops::Range<usize>,
        dir: &'a Path,
        connections: &'a BTreeMap<String, KafkaConnection>,
        report: &'a mut dyn Report,
    ) -> Check<'a> {
        Check { table: table.iter().map(|s| s.to_string()).collect(), span, dir, connections, report }
    }

    /// The table as the messages name it, e.g. `[sinks.pg]`.
    pub fn place(&self) -> String {
        format!("[{}]", self.table.join("."))
    }

    /// The table's keys from the top of the file.
    pub fn table(&self) -> Vec<&str> {
        self.table.iter().map(String::as_str).collect()
    }

    /// The folder relative paths of the table are resolved against.
    pub fn dir(&self) -> &'a Path {
        self.dir
    }

    /// The file's named Kafka connections.
    pub fn connections(&self) -> &'a BTreeMap<String, KafkaConnection> {
        self.connections
    }

    /// Reports `message` (which this prefixes with the table's place) at the table.
    pub fn error(&mut self, message: impl std::fmt::Display) {
        let message = format!("{}: {message}", self.place());
        self.report.at(self.span.clone(), message);
    }

    /// Reports `message` at the value of `key` (a path under the table),
    /// or at the table when the key is not written.
    pub fn error_at(&mut self, key: &[&str], message: impl std::fmt::Display) {
        self.error_at_first(&[key], message);
    }

    /// Reports `key` (a number, `value`) at its place unless it is within
    /// `range`: every numeric setting has one, so that a value that cannot
    /// work (0 records a batch, 10^15 of them) is refused by `sluice check`
    /// instead of failing the run.
    pub fn range(&mut self, key: &str, value: u64, range: std::ops::RangeInclusive<u64>) {
        if !range.contains(&value) {
            self.error_at(&[key], out_of_range(key, value, &range));
        }
    }

    /// Reports `message` at the first of `keys` written in the table, or at the table.
    pub fn error_at_first(&mut self, keys: &[&[&str]], message: impl std::fmt::Display) {
        let span = keys.iter().find_map(|key| self.report.span_of(&self.path(key))).unwrap_or(self.span.clone());
        let message = format!("{}: {message}", self.place());
        self.report.at(span, message);
    }

    /// Reports `message` as it is (no place before it) at the value of
    /// `key` under the table, or at the table.
    pub fn error_as_is_at(&mut self, key: &[&str], message: String) {
        let span = self.report.span_of(&self.path(key)).unwrap_or(self.span.clone());
        self.report.at(span, message);
    }

    /// How many problems were reported so far (in the whole file): a check
    /// that goes on only when its earlier steps passed compares two counts.
    pub fn errors(&self) -> usize {
        self.report.count()
    }

    fn path<'k>(&'k self, key: &[&'k str]) -> Vec<&'k str> {
        self.table.iter().map(String::as_str).chain(key.iter().copied()).collect()
    }
}

/// The message for a setting `key` whose `value` is outside `range`.
pub fn out_of_range(key: &str, value: u64, range: &std::ops::RangeInclusive<u64>) -> String {
    format!("`{key}` = {value} is out of its range, {} to {}", range.start(), range.end())
}

/// The most records a batch may hold (a batch is held in memory twice:
/// read, then transformed).
pub const MAX_BATCH_RECORDS: u64 = 1_000_000;

/// What a connector is built with when its pipeline starts.
#[derive(Debug, Clone)]
pub struct Build<'a> {
    /// The pipeline's name (client ids, metrics, logs).
    pub pipeline: &'a str,
    /// The pipeline file's folder.
    pub dir: &'a Path,
}

/// Lists the connectors of one kind as a config enum chosen by `type`, and
/// hands each variant to the connector trait.
///
/// ```ignore
/// registry! {
///     /// A sink, chosen by `type`.
///     pub enum SinkConfig: dyn Connector {
///         "kafka" => Kafka(kafka::KafkaSinkConfig),
///         "stdout" => Stdout(stdout::StdoutSinkConfig),
///     }
/// }
/// ```
///
/// gives `SinkConfig::connector()` and `connector_mut()` (the variant as
/// the trait object) and `kind()` (its `type`).
#[macro_export]
macro_rules! registry {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: dyn $connector:path {
            $($kind:literal => $variant:ident($config:ty),)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize, PartialEq, schemars::JsonSchema)]
        #[serde(tag = "type")]
        pub enum $name {
            $(#[serde(rename = $kind)] $variant($config),)+
        }

        impl $name {
            /// This connector's config, as the connector.
            pub fn connector(&self) -> &dyn $connector {
                match self {
                    $($name::$variant(config) => config,)+
                }
            }

            /// This connector's config, as the connector, to check (which may resolve it).
            pub fn connector_mut(&mut self) -> &mut dyn $connector {
                match self {
                    $($name::$variant(config) => config,)+
                }
            }

            /// The connector's `type`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $($name::$variant(_) => $kind,)+
                }
            }

            /// Every `type` there is.
            pub const KINDS: &'static [&'static str] = &[$($kind),+];
        }
    };
}
