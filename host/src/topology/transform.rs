//! The transform step of a pipeline (its own task): reads a batch, applies
//! chain swaps between batches, readies the keyed state, runs the chain
//! (and the timers it fires) under the supervisor's verdicts, and hands the
//! results with the batch's state changes to delivery (at most one waiting).
//!
//! A batch goes through named steps: [`TransformStep::read`] (or an idle
//! tick), [`TransformStep::ready_state`] (restore the state it needs),
//! [`TransformStep::transform`] (run, fire timers, judge; on probation,
//! [`TransformStep::gather`] more records when the batch is too small to
//! judge), then it is handed on to delivery.

use crate::record::{Record, Results};
use crate::sources::Source;
use crate::state::{Delta, PipelineState};
use crate::supervisor::{Supervisor, Verdict, SURGE_MIN_RECORDS};
use crate::telemetry::telemetry;
use crate::transforms::{Chain, ChainFailure, Fire};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// On probation, a batch too small to judge waits this long at most for
/// more records to join it (see [`Verdict::Gather`]): a broken version
/// cannot slip its failures of a few small batches to the dead letters, or
/// the state changes they made into the store, before a batch is large
/// enough to show the surge.
const PROBATION_GATHER: Duration = Duration::from_secs(10);

/// A batch and what the chain made of it, on its way to the sinks.
pub(super) struct Transformed {
    /// The source records, then the fired timers' records (offset -1).
    pub(super) batch: Vec<Record>,
    /// How many of `batch` are source records (the ones to commit).
    pub(super) sources: usize,
    pub(super) results: Results<ChainFailure>,
    /// The batch's state changes, for the state's sink.
    pub(super) delta: Option<Delta>,
    /// A barrier (with an empty batch): answered once every batch before
    /// it is delivered and committed.
    pub(super) delivered: Option<tokio::sync::oneshot::Sender<()>>,
    /// When the batch was read.
    pub(super) read_at: Instant,
}

/// A read of the source in progress.
type Read = Pin<Box<dyn Future<Output = anyhow::Result<Vec<Record>>> + Send>>;

/// What woke the step up.
enum Woken {
    Batch(Vec<Record>),
    /// No batch for a while: timers of idle partitions may be due.
    Idle,
    Cancelled,
}

/// The transform step's parts. A failing plugin version is handled by the
/// pipeline's [`crate::config::OnPluginFailure`] before any of the batch's
/// results are handed on.
pub(super) struct TransformStep {
    pipeline: String,
    source: Arc<dyn Source>,
    versions: Supervisor<Chain>,
    state: Option<PipelineState>,
    swaps: mpsc::UnboundedReceiver<Chain>,
    cancel: CancellationToken,
    out: mpsc::Sender<Transformed>,
    /// The source's input ended (read while gathering a batch).
    ended: bool,
}

impl TransformStep {
    pub(super) fn new(
        source: Arc<dyn Source>,
        versions: Supervisor<Chain>,
        state: Option<PipelineState>,
        swaps: mpsc::UnboundedReceiver<Chain>,
        cancel: CancellationToken,
        out: mpsc::Sender<Transformed>,
    ) -> Self {
        TransformStep {
            pipeline: versions.pipeline().to_string(),
            source,
            versions,
            state,
            swaps,
            cancel,
            out,
            ended: false,
        }
    }

    /// Runs batches until `cancel`, the end of the input, or delivery is gone.
    pub(super) async fn run(mut self) -> anyhow::Result<()> {
        // The read in progress, kept across idle ticks (a read is not
        // cancelled halfway: the records it took would be lost).
        let mut read = self.next_read();
        loop {
            let mut batch = match self.read(&mut read).await? {
                Woken::Cancelled => return Ok(()),
                Woken::Idle => match self.fire_idle().await {
                    true => continue,
                    false => return Ok(()),
                },
                Woken::Batch(batch) => batch,
            };
            if batch.is_empty() {
                break;
            }
            let read_at = Instant::now();
            self.take_swaps();
            if !self.ready_state(&mut batch).await {
                return Ok(());
            }
            if !batch.is_empty() {
                let Some(transformed) = self.transform(batch, read_at, &mut read).await? else { return Ok(()) };
                if self.out.send(transformed).await.is_err() {
                    return Ok(());
                }
            }
            if self.ended {
                break;
            }
        }
        info!(pipeline = %self.pipeline, "the source's input ended: delivering what is in hand, then stopping");
        self.fire_at_end().await;
        Ok(())
    }

