//! From pipeline files to runnable [`Pipeline`]s, reporting every error found
//! with its file, line and column (what `sluice check` prints).

use super::env::expand;
use super::file::*;
use crate::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A problem in a pipeline file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A validated pipeline, ready to build.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    /// Secret files the pipeline reads (`${file:/path}`): a change reloads it.
    pub secret_files: Vec<PathBuf>,
    pub source: SourceConfig,
    pub transforms: Vec<TransformSpec>,
    pub sinks: BTreeMap<String, SinkConfig>,
    pub default_sink: String,
    pub dead_letter: SinkConfig,
    pub on_plugin_failure: OnPluginFailure,
}

/// One transform of a validated pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformSpec {
    /// The plugin component, resolved against the pipeline file's folder.
    pub path: PathBuf,
    pub config: Vec<(String, String)>,
    pub limits: Limits,
    pub grants: Grants,
    /// SHA-256 of the plugin file when the pipeline was loaded with a runtime
    /// (empty otherwise): replacing the `.wasm` changes the pipeline.
    pub hash: String,
}

impl Pipeline {
    /// The Kafka consumer group: configured, or `sluice-<name>`.
    pub fn group(&self) -> String {
        match &self.source {
            SourceConfig::Kafka(k) => k.group.clone().unwrap_or_else(|| format!("sluice-{}", self.name)),
            SourceConfig::WebSocket(_) => format!("sluice-{}", self.name),
        }
    }
}

struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    /// The file as a TOML document with spans, to find where a key is written.
    doc: Option<toml::Spanned<toml::de::DeTable<'a>>>,
    errors: Vec<ConfigError>,
}

impl Reporter<'_> {
    /// The span of the value at `path` (keys from the top of the file), if written.
    fn span_of(&self, path: &[&str]) -> Option<Range<usize>> {
        let mut table = self.doc.as_ref()?.get_ref();
        let mut span = None;
        for (i, key) in path.iter().enumerate() {
            let value = table.get(*key)?;
            span = Some(value.span());
            if i + 1 < path.len() {
                table = value.get_ref().as_table()?;
            }
        }
        span
    }

    /// Reports `message` at the value of `path`, or at `fallback` when it is not written there.
    fn at_key(&mut self, path: &[&str], fallback: Range<usize>, message: impl Into<String>) {
        let span = self.span_of(path).unwrap_or(fallback);
        self.at(span, message);
    }

    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.errors.push(ConfigError { file: self.file.to_path_buf(), line, column, message: message.into() });
    }
}

/// Reads, expands and validates one pipeline file. With a `runtime`, each
/// plugin is also loaded and its `init` run with its config, so a plugin that
/// rejects its config is reported here, at the plugin's line.
pub fn load_pipeline(file: &Path, runtime: Option<&Runtime>) -> Result<Pipeline, Vec<ConfigError>> {
    let whole_file = |message: String| vec![ConfigError { file: file.to_path_buf(), line: 1, column: 1, message }];
    let raw = std::fs::read_to_string(file).map_err(|e| whole_file(format!("cannot read pipeline file: {e}")))?;
    parse_pipeline(&raw, file, runtime)
}

/// Expands and validates the text of a pipeline file read from `file`
/// (which names the errors and anchors relative paths).
pub fn parse_pipeline(raw: &str, file: &Path, runtime: Option<&Runtime>) -> Result<Pipeline, Vec<ConfigError>> {
    let expanded = expand(raw, |name| std::env::var(name).ok()).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| ConfigError { file: file.to_path_buf(), line: e.line, column: e.column, message: e.message })
            .collect::<Vec<_>>()
    })?;
    let text = expanded.text;
    let mut report = Reporter { file, text: &text, doc: toml::de::DeTable::parse(&text).ok(), errors: Vec::new() };
    let parsed: PipelineFile = match toml::from_str(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            report.at(e.span().unwrap_or(0..0), crate::secrets::redact(e.message().trim_end()));
            return Err(report.errors);
        }
    };
    let mut pipeline = check(parsed, file, runtime, &mut report);
    pipeline.secret_files = expanded.files;
    if report.errors.is_empty() {
        Ok(pipeline)
    } else {
        Err(report.errors)
    }
}

