//! `sluice plugin test`: a plugin over input lines. A stateless plugin is
//! called batch by batch; a stateful one (contract 0.3) runs through the
//! pipeline's own transform step ([`crate::topology::local`]) with its
//! state in memory.

use super::golden::Golden;
use super::input::{Fields, Lines, LinesSource};
use super::trace::Trace;
use crate::cli::parse_key_value;
use crate::record::{OutputRef, Record};
use crate::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use crate::shadow::diff::DiffOptions;
use crate::state::memory::MemoryState;
use crate::state::time::{EventTime, LatePolicy};
use crate::transforms::Chain;
use anyhow::Context;
use clap::Args;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin component (.wasm).
    pub plugin: PathBuf,
    /// A plugin configuration entry, KEY=VALUE (repeatable).
    #[arg(long = "config", short = 'c', value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Read input values from this file instead of stdin.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// Print each output as a JSON object with where it came from (`line`,
    /// or `timer` for a fired timer's), its key, route, timestamp and
    /// headers (value: embedded when it is JSON, else a string).
    #[arg(long)]
    pub json: bool,
    /// Records per call into the plugin (per batch, for a stateful plugin).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// CPU limit per call, in milliseconds.
    #[arg(long, default_value_t = Limits::default().cpu_ms)]
    pub cpu_ms: u64,
    /// Memory limit of the instance, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    pub memory_mib: usize,
    /// Write every log line of the plugin (no rate limit): for debugging.
    #[arg(long)]
    pub no_log_limit: bool,

    /// Compare the outputs with this golden file (as `--json` prints them,
    /// one per line) instead of printing them: exit 1 with the differences
    /// when they differ.
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
    /// With `--expect`: write the outputs to the file instead of comparing.
    #[arg(long, requires = "expect")]
    pub update: bool,
    /// With `--expect`: numbers that differ by at most this much are equal.
    #[arg(long, default_value_t = 0.0, requires = "expect")]
    pub tolerance: f64,
    /// With `--expect`: a field left out of the comparison, as a dotted
    /// path (repeatable).
    #[arg(long, requires = "expect")]
    pub ignore: Vec<String>,

    /// Stateful plugins: the JSON field (a dotted path) holding each
    /// record's event time, in ms since the Unix epoch. Without it the
    /// records have no timestamps, and timers fire only at the end.
    #[arg(long, value_name = "FIELD")]
    pub event_time: Option<String>,
    /// Stateful plugins: the JSON field whose value keys each record into
    /// one of `--partitions` partitions, as Kafka's default partitioner
    /// does (each partition has its own state and watermark). Default: one
    /// partition.
    #[arg(long, value_name = "FIELD", requires = "partitions")]
    pub partition_by: Option<String>,
    /// The topic the input's records come from, as the plugin sees it
    /// (state is kept per topic and partition).
    #[arg(long, default_value = "input")]
    pub topic: String,
    /// With `--partition-by`: how many partitions (the topic's count).
    #[arg(long, requires = "partition_by", value_parser = clap::value_parser!(u32).range(1..))]
    pub partitions: Option<u32>,
    /// Stateful plugins: `[transforms.event_time]`'s `allowed_lateness_ms`.
    #[arg(long, default_value_t = 0)]
    pub allowed_lateness_ms: u64,
    /// Stateful plugins: `idle_timeout_ms` (0: never).
    #[arg(long, default_value_t = 10_000)]
    pub idle_timeout_ms: u64,
    /// Stateful plugins: `max_ahead_ms`.
    #[arg(long, default_value_t = 3_600_000)]
    pub max_ahead_ms: u64,
    /// Stateful plugins: what becomes of a late record: `dead_letter`
    /// (reported as a failing line), `drop`, or `route:NAME` (printed with
    /// that route).
    #[arg(long, default_value = "dead_letter", value_parser = parse_late)]
    pub late: LatePolicy,
    /// Stateful plugins: start from the state in this file (written by
    /// `--state-out`).
    #[arg(long, value_name = "FILE")]
    pub state_in: Option<PathBuf>,
    /// Stateful plugins: instead of the outputs, print what happened to the
    /// state keys that begin with PREFIX, batch by batch: the lines, the
    /// values before and after, the timers set and fired, and the outputs
    /// keyed by them (`--batch-size 1`: line by line).
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["expect", "json"])]
    pub trace: Option<String>,
    /// Stateful plugins: write the final state to this file, one stored key
    /// per line (JSON: stage, partition, key and value in hex, and the
    /// plugin's key or timer readable).
    #[arg(long, value_name = "FILE")]
    pub state_out: Option<PathBuf>,
}

