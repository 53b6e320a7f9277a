//! A chain of plugin instances: the outputs of one are the inputs of the next.

use crate::capture::recorder::{watermarks, Recorder};
use crate::capture::Cause;
use crate::config::{Pipeline, TransformSpec};
use crate::record::{Origin, Output, Outputs, Record, RecordRef, Results};
use crate::runtime::{Plugin, PluginError, PluginInstance, Runtime};
use crate::shadow::{Place, Shadow};
use crate::state::time::{EventTime, LatePolicy};
use crate::state::{lock, PipelineState, SharedState};
use crate::telemetry::telemetry;

/// Why a source record produced nothing: which plugin failed it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFailure {
    pub plugin: String,
    pub error: String,
}

/// A plugin version of the chain found failing (see [`PluginInstance::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFailing {
    pub plugin: String,
    /// The version's SHA-256.
    pub version: String,
    /// The version with its configuration ([`crate::runtime::version_key`]).
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for VersionFailing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin {} version {} is failing: {}",
            self.plugin,
            self.version.get(..12).unwrap_or(&self.version),
            self.reason
        )
    }
}

pub struct Chain {
    stages: Vec<PluginInstance>,
    /// Each stage's event time (`[transforms.event_time]`).
    event: Vec<Option<EventTime>>,
    /// Each stage's shadow run, if it has one (see [`crate::shadow`]).
    shadows: Vec<Option<Shadow>>,
    /// Each stage's recording, while one runs (see [`crate::capture`]).
    recorders: Vec<Option<Recorder>>,
    pipeline: String,
}

impl Chain {
    /// Loads and initialises every plugin of `specs` (their shadows are
    /// left out: see [`Chain::live`]).
    pub fn new(runtime: &Runtime, specs: &[TransformSpec], pipeline: &str) -> Result<Self, PluginError> {
        let stages = specs
            .iter()
            .map(|s| {
                let plugin = Plugin::load(runtime, &s.path)?;
                PluginInstance::new(plugin, s.config.clone(), s.limits.clone(), s.grants.clone(), pipeline)
            })
            .collect::<Result<_, _>>()?;
        let event = specs.iter().map(|s| s.event_time.clone()).collect();
        let recorders = specs.iter().map(|_| None).collect();
        Ok(Chain { stages, event, shadows: Vec::new(), recorders, pipeline: pipeline.to_string() })
    }

    /// The chain of a live pipeline: [`Chain::new`], with each stage's
    /// shadow run started beside it. A candidate that cannot start is
    /// reported, never an error of the chain.
    pub fn live(runtime: &Runtime, spec: &Pipeline) -> Result<Self, PluginError> {
        let mut chain = Chain::new(runtime, &spec.transforms, &spec.name)?;
        chain.shadows = spec
            .transforms
            .iter()
            .zip(&chain.stages)
            .enumerate()
            .map(|(stage, (t, live))| {
                let place = Place { pipeline: spec.name.clone(), file: spec.file.clone(), stage };
                Shadow::start(runtime, t, live.plugin(), place)
            })
            .collect();
        Ok(chain)
    }

    /// The batch last run was delivered: the shadow runs may compare it,
    /// and the recordings write it.
    pub fn release_shadows(&mut self) {
        self.shadows.iter_mut().flatten().for_each(Shadow::release);
        for recorder in &mut self.recorders {
            if recorder.as_mut().is_some_and(|r| !r.release()) {
                *recorder = None;
            }
        }
    }