fn check(parsed: PipelineFile, file: &Path, runtime: Option<&Runtime>, report: &mut Reporter) -> Pipeline {
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = parsed
        .name
        .clone()
        .unwrap_or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        report.at(0..0, format!("pipeline name {name:?} must be non-empty letters, digits, `-` or `_`"));
    }

    let connections = check_connections(&parsed.connections, dir, report);
    let source_span = parsed.source.span();
    let mut source = parsed.source.get_ref().clone();
    match &mut source {
        SourceConfig::Kafka(k) => {
            resolve_kafka(
                &["source"],
                source_span.clone(),
                (&mut k.brokers, &k.connection, &mut k.properties),
                &connections,
                dir,
                report,
            );
            if k.topics.is_empty() {
                report.at(source_span.clone(), "[source]: `topics` is empty");
            }
            if k.batch_max_records == 0 {
                report.at(source_span.clone(), "[source]: `batch_max_records` must be at least 1");
            }
            if k.properties.contains_key("enable.auto.commit") {
                report.at_key(
                    &["source", "properties", "enable.auto.commit"],
                    source_span,
                    "[source.properties]: `enable.auto.commit` is Sluice's: offsets are committed after the sinks have the data",
                );
            }
        }
        SourceConfig::WebSocket(w) => {
            let url = w.url.trim();
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                report.at_key(
                    &["source", "url"],
                    source_span.clone(),
                    format!(
                        "[source]: url {:?} must start with ws:// or wss://",
                        crate::sources::websocket::display_url(url)
                    ),
                );
            }
            if let Err(e) = crate::sources::websocket::request(w) {
                report.at_key(&["source", "url"], source_span.clone(), format!("[source]: {e}"));
            }
            if let Some(ca) = &w.ca {
                let path = dir.join(ca);
                if !path.is_file() {
                    report.at_key(
                        &["source", "ca"],
                        source_span.clone(),
                        format!("[source]: ca file {} does not exist", path.display()),
                    );
                }
                w.ca = Some(path.display().to_string());
            }
            for (i, message) in w.subscribe.iter().enumerate() {
                if !(message.is_str() || message.is_table()) {
                    report.at_key(
                        &["source", "subscribe"],
                        source_span.clone(),
                        format!("[source]: subscribe message {} must be a string or a table", i + 1),
                    );
                }
            }
            if w.batch_max_records == 0 || w.buffer_records == 0 || w.buffer_bytes == 0 || w.max_message_bytes == 0 {
                report.at(source_span.clone(), "[source]: `batch_max_records`, `buffer_records`, `buffer_bytes` and `max_message_bytes` must be at least 1");
            }
        }
    }

    let transforms =
        parsed.transforms.iter().enumerate().map(|(i, t)| check_transform(i, t, dir, &name, runtime, report)).collect();

    if parsed.sinks.is_empty() {
        report.at(0..0, "no sinks: add at least one `[sinks.NAME]` table");
    }
    let mut sinks = BTreeMap::new();
    for (sink_name, sink) in &parsed.sinks {
        sinks.insert(sink_name.clone(), check_sink(&["sinks", sink_name], sink, &connections, dir, report));
    }
    // Exactly-once into PostgreSQL stores the source offsets with the rows and
    // skips what a source reads again; a WebSocket cannot read again, and its
    // offsets restart with each connection: its rows are written as they come.
    if matches!(source, SourceConfig::WebSocket(_)) {
        for sink in sinks.values_mut() {
            if let SinkConfig::Postgres(pg) = sink {
                pg.exactly_once = false;
            }
        }
    }
    let default_sink = match &parsed.default_sink {
        Some(d) if parsed.sinks.contains_key(d.get_ref()) => d.get_ref().clone(),
        Some(d) => {
            let known: Vec<&str> = parsed.sinks.keys().map(String::as_str).collect();
            report.at(
                d.span(),
                format!("default_sink {:?} is not a sink of this pipeline (sinks: {})", d.get_ref(), known.join(", ")),
            );
            String::new()
        }
        None if parsed.sinks.len() == 1 => parsed.sinks.keys().next().cloned().unwrap_or_default(),
        None if parsed.sinks.is_empty() => String::new(),
        None => {
            report.at(0..0, "several sinks: say which one takes unrouted outputs with `default_sink = \"NAME\"`");
            String::new()
        }
    };
    let dead_letter = match parsed.dead_letter.get_ref() {
        SinkConfig::Kafka(_) | SinkConfig::Stdout(_) => {
            check_sink(&["dead_letter"], &parsed.dead_letter, &connections, dir, report)
        }
        other => {
            report.at(
                parsed.dead_letter.span(),
                format!("[dead_letter]: type {:?} cannot hold dead letters; use \"kafka\" or \"stdout\"", other.kind()),
            );
            other.clone()
        }
    };

    Pipeline {
        name,
        file: file.to_path_buf(),
        secret_files: Vec::new(),
        source,
        transforms,
        sinks,
        default_sink,
        dead_letter,
        on_plugin_failure: parsed.on_plugin_failure,
    }
}

