//! `sluice replay CAPTURE`: runs a capture of a live stage ([`crate::capture`],
//! `sluice record`) through the recorded plugin version, or another one,
//! call by call as it ran live: the same inputs in the same calls, the
//! watermarks each call saw, the recorded processing clock, the fired
//! timers in their order, from the state the stage held. WASI's clocks read
//! the recorded clock and its random numbers come from a fixed seed, so the
//! same capture and version give the same bytes on every run.
//!
//! It prints the outputs (as `sluice plugin test` does), or compares them
//! with the live ones (`--diff`, through the shadow's diff engine), or
//! tells what the calls did to the state keys of a prefix (`--trace`).

use crate::capture::{Call, CallResult, Capture, Entry, Header};
use crate::record::{Output, Record, RecordRef};
use crate::runtime::limits::{Grants, Limits, ReplayClock};
use crate::runtime::{Plugin, PluginInstance, Runtime};
use crate::shadow::diff::{compare_record, Counts, DiffOptions, Difference, FieldDiff};
use crate::state::stage::{Access, AccessKind};

use crate::state::{lock, Loaded, Partition, StateLimits};
use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The capture (written by `sluice record`).
    pub capture: PathBuf,
    /// Run this component instead of the recorded version (a fix, a new
    /// version): with `--diff`, how its outputs differ from the live ones.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Plugin configuration KEY=VALUE over the recorded one (repeatable). A
    /// secret's value is not in the capture: give it this way.
    #[arg(short = 'c', long = "config", value_parser = super::parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Compare the outputs with the live outputs the capture holds, per
    /// input record, paired by key, field by field; exit 1 when they differ.
    #[arg(long)]
    pub diff: bool,
    /// Each output as a JSON line (with its call, input and origin); with
    /// `--diff`, the comparison as JSON.
    #[arg(long)]
    pub json: bool,
    /// With `--diff`: numbers within this relative difference are equal.
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f64,
    /// With `--diff`: leave these fields out of the comparison (dotted
    /// paths, repeatable).
    #[arg(long)]
    pub ignore: Vec<String>,
    /// Tell, call by call, what happened to the state keys beginning with
    /// PREFIX: each input that read or wrote one, each value before and
    /// after, timers set and fired, and the outputs keyed by them.
    #[arg(long, value_name = "PREFIX")]
    pub trace: Option<String>,
}

/// Differences `--diff` prints (all are counted).
const SHOWN_DIFFERENCES: usize = 20;