    /// Takes the recordings asked of the stages from `start` on, at the
    /// beginning of a batch (see [`crate::capture::recorder`]).
    fn take_recordings(&mut self, start: usize) {
        if !crate::capture::recorder::waiting() {
            return;
        }
        for index in start..self.stages.len() {
            if self.recorders.get(index).is_none_or(Option::is_some) {
                continue;
            }
            let stage = &self.stages[index];
            let event = self.event.get(index).cloned().flatten();
            let header = || {
                let plugin = stage.plugin();
                let limits = stage.limits();
                let masked: Vec<String> = stage
                    .config()
                    .iter()
                    .filter(|(k, v)| crate::secrets::is_secret_key(k) || crate::secrets::redact(v) != *v)
                    .map(|(k, _)| k.clone())
                    .collect();
                let config = stage
                    .config()
                    .iter()
                    .map(|(k, v)| {
                        (k.clone(), if masked.contains(k) { crate::secrets::MASK.to_string() } else { v.clone() })
                    })
                    .collect();
                crate::capture::Header {
                    format: crate::capture::FORMAT.to_string(),
                    version: crate::capture::VERSION,
                    pipeline: self.pipeline.clone(),
                    stage: index + 1,
                    plugin: crate::capture::PluginInfo {
                        name: plugin.name.clone(),
                        path: plugin.path.display().to_string(),
                        hash: plugin.hash.clone(),
                        contract: plugin.contract.to_string(),
                    },
                    config,
                    masked,
                    limits: crate::capture::LimitsInfo {
                        cpu_ms: limits.cpu_ms,
                        memory_bytes: limits.memory_bytes,
                        state_bytes: limits.state.bytes,
                        state_ttl_ms: limits.state.ttl.map(|t| t.as_millis() as u64),
                    },
                    event_time: event.as_ref().map(crate::capture::EventTimeInfo::new),
                    started_at_ms: crate::state::now_ms(),
                }
            };
            self.recorders[index] = Recorder::take(&self.pipeline, index, stage.state(), header);
        }
    }

    pub fn stages(&self) -> &[PluginInstance] {
        &self.stages
    }

    /// The stages that keep keyed state (contract 0.3), by index.
    pub fn stateful(&self) -> impl Iterator<Item = (usize, &PluginInstance)> {
        self.stages.iter().enumerate().filter(|(_, s)| s.plugin().contract.has_state())
    }

    /// Gives each stateful stage its state in `state` (a swapped-in version
    /// takes over the state of the stage it replaces).
    pub fn attach_state(&mut self, state: &mut PipelineState) {
        for (index, stage) in self.stages.iter_mut().enumerate() {
            if stage.plugin().contract.has_state() {
                let event = self.event.get(index).cloned().flatten();
                let shared = state.stage(index as u32, &stage.limits().state, event);
                stage.attach_state(shared);
            }
        }
    }

    /// Fires the timers of every stage with event time whose watermark the
    /// batch just run moved past them (see [`Fire`]). Each fired timer is a
    /// record of its own (origin offset -1, its key, its time, no value),
    /// run through its stage and the stages after it. Returns the records
    /// and their results, for delivery after the batch's.
    pub fn fire(&mut self, when: Fire) -> (Vec<Record>, Results<ChainFailure>) {
        let mut records = Vec::new();
        let mut results = Results::default();
        for index in 0..self.stages.len() {
            let Some(shared) = self.stages[index].state().cloned() else { continue };
            let due = {
                let mut state = lock(&shared);
                if state.event_time().is_none() {
                    continue;
                }
                // Not after a batch that was full: a partition missing from
                // it may have records waiting (a backlog, as after a sink
                // was down and the pipeline held back).
                match when {
                    Fire::Idle(now) | Fire::AfterBatch { at: now, drained: Some(true) } => state.observe_idle(now),
                    Fire::AfterBatch { at: now, drained: Some(false) } => state.hold_idle(now),
                    _ => {}
                }
                state.take_due(when == Fire::End)
            };
            if due.is_empty() {
                continue;
            }
            let timers: Vec<Record> = due
                .into_iter()
                .map(|((topic, partition), at, key)| Record {
                    key: Some(key.into()),
                    timestamp: Some(at),
                    origin: Origin::timer(topic, partition),
                    ..Record::default()
                })
                .collect();
            let views: Vec<RecordRef> = timers.iter().map(Record::view).collect();
            let cause = match when {
                Fire::AfterBatch { .. } => Cause::TimersAfterBatch,
                Fire::Idle(_) => Cause::TimersIdle,
                Fire::End => Cause::TimersEnd,
            };
            results.append(self.run_from(index, &views, cause));
            records.extend(timers);
        }
        (records, results)
    }