/// The Kafka connections of a file, each with its librdkafka properties
/// (from `tls`, `sasl` and `properties`), checked.
fn check_connections(
    connections: &BTreeMap<String, toml::Spanned<ConnectionConfig>>,
    dir: &Path,
    report: &mut Reporter,
) -> BTreeMap<String, (String, KafkaProperties)> {
    let mut out = BTreeMap::new();
    for (name, connection) in connections {
        let span = connection.span();
        let place = format!("[connections.{name}]");
        let ConnectionConfig::Kafka(kafka) = connection.get_ref();
        if kafka.brokers.trim().is_empty() {
            report.at_key(&["connections", name, "brokers"], span.clone(), format!("{place}: `brokers` is empty"));
        }
        let errors_before = report.errors.len();
        let mut properties = KafkaProperties::new();
        match crate::clients::kafka::connection_properties(kafka) {
            Ok(derived) => {
                for (key, value) in derived {
                    match crate::clients::kafka::check_property(key, &value, dir) {
                        Ok(value) => {
                            properties.insert(key.to_string(), value);
                        }
                        Err(message) => match typed_field(key) {
                            Some((table, field)) => report.at_key(
                                &["connections", name, table, field],
                                span.clone(),
                                format!("{place}: {message}"),
                            ),
                            None => report.at(span.clone(), format!("{place}: {message}")),
                        },
                    }
                }
            }
            Err(messages) => {
                for message in messages {
                    report.at(span.clone(), format!("{place}: {message}"));
                }
            }
        }
        check_properties(&place, &["connections", name], &kafka.properties, &mut properties, dir, report);
        if report.errors.len() == errors_before {
            if let Err(message) = crate::clients::kafka::check_client(&properties) {
                report.at(span.clone(), format!("{place}: {message}"));
            }
        }
        out.insert(name.clone(), (kafka.brokers.clone(), properties));
    }
    out
}

/// The `tls`/`sasl` field of a connection that a librdkafka property came from.
fn typed_field(property: &str) -> Option<(&'static str, &'static str)> {
    Some(match property {
        "ssl.ca.location" => ("tls", "ca"),
        "ssl.certificate.location" => ("tls", "cert"),
        "ssl.key.location" => ("tls", "key"),
        "ssl.key.password" => ("tls", "key_password"),
        "sasl.username" => ("sasl", "username"),
        "sasl.password" => ("sasl", "password"),
        "sasl.oauthbearer.token.endpoint.url" => ("sasl", "token_endpoint"),
        "sasl.oauthbearer.client.id" => ("sasl", "client_id"),
        "sasl.oauthbearer.client.secret" => ("sasl", "client_secret"),
        "sasl.oauthbearer.scope" => ("sasl", "scope"),
        "sasl.mechanism" | "sasl.oauthbearer.method" => ("sasl", "mechanism"),
        _ => return None,
    })
}

/// librdkafka properties by name.
type KafkaProperties = BTreeMap<String, String>;

