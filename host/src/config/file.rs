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

use crate::secrets::Secret;
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
    /// Named connections (a Kafka cluster with its TLS and SASL settings),
    /// referenced by `connection = "NAME"` from the source, the Kafka sinks
    /// and the dead-letter section.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ConnectionConfig>")]
    pub connections: BTreeMap<String, Spanned<ConnectionConfig>>,
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

/// A named connection, chosen by `type`.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ConnectionConfig {
    Kafka(KafkaConnectionConfig),
}

/// `type = "kafka"`: a Kafka cluster and how to reach it. Sluice turns `tls`
/// and `sasl` into librdkafka's properties (`security.protocol` follows from
/// which of them are set); `properties` adds or overrides any other.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaConnectionConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`).
    pub brokers: String,
    /// Encrypt with TLS (`security.protocol` ssl, or sasl_ssl with `sasl`).
    pub tls: Option<KafkaTlsConfig>,
    /// Authenticate with SASL (`security.protocol` sasl_ssl with `tls`,
    /// else sasl_plaintext).
    pub sasl: Option<KafkaSaslConfig>,
    /// librdkafka properties for every client of this connection; a
    /// source's or sink's own `properties` override them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// TLS towards the brokers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaTlsConfig {
    /// PEM file of the CA certificates that signed the brokers' certificates
    /// (`ssl.ca.location`). Default: the system's trusted roots.
    pub ca: Option<String>,
    /// PEM file of this client's certificate, for mutual TLS (`ssl.certificate.location`).
    pub cert: Option<String>,
    /// PEM file of this client's private key, for mutual TLS (`ssl.key.location`).
    pub key: Option<String>,
    /// Password of an encrypted `key` (`ssl.key.password`).
    #[schemars(with = "Option<String>")]
    pub key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to
    /// (default true; `ssl.endpoint.identification.algorithm`).
    #[serde(default = "default_true")]
    pub verify_hostname: bool,
}

/// SASL authentication towards the brokers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    pub mechanism: SaslMechanism,
    /// User name (PLAIN, SCRAM).
    pub username: Option<String>,
    /// Password (PLAIN, SCRAM): best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub password: Option<Secret>,
    /// OAUTHBEARER: the OIDC token endpoint that grants client-credentials
    /// tokens (`sasl.oauthbearer.token.endpoint.url`).
    pub token_endpoint: Option<String>,
    /// OAUTHBEARER: the OIDC client id.
    pub client_id: Option<String>,
    /// OAUTHBEARER: the OIDC client secret: best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub client_secret: Option<Secret>,
    /// OAUTHBEARER: the scope requested (optional).
    pub scope: Option<String>,
}

/// The SASL mechanisms this build of librdkafka supports.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// A source, chosen by `type`.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Kafka(KafkaSourceConfig),
    #[serde(rename = "websocket")]
    WebSocket(WebSocketSourceConfig),
}

/// `type = "websocket"`: a live feed (e.g. Finnhub's trades). Each text or
/// binary frame is one record; timestamp = time received; origin = the URL's
/// host, partition 0, a per-connection sequence as offset. A WebSocket
/// cannot replay: frames sent while disconnected are lost (at-most-once
/// across reconnects); within a connection nothing is dropped.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSourceConfig {
    /// `ws://` or `wss://` URL; a token in its query (`?token=…`) is a secret.
    pub url: String,
    /// HTTP headers of the handshake (e.g. `Authorization`); their values are secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Messages sent after every connect and reconnect: strings as they
    /// are, tables as JSON (e.g. `{ type = "subscribe", symbol = "BINANCE:BTCUSDT" }`).
    #[serde(default)]
    #[schemars(with = "Vec<serde_json::Value>")]
    pub subscribe: Vec<toml::Value>,
    /// PEM file of CA certificates to trust for `wss://` (default: the system's roots).
    pub ca: Option<String>,
    /// Seconds between the pings Sluice sends (default 20; 0: none).
    #[serde(default = "default_ping_secs")]
    pub ping_secs: u64,
    /// Reconnect when no frame arrives for this many seconds (default 60; 0: never).
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Frames over this many bytes are dead-lettered (cut to 64 KiB) instead
    /// of transformed (default 1 MiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Frames received but not yet transformed, at most; past it Sluice stops
    /// reading and TCP slows the server down (default 10,000).
    #[serde(default = "default_buffer_records")]
    pub buffer_records: usize,
    /// Bytes of frames received but not yet transformed, at most (default
    /// 64 MiB); past it Sluice stops reading, as for `buffer_records`. A
    /// source holds at most this plus one frame being read (up to twice
    /// `max_message_bytes`).
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    /// A batch closes at this many records, as soon as no further record
    /// is ready (a trickle goes out at once)...
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// ...or this many milliseconds after its first record, whichever comes first.
    #[serde(default = "default_batch_max_ms")]
    pub batch_max_ms: u64,
}

fn default_ping_secs() -> u64 {
    20
}
fn default_idle_timeout_secs() -> u64 {
    60
}
fn default_max_message_bytes() -> usize {
    1 << 20
}
fn default_buffer_records() -> usize {
    10_000
}
fn default_buffer_bytes() -> usize {
    64 << 20
}

