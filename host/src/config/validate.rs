//! From pipeline files to runnable [`Pipeline`]s, reporting every error found
//! with its file, line and column (what `sluice check` prints).

use super::env::expand;
use super::file::*;
use crate::connector::{Check, Report};
use crate::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use crate::sinks::SinkConfig;
use crate::sources::SourceConfig;
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
    /// Where stateful plugins' state is kept (`[state]`); `None`: the one
    /// exactly-once postgres sink.
    pub state: Option<StateSpec>,
}

/// A pipeline's `[state]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum StateSpec {
    /// With this exactly-once postgres sink's rows.
    Sink(String),
    /// In a database of its own.
    Postgres(crate::state::postgres::PostgresStateConfig),
}

/// One transform of a validated pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformSpec {
    /// The plugin component, resolved against the pipeline file's folder.
    pub path: PathBuf,
    pub config: Vec<(String, String)>,
    pub limits: Limits,
    pub grants: Grants,
    /// SHA-256 of the plugin file when the pipeline was loaded with a runtime
    /// (empty otherwise): replacing the `.wasm` changes the pipeline.
    pub hash: String,
    /// A candidate version run beside this one (a shadow run).
    pub shadow: Option<ShadowSpec>,
    /// The stage's event time (`[transforms.event_time]`), for a stateful plugin.
    pub event_time: Option<crate::state::time::EventTime>,
}

/// A transform's shadow run, validated: the candidate and how its outputs
/// are compared (see [`ShadowConfig`] for each setting).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSpec {
    /// The candidate component, resolved against the pipeline file's folder.
    pub path: PathBuf,
    pub config: Vec<(String, String)>,
    /// SHA-256 of the candidate, as [`TransformSpec::hash`].
    pub hash: String,
    pub sample: f64,
    pub tolerance: f64,
    pub ignore: Vec<String>,
    pub samples: usize,
    pub promote_after: Option<PromoteAfter>,
}

/// Samples of differences a shadow report keeps by default.
pub const DEFAULT_SHADOW_SAMPLES: usize = 20;

/// A plugin's config table as its `init` gets it: strings as they are,
/// numbers and booleans written out, arrays and tables as JSON.
fn plugin_config(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(_) | toml::Value::Table(_) => serde_json::to_string(v).unwrap_or_default(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    /// The file as a TOML document with spans, to find where a key is written.
    doc: Option<toml::Spanned<toml::de::DeTable<'a>>>,
    errors: Vec<ConfigError>,
}

impl Reporter<'_> {
    /// The span of the value at `path` (keys from the top of the file; a
    /// number indexes an array, as `transforms`), if written.
    fn span_of(&self, path: &[&str]) -> Option<Range<usize>> {
        let mut table = Some(self.doc.as_ref()?.get_ref());
        let mut array = None;
        let mut span = None;
        for key in path {
            let value = match (key.parse::<usize>(), array) {
                (Ok(i), Some(items)) => <[_]>::get(items, i)?,
                _ => table?.get(*key)?,
            };
            span = Some(value.span());
            table = value.get_ref().as_table();
            array = value.get_ref().as_array().map(|a| &a[..]);
        }
        span
    }

    /// Reports `value` at `path` (said as `place`) unless it is within `range`.
    fn range(&mut self, place: &str, path: &[&str], value: Option<u64>, range: std::ops::RangeInclusive<u64>) {
        let Some(value) = value.filter(|v| !range.contains(v)) else { return };
        let key = path.last().copied().unwrap_or_default();
        let span = self.span_of(path).unwrap_or(0..0);
        let message = crate::connector::out_of_range(key, value, &range);
        self.at(span, format!("{place}: {message}"));
    }

    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.errors.push(ConfigError { file: self.file.to_path_buf(), line, column, message: message.into() });
    }
}