/// Checks each of `own` (the `properties` of the table at `table`) and adds
/// it to `into` (over what is there).
fn check_properties(
    place: &str,
    table: &[&str],
    own: &KafkaProperties,
    into: &mut KafkaProperties,
    dir: &Path,
    report: &mut Reporter,
) {
    for (key, value) in own {
        match crate::clients::kafka::check_property(key, value, dir) {
            Ok(checked) => {
                into.insert(key.clone(), checked);
            }
            Err(message) => {
                let path: Vec<&str> = table.iter().copied().chain(["properties", key.as_str()]).collect();
                let fallback = report.span_of(table).unwrap_or(0..0);
                report.at_key(&path, fallback, format!("{place}.properties: {message}"));
            }
        }
    }
}

/// A Kafka source's or sink's `brokers`, `connection` and `properties`
/// (the table at `table`), resolved: the brokers of its connection, the
/// connection's properties under its own, every property checked.
fn resolve_kafka(
    table: &[&str],
    span: Range<usize>,
    (brokers, connection, properties): (&mut Option<String>, &Option<String>, &mut KafkaProperties),
    connections: &BTreeMap<String, (String, KafkaProperties)>,
    dir: &Path,
    report: &mut Reporter,
) {
    let place = format!("[{}]", table.join("."));
    let key = |k: &'static str| -> Vec<&str> { table.iter().copied().chain([k]).collect() };
    let mut merged = KafkaProperties::new();
    match (brokers.as_ref(), connection) {
        (Some(_), Some(_)) => report.at_key(
            &key("connection"),
            span.clone(),
            format!("{place}: give `brokers` or `connection`, not both (the connection has the brokers)"),
        ),
        (None, None) => report.at(
            span.clone(),
            format!("{place}: say where Kafka is: `brokers = \"host:port\"` or `connection = \"NAME\"`"),
        ),
        (Some(b), None) if b.trim().is_empty() => {
            report.at_key(&key("brokers"), span.clone(), format!("{place}: `brokers` is empty"))
        }
        (None, Some(c)) => match connections.get(c) {
            Some((connection_brokers, connection_properties)) => {
                *brokers = Some(connection_brokers.clone());
                merged = connection_properties.clone();
            }
            None => {
                let known: Vec<&str> = connections.keys().map(String::as_str).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                report.at_key(
                    &key("connection"),
                    span.clone(),
                    format!("{place}: no connection {c:?} in this file (connections: {known})"),
                );
            }
        },
        (Some(_), None) => {}
    }
    let errors_before = report.errors.len();
    check_properties(&place, table, properties, &mut merged, dir, report);
    if report.errors.len() == errors_before && !properties.is_empty() {
        if let Err(message) = crate::clients::kafka::check_client(&merged) {
            report.at(span, format!("{place}: {message}"));
        }
    }
    *properties = merged;
}