pub fn replay(runtime: &Runtime, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let capture = Capture::read(&args.capture)?;
    if let Some((at, len)) = capture.truncated {
        eprintln!(
            "sluice: {}: cut short at byte {at} ({len} bytes of a partial entry left out); replaying the {} whole entries before it",
            args.capture.display(),
            capture.entries.len()
        );
    }
    let mut replay = Replay::new(runtime, &capture.header, args)?;
    let mut out = BufWriter::new(std::io::stdout());
    let mut diff = Diff::default();
    let options = DiffOptions::new(args.tolerance, &args.ignore);
    let mut trace = args.trace.as_ref().map(|prefix| Trace::new(prefix, &replay));
    for entry in &capture.entries {
        match entry {
            Entry::State(s) => replay.restore(s)?,
            Entry::End(_) => {}
            Entry::Call(call) => {
                let before = trace.as_ref().map(|t| t.values(&replay, call));
                let (records, results) = replay.call(call)?;
                if let (Some(trace), Some(before)) = (&mut trace, before) {
                    trace.call(&replay, call, &records, &results, before, &mut out)?;
                } else if args.diff {
                    diff.call(call, &records, &results, &options)?;
                } else {
                    emit(&mut out, args.json, call, &records, &results)?;
                }
            }
        }
    }
    if args.diff && trace.is_none() {
        let same = diff.report(&mut out, args.json, &capture.header, &replay.plugin)?;
        out.flush()?;
        return Ok(if same { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// What a replayed input gave: its outputs, or why it failed.
type Replayed = Result<Vec<Output>, String>;

/// The plugin instance a capture is replayed through, and its state.
struct Replay {
    instance: PluginInstance,
    plugin: Arc<Plugin>,
    event: Option<crate::state::time::EventTime>,
    clock: ReplayClock,
    topics: Vec<Arc<str>>,
    pipeline: String,
}

impl Replay {
    fn new(runtime: &Runtime, header: &Header, args: &ReplayArgs) -> anyhow::Result<Self> {
        let path = args.plugin.clone().unwrap_or_else(|| PathBuf::from(&header.plugin.path));
        let plugin = Plugin::load(runtime, &path).with_context(|| format!("cannot load {}", path.display()))?;
        if args.plugin.is_none() && plugin.hash != header.plugin.hash {
            anyhow::bail!(
                "the recorded version {} of {} is no longer at {} (it holds {}): give it with --plugin",
                short(&header.plugin.hash),
                header.plugin.name,
                path.display(),
                short(&plugin.hash)
            );
        }
        if header.plugin.contract == "0.3" && !plugin.contract.has_state() {
            anyhow::bail!(
                "the capture is of a stateful stage ({} keeps state, contract 0.3), and {} (contract {}) keeps none: it cannot take the stage's place",
                header.plugin.name,
                path.display(),
                plugin.contract
            );
        }
        let mut config = header.config.clone();
        for (key, value) in &args.config {
            match config.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = value.clone(),
                None => config.push((key.clone(), value.clone())),
            }
        }
        for key in &header.masked {
            if !args.config.iter().any(|(k, _)| k == key) {
                anyhow::bail!("config key {key} was a secret, not kept in the capture: give it with -c {key}=VALUE");
            }
        }
        let limits = Limits {
            cpu_ms: header.limits.cpu_ms,
            memory_bytes: header.limits.memory_bytes,
            state: StateLimits {
                bytes: header.limits.state_bytes,
                ttl: header.limits.state_ttl_ms.map(std::time::Duration::from_millis),
            },
            ..Limits::default()
        };
        let clock = ReplayClock::default();
        clock.set(header.started_at_ms);
        let grants = Grants { replay_clock: Some(clock.clone()), ..Grants::default() };
        let pipeline = format!("{}(replay)", header.pipeline);
        let instance = PluginInstance::new(plugin.clone(), config, limits, grants, &pipeline)
            .with_context(|| format!("cannot start {}", path.display()))?;
        let event = header.event_time.as_ref().map(|e| e.event_time());
        if let Some(state) = instance.state() {
            lock(state).set_event_time(event.clone());
        }
        Ok(Replay { instance, plugin, event, clock, topics: Vec::new(), pipeline })
    }

    fn restore(&mut self, s: &crate::capture::StateEntry) -> anyhow::Result<()> {
        let partition: Partition = (self.topic(&s.topic), s.partition);
        let Some(state) = self.instance.state() else { return Ok(()) };
        let entries = s
            .entries
            .iter()
            .map(|(k, v)| Ok((hex::decode(k)?, hex::decode(v)?)))
            .collect::<Result<_, hex::FromHexError>>()
            .with_context(|| format!("the state of {}/{} in the capture", s.topic, s.partition))?;
        lock(state).restore(partition, Loaded { entries, next_offset: s.next_offset });
        Ok(())
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| ***t == *name) {
            return t.clone();
        }
        let t: Arc<str> = name.into();
        self.topics.push(t.clone());
        t
    }

    /// Runs one recorded call as it ran live: its watermarks, its clock,
    /// its fired timers taken out of the state first.
    fn call(&mut self, call: &Call) -> anyhow::Result<(Vec<Record>, Vec<Replayed>)> {
        let records =
            call.inputs.iter().map(|r| r.record(self.topic(&r.topic))).collect::<anyhow::Result<Vec<Record>>>()?;
        let marks: Vec<(Partition, Option<i64>)> =
            call.watermarks.iter().map(|w| ((self.topic(&w.topic), w.partition), w.watermark)).collect();
        self.clock.set(call.now_ms);
        if let Some(state) = self.instance.state() {
            let mut state = lock(state);
            for (partition, watermark) in &marks {
                state.set_watermark(partition, *watermark);
            }
            state.expire(call.now_ms);
            for r in records.iter().filter(|r| !r.origin.is_source()) {
                if let (Some(at), Some(key)) = (r.timestamp, &r.key) {
                    state.forget_timer(&(r.origin.topic.clone(), r.origin.partition), at, key);
                }
            }
        }
        let views: Vec<RecordRef> = records.iter().map(Record::view).collect();
        let results = crate::transforms::chain::call(
            &mut self.instance,
            self.event.as_ref(),
            &views,
            &self.pipeline,
            call.now_ms,
        );
        Ok((records, results.into_records()))
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn live(result: &CallResult) -> anyhow::Result<Result<Vec<Output>, String>> {
    Ok(match result {
        CallResult::Ok(outputs) => Ok(outputs.iter().map(|o| o.output()).collect::<anyhow::Result<_>>()?),
        CallResult::Error(error) => Err(error.clone()),
    })
}

/// One replayed output (`--json`), or a failed input.
#[derive(serde::Serialize)]
struct OutputJson<'a> {
    call: u64,
    input: usize,
    origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn origin(r: &Record) -> String {
    format!("{}/{}@{}", r.origin.topic, r.origin.partition, r.origin.offset)
}

fn emit(out: &mut dyn Write, json: bool, call: &Call, records: &[Record], results: &[Replayed]) -> anyhow::Result<()> {
    for (input, (record, result)) in records.iter().zip(results).enumerate() {
        match result {
            Ok(outputs) => {
                for o in outputs {
                    if json {
                        let value = serde_json::from_slice(&o.value)
                            .unwrap_or_else(|_| String::from_utf8_lossy(&o.value).into_owned().into());
                        let line = OutputJson {
                            call: call.seq,
                            input,
                            origin: origin(record),
                            route: o.route.as_deref(),
                            key: o.key.as_deref().map(String::from_utf8_lossy),
                            timestamp: o.timestamp,
                            value: Some(value),
                            error: None,
                        };
                        serde_json::to_writer(&mut *out, &line)?;
                    } else {
                        out.write_all(&o.value)?;
                    }
                    out.write_all(b"\n")?;
                }
            }
            Err(error) if json => {
                let line = OutputJson {
                    call: call.seq,
                    input,
                    origin: origin(record),
                    route: None,
                    key: None,
                    timestamp: None,
                    value: None,
                    error: Some(error),
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
            }
            Err(error) => {
                out.flush()?;
                eprintln!("call {} input {input} ({}): {error}", call.seq, origin(record));
            }
        }
    }
    Ok(())
}

/// `--diff`: the replayed outputs against the live ones.
#[derive(Default)]
struct Diff {
    counts: Counts,
    /// Inputs that failed in both, with different errors.
    other_errors: u64,
    /// Inputs that failed live and not in the replay.
    replay_ok: u64,
    differences: Vec<Difference>,
    differing: u64,
    calls: u64,
    records: u64,
}

#[derive(serde::Serialize)]
struct DiffJson<'a> {
    capture_version: &'a str,
    replayed_version: &'a str,
    calls: u64,
    records: u64,
    counts: &'a Counts,
    /// Inputs that failed live and in the replay with another error.
    errors_differ: u64,
    /// Inputs that failed live and not in the replay.
    replay_ok: u64,
    differences: &'a [Difference],
}

impl Diff {
    fn call(
        &mut self,
        call: &Call,
        records: &[Record],
        results: &[Replayed],
        options: &DiffOptions,
    ) -> anyhow::Result<()> {
        self.calls += 1;
        self.records += records.len() as u64;
        for (i, (record, replayed)) in records.iter().zip(results).enumerate() {
            let recorded = call.outputs.get(i).map(live).transpose()?.unwrap_or_else(|| Err("no live result".into()));
            let differences = match (&recorded, replayed) {
                (Err(a), Err(b)) if a == b => {
                    self.counts.live_errors += 1;
                    Vec::new()
                }
                (Err(a), Err(b)) => {
                    self.other_errors += 1;
                    vec![error_difference(record, "error_differs", a, b)]
                }
                (Err(a), Ok(outputs)) => {
                    self.replay_ok += 1;
                    let n = outputs.len();
                    vec![error_difference(record, "replay_ok", a, &format!("{n} output(s)"))]
                }
                _ => {
                    let (counts, differences) = compare_record(&record.origin, &recorded, replayed, options);
                    self.counts.add(&counts);
                    differences
                }
            };
            self.differing += differences.len() as u64;
            let room = SHOWN_DIFFERENCES.saturating_sub(self.differences.len());
            self.differences.extend(differences.into_iter().take(room));
        }
        Ok(())
    }

    /// Prints the comparison; whether the replay gave what ran live.
    fn report(&self, out: &mut dyn Write, json: bool, header: &Header, plugin: &Plugin) -> anyhow::Result<bool> {
        let same = self.differing == 0;
        if json {
            let report = DiffJson {
                capture_version: &header.plugin.hash,
                replayed_version: &plugin.hash,
                calls: self.calls,
                records: self.records,
                counts: &self.counts,
                errors_differ: self.other_errors,
                replay_ok: self.replay_ok,
                differences: &self.differences,
            };
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
            return Ok(same);
        }
        let c = &self.counts;
        writeln!(
            out,
            "replay of transform {} of {}: live {} {}, replayed {} {}",
            header.stage,
            header.pipeline,
            header.plugin.name,
            short(&header.plugin.hash),
            plugin.name,
            short(&plugin.hash)
        )?;
        writeln!(out, "  calls      {}, {} input records", self.calls, self.records)?;
        writeln!(
            out,
            "  outputs    {} identical, {} different, {} only live, {} only replayed",
            c.identical, c.different, c.only_live, c.only_candidate
        )?;
        writeln!(
            out,
            "  errors     {} live (as live: {}), {} replayed only, {} replayed where live failed",
            c.live_errors + self.other_errors + self.replay_ok,
            c.live_errors,
            c.candidate_errors,
            self.replay_ok
        )?;
        if same {
            writeln!(out, "  no differences: the replay gave what ran live")?;
            return Ok(true);
        }
        writeln!(out, "  {} differences; the first {}:", self.differing, self.differences.len())?;
        for d in &self.differences {
            let key = d.key.as_deref().map(|k| format!(" key {k}")).unwrap_or_default();
            writeln!(out, "  - {} {}{key}", d.origin, d.kind.replace('_', " ").replace("candidate", "replay"))?;
            for f in &d.fields {
                writeln!(out, "      {}: {} -> {}", f.path, f.live, f.candidate)?;
            }
        }
        Ok(false)
    }
}

fn error_difference(record: &Record, kind: &str, live: &str, replayed: &str) -> Difference {
    Difference {
        origin: origin(record),
        key: None,
        kind: kind.into(),
        fields: vec![FieldDiff { path: "(error)".into(), live: live.into(), candidate: replayed.into() }],
    }
}

/// `--trace PREFIX`: per call, what happened to the keys of the prefix.
struct Trace {
    prefix: Vec<u8>,
}

/// (partition, stored key) → value, of the traced keys.
type Values = BTreeMap<(String, i32, Vec<u8>), Vec<u8>>;

impl Trace {
    fn new(prefix: &str, replay: &Replay) -> Self {
        if let Some(state) = replay.instance.state() {
            lock(state).trace_keys(prefix.as_bytes().to_vec());
        }
        Trace { prefix: prefix.as_bytes().to_vec() }
    }

    /// The traced keys' stored values in the partitions of `call`.
    fn values(&self, replay: &Replay, call: &Call) -> Values {
        let Some(state) = replay.instance.state() else { return Values::new() };
        let state = lock(state);
        let mut partitions: Vec<(String, i32)> = call.inputs.iter().map(|r| (r.topic.clone(), r.partition)).collect();
        partitions.sort();
        partitions.dedup();
        let mut values = Values::new();
        for (topic, partition) in partitions {
            let Some(loaded) = state.export(&(topic.as_str().into(), partition)) else { continue };
            for (key, value) in loaded.entries {
                if super::plugin::trace::plugin_key(&key).is_some_and(|k| k.starts_with(&self.prefix)) {
                    values.insert((topic.clone(), partition, key), value);
                }
            }
        }
        values
    }

    fn call(
        &mut self,
        replay: &Replay,
        call: &Call,
        records: &[Record],
        results: &[Replayed],
        before: Values,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        use super::plugin::trace::{shown_key, shown_value};
        let accesses: Vec<Access> = replay.instance.state().map(|s| lock(s).take_accesses()).unwrap_or_default();
        let after = self.values(replay, call);
        let mut said = Vec::new();
        // A call runs a whole batch, and the SDKs read a key once per batch
        // and hand their writes back when it ends: the accesses are the
        // call's, in the order the host saw them.
        let mut seen: Vec<String> = Vec::new();
        for a in &accesses {
            let key = shown_key(&a.key);
            let what = match a.what {
                AccessKind::Get => format!("read {key}"),
                AccessKind::Put => format!("wrote {key}"),
                AccessKind::Delete => format!("deleted {key}"),
                AccessKind::SetTimer(at) => format!("set a timer for {key} at {at}"),
            };
            if !seen.contains(&what) {
                seen.push(what);
            }
        }
        if !seen.is_empty() {
            said.push(format!("  the call {}", seen.join(", ")));
        }
        for (record, result) in records.iter().zip(results) {
            let fired =
                !record.origin.is_source() && record.key.as_deref().is_some_and(|k| k.starts_with(&self.prefix));
            if fired {
                said.push(format!(
                    "  timer {} at {} fired",
                    shown_key(record.key.as_deref().unwrap_or_default()),
                    record.timestamp.unwrap_or_default()
                ));
            }
            match result {
                Ok(outputs) => {
                    for o in outputs
                        .iter()
                        .filter(|o| fired || o.key.as_deref().is_some_and(|k| k.starts_with(&self.prefix)))
                    {
                        let key = o.key.as_deref().map(shown_key).unwrap_or_else(|| "none".into());
                        said.push(format!("    output of {}, key {key}: {}", origin(record), shown_value(&o.value)));
                    }
                }
                Err(error) if fired => said.push(format!("    the timer failed: {error}")),
                Err(_) => {}
            }
        }
        let keys: std::collections::BTreeSet<_> = before.keys().chain(after.keys()).collect();
        for place in keys {
            let (was, is) = (before.get(place), after.get(place));
            if was == is {
                continue;
            }
            let (topic, partition, key) = place;
            said.push(super::plugin::trace::change(key, was, is, &format!("({topic}/{partition})")));
        }
        if said.is_empty() {
            return Ok(());
        }
        let marks: Vec<String> = call
            .watermarks
            .iter()
            .map(|w| format!("{}/{} {}", w.topic, w.partition, w.watermark.map_or("none".into(), |m| m.to_string())))
            .collect();
        writeln!(
            out,
            "call {} ({:?}, {} inputs, clock {}, watermarks {}):",
            call.seq,
            call.cause,
            call.inputs.len(),
            call.now_ms,
            if marks.is_empty() { "none".into() } else { marks.join(", ") }
        )?;
        for line in said {
            writeln!(out, "{line}")?;
        }
        Ok(())
    }
}
