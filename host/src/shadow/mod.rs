//! Shadow runs: a candidate plugin version beside a live chain stage, on the
//! same batches, its outputs compared with the live ones and discarded.
//!
//! - The stage hands each batch it ran (its inputs and the live results)
//!   to its [`Shadow`], which copies it for the candidate only when the
//!   batch is sampled (`sample`) and fewer than [`QUEUE`] batches wait for
//!   the candidate: it runs on its own thread, so a slow or looping
//!   candidate costs skipped comparisons; the live path never waits for it.
//!   Only delivered batches are compared: a batch the live chain runs
//!   again (a rollback, a pause) is offered again and counted once.
//! - The candidate is an ordinary [`PluginInstance`] with the stage's
//!   limits; a version found failing (a fault streak) is dropped and
//!   reported; the live path never sees its errors.
//! - [`diff`] pairs and compares the outputs; [`report`] keeps the counts
//!   and a bounded sample of differences for `/status`, `sluice shadow
//!   report` and `sluice top`, beside the metrics
//!   (`sluice_shadow_outputs_total{result}`, `sluice_shadow_cpu_seconds_total`).
//! - [`edit`] rewrites the pipeline file: a promotion (by hand, or by
//!   itself under `promote_after`) makes the candidate the stage's plugin,
//!   and the reload that follows is the ordinary hot swap, with its
//!   probation and rollback; the admin API also starts and stops a shadow
//!   run this way.

pub mod diff;
pub mod edit;
pub mod report;

use crate::config::{ShadowSpec, TransformSpec};
use crate::record::{Output, Record, RecordRef, Results};
use crate::runtime::{Plugin, PluginInstance, Runtime};
use crate::state::{Loaded, Partition, SharedState};
use crate::telemetry::telemetry;
use diff::{compare_record, Counts, DiffOptions};
use report::{Report, State};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tracing::{info, warn};

pub use report::{reports, ShadowReport};

/// One batch for the candidate: the stage's inputs and what the live
/// version made of each, and a copy of the live state of each partition
/// the candidate is to start from (as the live stage held it before the batch).
struct Job {
    inputs: Vec<Record>,
    live: Vec<Result<Vec<Output>, String>>,
    seeds: Vec<(Partition, Loaded)>,
}

/// A chain stage's shadow run (the stage's side of it).
pub struct Shadow {
    sample: f64,
    /// Sampling credit: a batch runs when it reaches 1 (so `sample = 0.25`
    /// is exactly every fourth batch).
    credit: f64,
    /// The batches offered by the last run (its records, then the timers
    /// it fired), sent once they are delivered.
    pending: Vec<Job>,
    /// The partitions whose live state the candidate holds a copy of, kept
    /// up since by every batch of theirs: a batch it misses (skipped,
    /// unsampled) makes it take fresh copies.
    seeded: HashSet<Partition>,
    jobs: Option<SyncSender<Job>>,
    /// Batches sent to the candidate and not yet compared (at most [`QUEUE`]).
    queued: Arc<AtomicUsize>,
    report: Report,
}

/// Batches that may wait for the candidate: a little room for jitter; past
/// it, a sampled batch is skipped (and counted) rather than held.
pub const QUEUE: usize = 4;

/// Where a shadow run is, for its report and promotion.
#[derive(Debug, Clone)]
pub struct Place {
    pub pipeline: String,
    /// The pipeline file (a promotion rewrites it).
    pub file: PathBuf,
    /// The stage's index in the chain (0-based).
    pub stage: usize,
}

