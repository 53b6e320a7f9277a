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
    pub source: SourceConfig,
    pub transforms: Vec<TransformSpec>,
    pub sinks: BTreeMap<String, SinkConfig>,
    pub default_sink: String,
    pub dead_letter: SinkConfig,
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
        }
    }
}

struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Reporter<'_> {
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
    let text = expand(raw, |name| std::env::var(name).ok()).map_err(|missing| {
        missing
            .into_iter()
            .map(|m| ConfigError {
                file: file.to_path_buf(),
                line: m.line,
                column: m.column,
                message: format!("environment variable `{}` is not set (write `${{{}:-default}}` for a default)", m.name, m.name),
            })
            .collect::<Vec<_>>()
    })?;
    let mut report = Reporter { file, text: &text, errors: Vec::new() };
    let parsed: PipelineFile = match toml::from_str(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            report.at(e.span().unwrap_or(0..0), e.message().trim_end().to_string());
            return Err(report.errors);
        }
    };
    let pipeline = check(parsed, file, runtime, &mut report);
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

    let source_span = parsed.source.span();
    match parsed.source.get_ref() {
        SourceConfig::Kafka(k) => {
            if k.topics.is_empty() {
                report.at(source_span.clone(), "[source]: `topics` is empty");
            }
            if k.batch_max_records == 0 {
                report.at(source_span.clone(), "[source]: `batch_max_records` must be at least 1");
            }
            if k.properties.contains_key("enable.auto.commit") {
                report.at(source_span, "[source.properties]: `enable.auto.commit` is Sluice's: offsets are committed after the sinks have the data");
            }
        }
    }

    let transforms = parsed
        .transforms
        .iter()
        .enumerate()
        .map(|(i, t)| check_transform(i, t, dir, &name, runtime, report))
        .collect();

    if parsed.sinks.is_empty() {
        report.at(0..0, "no sinks: add at least one `[sinks.NAME]` table");
    }
    for (sink_name, sink) in &parsed.sinks {
        check_sink(&format!("[sinks.{sink_name}]"), sink, report);
    }
    let default_sink = match &parsed.default_sink {
        Some(d) if parsed.sinks.contains_key(d.get_ref()) => d.get_ref().clone(),
        Some(d) => {
            let known: Vec<&str> = parsed.sinks.keys().map(String::as_str).collect();
            report.at(d.span(), format!("default_sink {:?} is not a sink of this pipeline (sinks: {})", d.get_ref(), known.join(", ")));
            String::new()
        }
        None if parsed.sinks.len() == 1 => parsed.sinks.keys().next().cloned().unwrap_or_default(),
        None if parsed.sinks.is_empty() => String::new(),
        None => {
            report.at(0..0, "several sinks: say which one takes unrouted outputs with `default_sink = \"NAME\"`");
            String::new()
        }
    };
    match parsed.dead_letter.get_ref() {
        SinkConfig::Kafka(_) | SinkConfig::Stdout(_) => check_sink("[dead_letter]", &parsed.dead_letter, report),
        other => report.at(
            parsed.dead_letter.span(),
            format!("[dead_letter]: type {:?} cannot hold dead letters; use \"kafka\" or \"stdout\"", other.kind()),
        ),
    }

    Pipeline {
        name,
        file: file.to_path_buf(),
        source: parsed.source.into_inner(),
        transforms,
        sinks: parsed.sinks.into_iter().map(|(k, v)| (k, v.into_inner())).collect(),
        default_sink,
        dead_letter: parsed.dead_letter.into_inner(),
    }
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
    };
    let mut grants = Grants { network: t.grants.network, ..Grants::default() };
    for var in &t.grants.env {
        match std::env::var(var) {
            Ok(value) => grants.env.push((var.clone(), value)),
            Err(_) => report.at(t.plugin.span(), format!("transform {}: granted environment variable `{var}` is not set", index + 1)),
        }
    }
    for entry in &t.grants.read_dirs {
        let (host, guest) = match entry.split_once(':') {
            Some((host, guest)) => (host, guest.to_string()),
            None => (entry.as_str(), entry.clone()),
        };
        let host = dir.join(host);
        if !host.is_dir() {
            report.at(t.plugin.span(), format!("transform {}: granted directory {} does not exist", index + 1, host.display()));
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

fn check_sink(place: &str, sink: &toml::Spanned<SinkConfig>, report: &mut Reporter) {
    let span = sink.span();
    match sink.get_ref() {
        SinkConfig::Kafka(k) if k.topic.is_empty() => report.at(span, format!("{place}: `topic` is empty")),
        SinkConfig::Postgres(pg) => {
            if pg.columns.is_empty() {
                report.at(span.clone(), format!("{place}: `columns` is empty"));
            }
            for key in &pg.upsert_key {
                if !pg.columns.iter().any(|c| &c.name == key) {
                    report.at(span.clone(), format!("{place}: upsert_key column {key:?} is not among `columns`"));
                }
            }
        }
        _ => {}
    }
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
                Err(e) => errors.push(ConfigError { file: path.clone(), line: 1, column: 1, message: format!("cannot list folder: {e}") }),
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
