//! The pipeline file format. Every table rejects unknown keys.
//!
//! ```toml
//! name = "trades"                       # optional: defaults to the file name
//! default_sink = "pg"                   # optional when there is one sink
//!
//! [source]
//! type = "kafka"
//! brokers = "${SLUICE_BROKERS:-127.0.0.1:9092}"
//! topics = ["trades_raw"]
//!
//! [[transforms]]
//! plugin = "../target/wasm32-wasip2/release/trade_flattener.wasm"
//!
//! [sinks.pg]
//! type = "postgres"
//! url = "${SLUICE_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
//! table = "trades"
//! columns = [{ name = "symbol", type = "text" }]
//!
//! [dead_letter]
//! type = "kafka"
//! brokers = "${SLUICE_BROKERS:-127.0.0.1:9092}"
//! topic = "trades_dlq"
//! ```
//!
//! A secured cluster is declared once, as a named connection that the
//! source, Kafka sinks and dead-letter section reference:
//!
//! ```toml
//! [connections.prod]
//! type = "kafka"
//! brokers = "b1.example.com:9093"
//! tls = { ca = "/etc/ssl/kafka-ca.pem" }
//! sasl = { mechanism = "SCRAM-SHA-512", username = "sluice", password = "${file:/run/secrets/kafka}" }
//!
//! [source]
//! type = "kafka"
//! connection = "prod"
//! topics = ["trades_raw"]
//! ```

use crate::clients::kafka::ConnectionConfig;
use crate::sinks::SinkConfig;
use crate::sources::SourceConfig;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// One pipeline: a source, a chain of transforms, named sinks, a dead-letter destination.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// The pipeline's name (logs, metrics, dead-letter headers, default consumer
    /// group `sluice-<name>`). Defaults to the file name without `.toml`.
    pub name: Option<String>,
    /// Where records come from.
    #[schemars(with = "SourceConfig")]
    pub source: Spanned<SourceConfig>,
    /// Plugins applied in order; the outputs of one are the inputs of the next.
    /// Empty: records pass through unchanged.
    #[serde(default)]
    pub transforms: Vec<TransformConfig>,
    /// Named sinks. A plugin output's `route` names one of them.
    #[schemars(with = "BTreeMap<String, SinkConfig>")]
    pub sinks: BTreeMap<String, Spanned<SinkConfig>>,
    /// The sink for outputs without a route. Required when there are several sinks.
    #[schemars(with = "Option<String>")]
    pub default_sink: Option<Spanned<String>>,
    /// Where records go that a transform failed on, or whose output could not
    /// be routed or converted (a Kafka topic, or stdout).
    #[schemars(with = "SinkConfig")]
    pub dead_letter: Spanned<SinkConfig>,
    /// What to do when a plugin version is failing (faults on several
    /// records in a row, or an error surge after a hot swap): `rollback`
    /// (default: back to the previous version, after a hot swap; else
    /// pause), `pause` (stop consuming until a new version is dropped in) or
    /// `dead_letter` (dead-letter the records and go on).
    #[serde(default)]
    pub on_plugin_failure: OnPluginFailure,
    /// Where the keyed state of stateful (contract 0.3) plugins is kept,
    /// with the source offsets it goes to. Default: the pipeline's one
    /// exactly-once postgres sink, in the transactions of its rows.
    #[serde(default)]
    #[schemars(with = "Option<StateConfig>")]
    pub state: Option<Spanned<StateConfig>>,
    /// Named connections (a Kafka cluster with its TLS and SASL settings),
    /// referenced by `connection = "NAME"` from the source, the Kafka sinks
    /// and the dead-letter section.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ConnectionConfig>")]
    pub connections: BTreeMap<String, Spanned<ConnectionConfig>>,
}

/// `[state]`: where stateful plugins' keyed state is kept. Say one of
/// `sink` and `postgres`.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The exactly-once postgres sink whose transactions keep the state,
    /// with its rows and offsets (exactly once for that sink's rows): for a
    /// pipeline with several such sinks.
    pub sink: Option<String>,
    /// A PostgreSQL database of the state's own: each batch's state changes
    /// and source offsets commit there in one transaction, once every sink
    /// has the batch. The state counts each record once through crashes;
    /// the sinks are at-least-once (a batch a crash cut between a sink's
    /// write and the state's commit is written again).
    pub postgres: Option<crate::state::postgres::PostgresStateConfig>,
}