    /// The first stage whose version was found failing by the last
    /// [`Chain::process`] (every stage's verdict is taken).
    pub fn take_failing(&mut self) -> Option<VersionFailing> {
        let mut first = None;
        for stage in &mut self.stages {
            if let Some(reason) = stage.take_failing() {
                let plugin = stage.plugin();
                let key = stage.version_key();
                first.get_or_insert(VersionFailing {
                    plugin: plugin.name.clone(),
                    version: plugin.hash.clone(),
                    key,
                    reason,
                });
            }
        }
        first
    }

    /// Runs `batch` through every stage. One result per source record: all
    /// its final outputs, or the first failure on its way (a record its
    /// source rejected fails as the source's, without running). A later
    /// stage's output without a route keeps the route its input had.
    pub fn process(&mut self, batch: &[Record]) -> Results<ChainFailure> {
        // A batch run (again): the shadows forget what its last run offered.
        self.shadows.iter_mut().flatten().for_each(Shadow::discard);
        self.recorders.iter_mut().flatten().for_each(Recorder::discard);
        self.take_recordings(0);
        let rejected = |reason: &String| ChainFailure { plugin: "source".to_string(), error: reason.clone() };
        if self.stages.is_empty() {
            let mut results = Results::with_owned_capacity(batch.len(), batch.len());
            for r in batch {
                match &r.rejected {
                    Some(reason) => results.push_err(rejected(reason)),
                    None => results.push_ok([Output::from(r.clone())]),
                }
            }
            return results;
        }
        let accepted: Vec<RecordRef> = batch.iter().filter(|r| r.rejected.is_none()).map(Record::view).collect();
        let results = self.run_from(0, &accepted, Cause::Batch);
        if accepted.len() == batch.len() {
            return results;
        }
        let (outputs, per_record) = results.into_parts();
        let mut per_record = per_record.into_iter();
        let records = batch
            .iter()
            .map(|r| match &r.rejected {
                Some(reason) => Err(rejected(reason)),
                None => per_record.next().unwrap_or(Ok(0)),
            })
            .collect();
        Results::from_parts(outputs, records)
    }

    /// Runs `inputs` through stage `start` and every stage after it. Each
    /// stage reads the outputs of the one before where they are, as
    /// [`RecordRef`]s with the origin of their source record. Each stage's
    /// shadow is offered what the stage ran (a batch's records, or the
    /// timers fired from `start`), with the stage's state to copy from.
    fn run_from(&mut self, start: usize, inputs: &[RecordRef<'_>], cause: Cause) -> Results<ChainFailure> {
        let failure = |stage: &PluginInstance, error| ChainFailure { plugin: stage.plugin().name.clone(), error };
        let pipeline = &self.pipeline;
        let mut recorders = self.recorders.iter_mut().skip(start);
        let mut timed = |stage: &mut PluginInstance, event: Option<&EventTime>, inputs: &[RecordRef<'_>]| {
            let recorder = recorders.next().and_then(Option::as_mut);
            let marks = recorder.as_ref().map(|_| watermarks(stage.state(), inputs));
            let now_ms = crate::state::now_ms();
            let started = std::time::Instant::now();
            let results = call(stage, event, inputs, pipeline, now_ms);
            telemetry().plugin_call(pipeline, &stage.plugin().name, started.elapsed().as_secs_f64());
            if let (Some(recorder), Some(marks)) = (recorder, marks) {
                recorder.offer(cause, now_ms, marks, inputs, &results, stage.state());
            }
            results
        };
        let mut shadows = self.shadows.iter_mut().skip(start);
        let mut offer = |inputs: &[RecordRef<'_>], results: &Results<String>, state: Option<&SharedState>| {
            if let Some(shadow) = shadows.next().and_then(Option::as_mut) {
                shadow.offer(inputs, results, state);
            }
        };
        let mut events = self.event.iter().skip(start).map(Option::as_ref);
        let Some((first, rest)) = self.stages.get_mut(start..).and_then(|s| s.split_first_mut()) else {
            return Results::default();
        };
        let first_results = timed(first, events.next().flatten(), inputs);
        offer(inputs, &first_results, first.state());
        let mut results = first_results.map_err(|e| failure(first, e));
        for stage in rest {
            let event = events.next().flatten();
            let prev = std::mem::take(&mut results);
            // This stage's inputs: the outputs so far, in order, each with
            // its source record's origin.
            let (new, per_input) = {
                let (outputs, records) = (prev.outputs(), prev.records());
                let mut next = Vec::with_capacity(outputs.len());
                let mut at = 0;
                for (source, record) in inputs.iter().zip(records) {
                    if let Ok(n) = record {
                        next.extend(outputs.range(at..at + n).map(|o| o.as_input(source.origin)));
                        at += n;
                    }
                }
                let results = timed(stage, event, &next);
                offer(&next, &results, stage.state());
                results.into_parts()
            };
            results = combine(prev, new, per_input, |error| failure(stage, error));
        }
        results
    }
}

/// When [`Chain::fire`] looks for due timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fire {
    /// After a batch, at this instant: at the watermarks it moved. When the
    /// source had nothing more waiting (`drained`: see
    /// [`crate::sources::Source::drained`]), the partitions the batch did
    /// not hold that are idle move on too; when it had more, their idle
    /// time starts over.
    AfterBatch { at: std::time::Instant, drained: Option<bool> },
    /// No batch for a while: partitions idle at this instant move their
    /// watermarks on first.
    Idle(std::time::Instant),
    /// The input ended (a file under `--until-eof`): every timer is due.
    End,
}