impl Shadow {
    /// Starts the candidate of `live.shadow` beside the stage `live` at
    /// `place`. A candidate that cannot be loaded is reported as dropped:
    /// it never fails the live chain.
    pub fn start(runtime: &Runtime, live: &TransformSpec, live_plugin: &Plugin, place: Place) -> Option<Shadow> {
        let spec = live.shadow.clone()?;
        let report = Report::register(&place, &spec, live_plugin);
        let mut shadow = Shadow {
            sample: spec.sample,
            credit: 0.0,
            pending: Vec::new(),
            seeded: HashSet::new(),
            jobs: None,
            queued: Arc::default(),
            report,
        };
        let context = format!("{}(shadow)", place.pipeline);
        let candidate = Plugin::load(runtime, &spec.path).and_then(|p| {
            PluginInstance::new(p, spec.config.clone(), live.limits.clone(), live.grants.clone(), &context)
        });
        // A stateful candidate's scratch state tells time as the live
        // stage does: its timers are taken, not refused.
        if let Ok(candidate) = &candidate {
            if let Some(state) = candidate.state() {
                crate::state::lock(state).set_event_time(live.event_time.clone());
            }
        }
        match candidate {
            Err(error) => {
                warn!(pipeline = %place.pipeline, candidate = %spec.path.display(), %error, "shadow candidate cannot start; the live path runs on");
                shadow.report.set_state(State::Dropped(format!("cannot start: {error}")));
            }
            Ok(candidate) => {
                let (tx, rx) = sync_channel(QUEUE);
                let worker = Worker {
                    candidate,
                    options: DiffOptions::new(spec.tolerance, &spec.ignore),
                    spec,
                    place: place.clone(),
                    queued: shadow.queued.clone(),
                    report: shadow.report.clone(),
                };
                let spawned = std::thread::Builder::new()
                    .name(format!("shadow-{}-{}", place.pipeline, place.stage + 1))
                    .spawn(move || worker.run(rx));
                match spawned {
                    Ok(_) => {
                        info!(pipeline = %place.pipeline, stage = place.stage + 1, candidate = %shadow.report.candidate(), "shadow run started");
                        shadow.jobs = Some(tx);
                    }
                    Err(error) => shadow.report.set_state(State::Dropped(format!("cannot start its thread: {error}"))),
                }
            }
        }
        Some(shadow)
    }

