//! One pipeline's task: read a batch, run the chain, route outputs to sinks,
//! dead-letter failures, and commit the source only once every sink has it.

use crate::config::{Pipeline, StateSpec};
use crate::connector::{Build, RunOptions};
use crate::record::{Header, Output, OutputRef, Record, Results};
use crate::runtime::Runtime;
use crate::sinks::{Refusals, Rejected, Sink};
use crate::sources::Source;
use crate::state::{lock, Delta, Fenced, PipelineState, SharedState, StateStore};
use crate::supervisor::{shown_versions, Refused, Supervisor, Verdict, SURGE_MIN_RECORDS};
use crate::telemetry::telemetry;
use crate::transforms::{Chain, ChainFailure, Fire};
use anyhow::Context;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Why a batch was not delivered: it stays uncommitted and is read again
/// on the next start.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The pipeline was asked to stop while a sink could not take it.
    #[error("stopped before the batch was delivered")]
    Cancelled,
    /// Its state was computed from a partition another instance has
    /// committed since: the pipeline must start again (see [`Fenced`]).
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

pub struct PipelineTask {
    refused: Refused,
    spec: Pipeline,
    source: Arc<dyn Source>,
    chain: Chain,
    sinks: BTreeMap<String, Box<dyn Sink>>,
    dead_letter: Box<dyn Sink>,
    /// The keyed state of the chain's stateful stages, and what keeps it.
    state: Option<(PipelineState, Keeper)>,
}

/// What keeps a pipeline's keyed state with the source offsets it goes to:
/// one of its sinks (an exactly-once postgres sink, in the transactions of
/// its rows), or a store of its own (`[state.postgres]`).
pub enum Keeper {
    Sink(String),
    Own(Box<dyn Sink>),
}

impl Keeper {
    /// Where the pipeline `spec` keeps its state: as `[state]` says, else
    /// its one exactly-once postgres sink. `sinks` are the pipeline's,
    /// built; `dir` anchors a store's relative paths.
    pub fn of(
        spec: &Pipeline,
        sinks: &BTreeMap<String, Box<dyn Sink>>,
        dir: &std::path::Path,
    ) -> anyhow::Result<Keeper> {
        match &spec.state {
            Some(StateSpec::Postgres(config)) => Ok(Keeper::Own(config.build(&spec.name, dir)?)),
            Some(StateSpec::Sink(name)) => Ok(Keeper::Sink(name.clone())),
            None => {
                let keepers: Vec<&String> =
                    sinks.iter().filter(|(_, sink)| sink.state_store().is_some()).map(|(name, _)| name).collect();
                match &keepers[..] {
                    [name] => Ok(Keeper::Sink(name.to_string())),
                    [] => anyhow::bail!(
                        "the pipeline needs an exactly-once postgres sink to keep it with the rows and offsets, or a `[state.postgres]` table, and has neither"
                    ),
                    several => anyhow::bail!(
                        "the pipeline has several exactly-once postgres sinks ({}): say which one keeps the state with `[state] sink = \"NAME\"`",
                        several.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                }
            }
        }
    }

    /// The store the state is read back from.
    pub fn store(&self, sinks: &BTreeMap<String, Box<dyn Sink>>) -> anyhow::Result<Arc<dyn StateStore>> {
        let sink = match self {
            Keeper::Own(keeper) => Some(&**keeper),
            Keeper::Sink(name) => sinks.get(name).map(|s| &**s),
        };
        sink.and_then(|s| s.state_store()).ok_or_else(|| match self {
            Keeper::Sink(name) => {
                anyhow::anyhow!("sink {name} cannot keep state: it is not an exactly-once postgres sink")
            }
            Keeper::Own(_) => anyhow::anyhow!("the state store has no reader"),
        })
    }
}

/// A batch and what the chain made of it, on its way to the sinks.
struct Transformed {
    /// The source records, then the fired timers' records (offset -1).
    batch: Vec<Record>,
    /// How many of `batch` are source records (the ones to commit).
    sources: usize,
    results: Results<ChainFailure>,
    /// The batch's state changes, for the state's sink.
    delta: Option<Delta>,
    /// A barrier (with an empty batch): answered once every batch before
    /// it is delivered and committed.
    delivered: Option<tokio::sync::oneshot::Sender<()>>,
    /// When the batch was read.
    read_at: Instant,
}

impl PipelineTask {
    /// Creates the source, the chain (compiling and initialising each plugin) and the sinks.
    pub async fn build(
        runtime: &Runtime,
        spec: Pipeline,
        options: &RunOptions,
        refused: &Refused,
    ) -> anyhow::Result<Self> {
        let mut chain = tokio::task::block_in_place(|| Chain::live(runtime, &spec))?;
        for stage in chain.stages() {
            let p = stage.plugin();
            info!(pipeline = %spec.name, plugin = %p.name, version = %p.short_hash(), contract = %p.contract, cache_hit = p.cache_hit, "plugin ready");
        }
        let dir = spec.file.parent().unwrap_or(std::path::Path::new("."));
        let cx = Build { pipeline: &spec.name, dir, options };
        let mut sinks = BTreeMap::new();
        for (name, config) in &spec.sinks {
            sinks.insert(name.clone(), config.connector().build(name, &cx)?);
        }
        let dead_letter = spec.dead_letter.connector().build("dead_letter", &cx)?;
        let source = spec.source.connector().build(&cx)?;
        let mut state = state_for(&chain, &spec, &sinks, dir)?;
        if let Some((state, _)) = &mut state {
            check_state_versions(&chain, &*state.store(), &BTreeMap::new(), &spec.file).await?;
            chain.attach_state(state);
        }
        Ok(PipelineTask { refused: refused.clone(), spec, source, chain, sinks, dead_letter, state })
    }