    fn next_read(&self) -> Read {
        let source = self.source.clone();
        Box::pin(async move { source.next_batch().await })
    }

    /// The next batch (empty: the input ended), or an idle tick when the
    /// state looks for idle partitions and expired keys.
    async fn read(&mut self, read: &mut Read) -> anyhow::Result<Woken> {
        let tick = self.state.as_ref().and_then(PipelineState::idle_tick);
        tokio::select! {
            _ = self.cancel.cancelled() => Ok(Woken::Cancelled),
            batch = read.as_mut() => {
                *read = self.next_read();
                Ok(Woken::Batch(batch?))
            }
            _ = tokio::time::sleep(tick.unwrap_or_default()), if tick.is_some() => Ok(Woken::Idle),
        }
    }

    /// Swaps in the chains received since the last batch: every record is
    /// transformed by exactly one version.
    fn take_swaps(&mut self) {
        while let Ok(new) = self.swaps.try_recv() {
            let new = self.with_state(new);
            self.versions.swap_in(new);
        }
    }

    /// `chain`, sharing the pipeline's state.
    fn with_state(&mut self, mut chain: Chain) -> Chain {
        if let Some(state) = &mut self.state {
            chain.attach_state(state);
        }
        chain
    }

    /// On probation, a batch too small to judge gathers more records,
    /// through `read`, the read in progress, until it has
    /// SURGE_MIN_RECORDS, `until` passes, or the input ends. A read is
    /// never dropped halfway: one that has taken records when the wait ends
    /// goes on, and its batch is the next one (dropped, its records would
    /// be skipped, and lost once a later batch commits past them). Returns
    /// whether more records could still join the batch; `None` on `cancel`.
    async fn gather(
        &mut self,
        batch: &mut Vec<Record>,
        until: Instant,
        read: &mut Read,
    ) -> anyhow::Result<Option<bool>> {
        while batch.len() < SURGE_MIN_RECORDS {
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep_until(until.into()) => break,
                more = read.as_mut() => {
                    *read = self.next_read();
                    let more = more?;
                    if more.is_empty() {
                        self.ended = true;
                        break;
                    }
                    batch.extend(more);
                }
            }
        }
        // The whole batch again: a rebalance while waiting reloads the state.
        if !self.ready_state(batch).await {
            return Ok(None);
        }
        Ok(Some(!self.ended && Instant::now() < until))
    }

    /// Readies the state for `batch` (see [`restore`]), taking out the
    /// records it already holds; `false` on `cancel`.
    async fn ready_state(&mut self, batch: &mut Vec<Record>) -> bool {
        let Some(state) = &mut self.state else { return true };
        let Some(skipped) = restore(state, batch, &*self.source, &self.pipeline, &self.cancel, &self.out).await else {
            return false;
        };
        if skipped > 0 {
            info!(pipeline = %self.pipeline, records = skipped, "skipped records the restored state already holds (read again after a restart or rebalance)");
        }
        true
    }

    /// Runs the chain on `batch` (and the timers its watermarks pass) until
    /// the supervisor lets the results go on, gathering more records
    /// through `read` when it asks; `None` on `cancel`.
    async fn transform(
        &mut self,
        mut batch: Vec<Record>,
        read_at: Instant,
        read: &mut Read,
    ) -> anyhow::Result<Option<Transformed>> {
        let mut paused = false;
        let mut delay = Duration::from_secs(1);
        let until = Instant::now() + PROBATION_GATHER;
        let mut more = !self.ended;
        let (results, fired) = loop {
            let (results, fired) = self.run_chain(&batch);
            match self.versions.verdict(&results, more) {
                Verdict::Deliver => break (results, fired),
                Verdict::DeliverFailing(failing) => {
                    warn!(pipeline = %self.pipeline, %failing, "plugin version failing; its records go to the dead letters (on_plugin_failure = dead_letter)");
                    break (results, fired);
                }
                Verdict::RunAgain => {}
                Verdict::Gather => match self.gather(&mut batch, until, read).await? {
                    Some(can_grow) => more = can_grow,
                    None => return Ok(None),
                },
                Verdict::Pause(failing) => {
                    paused = true;
                    if !self.pause(&failing.to_string(), delay).await {
                        return Ok(None);
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        if paused {
            info!(pipeline = %self.pipeline, "plugin version works: pipeline resumed");
            telemetry().plugin_ok(&self.pipeline);
        }
        self.versions.record(&results);
        self.versions.current().release_shadows();
        let sources = batch.len();
        batch.extend(fired);
        let delta = self.state.as_ref().map(|state| state.apply(&batch));
        if let Some(state) = &self.state {
            report_state(&self.pipeline, state);
        }
        Ok(Some(Transformed { batch, sources, results, delta, delivered: None, read_at }))
    }

    /// One run of the current chain on `batch`, from the state before it
    /// (a batch run again, after a rollback or a pause, starts over), then
    /// the timers the batch's watermarks passed.
    fn run_chain(&mut self, batch: &[Record]) -> (Results<ChainFailure>, Vec<Record>) {
        if let Some(state) = &self.state {
            state.discard();
        }
        let stateful = self.state.is_some();
        let drained = self.source.drained();
        tokio::task::block_in_place(|| {
            let mut results = self.versions.current().process(batch);
            let (fired, timer_results) = match stateful {
                true => self.versions.current().fire(Fire::AfterBatch { at: Instant::now(), drained }),
                false => Default::default(),
            };
            results.append(timer_results);
            (results, fired)
        })
    }

    /// Paused on a failing version: nothing of the batch is delivered,
    /// nothing committed, until `delay` passes or a new version comes (it
    /// replaces the failing one); `false` on `cancel`.
    async fn pause(&mut self, reason: &str, delay: Duration) -> bool {
        error!(pipeline = %self.pipeline, %reason, retry_in = ?delay, "pipeline paused on a failing plugin version: drop in a new version to resume");
        telemetry().plugin_failing(&self.pipeline, reason);
        tokio::select! {
            _ = self.cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
            Some(new) = self.swaps.recv() => {
                let new = self.with_state(new);
                self.versions.replace(new);
                while let Ok(newer) = self.swaps.try_recv() {
                    let newer = self.with_state(newer);
                    self.versions.replace(newer);
                }
            }
        }
        true
    }

    /// An idle tick: the timers of idle partitions whose watermarks moved
    /// on fire, and go to delivery; `false` when the step must stop.
    async fn fire_idle(&mut self) -> bool {
        let Some(state) = &mut self.state else { return true };
        if restore(state, &mut Vec::new(), &*self.source, &self.pipeline, &self.cancel, &self.out).await.is_none() {
            return false;
        }
        let (fired, results) = tokio::task::block_in_place(|| self.versions.current().fire(Fire::Idle(Instant::now())));
        let Some(state) = &self.state else { return true };
        if fired.is_empty() {
            state.discard();
            return true;
        }
        info!(pipeline = %self.pipeline, timers = fired.len(), "idle partitions' watermarks moved on: timers fired");
        self.versions.current().release_shadows();
        hand_on_timers(state, fired, results, &self.pipeline, &self.out).await
    }

    /// The input ended (a file under `--until-eof`): every timer still set
    /// fires (the last windows close), and is delivered as a last batch.
    async fn fire_at_end(&mut self) {
        if self.state.is_none() {
            return;
        }
        let (fired, results) = tokio::task::block_in_place(|| self.versions.current().fire(Fire::End));
        let Some(state) = &self.state else { return };
        if fired.is_empty() {
            return;
        }
        info!(pipeline = %self.pipeline, timers = fired.len(), "the input ended: every timer fired");
        self.versions.current().release_shadows();
        hand_on_timers(state, fired, results, &self.pipeline, &self.out).await;
    }
}

/// Hands fired timers' records, without a source batch, to delivery with
/// their state changes; `false` when the delivery stage is gone.
async fn hand_on_timers(
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