impl Report for Reporter<'_> {
    fn span_of(&self, path: &[&str]) -> Option<Range<usize>> {
        Reporter::span_of(self, path)
    }

    fn at(&mut self, span: Range<usize>, message: String) {
        Reporter::at(self, span, message);
    }

    fn count(&self) -> usize {
        self.errors.len()
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

    let connections = crate::clients::kafka::check::connections(&parsed.connections, dir, report);
    let mut source = parsed.source.get_ref().clone();
    source.connector_mut().check(&mut Check::new(&["source"], parsed.source.span(), dir, &connections, report));

    let transforms = parsed
        .transforms
        .iter()
        .enumerate()
        .map(|(i, t)| check_transform(i, t, dir, &name, &parsed.sinks, runtime, report))
        .collect();

    if parsed.sinks.is_empty() {
        report.at(0..0, "no sinks: add at least one `[sinks.NAME]` table");
    }
    let mut sinks = BTreeMap::new();
    for (sink_name, sink) in &parsed.sinks {
        let mut resolved = sink.get_ref().clone();
        resolved.connector_mut().check(&mut Check::new(&["sinks", sink_name], sink.span(), dir, &connections, report));
        sinks.insert(sink_name.clone(), resolved);
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
    let mut dead_letter = parsed.dead_letter.get_ref().clone();
    if dead_letter.holds_dead_letters() {
        let span = parsed.dead_letter.span();
        dead_letter.connector_mut().check(&mut Check::new(&["dead_letter"], span, dir, &connections, report));
    } else {
        let kinds: Vec<String> = crate::sinks::DEAD_LETTER_KINDS.iter().map(|k| format!("{k:?}")).collect();
        report.at(
            parsed.dead_letter.span(),
            format!(
                "[dead_letter]: type {:?} cannot hold dead letters; use {}",
                dead_letter.kind(),
                kinds.join(" or ")
            ),
        );
    }

    let state = parsed.state.as_ref().and_then(|state| check_state(state, &sinks, &source, dir, &connections, report));

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
        state,
    }
}

/// Checks `[state]`: one place to keep the state, which can keep it.
fn check_state(
    state: &toml::Spanned<StateConfig>,
    sinks: &BTreeMap<String, SinkConfig>,
    source: &SourceConfig,
    dir: &Path,
    connections: &BTreeMap<String, crate::connector::KafkaConnection>,
    report: &mut Reporter,
) -> Option<StateSpec> {
    let table: &[&str] = if state.get_ref().postgres.is_some() { &["state", "postgres"] } else { &["state"] };
    let mut cx = Check::new(table, state.span(), dir, connections, report);
    match state.get_ref() {
        StateConfig { sink: Some(_), postgres: Some(_) } => {
            cx.error("say one of `state.sink` and `[state.postgres]`, not both");
            None
        }
        StateConfig { sink: None, postgres: None } => {
            cx.error("say where the state is kept: `sink = \"NAME\"` (an exactly-once postgres sink) or a `[state.postgres]` table");
            None
        }
        StateConfig { sink: Some(name), postgres: None } => {
            match sinks.get(name).map(|sink| (sink.kind(), sink.connector().can_keep_state())) {
                Some((kind, Err(why))) => {
                    cx.error_at(&["sink"], format!("sink {name:?} ({kind}) cannot keep the state: {why}"))
                }
                Some(_) if !source.connector().replays() => cx.error_at(
                    &["sink"],
                    format!("sink {name:?} cannot keep the state: a {} source cannot read anything again, so state kept with its offsets could not be restored to match them", source.kind()),
                ),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
                    cx.error_at(&["sink"], format!("{name:?} is not a sink of this pipeline (sinks: {})", known.join(", ")))
                }
            }
            Some(StateSpec::Sink(name.clone()))
        }
        StateConfig { sink: None, postgres: Some(pg) } => {
            pg.check(&mut cx);
            if !source.connector().replays() {
                cx.error(format!(
                    "a {} source cannot read anything again: state kept with its offsets could not be restored to match them",
                    source.kind()
                ));
            }
            Some(StateSpec::Postgres(pg.clone()))
        }
    }
}