fn parse_late(text: &str) -> Result<LatePolicy, String> {
    match text {
        "dead_letter" => Ok(LatePolicy::DeadLetter),
        "drop" => Ok(LatePolicy::Drop),
        _ => match text.strip_prefix("route:") {
            Some(route) if !route.is_empty() => Ok(LatePolicy::Route(route.to_string())),
            _ => Err(format!("`{text}`: expected dead_letter, drop or route:NAME")),
        },
    }
}

pub fn test(runtime: &Runtime, args: PluginTestArgs) -> anyhow::Result<ExitCode> {
    let plugin = Plugin::load(runtime, &args.plugin)?;
    let mut limits = Limits { cpu_ms: args.cpu_ms, memory_bytes: args.memory_mib << 20, ..Limits::default() };
    if args.no_log_limit {
        limits.log_lines_per_s = 0;
    }
    let lines = Lines::open(args.input.as_deref(), &args.topic)?;
    let mut out = Emit::new(&args);
    let failed = match plugin.contract.has_state() {
        true => stateful(runtime, &args, limits, lines, &mut out)?,
        false => {
            let stateful_only = [
                ("--event-time", args.event_time.is_some()),
                ("--partition-by", args.partition_by.is_some()),
                ("--state-in", args.state_in.is_some()),
                ("--trace", args.trace.is_some()),
                ("--state-out", args.state_out.is_some()),
            ];
            if let Some((flag, _)) = stateful_only.iter().find(|(_, given)| *given) {
                anyhow::bail!(
                    "{flag} is for a stateful plugin (contract 0.3), and {} keeps no state (contract {})",
                    plugin.name,
                    plugin.contract
                );
            }
            let instance = PluginInstance::new(plugin, args.config.clone(), limits, Grants::default(), "plugin-test")?;
            stateless(instance, args.batch_size as usize, lines, &mut out)?
        }
    };
    // Against a golden file, the failing lines are part of what is compared.
    let passed = match args.expect {
        Some(_) => out.finish()?,
        None => out.finish()? && failed == 0,
    };
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Calls the plugin batch by batch; returns how many lines failed.
fn stateless(mut instance: PluginInstance, batch_size: usize, mut lines: Lines, out: &mut Emit) -> anyhow::Result<u64> {
    let mut failed = 0;
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        let record = lines.next_record()?;
        let ended = record.is_none();
        batch.extend(record);
        if batch.len() == batch_size || (ended && !batch.is_empty()) {
            let results = instance.process(&batch);
            if let Some(reason) = instance.take_failing() {
                eprintln!(
                    "sluice: the plugin version is failing: {reason}; the batch's remaining records were not run"
                );
            }
            for (record, result) in batch.iter().zip(results) {
                match result {
                    Ok(outputs) => {
                        for output in &outputs {
                            out.output(record, output.view())?;
                        }
                    }
                    Err(error) => {
                        failed += 1;
                        out.failed(record, &error)?;
                    }
                }
            }
            batch.clear();
        }
        if ended {
            return Ok(failed);
        }
    }
}

/// Runs a stateful plugin through the pipeline's transform step, its state
/// in memory; returns how many lines failed.
fn stateful(
    runtime: &Runtime,
    args: &PluginTestArgs,
    limits: Limits,
    lines: Lines,
    out: &mut Emit,
) -> anyhow::Result<u64> {
    let event_time =
        EventTime::from_ms(args.allowed_lateness_ms, args.idle_timeout_ms, args.max_ahead_ms, args.late.clone());
    let spec = crate::config::TransformSpec {
        path: args.plugin.clone(),
        config: args.config.clone(),
        limits,
        grants: Grants::default(),
        hash: String::new(),
        shadow: None,
        event_time: Some(event_time),
    };
    let chain = Chain::new(runtime, &[spec], "plugin-test")?;
    let state = match &args.state_in {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read the state {}", path.display()))?;
            MemoryState::read_json(&text, path)?
        }
        None => MemoryState::new(),
    };
    let fields = Fields {
        event_time: args.event_time.clone(),
        partition_by: args.partition_by.clone(),
        partitions: args.partitions.unwrap_or(1),
    };
    let source = Arc::new(LinesSource::new(lines, fields, args.batch_size as usize));
    let mut failed = 0;
    let mut trace = args.trace.as_deref().map(|prefix| Trace::new(prefix, &state));
    crate::cli::tokio_runtime()?.block_on(crate::topology::local::run_local(
        "plugin-test",
        source,
        chain,
        state.clone(),
        |ran| {
            if let Some(trace) = &mut trace {
                trace.batch(&ran, &state, &mut out.stdout)?;
            }
            for (record, result) in ran.batch.iter().zip(ran.results.iter()) {
                match result {
                    Ok(_) if trace.is_some() => {}
                    Ok(outputs) => {
                        for output in outputs {
                            out.output(record, output)?;
                        }
                    }
                    Err(failure) => {
                        failed += 1;
                        out.failed(record, &failure.error)?;
                    }
                }
            }
            Ok(())
        },
    ))?;
    if let Some(path) = &args.state_out {
        super::write_replacing(path, |file| state.write_json(file))?;
    }
    Ok(failed)
}