/// `type = "kafka"`: a consumer group over one or more topics.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`). Give
    /// either `brokers` or `connection`.
    pub brokers: Option<String>,
    /// The named Kafka connection (`[connections.NAME]`) to read from.
    pub connection: Option<String>,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id. Default: `sluice-<pipeline name>`. Instances sharing
    /// a group share the partitions.
    pub group: Option<String>,
    /// Static group membership: a stable id of this instance within the
    /// group (e.g. `"${HOSTNAME}"`), unique per running instance. An instance
    /// restarting with the same id gets its partitions back at once instead
    /// of after the group's session timeout. Unset: dynamic membership.
    pub instance_id: Option<String>,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    #[serde(default)]
    pub offset_reset: OffsetReset,
    /// A batch closes at this many records, as soon as no further record
    /// is ready (a trickle goes out at once)...
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// ...or this many milliseconds after its first record, whichever comes first.
    #[serde(default = "default_batch_max_ms")]
    pub batch_max_ms: u64,
    /// librdkafka consumer properties passed through as they are
    /// (e.g. `"session.timeout.ms" = "10000"`), over the connection's. Sluice
    /// owns `enable.auto.commit` (always false): offsets are committed only
    /// after every sink has the batch.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSourceConfig {
    /// The bootstrap servers (after validation, also those of a connection).
    pub fn brokers(&self) -> &str {
        self.brokers.as_deref().unwrap_or_default()
    }
}

fn default_batch_max_records() -> usize {
    1000
}
fn default_batch_max_ms() -> u64 {
    50
}

/// Where a consumer group without committed offsets starts.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
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

/// A sink, chosen by `type`.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Kafka(KafkaSinkConfig),
    Postgres(PostgresSinkConfig),
    Stdout(StdoutSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::Stdout(_) => "stdout",
        }
    }
}

/// `type = "kafka"`: an idempotent producer writing to one topic; keys,
/// headers and timestamps are kept.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, comma-separated. Give either `brokers` or `connection`.
    pub brokers: Option<String>,
    /// The named Kafka connection (`[connections.NAME]`) to write to.
    pub connection: Option<String>,
    /// Destination topic.
    pub topic: String,
    /// Compression of the batches written: `none`, `gzip`, `snappy`, `lz4`
    /// (default) or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// librdkafka producer properties passed through as they are, over the connection's.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSinkConfig {
    /// The bootstrap servers (after validation, also those of a connection).
    pub fn brokers(&self) -> &str {
        self.brokers.as_deref().unwrap_or_default()
    }
}

/// A Kafka producer's compression codec (`compression.type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// `type = "postgres"`: rows into a table, one per output record, written
/// with binary COPY in one transaction per batch. Output values must be JSON
/// objects; each column takes the field of its `field` (default: its name).
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// Connection string, as a URL (`postgres://user@host:5432/db?sslmode=verify-full`)
    /// or libpq's `key=value` form. `sslmode`, `sslrootcert`, `sslcert` and
    /// `sslkey` have libpq's meaning, in the URL or as the options below.
    pub url: String,
    /// Password, when it is not in `url`: best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub password: Option<Secret>,
    /// TLS: `disable`, `prefer` (libpq's default: TLS if the server offers
    /// it, unverified), `require` (TLS, unverified unless a root file is
    /// set or `~/.postgresql/root.crt` exists), `verify-ca` (the server's
    /// certificate chains to the root) or `verify-full` (and names the
    /// host). `verify-*` need a root, as in libpq. Overrides the URL's.
    pub sslmode: Option<String>,
    /// PEM file of the CA certificates to trust (libpq's default:
    /// `~/.postgresql/root.crt`), or `system` for the system's trusted roots,
    /// which only `sslmode=verify-full` may use (and is then the default).
    pub sslrootcert: Option<String>,
    /// PEM file of this client's certificate, for mutual TLS.
    pub sslcert: Option<String>,
    /// PEM file of this client's private key, for mutual TLS.
    pub sslkey: Option<String>,
    /// Destination table (optionally `schema.table`).
    pub table: String,
    /// Create the table (and schema) if missing, from `columns`.
    #[serde(default)]
    pub create_table: bool,
    /// The table's columns and where each takes its value from.
    pub columns: Vec<ColumnConfig>,
    /// Columns of a unique key: rows whose key exists are updated instead of
    /// inserted (`INSERT … ON CONFLICT … DO UPDATE`). Empty: plain inserts.
    #[serde(default)]
    pub upsert_key: Vec<String>,
    /// Exactly-once: each batch's rows and the source offsets they came from
    /// are committed in one transaction (into `offsets_table`), and rows of
    /// records read again after a crash, restart or rebalance are skipped.
    /// `false`: at-least-once, one statement fewer per batch. Always `false`
    /// behind a WebSocket source, which cannot read anything again.
    #[serde(default = "default_true")]
    pub exactly_once: bool,
    /// The table holding the source offsets of the rows written, keyed by
    /// pipeline, sink, topic and partition; created if missing. Default:
    /// `sluice_offsets` in the schema of `table`.
    pub offsets_table: Option<String>,
}

fn default_true() -> bool {
    true
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

/// `type = "stdout"`: one output value per line on standard output.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}