/// The policy for a failing plugin version.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnPluginFailure {
    /// Swap back to the version that ran before the last hot swap and run
    /// the batch through it; with no earlier version, pause.
    #[default]
    Rollback,
    /// Stop consuming, commit nothing past the last good batch, retry with
    /// backoff and resume once a new version is dropped in.
    Pause,
    /// Dead-letter the records the version fails and go on (Kafka
    /// Connect's `errors.tolerance = all`).
    DeadLetter,
}

/// One plugin of the transform chain.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Path to the plugin component (`.wasm`), relative to the pipeline file.
    #[schemars(with = "String")]
    pub plugin: Spanned<String>,
    /// The plugin's configuration, handed to its `init`. Strings are passed
    /// as they are; numbers and booleans written out; arrays and tables as JSON.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub config: toml::Table,
    /// Resource limits of the plugin instance.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What the sandbox lets the plugin reach. Default: nothing.
    #[serde(default)]
    pub grants: GrantsConfig,
    /// A candidate version run beside this plugin on the same batches (a
    /// shadow run): its outputs are compared with the live ones, key by
    /// key, then discarded; they never reach a sink or the dead letters.
    /// A path (`shadow = "new.wasm"`), or a table with the comparison's
    /// options. See `sluice shadow report` and `sluice shadow promote`.
    #[serde(default)]
    #[schemars(with = "Option<ShadowSchema>")]
    pub shadow: Option<Spanned<Shadow>>,
    /// Event time for a stateful (contract 0.3) plugin: a watermark per
    /// source partition, timers that fire as it passes, and what becomes of
    /// records behind it. Without it, the plugin's state has no clock.
    #[serde(default)]
    #[schemars(with = "Option<EventTimeConfig>")]
    pub event_time: Option<Spanned<EventTimeConfig>>,
}

/// `[transforms.event_time]`: how a stateful stage tells time by its
/// records' timestamps.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// How far behind the newest timestamp of its partition a record may be
    /// and still count, in ms (default 0): the partition's watermark is that
    /// timestamp minus this, and never goes back.
    #[serde(default)]
    pub allowed_lateness_ms: u64,
    /// A partition without records this long (processing time, ms) has its
    /// watermark moved on by the time that passes, so that the last windows
    /// of a quiet market close (default 10000; 0: never).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How far ahead of the processing clock (this host's time) a record's
    /// timestamp may be, in ms (default 3600000: one hour). A record further
    /// ahead (a clock gone wrong, a bad field) is given to the `late` policy
    /// and does not move the watermark, which would otherwise leave every
    /// later record of its partition late, for good.
    #[serde(default = "default_max_ahead_ms")]
    pub max_ahead_ms: u64,
    /// A record behind the watermark: `"dead_letter"` (default), `"drop"`
    /// (counted in `sluice_late_records_total`), or `{ route = "SINK" }`
    /// (passed on as it is to that sink of the pipeline).
    #[serde(default)]
    pub late: LateConfig,
}

fn default_idle_timeout_ms() -> u64 {
    10_000
}

fn default_max_ahead_ms() -> u64 {
    3_600_000
}

/// What becomes of a late record.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum LateConfig {
    /// `"dead_letter"` or `"drop"`.
    Policy(LatePolicyName),
    /// `{ route = "SINK" }`.
    Route {
        /// The sink the late records go to.
        route: String,
    },
    #[default]
    #[serde(skip)]
    Default,
}

/// A late-record policy by name.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicyName {
    /// Sent to the dead letters, the watermark in the reason.
    DeadLetter,
    /// Dropped and counted.
    Drop,
}

/// A shadow run's candidate: the pipeline file's `shadow`, given as a path
/// or as a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow(pub ShadowConfig);

/// A transform's `shadow`: the candidate's path, or a table with the shadow
/// run's options.
#[derive(JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "Shadow")]
#[allow(dead_code)]
enum ShadowSchema {
    /// The candidate component's path, relative to the pipeline file, with
    /// every option at its default.
    Path(String),
    Table(ShadowConfig),
}