/// Where the outputs go: stdout (values, or `--json` lines), or a golden
/// file's comparison.
struct Emit {
    stdout: BufWriter<std::io::Stdout>,
    json: bool,
    golden: Option<Golden>,
}

impl Emit {
    fn new(args: &PluginTestArgs) -> Self {
        let golden = args
            .expect
            .clone()
            .map(|path| Golden::new(path, args.update, DiffOptions::new(args.tolerance, &args.ignore)));
        Emit { stdout: BufWriter::new(std::io::stdout()), json: args.json, golden }
    }

    /// An output of `record` (a source line, or a fired timer).
    fn output(&mut self, record: &Record, output: OutputRef<'_>) -> anyhow::Result<()> {
        // The JSON form (which parses the value) only when it is asked for:
        // plain values are the benchmarks' baseline.
        if let Some(golden) = &mut self.golden {
            golden.push(serde_json::to_string(&OutputJson::new(record, output))?);
        } else if self.json {
            serde_json::to_writer(&mut self.stdout, &OutputJson::new(record, output))?;
            self.stdout.write_all(b"\n")?;
        } else {
            self.stdout.write_all(output.value)?;
            self.stdout.write_all(b"\n")?;
        }
        Ok(())
    }

    /// `record` failed: reported on stderr (`line N: ...`, or `timer KEY
    /// at T: ...`) after the outputs before it, or compared with the
    /// golden file's failures.
    fn failed(&mut self, record: &Record, error: &str) -> anyhow::Result<()> {
        if let Some(golden) = &mut self.golden {
            let (line, timer) = from(record);
            golden.push(serde_json::to_string(&ErrorJson { line, timer, error })?);
            return Ok(());
        }
        self.stdout.flush()?;
        match record.origin.is_source() {
            true => eprintln!("line {}: {error}", record.origin.offset),
            false => eprintln!(
                "timer {:?} at {}: {error}",
                String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()),
                record.timestamp.unwrap_or_default()
            ),
        }
        Ok(())
    }

    /// Flushes the outputs, or compares them with the golden file (or
    /// writes it); `false` when they differ from it.
    fn finish(mut self) -> anyhow::Result<bool> {
        let matched = match self.golden.take() {
            Some(golden) => golden.finish(&mut self.stdout)?,
            None => true,
        };
        self.stdout.flush()?;
        Ok(matched)
    }
}

/// One output of `sluice plugin test --json` (and a golden file's line).
#[derive(serde::Serialize)]
struct OutputJson<'a> {
    /// The input line the output came from; `null` for a timer's.
    line: Option<i64>,
    /// The fired timer the output came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    timer: Option<TimerJson>,
    route: Option<&'a str>,
    key: Option<std::borrow::Cow<'a, str>>,
    timestamp: Option<i64>,
    headers: Vec<(&'a str, std::borrow::Cow<'a, str>)>,
    value: JsonOrText<'a>,
}

/// A failed input, as a golden file holds it.
#[derive(serde::Serialize)]
struct ErrorJson<'a> {
    line: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timer: Option<TimerJson>,
    error: &'a str,
}

/// Where `record` came from: its line, or the timer that fired it.
fn from(record: &Record) -> (Option<i64>, Option<TimerJson>) {
    match record.origin.is_source() {
        true => (Some(record.origin.offset), None),
        false => (
            None,
            Some(TimerJson {
                partition: record.origin.partition,
                key: String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned(),
                at: record.timestamp.unwrap_or_default(),
            }),
        ),
    }
}

/// A fired timer: its partition, key (lossy UTF-8) and time.
#[derive(serde::Serialize)]
struct TimerJson {
    partition: i32,
    key: String,
    at: i64,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum JsonOrText<'a> {
    Json(&'a serde_json::value::RawValue),
    Text(std::borrow::Cow<'a, str>),
}

impl<'a> OutputJson<'a> {
    fn new(record: &Record, output: OutputRef<'a>) -> Self {
        let value = match serde_json::from_slice::<&serde_json::value::RawValue>(output.value) {
            Ok(raw) => JsonOrText::Json(raw),
            Err(_) => JsonOrText::Text(String::from_utf8_lossy(output.value)),
        };
        let (line, timer) = from(record);
        OutputJson {
            line,
            timer,
            route: output.route,
            key: output.key.map(String::from_utf8_lossy),
            timestamp: output.timestamp,
            headers: output.headers.iter().map(|h| (h.name.as_str(), String::from_utf8_lossy(&h.value))).collect(),
            value,
        }
    }
}
