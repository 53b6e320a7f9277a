//! Delivery of a transformed batch: outputs routed to the sinks, failures
//! to the dead letters, in the order that keeps each dead letter durable
//! before any position past its record commits; writes retried with
//! back-off until they go through or the pipeline stops.

use super::dead_letter::{dead_letter, truncated};
use super::keeper::Keeper;
use crate::config::Pipeline;
use crate::record::{Origin, Output, OutputRef, Record, Refusals, Rejected, Results};
use crate::sinks::Sink;
use crate::state::{Delta, Fenced, StateKeeper};
use crate::telemetry::telemetry;
use crate::transforms::ChainFailure;
use anyhow::Context;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

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
    /// No retry can deliver it (the pipeline's wiring is wrong): the
    /// pipeline stops with the reason.
    #[error(transparent)]
    Failed(anyhow::Error),
}

/// Routes a transformed batch to the sinks and the dead-letter destination.
pub(super) struct Delivery {
    pub(super) spec: Pipeline,
    pub(super) sinks: BTreeMap<String, Box<dyn Sink>>,
    pub(super) dead_letter: Box<dyn Sink>,
    /// What keeps the state: written last, with the batch's changes.
    pub(super) keeper: Option<Keeper>,
}

/// A batch's dead letters, each with the index of its source record.
type Dead = Vec<(usize, Output)>;

/// Per sink: its outputs, and the index of each one's source record.
type Routed<'s, 'r> = BTreeMap<&'s str, (Vec<usize>, Vec<OutputRef<'r>>)>;

/// What commits positions with its data: an exactly-once sink, or the
/// state's keeper with the batch's state changes.
enum Committer<'a> {
    Sink(&'a dyn Sink),
    Keeper(&'a dyn StateKeeper, &'a Delta),
}

impl Committer<'_> {
    async fn write(
        &self,
        outputs: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        match self {
            Committer::Sink(sink) => sink.write_committed(outputs, origins, refusals).await,
            Committer::Keeper(keeper, delta) => keeper.commit(delta, outputs, origins, refusals).await,
        }
    }
}

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
    pub(super) async fn deliver(
        &self,
        batch: &[Record],
        results: Results<ChainFailure>,
        delta: Option<&Delta>,
        cancel: &CancellationToken,
    ) -> Result<usize, Stopped> {
        let pipeline = self.spec.name.as_str();
        let (mut routed, mut dead) = self.route(batch, &results);
        // The state's keeper is written last, with the state's changes.
        let keeper = match (&self.keeper, delta) {
            (Some(keeper), Some(delta)) => {
                let (name, rows) = match keeper {
                    Keeper::Sink(name) => (name.as_str(), routed.remove(name.as_str()).unwrap_or_default()),
                    Keeper::Own(_) => ("state store", Default::default()),
                };
                let keeper = keeper.get(&self.sinks).map_err(Stopped::Failed)?;
                Some((name, Committer::Keeper(keeper, delta), rows))
            }
            _ => None,
        };
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
            let sink = Committer::Sink(&*self.sinks[*name]);
            async move { self.write_committing(batch, name, &sink, owners, outputs, cancel).await }
        });
        count += futures::future::try_join_all(writes).await?.into_iter().sum::<usize>();
        if let Some((name, keeper, (owners, outputs))) = &keeper {
            count += self.write_committing(batch, name, keeper, owners, outputs, cancel).await?;
        }
        crate::crash::point("delivered");
        Ok(count)
    }

    /// Each sink's outputs (with the index of each one's source record),
    /// and the dead letters of the records that failed in the chain or
    /// named a route with no sink.
    fn route<'r>(&self, batch: &[Record], results: &'r Results<ChainFailure>) -> (Routed<'_, 'r>, Dead) {
        let pipeline = self.spec.name.as_str();
        let mut routed: Routed = BTreeMap::new();
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
        (routed, dead)
    }

    /// Writes `outputs` (of the source records `owners`) to `sink`, which
    /// commits their positions (with the batch's state, for the state's
    /// keeper): its refusals are dead-lettered before it commits. Returns
    /// how many it refused.
    async fn write_committing(
        &self,
        batch: &[Record],
        name: &str,
        sink: &Committer<'_>,
        owners: &[usize],
        outputs: &[OutputRef<'_>],
        cancel: &CancellationToken,
    ) -> Result<usize, Stopped> {
        let pipeline = self.spec.name.as_str();
        let origins: Vec<_> = owners.iter().map(|&i| &batch[i].origin).collect();
        let refusals = DeadLetterRefusals { delivery: self, batch, sink: name, owners, kept: Default::default() };
        let rejected = retry(pipeline, name, cancel, || sink.write(outputs, &origins, &refusals)).await?;
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