impl<'de> Deserialize<'de> for Shadow {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Shadow;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a plugin path, or a table with `plugin` and the shadow run's options")
            }

            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<Shadow, E> {
                Ok(Shadow(ShadowConfig { plugin: path.to_string(), ..ShadowConfig::default() }))
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<Shadow, M::Error> {
                ShadowConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Shadow)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A shadow run: the candidate, and how its outputs are compared.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate component's path, relative to the pipeline file.
    pub plugin: String,
    /// The candidate's configuration (default: the live plugin's).
    #[schemars(with = "Option<BTreeMap<String, serde_json::Value>>")]
    pub config: Option<toml::Table>,
    /// The fraction of batches the candidate also runs on, from 0 (exclusive)
    /// to 1 (default 1: every batch). The candidate runs on its own thread
    /// beside the live path; a batch that arrives while it is several
    /// batches behind is skipped (counted), so a slow candidate never slows
    /// the pipeline.
    pub sample: Option<f64>,
    /// Numbers that differ by at most this much (absolute) compare equal
    /// (default 0).
    pub tolerance: Option<f64>,
    /// Fields left out of the comparison, as dotted paths into the JSON
    /// value (`"received_at"`, `"meta.venue"`); an array's elements go with it.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// How many differences the report keeps as samples (default 20; the
    /// first ones seen).
    pub samples: Option<usize>,
    /// Promote the candidate by itself once it has run on `batches`
    /// batches with at most `max_diff_ratio` of its outputs differing:
    /// the pipeline file is rewritten with the candidate as the plugin, and
    /// the reload swaps it in (with the usual rollback protection).
    pub promote_after: Option<PromoteAfter>,
}

/// When a shadow run promotes its candidate by itself.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteAfter {
    /// Batches the candidate must have been compared on.
    pub batches: u64,
    /// The largest share of outputs (0 to 1) that may differ (a different
    /// field, an output only one side made, a record only the candidate
    /// failed) (default 0: none).
    #[serde(default)]
    pub max_diff_ratio: f64,
}

/// Resource limits; unset values take the runtime's safe defaults.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time one batch may take, in milliseconds, running or waiting in a
    /// host call (a sleep, a socket) (default 1000). Instantiation and
    /// `init` each get this, but at least 10 s (an interpreter starts up in
    /// them).
    pub cpu_ms: Option<u64>,
    /// Linear memory the instance may grow to, in MiB (default 128).
    pub memory_mib: Option<usize>,
    /// Output one input record may produce, in MiB of keys, values and
    /// headers (default 16); a record over it is dead-lettered.
    pub output_mib: Option<usize>,
    /// Outputs one input record may produce (default 100000); a record over
    /// it is dead-lettered.
    pub max_outputs: Option<usize>,
    /// Output one batch may produce, in MiB of keys, values and headers,
    /// a range given twice counted twice (what the host copies on) (default
    /// 256); the records past it are dead-lettered.
    pub batch_output_mib: Option<usize>,
    /// Log lines a second the plugin may write on average (default 100;
    /// 0: no limit). Lines over it are counted, not written.
    pub log_lines_per_s: Option<u32>,
    /// Log lines the plugin may write at once above that rate (default 1000).
    pub log_burst: Option<u32>,
    /// Keyed state a stateful (contract 0.3) plugin may hold, in MiB of keys
    /// and values over all its partitions, plus 32 bytes per key (default
    /// 256). A `put` past it faults the batch, and `on_plugin_failure` applies.
    pub state_mib: Option<usize>,
    /// Keyed state: a key not written for this long (processing time, ms)
    /// is deleted, from memory before the stage's next batch or idle tick
    /// and from the store with its next commit (default 0: never). Timers
    /// stay. Each key then costs 40 bytes more against `state_mib`.
    pub state_ttl_ms: Option<u64>,
}

/// Sandbox grants. Everything is denied unless listed here.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// Names of host environment variables the plugin may read.
    #[serde(default)]
    pub env: Vec<String>,
    /// Directories the plugin may read, as `"host/path"` (seen at the same
    /// path) or `"host/path:/guest/path"`; relative to the pipeline file.
    #[serde(default)]
    pub read_dirs: Vec<String>,
    /// Whether the plugin may open sockets and resolve names.
    #[serde(default)]
    pub network: bool,
}