/// One stage's call on `inputs`. With event time, the records behind their
/// partition's watermark do not reach the plugin (the stage's late policy
/// decides their result), and the others move the watermarks; fired timers
/// (offset -1) are neither. `now_ms` is the processing clock (a replay
/// gives the recorded one).
pub(crate) fn call(
    stage: &mut PluginInstance,
    event: Option<&EventTime>,
    inputs: &[RecordRef<'_>],
    pipeline: &str,
    now_ms: i64,
) -> Results<String> {
    let (Some(event), Some(shared)) = (event, stage.state().cloned()) else { return stage.transform_views(inputs) };
    let counts = |r: &RecordRef| r.origin.is_source() && r.timestamp.is_some();
    // A record too far ahead of the processing clock is out of time too.
    let horizon = now_ms.saturating_add(event.max_ahead_ms);
    let late: Vec<Option<OutOfTime>> = {
        let state = lock(&shared);
        inputs
            .iter()
            .map(|r| {
                let ts = r.timestamp.filter(|_| counts(r))?;
                if ts > horizon {
                    return Some(OutOfTime::Ahead(horizon));
                }
                let partition = (r.origin.topic.clone(), r.origin.partition);
                state
                    .is_late(&partition, ts)
                    .then(|| OutOfTime::Behind(state.watermark(&partition).unwrap_or(i64::MIN)))
            })
            .collect()
    };
    let observe = |on_time: &mut dyn Iterator<Item = &RecordRef<'_>>| {
        let mut newest: std::collections::HashMap<(std::sync::Arc<str>, i32), i64> = Default::default();
        for r in on_time.filter(|r| counts(r)) {
            let ts = r.timestamp.unwrap_or(i64::MIN);
            let at = newest.entry((r.origin.topic.clone(), r.origin.partition)).or_insert(ts);
            *at = (*at).max(ts);
        }
        let mut state = lock(&shared);
        for (partition, ts) in newest {
            state.observe(&partition, ts);
        }
    };
    if late.iter().all(Option::is_none) {
        let results = stage.transform_views(inputs);
        observe(&mut inputs.iter());
        return results;
    }
    let on_time: Vec<RecordRef> = inputs.iter().zip(&late).filter(|(_, l)| l.is_none()).map(|(r, _)| *r).collect();
    let mut ran = stage.transform_views(&on_time).into_records().into_iter();
    observe(&mut on_time.iter());
    let plugin = stage.plugin().name.clone();
    let mut results = Results::with_owned_capacity(inputs.len(), inputs.len());
    for (r, late) in inputs.iter().zip(late) {
        let Some(late) = late else {
            match ran.next().unwrap_or_else(|| Err("plugin returned no result".to_string())) {
                Ok(outputs) => results.push_ok(outputs),
                Err(error) => results.push_err(error),
            }
            continue;
        };
        telemetry().late_record(pipeline, &plugin, late_policy_name(&event.late));
        let ts = r.timestamp.unwrap_or_default();
        match &event.late {
            LatePolicy::Drop => results.push_ok([]),
            LatePolicy::DeadLetter => results.push_err(match late {
                OutOfTime::Behind(watermark) => format!(
                    "late record: timestamp {ts} is {} ms behind the watermark {watermark} of {}/{} (allowed_lateness_ms = {})",
                    watermark.saturating_sub(ts),
                    r.origin.topic,
                    r.origin.partition,
                    event.allowed_lateness_ms
                ),
                OutOfTime::Ahead(horizon) => format!(
                    "record ahead of time: timestamp {ts} is {} ms ahead of the processing clock, more than max_ahead_ms = {} (it does not move the watermark of {}/{})",
                    ts.saturating_sub(horizon.saturating_sub(event.max_ahead_ms)),
                    event.max_ahead_ms,
                    r.origin.topic,
                    r.origin.partition
                ),
            }),
            LatePolicy::Route(route) => {
                results.push_ok([Output {
                    key: r.key.map(|k| k.to_vec().into()),
                    value: r.value.to_vec().into(),
                    headers: r.headers.to_vec(),
                    timestamp: r.timestamp,
                    route: Some(route.clone()),
                }]);
            }
        }
    }
    results
}