    /// The keyed state the pipeline keeps, if any (a chain swapped in later
    /// may keep state only if it does, of versions it can take over).
    pub fn held_state(&self) -> Option<HeldState> {
        let (state, _) = self.state.as_ref()?;
        Some(HeldState { store: state.store(), stages: state.stage_states() })
    }

    /// Runs until `cancel`. Two stages overlap: the transform stage (its own
    /// task) reads and transforms batch N+1 while this one writes batch N to
    /// the sinks and commits it; batches are delivered and committed in order.
    /// On `cancel` the batches in hand are delivered and committed first.
    /// A chain received on `swaps` replaces the current one between two
    /// batches: every record is transformed by exactly one version.
    pub async fn run(self, cancel: CancellationToken, swaps: mpsc::UnboundedReceiver<Chain>) -> anyhow::Result<()> {
        let PipelineTask { refused, spec, source, chain, sinks, dead_letter, state } = self;
        telemetry().pipeline_started(&spec.name, &sinks.keys().cloned().collect::<Vec<_>>(), &shown_versions(&chain));
        let (transformed_tx, mut transformed) = mpsc::channel::<Transformed>(1);
        let (state, keeper) = match state {
            Some((state, keeper)) => (Some(state), Some(keeper)),
            None => (None, None),
        };
        let versions = Supervisor::new(spec.name.clone(), chain, spec.on_plugin_failure, refused);
        // The transform stage stops with the pipeline, or alone on a fence.
        let stage_cancel = cancel.child_token();
        let stage =
            tokio::spawn(transform_stage(source.clone(), versions, state, swaps, stage_cancel.clone(), transformed_tx));
        let mut fenced = None;
        let delivery = Delivery { spec, sinks, dead_letter, keeper };
        let name = delivery.spec.name.clone();
        while let Some(Transformed { batch, sources, results, delta, delivered, read_at }) = transformed.recv().await {
            if let Some(delivered) = delivered {
                let _ = delivered.send(());
                continue;
            }
            let dead = match delivery.deliver(&batch, results, delta.as_ref(), &cancel).await {
                Ok(dead) => dead,
                Err(Stopped::Cancelled) => break,
                Err(Stopped::Fenced(fence)) => {
                    warn!(pipeline = %name, error = %fence, "state fenced: the batch is not committed, and the pipeline starts again to read the state as committed");
                    stage_cancel.cancel();
                    fenced = Some(fence);
                    break;
                }
            };
            let committed = match sources {
                0 => Ok(()),
                _ => source.commit(&batch[..sources]).await,
            };
            crate::crash::point("source-committed");
            if let Err(error) = committed {
                // The records are in the sinks; a lost commit only means they
                // may be read again (at-least-once).
                let error = format!("{error:#}");
                warn!(pipeline = %name, %error, "offset commit failed");
                telemetry().error(&name, &format!("offset commit failed: {error}"));
            }
            telemetry().batch_done(&name, batch.len(), dead, read_at.elapsed().as_secs_f64());
        }
        drop(transformed); // unblocks a transform stage waiting to hand over a batch
        let stage = stage.await;
        let flushed = source.flush_commits().await;
        telemetry().pipeline_stopped(&name);
        flushed?;
        if let Some(fence) = fenced {
            return Err(fence.into());
        }
        stage.map_err(|e| anyhow::anyhow!("transform stage panicked: {e}"))?
    }
}

/// On probation, a batch too small to be judged waits this long at most for
/// more records to join it, so that a broken version cannot slip its
/// failures of a few small batches to the dead letters before a batch is
/// large enough to show the surge.
const PROBATION_TOP_UP: Duration = Duration::from_millis(250);

/// Reads batches, applies chain swaps between them, transforms them, and
/// hands them to the delivery stage (at most one waiting). A failing plugin
/// version is handled by the pipeline's [`crate::config::OnPluginFailure`] before any of
/// the batch's results are handed on.
async fn transform_stage(
    source: Arc<dyn Source>,
    mut versions: Supervisor<Chain>,
    mut state: Option<PipelineState>,
    mut swaps: mpsc::UnboundedReceiver<Chain>,
    cancel: CancellationToken,
    out: mpsc::Sender<Transformed>,
) -> anyhow::Result<()> {
    let pipeline = versions.pipeline().to_string();
    let mut ended = false;
    // The read in progress, kept across idle ticks (a read is not cancelled
    // halfway: the records it took would be lost).
    let next_read = |source: &Arc<dyn Source>| {
        let source = source.clone();
        Box::pin(async move { source.next_batch().await })
    };
    let mut read = next_read(&source);
    while !ended {
        let tick = state.as_ref().and_then(PipelineState::idle_tick);
        let mut batch = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            batch = &mut read => {
                read = next_read(&source);
                batch?
            }
            _ = tokio::time::sleep(tick.unwrap_or_default()), if tick.is_some() => {
                // No batch for a while: timers of idle partitions may be due.
                let Some(state) = &mut state else { continue };
                if restore(state, &mut Vec::new(), &*source, &pipeline, &cancel, &out).await.is_none() {
                    return Ok(());
                }
                let (fired, results) = tokio::task::block_in_place(|| versions.current().fire(Fire::Idle(Instant::now())));
                if fired.is_empty() {
                    state.discard();
                    continue;
                }
                info!(%pipeline, timers = fired.len(), "idle partitions' watermarks moved on: timers fired");
                if !send_timers(state, fired, results, &pipeline, &out).await {
                    return Ok(());
                }
                continue;
            }
        };
        if batch.is_empty() {
            info!(%pipeline, "the source's input ended: delivering what is in hand, then stopping");
            fire_at_end(&mut versions, state.as_ref(), &pipeline, &out).await;
            return Ok(());
        }
        let read_at = Instant::now();
        while let Ok(mut new) = swaps.try_recv() {
            if let Some(state) = &mut state {
                new.attach_state(state);
            }
            versions.swap_in(new);
        }
        // A new version on probation is judged on batches of at least
        // SURGE_MIN_RECORDS: a smaller batch waits a little for more. (The
        // sources only wait before their first record: a timed-out read has
        // taken nothing.)
        let top_up = read_at + PROBATION_TOP_UP;
        while versions.on_probation() && batch.len() < SURGE_MIN_RECORDS {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(top_up.into()) => break,
                more = source.next_batch() => {
                    let more = more?;
                    // The input ended: this batch is the last.
                    ended = more.is_empty();
                    batch.extend(more);
                    if ended {
                        break;
                    }
                }
            }
        }
        if let Some(state) = &mut state {
            let Some(skipped) = restore(state, &mut batch, &*source, &pipeline, &cancel, &out).await else {
                return Ok(());
            };
            if skipped > 0 {
                info!(%pipeline, records = skipped, "skipped records the restored state already holds (read again after a restart or rebalance)");
            }
            if batch.is_empty() {
                continue;
            }
        }
        let mut paused = false;
        let mut delay = Duration::from_secs(1);
        let (results, fired) = loop {
            // A batch run again (a rollback, a pause) starts from the state before it.
            if let Some(state) = &state {
                state.discard();
            }
            let (results, fired) = tokio::task::block_in_place(|| {
                let mut results = versions.current().process(&batch);
                // The timers the batch's watermarks passed fire after it.
                let (fired, timer_results) = match &state {
                    Some(_) => {
                        versions.current().fire(Fire::AfterBatch { at: Instant::now(), drained: source.drained() })
                    }
                    None => Default::default(),
                };
                results.append(timer_results);
                (results, fired)
            });
            match versions.verdict(&results) {
                Verdict::Deliver => break (results, fired),
                Verdict::DeliverFailing(failing) => {
                    warn!(%pipeline, %failing, "plugin version failing; its records go to the dead letters (on_plugin_failure = dead_letter)");
                    break (results, fired);
                }
                Verdict::RunAgain => {}
                Verdict::Pause(failing) => {
                    // Pause: nothing of this batch is delivered, nothing committed.
                    let reason = failing.to_string();
                    error!(%pipeline, reason = %reason, retry_in = ?delay, "pipeline paused on a failing plugin version: drop in a new version to resume");
                    telemetry().plugin_failing(&pipeline, &reason);
                    paused = true;
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                        Some(mut new) = swaps.recv() => {
                            if let Some(state) = &mut state {
                                new.attach_state(state);
                            }
                            versions.replace(new);
                            while let Ok(mut newer) = swaps.try_recv() {
                                if let Some(state) = &mut state {
                                    newer.attach_state(state);
                                }
                                versions.replace(newer);
                            }
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        if paused {
            info!(%pipeline, "plugin version works: pipeline resumed");
            telemetry().plugin_ok(&pipeline);
        }
        versions.record(&results);
        versions.current().release_shadows();
        let sources = batch.len();
        batch.extend(fired);
        let delta = state.as_ref().map(|state| state.apply(&batch));
        if let Some(state) = &state {
            report_state(&pipeline, state);
        }
        if out.send(Transformed { batch, sources, results, delta, delivered: None, read_at }).await.is_err() {
            return Ok(());
        }
    }
    info!(%pipeline, "the source's input ended: delivering what is in hand, then stopping");
    fire_at_end(&mut versions, state.as_ref(), &pipeline, &out).await;
    Ok(())
}

/// The input ended (a file under `--until-eof`): every timer still set
/// fires (the last windows close), and is delivered as a last batch.
async fn fire_at_end(
    versions: &mut Supervisor<Chain>,
    state: Option<&PipelineState>,
    pipeline: &str,
    out: &mpsc::Sender<Transformed>,
) {
    let Some(state) = state else { return };
    let (fired, results) = tokio::task::block_in_place(|| versions.current().fire(Fire::End));
    if fired.is_empty() {
        return;
    }
    info!(%pipeline, timers = fired.len(), "the input ended: every timer fired");
    send_timers(state, fired, results, pipeline, out).await;
}

/// Hands fired timers' records, without a source batch, to delivery with
/// their state changes; `false` when the delivery stage is gone.
async fn send_timers(
    state: &PipelineState,
    fired: Vec<Record>,
    results: Results<ChainFailure>,
    pipeline: &str,
    out: &mpsc::Sender<Transformed>,
) -> bool {
    let delta = Some(state.apply(&fired));
    report_state(pipeline, state);
    let timers = Transformed { batch: fired, sources: 0, results, delta, delivered: None, read_at: Instant::now() };
    out.send(timers).await.is_ok()
}

/// Each stateful stage's keys, bytes and watermark lag, for the metrics and `/status`.
fn report_state(pipeline: &str, state: &PipelineState) {
    for (stage, keys, bytes, lag) in state.sizes() {
        telemetry().state_size(pipeline, stage as usize, keys, bytes, lag);
    }
}

/// Readies `state` for `batch` ([`PipelineState::prepare`]), retrying
/// while its store cannot be read (backing off to 10 s); `None` on `cancel`
/// (or when the delivery stage is gone).
async fn restore(
    state: &mut PipelineState,
    batch: &mut Vec<Record>,
    source: &dyn Source,
    pipeline: &str,
    cancel: &CancellationToken,
    out: &mpsc::Sender<Transformed>,
) -> Option<usize> {
    // After a rebalance the state is read again from the store: first every
    // batch in flight is committed, or the store would be read without it
    // (and a timer it fired would fire again).
    if state.is_stale(source.generation()) {
        let (delivered, done) = tokio::sync::oneshot::channel();
        let barrier = Transformed {
            batch: Vec::new(),
            sources: 0,
            results: Results::default(),
            delta: None,
            delivered: Some(delivered),
            read_at: Instant::now(),
        };
        if out.send(barrier).await.is_err() || done.await.is_err() {
            return None;
        }
    }
    let mut delay = Duration::from_millis(100);
    loop {
        match state.prepare(batch, source.generation(), &source.assignment()).await {
            Ok(skipped) => return Some(skipped),
            Err(error) => {
                let error = format!("{error:#}");
                warn!(%pipeline, %error, retry_in = ?delay, "cannot restore the plugins' state; retrying");
                telemetry().error(pipeline, &format!("cannot restore state: {error}"));
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The keyed state of a running pipeline, as a reload sees it.
pub struct HeldState {
    pub store: Arc<dyn StateStore>,
    /// Each stateful stage's state in memory, by index.
    pub stages: BTreeMap<u32, SharedState>,
}

/// Whether each stateful stage of `chain` can take over its state: the
/// versions `store` holds for it (in every partition that has entries),
/// and those of the partitions `memory` holds. A stage whose plugin keeps
/// another version and has no migrate from it is refused, with the reason:
/// a start fails, and so does a reload (the running chain goes on).
pub async fn check_state_versions(
    chain: &Chain,
    store: &dyn StateStore,
    memory: &BTreeMap<u32, SharedState>,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    // State stored for a place in the chain that keeps none now (a stage
    // inserted before it, or removed) would be orphaned, and the stage that
    // keeps it would start over: refused, with the way out.
    match store.stages().await {
        Ok(stored) => {
            let stateful: Vec<u32> = chain.stateful().map(|(i, _)| i as u32).collect();
            if let Some(orphan) = stored.iter().find(|s| !stateful.contains(s)) {
                let now = match chain.stages().get(*orphan as usize) {
                    Some(stage) => format!("is now {}, which keeps no state", stage.plugin().name),
                    None => format!("is no more (the chain has {})", chain.stages().len()),
                };
                let file = file.display();
                let to = match stateful.iter().find(|s| !stored.contains(s)) {
                    Some(s) => (s + 1).to_string(),
                    None => "N".into(),
                };
                anyhow::bail!(
                    "the pipeline's stored state holds keys of transform {n}, and transform {n} {now}: starting would orphan them. \
                     If that stage moved, move its state with `sluice state {file} --move {n} --to {to}`; \
                     to drop it, `sluice state {file} --drop {n}`",
                    n = orphan + 1
                );
            }
        }
        Err(error) => {
            let error = format!("{error:#}");
            warn!(%error, "cannot read which stages the store holds state of; each partition is checked when it is loaded");
        }
    }
    for (index, stage) in chain.stateful() {
        // A store that cannot be read now (the database down) does not stop
        // a start or a swap: each partition is checked again when loaded,
        // and a version that cannot read it fails its batches with the reason.
        let mut held = match store.versions(index as u32).await {
            Ok(held) => held,
            Err(error) => {
                let error = format!("{error:#}");
                warn!(%error, stage = index, "cannot read the state versions from the store; each partition is checked when it is loaded");
                Default::default()
            }
        };
        if let Some(shared) = memory.get(&(index as u32)) {
            held.extend(lock(shared).versions_held());
        }
        if let Err(reason) = stage.state_version().takes_over(&held) {
            anyhow::bail!(
                "transform {} ({}) cannot take over the stage's state: {reason}",
                index + 1,
                stage.plugin().name
            );
        }
    }
    Ok(())
}

/// The state of `chain`'s stateful stages and what keeps it (see
/// [`Keeper::of`]). `None` when no stage keeps state.
fn state_for(
    chain: &Chain,
    spec: &Pipeline,
    sinks: &BTreeMap<String, Box<dyn Sink>>,
    dir: &std::path::Path,
) -> anyhow::Result<Option<(PipelineState, Keeper)>> {
    let Some((index, stage)) = chain.stateful().next() else { return Ok(None) };
    let what = || format!("transform {} ({}) keeps state (contract 0.3)", index + 1, stage.plugin().name);
    anyhow::ensure!(
        spec.source.connector().replays(),
        "{}: a {} source cannot read anything again, so its state could not be restored to match what was read",
        what(),
        spec.source.kind()
    );
    let keeper = Keeper::of(spec, sinks, dir).with_context(what)?;
    let store = keeper.store(sinks).with_context(what)?;
    if let Keeper::Sink(name) = &keeper {
        sinks[name].keeps_state();
    }
    Ok(Some((PipelineState::new(store), keeper)))
}

/// Routes a transformed batch to the sinks and the dead-letter destination.
struct Delivery {
    spec: Pipeline,
    sinks: BTreeMap<String, Box<dyn Sink>>,
    dead_letter: Box<dyn Sink>,
    /// What keeps the state: written last, with the batch's changes.
    keeper: Option<Keeper>,
}

/// A batch's dead letters, each with the index of its source record.
type Dead = Vec<(usize, Output)>;

impl Delivery {
    /// Writes a transformed batch: returns how many records were
    /// dead-lettered. Each dead letter is durable before any position that
    /// passes its record commits (a restart would skip the record):
    /// 1. the sinks that commit no positions (Kafka, stdout, an
    ///    at-least-once postgres sink) write the batch;
    /// 2. the dead letters known then (the source's, the plugins', the
    ///    router's, those sinks' refusals) are written;
    /// 3. the sinks that commit positions with their data (exactly-once
    ///    postgres) write theirs, each handing its refusals to the dead
    ///    letters before it commits ([`Refusals`]);
    /// 4. last, the state's keeper, with the batch's state changes: once it
    ///    has them, every other sink has the batch.
    ///
    /// A crash between two steps runs the batch again: the dead letters
    /// are at-least-once (their headers name the origin), the rows of an
    /// exactly-once sink exactly once.
    async fn deliver(
        &self,
        batch: &[Record],
        results: Results<ChainFailure>,
        delta: Option<&Delta>,
        cancel: &CancellationToken,
    ) -> Result<usize, Stopped> {
        let pipeline = self.spec.name.as_str();
        let mut routed: BTreeMap<&str, (Vec<usize>, Vec<OutputRef>)> = BTreeMap::new();
        let mut dead: Dead = Vec::new();
        let (outputs, per_record) = (results.outputs(), results.records());
        let mut next = 0;
        for (i, result) in per_record.iter().enumerate() {
            let n = match result {
                Ok(n) => *n,
                Err(failure) => {
                    dead.push((i, dead_letter(pipeline, &batch[i], &failure.plugin, &failure.error)));
                    continue;
                }
            };
            let mine = outputs.range(next..next + n);
            next += n;
            if let Some(route) = mine.clone().filter_map(|o| o.route).find(|r| !self.sinks.contains_key(*r)) {
                let known: Vec<&str> = self.sinks.keys().map(String::as_str).collect();
                let error = format!("unknown route {route:?} (sinks: {})", known.join(", "));
                dead.push((i, dead_letter(pipeline, &batch[i], "router", &error)));
                continue;
            }
            for out in mine {
                let sink = out.route.unwrap_or(&self.spec.default_sink);
                let name = self.sinks.get_key_value(sink).map(|(k, _)| k.as_str()).unwrap_or_default();
                let entry = routed.entry(name).or_default();
                entry.0.push(i);
                entry.1.push(out);
            }
        }

        // The state's keeper is written last, with the state's changes.
        let keeper = self.keeper.as_ref().zip(delta).map(|(keeper, delta)| match keeper {
            Keeper::Sink(name) => {
                (name.as_str(), &*self.sinks[name], routed.remove(name.as_str()).unwrap_or_default(), delta)
            }
            Keeper::Own(store) => ("state store", &**store, Default::default(), delta),
        });
        let (committing, plain): (Vec<_>, Vec<_>) =
            routed.iter().partition(|(name, _)| self.sinks[**name].commits_positions());

        // 1. The sinks that commit no positions.
        let writes = plain.into_iter().map(|(name, (owners, outputs))| {
            let sink = &self.sinks[*name];
            let origins: Vec<_> = owners.iter().map(|&i| &batch[i].origin).collect();
            async move {
                let rejected = retry(pipeline, name, cancel, || sink.write(outputs, &origins)).await?;
                telemetry().written(pipeline, name, outputs.len() - rejected.len());
                Ok::<_, Stopped>(self.refused(batch, name, owners, &rejected))
            }
        });
        for refused in futures::future::try_join_all(writes).await? {
            dead.extend(refused);
        }
        // 2. The dead letters known so far.
        let mut count = dead.len();
        if !dead.is_empty() {
            retry(pipeline, "dead_letter", cancel, || self.write_dead(batch, &dead)).await?;
            telemetry().written(pipeline, "dead_letter", dead.len());
            debug!(%pipeline, records = dead.len(), "dead-lettered");
        }
        crate::crash::point("dead-letters-written");
        // 3. The sinks that commit positions, then 4. the state's keeper.
        let writes = committing.into_iter().map(|(name, (owners, outputs))| {
            self.write_committing(batch, name, &*self.sinks[*name], owners, outputs, None, cancel)
        });
        count += futures::future::try_join_all(writes).await?.into_iter().sum::<usize>();
        if let Some((name, sink, (owners, outputs), delta)) = &keeper {
            count += self.write_committing(batch, name, *sink, owners, outputs, Some(*delta), cancel).await?;
        }
        crate::crash::point("delivered");
        Ok(count)
    }

    /// Writes `outputs` (of the source records `owners`) to `sink`, which
    /// commits their positions (with `delta`, for the state's keeper): its
    /// refusals are dead-lettered before it commits. Returns how many it refused.
    #[allow(clippy::too_many_arguments)]
    async fn write_committing(
        &self,
        batch: &[Record],
        name: &str,
        sink: &dyn Sink,
        owners: &[usize],
        outputs: &[OutputRef<'_>],
        delta: Option<&Delta>,
        cancel: &CancellationToken,
    ) -> Result<usize, Stopped> {
        let pipeline = self.spec.name.as_str();
        let origins: Vec<_> = owners.iter().map(|&i| &batch[i].origin).collect();
        let refusals = DeadLetterRefusals { delivery: self, batch, sink: name, owners, kept: Default::default() };
        let rejected =
            retry(pipeline, name, cancel, || sink.write_committed(outputs, &origins, delta, &refusals)).await?;
        if !outputs.is_empty() {
            telemetry().written(pipeline, name, outputs.len() - rejected.len());
        }
        // What the sink did not hand over before committing (a sink of
        // another kind): written now.
        let kept = std::mem::take(&mut *lock_kept(&refusals.kept));
        let unkept: Vec<Rejected> = rejected.iter().filter(|r| !kept.contains(&r.index)).cloned().collect();
        let late = self.refused(batch, name, owners, &unkept);
        if !late.is_empty() {
            retry(pipeline, "dead_letter", cancel, || self.write_dead(batch, &late)).await?;
        }
        if !rejected.is_empty() {
            telemetry().written(pipeline, "dead_letter", rejected.len());
        }
        Ok(rejected.len())
    }

    /// The dead letters of the records `sink` refused (`owners[i]` is the
    /// source record of the sink's `i`th output).
    fn refused(&self, batch: &[Record], sink: &str, owners: &[usize], rejected: &[Rejected]) -> Dead {
        rejected
            .iter()
            .map(|r| {
                let i = owners[r.index];
                (i, dead_letter(&self.spec.name, &batch[i], "sink", &format!("sink {sink}: {}", r.reason)))
            })
            .collect()
    }

    /// One attempt at writing `dead` to the dead-letter destination. A
    /// dead letter it refuses for good (too large) is written again with
    /// its value cut to a head; the headers keep the origin, so the record
    /// can still be found in the source.
    async fn write_dead(&self, batch: &[Record], dead: &[(usize, Output)]) -> anyhow::Result<()> {
        let pipeline = &self.spec.name;
        let origins: Vec<_> = dead.iter().map(|(i, _)| &batch[*i].origin).collect();
        let views: Vec<OutputRef> = dead.iter().map(|(_, out)| out.view()).collect();
        let rejected = self.dead_letter.write(&views, &origins).await?;
        if rejected.is_empty() {
            return Ok(());
        }
        let cut: Vec<Output> = rejected.iter().map(|r| truncated(&dead[r.index].1, &r.reason)).collect();
        let cut_origins: Vec<_> = rejected.iter().map(|r| origins[r.index]).collect();
        for r in &rejected {
            error!(%pipeline, reason = %r.reason, bytes = dead[r.index].1.value.len(), "dead letter refused; writing it truncated");
        }
        let cut: Vec<OutputRef> = cut.iter().map(Output::view).collect();
        let refused = self.dead_letter.write(&cut, &cut_origins).await?;
        anyhow::ensure!(refused.is_empty(), "the dead-letter destination refused truncated records: {:?}", refused);
        Ok(())
    }
}

/// What a sink that commits positions refuses, dead-lettered before it
/// commits; `kept` remembers which of its outputs are, so that a retry of
/// the batch writes each dead letter once.
struct DeadLetterRefusals<'a> {
    delivery: &'a Delivery,
    batch: &'a [Record],
    sink: &'a str,
    owners: &'a [usize],
    kept: std::sync::Mutex<std::collections::BTreeSet<usize>>,
}

fn lock_kept(
    kept: &std::sync::Mutex<std::collections::BTreeSet<usize>>,
) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<usize>> {
    kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait::async_trait]
impl Refusals for DeadLetterRefusals<'_> {
    async fn keep(&self, refused: &[Rejected]) -> anyhow::Result<()> {
        let new: Vec<Rejected> = {
            let kept = lock_kept(&self.kept);
            refused.iter().filter(|r| !kept.contains(&r.index)).cloned().collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let dead = self.delivery.refused(self.batch, self.sink, self.owners, &new);
        self.delivery.write_dead(self.batch, &dead).await.context("the dead-letter destination")?;
        lock_kept(&self.kept).extend(new.iter().map(|r| r.index));
        Ok(())
    }
}

/// Runs `write` (to `sink`) until it succeeds, backing off from 100 ms to
/// 10 s, or until `cancel`.
async fn retry<T, F, Fut>(pipeline: &str, sink: &str, cancel: &CancellationToken, mut write: F) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match write().await {
            Ok(value) => {
                telemetry().sink_ok(pipeline, sink, started.elapsed().as_secs_f64());
                return Ok(value);
            }
            Err(error) => {
                // A broken fence holds on every retry.
                if let Some(fence) = error.chain().find_map(|e| e.downcast_ref::<Fenced>()) {
                    return Err(Stopped::Fenced(fence.clone()));
                }
                let error = format!("{error:#}");
                warn!(%pipeline, %sink, %error, retry_in = ?delay, "sink write failed; retrying");
                telemetry().sink_failed(pipeline, sink, &error);
                tokio::select! {
                    _ = cancel.cancelled() => return Err(Stopped::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Bytes of a `sluice.error` header: a plugin's message may quote a whole
/// (huge) input.
const MAX_ERROR_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes on a character boundary, saying so.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// Bytes of the value a truncated dead letter keeps.
const TRUNCATED_HEAD: usize = 64 << 10;

/// `dead` with its value cut to [`TRUNCATED_HEAD`] bytes, for a dead-letter
/// destination that refused it whole.
fn truncated(dead: &Output, reason: &str) -> Output {
    let mut out = dead.clone();
    out.value.truncate(TRUNCATED_HEAD);
    for h in &mut out.headers {
        h.value.truncate(TRUNCATED_HEAD);
    }
    out.headers.push(Header { name: "sluice.truncated".into(), value: dead.value.len().to_string().into_bytes() });
    out.headers.push(Header { name: "sluice.truncated.reason".into(), value: reason.as_bytes().to_vec() });
    out
}

/// The dead-letter record for `record`: its key, value, headers and timestamp
/// as read, plus headers naming the pipeline, the failing stage, the error
/// and the origin.
pub fn dead_letter(pipeline: &str, record: &Record, stage: &str, error: &str) -> Output {
    let mut headers = record.headers.clone();
    let mut add =
        |name: &str, value: String| headers.push(Header { name: name.to_string(), value: value.into_bytes() });
    add("sluice.pipeline", pipeline.to_string());
    add("sluice.plugin", stage.to_string());
    add("sluice.error", clip(error, MAX_ERROR_BYTES));
    add("sluice.topic", record.origin.topic.to_string());
    add("sluice.partition", record.origin.partition.to_string());
    add("sluice.offset", record.origin.offset.to_string());
    Output { key: record.key.clone(), value: record.value.clone(), headers, timestamp: record.timestamp, route: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;
    use crate::sinks::Rejected;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// What the fakes saw, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// A source handing out `batches`, then the end of its input.
    struct MemorySource {
        batches: Mutex<std::collections::VecDeque<Vec<Record>>>,
        log: Log,
    }

    #[async_trait]
    impl Source for MemorySource {
        async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
            Ok(self.batches.lock().unwrap().pop_front().unwrap_or_default())
        }

        async fn commit(&self, batch: &[Record]) -> anyhow::Result<()> {
            let offsets: Vec<String> = batch.iter().map(|r| r.origin.offset.to_string()).collect();
            self.log.lock().unwrap().push(format!("commit {}", offsets.join(",")));
            Ok(())
        }

        async fn flush_commits(&self) -> anyhow::Result<()> {
            self.log.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    /// A sink that logs what it writes and, if `refuses`, refuses values
    /// starting with "refuse".
    struct MemorySink {
        name: &'static str,
        refuses: bool,
        log: Log,
    }

    #[async_trait]
    impl Sink for MemorySink {
        async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
            let mut rejected = Vec::new();
            let mut written = Vec::new();
            for (index, out) in batch.iter().enumerate() {
                let value = String::from_utf8_lossy(out.value).into_owned();
                if self.refuses && value.starts_with("refuse") {
                    rejected.push(Rejected { index, reason: format!("{value} refused") });
                } else {
                    let error = out.headers.iter().find(|h| h.name == "sluice.error");
                    match error {
                        Some(h) => written.push(format!("{value} ({})", String::from_utf8_lossy(&h.value))),
                        None => written.push(value),
                    }
                }
            }
            self.log.lock().unwrap().push(format!("{} {}", self.name, written.join(",")));
            Ok(rejected)
        }
    }

    fn record(value: &str, offset: i64, rejected: Option<&str>) -> Record {
        Record {
            value: value.to_string().into(),
            origin: Origin { topic: "t".into(), partition: 0, offset },
            rejected: rejected.map(str::to_string),
            ..Record::default()
        }
    }

    /// Delivery with no plugin (records pass through): each batch goes to
    /// the sink, what the source rejected and what the sink refuses go to the
    /// dead letters with their reasons, and the batch is committed only
    /// after both have it; at the end of the input the pipeline stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_committed_after_the_sink_and_the_dead_letters_have_it() {
        let log: Log = Arc::default();
        let runtime = Runtime::new(None).unwrap();
        // A pipeline file whose connectors the fakes stand in for.
        let text = "[source]\ntype = \"kafka\"\nbrokers = \"none:9092\"\ntopics = [\"t\"]\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n";
        let spec = crate::config::parse_pipeline(text, std::path::Path::new("/nonexistent/mem.toml"), None).unwrap();
        let source = Arc::new(MemorySource {
            batches: Mutex::new(
                [
                    vec![record("a", 0, None), record("cut", 1, Some("too long")), record("b", 2, None)],
                    vec![record("refuse-c", 3, None), record("d", 4, None)],
                ]
                .into(),
            ),
            log: log.clone(),
        });
        let chain = Chain::new(&runtime, &[], "mem").unwrap();
        let task = PipelineTask {
            refused: Refused::default(),
            spec,
            source,
            chain,
            sinks: [(
                "out".to_string(),
                Box::new(MemorySink { name: "out", refuses: true, log: log.clone() }) as Box<dyn Sink>,
            )]
            .into(),
            dead_letter: Box::new(MemorySink { name: "dead", refuses: false, log: log.clone() }),
            state: None,
        };
        let (_swap, swaps) = mpsc::unbounded_channel();
        task.run(CancellationToken::new(), swaps).await.unwrap();
        assert_eq!(
            log.lock().unwrap().clone(),
            [
                "out a,b",
                "dead cut (too long)",
                "commit 0,1,2",
                "out d",
                "dead refuse-c (sink out: refuse-c refused)",
                "commit 3,4",
                "flush",
            ]
        );
    }

    /// What outlives a crash: the exactly-once sink's rows and the offset
    /// stored with them, and the dead letters (source offsets), plus the
    /// write at which this run crashes.
    #[derive(Default)]
    struct Durable {
        rows: Vec<i64>,
        next: i64,
        dead: Vec<i64>,
        /// Writes so far (sink commits and dead-letter writes).
        writes: usize,
        /// The write that never returns (the crash), and whether it is
        /// durable before the crash.
        crash_at: Option<(usize, bool)>,
        crashed: bool,
    }

    type Shared = Arc<Mutex<Durable>>;

    /// One write: durable (`apply`) unless the crash comes first; at the
    /// crash the write never returns.
    async fn durable_write(shared: &Shared, apply: impl FnOnce(&mut Durable)) {
        let crash = {
            let mut d = shared.lock().unwrap();
            d.writes += 1;
            let crash = d.crash_at.filter(|(at, _)| *at == d.writes);
            if crash.is_none_or(|(_, durable)| durable) {
                apply(&mut d);
            }
            d.crashed |= crash.is_some();
            crash.is_some()
        };
        if crash {
            std::future::pending::<()>().await;
        }
    }

    /// An exactly-once sink: skips records below its stored offset, refuses
    /// values starting with "refuse" and hands them to the dead letters
    /// before it commits its rows with the offset.
    struct CommittingSink(Shared);

    #[async_trait]
    impl Sink for CommittingSink {
        async fn write(&self, batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
            self.write_committed(batch, origins, None, &()).await
        }

        fn commits_positions(&self) -> bool {
            true
        }

        async fn write_committed(
            &self,
            batch: &[OutputRef<'_>],
            origins: &[&Origin],
            _delta: Option<&Delta>,
            refusals: &dyn Refusals,
        ) -> anyhow::Result<Vec<Rejected>> {
            let stored = self.0.lock().unwrap().next;
            let (mut rows, mut refused) = (Vec::new(), Vec::new());
            for (index, (out, origin)) in batch.iter().zip(origins).enumerate() {
                if origin.offset < stored {
                    continue;
                }
                if out.value.starts_with(b"refuse") {
                    refused.push(Rejected { index, reason: "refused".into() });
                } else {
                    rows.push(origin.offset);
                }
            }
            if !refused.is_empty() {
                refusals.keep(&refused).await?;
            }
            let next = origins.iter().map(|o| o.offset + 1).max().unwrap_or(stored).max(stored);
            durable_write(&self.0, |d| {
                d.rows.extend(rows);
                d.next = next;
            })
            .await;
            Ok(refused)
        }
    }

    /// The dead-letter destination: keeps each dead letter's origin offset.
    struct DeadLetters(Shared);

    #[async_trait]
    impl Sink for DeadLetters {
        async fn write(&self, _batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
            let offsets: Vec<i64> = origins.iter().map(|o| o.offset).collect();
            durable_write(&self.0, |d| d.dead.extend(offsets)).await;
            Ok(Vec::new())
        }
    }

    /// Runs the pipeline over `batches` (read again from the start, as a
    /// file source is after a restart) until it ends or crashes; true when
    /// it ended.
    async fn run_until_end_or_crash(batches: &[Vec<Record>], shared: &Shared) -> bool {
        let runtime = Runtime::new(None).unwrap();
        let text = "[source]\ntype = \"kafka\"\nbrokers = \"none:9092\"\ntopics = [\"t\"]\n[sinks.pg]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n";
        let spec = crate::config::parse_pipeline(text, std::path::Path::new("/nonexistent/p.toml"), None).unwrap();
        let source =
            Arc::new(MemorySource { batches: Mutex::new(batches.iter().cloned().collect()), log: Log::default() });
        let task = PipelineTask {
            refused: Refused::default(),
            spec,
            source,
            chain: Chain::new(&runtime, &[], "p").unwrap(),
            sinks: [("pg".to_string(), Box::new(CommittingSink(shared.clone())) as Box<dyn Sink>)].into(),
            dead_letter: Box::new(DeadLetters(shared.clone())),
            state: None,
        };
        let (_swap, swaps) = mpsc::unbounded_channel();
        let run = tokio::spawn(task.run(CancellationToken::new(), swaps));
        loop {
            if run.is_finished() {
                run.await.unwrap().unwrap();
                return true;
            }
            if shared.lock().unwrap().crashed {
                run.abort(); // the crash: nothing after it happens
                let _ = run.await;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// For any batches of records the source rejects, the sink refuses
        /// or takes, and crashes at any write (before or after it is
        /// durable), restarted until a run ends: every record is in the
        /// sink once or in the dead letters (at least once, one record per
        /// origin), never both, never neither.
        #[test]
        fn every_record_ends_in_the_sink_once_or_in_the_dead_letters_through_crashes(
            kinds in proptest::collection::vec(proptest::collection::vec(0..3u8, 1..6), 1..5),
            crashes in proptest::collection::vec((1..12usize, proptest::bool::ANY), 0..4),
        ) {
            let mut offset = 0;
            let batches: Vec<Vec<Record>> = kinds
                .iter()
                .map(|batch| {
                    batch
                        .iter()
                        .map(|kind| {
                            offset += 1;
                            match kind {
                                0 => record(&format!("ok-{offset}"), offset, None),
                                1 => record(&format!("refuse-{offset}"), offset, None),
                                _ => record(&format!("bad-{offset}"), offset, Some("not JSON")),
                            }
                        })
                        .collect()
                })
                .collect();
            let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let shared: Shared = Arc::default();
            for crash in crashes.into_iter().map(Some).chain([None]) {
                {
                    let mut d = shared.lock().unwrap();
                    d.writes = 0;
                    d.crashed = false;
                    d.crash_at = crash;
                }
                if tokio.block_on(run_until_end_or_crash(&batches, &shared)) {
                    break;
                }
            }
            let d = shared.lock().unwrap();
            let mut rows = d.rows.clone();
            rows.sort();
            let before = rows.len();
            rows.dedup();
            proptest::prop_assert_eq!(before, rows.len(), "a row written twice");
            let mut dead = d.dead.clone();
            dead.sort();
            dead.dedup();
            let mut want_rows = Vec::new();
            let mut want_dead = Vec::new();
            for r in batches.iter().flatten() {
                match r.value.starts_with(b"ok") {
                    true => want_rows.push(r.origin.offset),
                    false => want_dead.push(r.origin.offset),
                }
            }
            proptest::prop_assert_eq!(rows, want_rows);
            proptest::prop_assert_eq!(dead, want_dead);
        }
    }

    #[test]
    fn dead_letters_keep_the_record_and_a_bounded_error() {
        let record = Record {
            value: "v".into(),
            origin: crate::record::Origin { topic: "t".into(), partition: 2, offset: 9 },
            ..Record::default()
        };
        let huge = "é".repeat(10_000);
        let dead = dead_letter("p", &record, "plug", &huge);
        let header = |name: &str| {
            dead.headers.iter().find(|h| h.name == name).map(|h| String::from_utf8(h.value.clone()).unwrap())
        };
        assert_eq!(dead.value, "v");
        assert_eq!(header("sluice.offset").as_deref(), Some("9"));
        let error = header("sluice.error").unwrap();
        assert!(error.len() < MAX_ERROR_BYTES + 40 && error.ends_with("(20000 bytes in all)"), "{}", error.len());
        assert_eq!(clip("short", 10), "short");

        let cut = truncated(&Output { value: vec![1; TRUNCATED_HEAD * 2].into(), ..dead.clone() }, "too large");
        assert_eq!(cut.value.len(), TRUNCATED_HEAD);
        assert!(cut
            .headers
            .iter()
            .any(|h| h.name == "sluice.truncated" && h.value == (TRUNCATED_HEAD * 2).to_string().as_bytes()));
    }
}
