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
    /// How `sluice run` was asked to run.
    pub options: &'a RunOptions,
}

/// How `sluice run` runs its pipelines, as far as connectors care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// `--until-eof`: a source with an end (a file) ends its pipeline there,
    /// instead of waiting for more.
    pub until_eof: bool,
    /// `sluice backfill`: the sources read this range of their input and
    /// end there (a source that cannot is refused before it starts).
    pub range: Option<Range>,
}

/// One bound of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The partition's first offset still kept.
    Earliest,
    /// The partition's end offset when the range is resolved.
    Latest,
    /// A record timestamp, in milliseconds since the Unix epoch.
    Time(i64),
    /// An offset per partition (`0:1200,1:1180`), in every topic of the
    /// source. A start leaves the partitions it does not list out of the
    /// range; an end reads those to `latest`.
    Offsets(Vec<(i32, i64)>),
}

impl Position {
    /// Why a range from `from` to `to` is empty for certain, if it is:
    /// `latest` before anything, anything before `earliest`, a time after
    /// a later one, an offset after the end's for the same partition.
    pub fn empty_range(from: &Position, to: &Position) -> Option<String> {
        match (from, to) {
            (Position::Latest, _) => Some("--from latest: the range starts at its end (give a time or offsets)".into()),
            (_, Position::Earliest) => Some("--to earliest: the range ends before its first record".into()),
            (Position::Time(a), Position::Time(b)) if a >= b => {
                Some(format!("--from {from} is not before --to {to} (the end is exclusive)"))
            }
            (Position::Offsets(a), Position::Offsets(b)) => a.iter().find_map(|(p, o)| {
                let end = b.iter().find(|(q, _)| q == p).map(|(_, e)| *e)?;
                (*o >= end).then(|| format!("partition {p}: --from offset {o} is not before --to offset {end}"))
            }),
            _ => None,
        }
    }

    /// The timestamp, when the position is one.
    pub fn time(&self) -> Option<i64> {
        match self {
            Position::Time(ms) => Some(*ms),
            _ => None,
        }
    }

    /// The offset given for `partition`, when the position lists offsets:
    /// `Some(None)` when it does not list the partition.
    pub fn offset(&self, partition: i32) -> Option<Option<i64>> {
        match self {
            Position::Offsets(offsets) => Some(offsets.iter().find(|(p, _)| *p == partition).map(|(_, o)| *o)),
            _ => None,
        }
    }
}

/// `P:OFFSET[,P:OFFSET…]`, if `raw` is written so.
fn parse_offsets(raw: &str) -> Option<Result<Vec<(i32, i64)>, String>> {
    if !raw.contains(':') || raw.contains('T') {
        return None;
    }
    let mut offsets = Vec::new();
    for part in raw.split(',') {
        let parsed = part
            .split_once(':')
            .and_then(|(p, o)| Some((p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?)));
        match parsed {
            Some((p, o)) if p >= 0 && o >= 0 && !offsets.iter().any(|(q, _)| *q == p) => offsets.push((p, o)),
            _ => {
                return Some(Err(format!(
                    "{raw:?}: {part:?} is not PARTITION:OFFSET (each partition once, both 0 or more)"
                )))
            }
        }
    }
    offsets.sort_unstable();
    Some(Ok(offsets))
}

impl std::str::FromStr for Position {
    type Err = String;

    /// `earliest`, `latest`, an RFC 3339 time (`2019-12-05T06:18:00Z`),
    /// milliseconds since the Unix epoch, or offsets (`0:1200,1:1180`).
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "earliest" => return Ok(Position::Earliest),
            "latest" => return Ok(Position::Latest),
            _ => {}
        }
        if let Some(offsets) = parse_offsets(raw) {
            return offsets.map(Position::Offsets);
        }
        if let Ok(ms) = raw.parse::<i64>() {
            return Ok(Position::Time(ms));
        }
        let time = humantime::parse_rfc3339_weak(raw).map_err(|e| {
            format!("{raw:?}: {e} (expected earliest, latest, an RFC 3339 time such as 2019-12-05T06:18:00Z, epoch milliseconds, or offsets such as 0:1200,1:1180)")
        })?;
        let ms = match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_millis()).map_err(|_| format!("{raw:?}: too far in the future"))?,
            Err(before) => {
                -i64::try_from(before.duration().as_millis()).map_err(|_| format!("{raw:?}: too far back"))?
            }
        };
        Ok(Position::Time(ms))
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Earliest => f.write_str("earliest"),
            Position::Latest => f.write_str("latest"),
            Position::Offsets(offsets) => {
                let text: Vec<String> = offsets.iter().map(|(p, o)| format!("{p}:{o}")).collect();
                f.write_str(&text.join(","))
            }
            Position::Time(ms) => {
                match u64::try_from(*ms).ok().map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)) {
                    Some(time) => write!(f, "{}", humantime::format_rfc3339_millis(time)),
                    None => write!(f, "{ms}"),
                }
            }
        }
    }
}

/// What to read: every partition of the source's topics from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub from: Position,
    pub to: Position,
    /// At most this many records a second (`None`: as fast as it goes), so
    /// that a backfill does not starve the live pipelines of the broker.
    pub max_rate: Option<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_from_names_times_and_milliseconds() {
        assert_eq!("earliest".parse(), Ok(Position::Earliest));
        assert_eq!("latest".parse(), Ok(Position::Latest));
        assert_eq!("1575526691134".parse(), Ok(Position::Time(1575526691134)));
        assert_eq!("2019-12-05T06:18:11.134Z".parse(), Ok(Position::Time(1575526691134)));
        assert_eq!(Position::Time(1575526691134).to_string(), "2019-12-05T06:18:11.134Z");
        let error = "yesterday".parse::<Position>().unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
        assert_eq!("1:20,0:10".parse(), Ok(Position::Offsets(vec![(0, 10), (1, 20)])));
        assert_eq!(Position::Offsets(vec![(0, 10), (1, 20)]).to_string(), "0:10,1:20");
        assert_eq!("0:7".parse::<Position>().map(|p| p.offset(0)), Ok(Some(Some(7))));
        assert_eq!(Position::Time(1).offset(0), None);
        for bad in ["0:x", "0:1,0:2", "-1:5", "0:1,"] {
            assert!(bad.parse::<Position>().unwrap_err().contains("PARTITION:OFFSET"), "{bad}");
        }
    }

    #[test]
    fn a_range_that_is_empty_for_certain_is_named() {
        let p = |s: &str| s.parse::<Position>().unwrap();
        let empty = |from: &str, to: &str| Position::empty_range(&p(from), &p(to));
        assert!(empty("2020-01-02T00:00:00Z", "2020-01-01T00:00:00Z").unwrap().contains("is not before --to"));
        assert!(empty("1000", "1000").is_some(), "the end is exclusive");
        assert!(empty("0:10,1:5", "1:5").unwrap().contains("partition 1"));
        assert!(empty("latest", "latest").is_some());
        assert!(empty("earliest", "earliest").is_some());
        assert_eq!(empty("earliest", "latest"), None);
        assert_eq!(empty("1000", "2000"), None);
        assert_eq!(empty("0:10", "1:5"), None, "another partition: read to latest");
        assert_eq!(empty("1000", "0:5"), None, "a time and offsets: resolved per partition");
    }
}