    /// A batch is run (again): what the last run offered is forgotten.
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    /// The stage ran `inputs` (a batch's records, or the timers it fired)
    /// into `live`: keep a copy for the candidate if this batch is sampled
    /// and the candidate is free, with a copy of `state` (the live stage's)
    /// for each partition the candidate does not hold yet.
    pub fn offer(&mut self, inputs: &[RecordRef<'_>], live: &Results<String>, state: Option<&SharedState>) {
        if self.jobs.is_none() || inputs.is_empty() {
            return;
        }
        self.credit += self.sample;
        if self.credit < 1.0 - 1e-9 {
            self.report.batch_unsampled();
            self.seeded.clear();
            return;
        }
        self.credit -= 1.0;
        if self.queued.load(Ordering::Acquire) + self.pending.len() >= QUEUE {
            self.report.batch_skipped();
            self.seeded.clear();
            return;
        }
        let seeds = self.seeds(inputs, state);
        let inputs = inputs.iter().map(RecordRef::to_record).collect();
        let live = live.per_record();
        self.pending.push(Job { inputs, live, seeds });
    }

    /// Copies of the live state of `inputs`' partitions that the candidate
    /// neither holds nor is about to be given.
    fn seeds(&self, inputs: &[RecordRef<'_>], state: Option<&SharedState>) -> Vec<(Partition, Loaded)> {
        let Some(state) = state else { return Vec::new() };
        let mut partitions: Vec<Partition> =
            inputs.iter().map(|r| (r.origin.topic.clone(), r.origin.partition)).collect();
        partitions.sort();
        partitions.dedup();
        let pending = |p: &Partition| self.pending.iter().any(|job| job.seeds.iter().any(|(q, _)| q == p));
        partitions.retain(|p| !self.seeded.contains(p) && !pending(p));
        let live = crate::state::lock(state);
        partitions.into_iter().filter_map(|p| Some((p.clone(), live.export(&p)?))).collect()
    }

    /// The batches last offered were delivered: the candidate may run them.
    pub fn release(&mut self) {
        for job in std::mem::take(&mut self.pending) {
            let Some(jobs) = &self.jobs else { return };
            let seeded: Vec<Partition> = job.seeds.iter().map(|(p, _)| p.clone()).collect();
            self.queued.fetch_add(1, Ordering::AcqRel);
            match jobs.try_send(job) {
                Ok(()) => self.seeded.extend(seeded),
                Err(TrySendError::Full(_)) => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    self.report.batch_skipped();
                    self.seeded.clear();
                }
                Err(TrySendError::Disconnected(_)) => {
                    // The worker ended (the candidate was dropped).
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    self.jobs = None;
                }
            }
        }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        // The worker ends with its channel; the report stays readable.
        self.report.stopped();
    }
}

/// The candidate's thread: runs each batch, compares, reports.
struct Worker {
    candidate: PluginInstance,
    spec: ShadowSpec,
    options: DiffOptions,
    place: Place,
    queued: Arc<AtomicUsize>,
    report: Report,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        for job in jobs {
            self.take_seeds(job.seeds);
            let cpu = cpu_time::ThreadTime::now();
            let results = self.candidate.transform(&job.inputs).into_records();
            self.forget_fired(&job.inputs);
            let cpu = cpu.elapsed().as_secs_f64();
            let mut counts = Counts::default();
            let mut differences = Vec::new();
            let missing = Err("the candidate returned no result for this record".to_string());
            for (i, (input, live)) in job.inputs.iter().zip(&job.live).enumerate() {
                let candidate = results.get(i).unwrap_or(&missing);
                let (c, d) = compare_record(&input.origin, live, candidate, &self.options);
                counts.add(&c);
                differences.extend(d);
            }
            let plugin = &self.report.live_plugin();
            telemetry().shadow_compared(&self.place.pipeline, plugin, &counts.labelled(), cpu);
            let totals = self.report.compared(job.inputs.len(), &counts, differences, cpu);
            if let Some(reason) = self.candidate.take_failing() {
                warn!(pipeline = %self.place.pipeline, stage = self.place.stage + 1, %reason, "shadow candidate failing: dropped (the live path is unaffected)");
                self.report.set_state(State::Dropped(reason));
                return;
            }
            if let Some(after) = self.spec.promote_after {
                let ratio = if totals.counts.total() == 0 {
                    0.0
                } else {
                    totals.counts.differing() as f64 / totals.counts.total() as f64
                };
                if totals.batches >= after.batches && ratio <= after.max_diff_ratio && totals.state == State::Running {
                    self.promote(totals.batches, ratio);
                }
            }
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The candidate's state takes the copies of the live state it starts from.
    fn take_seeds(&mut self, seeds: Vec<(Partition, Loaded)>) {
        let Some(state) = self.candidate.state() else { return };
        let mut state = crate::state::lock(state);
        for (partition, loaded) in seeds {
            state.restore(partition, loaded);
        }
    }

    /// The timers the live stage fired and handed over as records: the
    /// candidate's copies of them are done with (it fires none itself).
    fn forget_fired(&mut self, inputs: &[Record]) {
        let Some(state) = self.candidate.state() else { return };
        let mut state = crate::state::lock(state);
        for r in inputs.iter().filter(|r| !r.origin.is_source()) {
            let (Some(at), Some(key)) = (r.timestamp, &r.key) else { continue };
            state.forget_timer(&(r.origin.topic.clone(), r.origin.partition), at, key);
        }
    }

    /// `promote_after` is met: the file is rewritten; its reload swaps the candidate in.
    fn promote(&mut self, batches: u64, ratio: f64) {
        match edit::promote(&self.place.file, self.place.stage) {
            Ok(plugin) => {
                info!(pipeline = %self.place.pipeline, stage = self.place.stage + 1, batches, diff_ratio = ratio, plugin = %plugin, file = %self.place.file.display(), "shadow candidate promoted (promote_after met): pipeline file rewritten, reloading");
                self.report.set_state(State::Promoting);
            }
            Err(error) => {
                let error = format!("{error:#}");
                warn!(pipeline = %self.place.pipeline, %error, "shadow candidate met promote_after but cannot be promoted");
                self.report.set_state(State::PromoteFailed(error));
            }
        }
    }
}