/// Why a record of a stage with event time does not reach the plugin.
#[derive(Clone, Copy)]
enum OutOfTime {
    /// Behind its partition's watermark (this one).
    Behind(i64),
    /// Ahead of the processing clock by more than `max_ahead_ms` (past this horizon).
    Ahead(i64),
}

/// The `policy` label of `sluice_late_records_total`.
fn late_policy_name(policy: &LatePolicy) -> &'static str {
    match policy {
        LatePolicy::Drop => "drop",
        LatePolicy::DeadLetter => "dead_letter",
        LatePolicy::Route(_) => "route",
    }
}

/// The results of the stages so far (`prev`), followed by one stage whose
/// inputs were `prev`'s outputs, in order: `new`, and per input its count of
/// `new` or its error. A source record's outputs are those of its outputs
/// there, in order, unless one of them failed: then they are dropped, and
/// the record fails with the first error. An output without a route takes
/// the route of its input.
fn combine(
    prev: Results<ChainFailure>,
    mut new: Outputs,
    per_input: Vec<Result<usize, String>>,
    failure: impl Fn(String) -> ChainFailure,
) -> Results<ChainFailure> {
    let (outputs, records) = prev.into_parts();
    let mut per_input = per_input.into_iter();
    let mut keep = Vec::with_capacity(new.len());
    let mut per_record = Vec::with_capacity(records.len());
    let mut input = 0;
    for record in records {
        let n = match record {
            Ok(n) => n,
            Err(e) => {
                per_record.push(Err(e));
                continue;
            }
        };
        let mut failed = None;
        let mine = keep.len();
        for _ in 0..n {
            let route = outputs.get(input).and_then(|o| o.route);
            input += 1;
            match per_input.next() {
                Some(Ok(count)) => {
                    for o in keep.len()..keep.len() + count {
                        new.inherit_route(o, route);
                    }
                    keep.resize(keep.len() + count, true);
                }
                Some(Err(error)) => {
                    failed.get_or_insert(error);
                }
                None => {
                    failed.get_or_insert_with(|| "plugin returned no result".to_string());
                }
            }
        }
        per_record.push(match failed {
            None => Ok(keep.len() - mine),
            Some(error) => {
                keep[mine..].fill(false);
                Err(failure(error))
            }
        });
    }
    new.retain(&keep);
    Results::from_parts(new, per_record)
}