fn check_transform(
    index: usize,
    t: &TransformConfig,
    dir: &Path,
    pipeline: &str,
    runtime: Option<&Runtime>,
    report: &mut Reporter,
) -> TransformSpec {
    let path = dir.join(t.plugin.get_ref());
    let config: Vec<(String, String)> = t
        .config
        .iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(_) | toml::Value::Table(_) => serde_json::to_string(v).unwrap_or_default(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    let defaults = Limits::default();
    let limits = Limits {
        cpu_ms: t.limits.cpu_ms.unwrap_or(defaults.cpu_ms),
        memory_bytes: t.limits.memory_mib.map_or(defaults.memory_bytes, |m| m << 20),
        output_bytes: t.limits.output_mib.map_or(defaults.output_bytes, |m| m << 20),
        outputs: t.limits.max_outputs.unwrap_or(defaults.outputs),
        batch_output_bytes: t.limits.batch_output_mib.map_or(defaults.batch_output_bytes, |m| m << 20),
        log_lines_per_s: t.limits.log_lines_per_s.unwrap_or(defaults.log_lines_per_s),
        log_burst: t.limits.log_burst.unwrap_or(defaults.log_burst),
    };
    let mut grants = Grants { network: t.grants.network, ..Grants::default() };
    for var in &t.grants.env {
        match std::env::var(var) {
            Ok(value) => {
                // What a plugin is handed may be a token: never shown.
                crate::secrets::register(&value);
                grants.env.push((var.clone(), value))
            }
            Err(_) => report.at(
                t.plugin.span(),
                format!("transform {}: granted environment variable `{var}` is not set", index + 1),
            ),
        }
    }
    for entry in &t.grants.read_dirs {
        let (host, guest) = match entry.split_once(':') {
            Some((host, guest)) => (host, guest.to_string()),
            None => (entry.as_str(), entry.clone()),
        };
        let host = dir.join(host);
        if !host.is_dir() {
            report.at(
                t.plugin.span(),
                format!("transform {}: granted directory {} does not exist", index + 1, host.display()),
            );
        }
        grants.read_dirs.push((host, guest));
    }
    let mut spec = TransformSpec { path, config, limits, grants, hash: String::new() };
    if !spec.path.is_file() {
        report.at(t.plugin.span(), format!("plugin file {} does not exist", spec.path.display()));
    } else if let Some(runtime) = runtime {
        let tried = Plugin::load(runtime, &spec.path).map_err(|e| e.to_string()).and_then(|plugin| {
            PluginInstance::new(plugin.clone(), spec.config.clone(), spec.limits.clone(), spec.grants.clone(), pipeline)
                .map(|_| plugin.hash.clone())
                .map_err(|e| e.to_string())
        });
        match tried {
            Ok(hash) => spec.hash = hash,
            Err(message) => report.at(t.plugin.span(), message),
        }
    }
    spec
}

/// Checks a sink (the table at `table`) and returns it resolved (a Kafka
/// sink's connection merged in).
fn check_sink(
    table: &[&str],
    sink: &toml::Spanned<SinkConfig>,
    connections: &BTreeMap<String, (String, KafkaProperties)>,
    dir: &Path,
    report: &mut Reporter,
) -> SinkConfig {
    let span = sink.span();
    let place = format!("[{}]", table.join("."));
    let key = |k: &'static str| -> Vec<&str> { table.iter().copied().chain([k]).collect() };
    let mut resolved = sink.get_ref().clone();
    match &mut resolved {
        SinkConfig::Kafka(k) => {
            if k.topic.is_empty() {
                report.at_key(&key("topic"), span.clone(), format!("{place}: `topic` is empty"));
            }
            resolve_kafka(table, span, (&mut k.brokers, &k.connection, &mut k.properties), connections, dir, report);
        }
        SinkConfig::Postgres(pg) => {
            if let Err(errors) = crate::clients::postgres::target(pg, dir) {
                for e in errors {
                    // An option the sink does not set came from the URL.
                    let at = match report.span_of(&key(e.option)) {
                        Some(at) => at,
                        None => report.span_of(&key("url")).unwrap_or(span.clone()),
                    };
                    report.at(at, format!("{place}: {}", e.message));
                }
            }
            if pg.columns.is_empty() {
                report.at(span.clone(), format!("{place}: `columns` is empty"));
            }
            for key in &pg.upsert_key {
                if !pg.columns.iter().any(|c| &c.name == key) {
                    report.at(span.clone(), format!("{place}: upsert_key column {key:?} is not among `columns`"));
                }
            }
        }
        SinkConfig::Stdout(_) => {}
    }
    resolved
}

/// Expands the arguments of `sluice run`/`check`: files as they are, folders
/// to their `*.toml` files (sorted). Also rejects two pipelines with one name.
pub fn load_dir_or_files(paths: &[PathBuf], runtime: Option<&Runtime>) -> Result<Vec<Pipeline>, Vec<ConfigError>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(ConfigError {
                    file: path.clone(),
                    line: 1,
                    column: 1,
                    message: format!("cannot list folder: {e}"),
                }),
            }
        } else {
            files.push(path.clone());
        }
    }
    let mut pipelines: Vec<Pipeline> = Vec::new();
    for file in files {
        match load_pipeline(&file, runtime) {
            Ok(p) => {
                if let Some(other) = pipelines.iter().find(|o| o.name == p.name) {
                    errors.push(ConfigError {
                        file: file.clone(),
                        line: 1,
                        column: 1,
                        message: format!("pipeline name {:?} is already used by {}", p.name, other.file.display()),
                    });
                } else {
                    pipelines.push(p);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(pipelines)
    } else {
        Err(errors)
    }
}