fn check_transform(
    index: usize,
    t: &TransformConfig,
    dir: &Path,
    pipeline: &str,
    sinks: &BTreeMap<String, toml::Spanned<crate::sinks::SinkConfig>>,
    runtime: Option<&Runtime>,
    report: &mut Reporter,
) -> TransformSpec {
    let path = dir.join(t.plugin.get_ref());
    let config = plugin_config(&t.config);
    let defaults = Limits::default();
    // Every limit has a range (the memory of a 32-bit WebAssembly instance is 4 GiB at most).
    let at = index.to_string();
    let l = &t.limits;
    let n = |v: Option<usize>| v.map(|v| v as u64);
    for (key, value, range) in [
        ("cpu_ms", l.cpu_ms, 1..=3_600_000),
        ("memory_mib", n(l.memory_mib), 1..=4096),
        ("output_mib", n(l.output_mib), 1..=4096),
        ("max_outputs", n(l.max_outputs), 1..=100_000_000),
        ("batch_output_mib", n(l.batch_output_mib), 1..=65_536),
        ("log_lines_per_s", l.log_lines_per_s.map(u64::from), 0..=1_000_000),
        ("log_burst", l.log_burst.map(u64::from), 0..=1_000_000),
        ("state_mib", n(l.state_mib), 0..=1_048_576),
        ("state_ttl_ms", l.state_ttl_ms, 0..=3_153_600_000_000),
    ] {
        report.range(&format!("transform {} limits", index + 1), &["transforms", &at, "limits", key], value, range);
    }
    if let Some(event) = &t.event_time {
        let e = event.get_ref();
        for (key, value, range) in [
            ("allowed_lateness_ms", e.allowed_lateness_ms, 0..=3_153_600_000_000),
            ("idle_timeout_ms", e.idle_timeout_ms, 0..=3_153_600_000_000),
            ("max_ahead_ms", e.max_ahead_ms, 1..=3_153_600_000_000),
        ] {
            let place = format!("transform {} event_time", index + 1);
            report.range(&place, &["transforms", &at, "event_time", key], Some(value), range);
        }
    }
    let limits = Limits {
        cpu_ms: t.limits.cpu_ms.unwrap_or(defaults.cpu_ms),
        memory_bytes: t.limits.memory_mib.map_or(defaults.memory_bytes, |m| m << 20),
        output_bytes: t.limits.output_mib.map_or(defaults.output_bytes, |m| m << 20),
        outputs: t.limits.max_outputs.unwrap_or(defaults.outputs),
        batch_output_bytes: t.limits.batch_output_mib.map_or(defaults.batch_output_bytes, |m| m << 20),
        log_lines_per_s: t.limits.log_lines_per_s.unwrap_or(defaults.log_lines_per_s),
        log_burst: t.limits.log_burst.unwrap_or(defaults.log_burst),
        state: crate::state::StateLimits {
            bytes: t.limits.state_mib.map_or(defaults.state.bytes, |m| m << 20),
            ttl: t.limits.state_ttl_ms.filter(|ms| *ms > 0).map(std::time::Duration::from_millis),
        },
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
    let event_time = t.event_time.as_ref().map(|e| check_event_time(index, e, sinks, report));
    let mut spec = TransformSpec { path, config, limits, grants, hash: String::new(), shadow: None, event_time };
    if !spec.path.is_file() {
        report.at(t.plugin.span(), format!("plugin file {} does not exist", spec.path.display()));
    } else if let Some(runtime) = runtime {
        if let Err(message) = spec.load(runtime, pipeline) {
            report.at(t.plugin.span(), message);
        }
    }
    if let Some(shadow) = &t.shadow {
        spec.shadow = Some(check_shadow(index, shadow, &spec, dir, pipeline, runtime, report));
    }
    spec
}

fn check_event_time(
    index: usize,
    event: &toml::Spanned<EventTimeConfig>,
    sinks: &BTreeMap<String, toml::Spanned<crate::sinks::SinkConfig>>,
    report: &mut Reporter,
) -> crate::state::time::EventTime {
    use crate::state::time::{EventTime, LatePolicy};
    let c = event.get_ref();
    let late = match &c.late {
        LateConfig::Policy(LatePolicyName::Drop) => LatePolicy::Drop,
        LateConfig::Policy(LatePolicyName::DeadLetter) | LateConfig::Default => LatePolicy::DeadLetter,
        LateConfig::Route { route } => {
            if !sinks.contains_key(route) {
                let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
                report.at(
                    event.span(),
                    format!(
                        "transform {} event_time: late route {route:?} is not a sink of this pipeline (sinks: {})",
                        index + 1,
                        known.join(", ")
                    ),
                );
            }
            LatePolicy::Route(route.clone())
        }
    };
    EventTime::from_ms(c.allowed_lateness_ms, c.idle_timeout_ms, c.max_ahead_ms, late)
}

fn check_shadow(
    index: usize,
    shadow: &toml::Spanned<Shadow>,
    live: &TransformSpec,
    dir: &Path,
    pipeline: &str,
    runtime: Option<&Runtime>,
    report: &mut Reporter,
) -> ShadowSpec {
    let (span, c) = (shadow.span(), &shadow.get_ref().0);
    let mut bad = |message: String| report.at(span.clone(), format!("transform {} shadow: {message}", index + 1));
    let sample = c.sample.unwrap_or(1.0);
    if !(sample > 0.0 && sample <= 1.0) {
        bad(format!("sample = {sample} must be above 0 and at most 1"));
    }
    let tolerance = c.tolerance.unwrap_or(0.0);
    if !(tolerance >= 0.0 && tolerance.is_finite()) {
        bad(format!("tolerance = {tolerance} must be a finite number, 0 or more"));
    }
    if let Some(p) = &c.promote_after {
        if p.batches == 0 {
            bad("promote_after.batches must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&p.max_diff_ratio) {
            bad(format!("promote_after.max_diff_ratio = {} must be from 0 to 1", p.max_diff_ratio));
        }
    }
    if let Some(samples) = c.samples.filter(|n| *n > 10_000) {
        bad(crate::connector::out_of_range("samples", samples as u64, &(0..=10_000)));
    }
    if c.ignore.iter().any(|i| i.is_empty() || i.split('.').any(str::is_empty)) {
        bad("ignore holds an empty path".into());
    }
    let mut spec = ShadowSpec {
        path: dir.join(&c.plugin),
        config: c.config.as_ref().map_or_else(|| live.config.clone(), plugin_config),
        hash: String::new(),
        sample,
        tolerance,
        ignore: c.ignore.clone(),
        samples: c.samples.unwrap_or(DEFAULT_SHADOW_SAMPLES),
        promote_after: c.promote_after,
    };
    if !spec.path.is_file() {
        bad(format!("plugin file {} does not exist", spec.path.display()));
    } else if let Some(runtime) = runtime {
        let candidate =
            TransformSpec { path: spec.path.clone(), config: spec.config.clone(), shadow: None, ..live.clone() };
        match candidate.check_init(runtime, pipeline) {
            Ok(hash) => spec.hash = hash,
            Err(message) => bad(message),
        }
    }
    spec
}

impl TransformSpec {
    /// Loads the plugin at `path` and runs its `init` with this config (so
    /// a plugin that rejects it is an error here), then keeps its hash.
    pub fn load(&mut self, runtime: &Runtime, pipeline: &str) -> Result<(), String> {
        self.hash = self.check_init(runtime, pipeline)?;
        Ok(())
    }

    /// Loads the plugin and runs its `init`; returns its hash.
    fn check_init(&self, runtime: &Runtime, pipeline: &str) -> Result<String, String> {
        let plugin = Plugin::load(runtime, &self.path).map_err(|e| e.to_string())?;
        PluginInstance::new(plugin.clone(), self.config.clone(), self.limits.clone(), self.grants.clone(), pipeline)
            .map_err(|e| e.to_string())?;
        Ok(plugin.hash.clone())
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
