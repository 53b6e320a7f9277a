//! One pipeline's task: read a batch, run the chain, route outputs to sinks,
//! dead-letter failures, and commit the source only once every sink has it.

use crate::config::{OnPluginFailure, Pipeline, SourceConfig};
use crate::record::{Header, Output, OutputRef, Record, Results};
use crate::runtime::Runtime;
use crate::sinks::{self, Sink};
use crate::sources::{kafka::KafkaSource, websocket::WebSocketSource, Source};
use crate::telemetry::telemetry;
use crate::transforms::{Chain, ChainFailure, VersionFailing};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The pipeline was asked to stop while a batch could not be delivered: the
/// batch stays uncommitted and is read again on the next start.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the batch was delivered")]
pub struct Stopped;

pub struct PipelineTask {
    runtime: Runtime,
    spec: Pipeline,
    source: Arc<dyn Source>,
    chain: Chain,
    sinks: BTreeMap<String, Box<dyn Sink>>,
    dead_letter: Box<dyn Sink>,
}

/// A batch and what the chain made of it, on its way to the sinks.
struct Transformed {
    batch: Vec<Record>,
    results: Results<ChainFailure>,
    /// When the batch was read.
    read_at: Instant,
}

/// `(plugin, short version)` of each stage of `chain`.
fn versions(chain: &Chain) -> Vec<(String, String)> {
    chain.stages().iter().map(|s| (s.plugin().name.clone(), s.plugin().short_hash().to_string())).collect()
}

impl PipelineTask {
    /// Creates the source, the chain (compiling and initialising each plugin) and the sinks.
    pub async fn build(runtime: &Runtime, spec: Pipeline) -> anyhow::Result<Self> {
        let chain = tokio::task::block_in_place(|| Chain::new(runtime, &spec.transforms, &spec.name))?;
        for stage in chain.stages() {
            let p = stage.plugin();
            info!(pipeline = %spec.name, plugin = %p.name, version = %p.short_hash(), contract = %p.contract, cache_hit = p.cache_hit, "plugin ready");
        }
        let dir = spec.file.parent().unwrap_or(std::path::Path::new("."));
        let mut sinks = BTreeMap::new();
        for (name, config) in &spec.sinks {
            sinks.insert(name.clone(), sinks::build(name, config, &spec.name, dir).await?);
        }
        let dead_letter = sinks::build("dead_letter", &spec.dead_letter, &spec.name, dir).await?;
        let source: Arc<dyn Source> = match &spec.source {
            SourceConfig::Kafka(k) => Arc::new(KafkaSource::new(k, &spec.group(), &spec.name)?),
            SourceConfig::WebSocket(w) => Arc::new(WebSocketSource::new(w, &spec.name)?),
        };
        Ok(PipelineTask { runtime: runtime.clone(), spec, source, chain, sinks, dead_letter })
    }

    /// Runs until `cancel`. Two stages overlap: the transform stage (its own
    /// task) reads and transforms batch N+1 while this one writes batch N to
    /// the sinks and commits it; batches are delivered and committed in order.
    /// On `cancel` the batches in hand are delivered and committed first.
    /// A chain received on `swaps` replaces the current one between two
    /// batches: every record is transformed by exactly one version.
    pub async fn run(self, cancel: CancellationToken, swaps: mpsc::UnboundedReceiver<Chain>) -> anyhow::Result<()> {
        let PipelineTask { runtime, spec, source, chain, sinks, dead_letter } = self;
        telemetry().pipeline_started(&spec.name, &sinks.keys().cloned().collect::<Vec<_>>(), &versions(&chain));
        let (transformed_tx, mut transformed) = mpsc::channel::<Transformed>(1);
        let versions = Versions::new(spec.name.clone(), chain, spec.on_plugin_failure, runtime);
        let stage = tokio::spawn(transform_stage(source.clone(), versions, swaps, cancel.clone(), transformed_tx));
        let delivery = Delivery { spec, sinks, dead_letter };
        let name = delivery.spec.name.clone();
        while let Some(Transformed { batch, results, read_at }) = transformed.recv().await {
            let dead = match delivery.deliver(&batch, results, &cancel).await {
                Ok(dead) => dead,
                Err(Stopped) => break,
            };
            if let Err(error) = source.commit(&batch).await {
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
        stage.map_err(|e| anyhow::anyhow!("transform stage panicked: {e}"))?
    }
}

/// Batches a new version runs on probation after a hot swap: an error surge
/// in one of them counts as the version failing.
const PROBATION_BATCHES: u32 = 10;

/// A batch is judged for an error surge only from this many records on.
const SURGE_MIN_RECORDS: usize = 10;

/// On probation, a batch too small to be judged waits this long at most for
/// more records to join it, so that a broken version cannot slip its
/// failures of a few small batches to the dead letters before a batch is
/// large enough to show the surge.
const PROBATION_TOP_UP: Duration = Duration::from_millis(250);

/// The chain a pipeline runs, the one it ran before the last hot swap (for a
/// rollback), and how often their records fail.
struct Versions {
    pipeline: String,
    current: Chain,
    /// The chain before the last swap, kept for [`OnPluginFailure::Rollback`].
    previous: Option<Chain>,
    policy: OnPluginFailure,
    runtime: Runtime,
    /// Batches the current chain has run since it went live.
    batches: u32,
    /// The current chain's recent record errors and records (decaying sums).
    recent: (f64, f64),
    /// The previous chain's recent error rate when it was swapped out.
    previous_rate: f64,
}

impl Versions {
    fn new(pipeline: String, current: Chain, policy: OnPluginFailure, runtime: Runtime) -> Self {
        Versions {
            pipeline,
            current,
            previous: None,
            policy,
            runtime,
            batches: PROBATION_BATCHES,
            recent: (0.0, 0.0),
            previous_rate: 0.0,
        }
    }

    fn rate(&self) -> f64 {
        if self.recent.1 == 0.0 {
            0.0
        } else {
            self.recent.0 / self.recent.1
        }
    }

    /// A hot swap: `new` goes live, the current chain is kept for a rollback.
    fn swap_in(&mut self, new: Chain) {
        // The new chain is compiled, instantiated and initialised already:
        // the pause is moving the old one aside.
        let started = Instant::now();
        self.previous_rate = self.rate();
        self.previous = Some(std::mem::replace(&mut self.current, new));
        self.went_live(started);
    }

    /// A new version while paused: the failing chain is dropped, not kept.
    fn replace(&mut self, new: Chain) {
        let started = Instant::now();
        drop(std::mem::replace(&mut self.current, new));
        self.went_live(started);
    }

    fn went_live(&mut self, started: Instant) {
        self.batches = 0;
        self.recent = (0.0, 0.0);
        let pause_us = started.elapsed().as_micros() as u64;
        let live = versions(&self.current);
        let shown: Vec<String> = live.iter().map(|(name, version)| format!("{name}@{version}")).collect();
        info!(pipeline = %self.pipeline, plugins = %shown.join(" -> "), pause_us, "new plugin versions live");
        telemetry().set_plugins(&self.pipeline, &live);
    }

    /// Whether the current chain is a new version still on probation.
    fn on_probation(&self) -> bool {
        self.batches < PROBATION_BATCHES && self.previous.is_some()
    }

    /// Whether the current chain is failing, after it ran `results`: a
    /// fault streak or isolation over budget (any time), or, on probation
    /// after a swap, an error surge against the previous version's rate.
    fn judge(&mut self, results: &Results<ChainFailure>) -> Option<VersionFailing> {
        if let Some(failing) = self.current.take_failing() {
            return Some(failing);
        }
        if !self.on_probation() || results.len() < SURGE_MIN_RECORDS {
            return None;
        }
        let failed: Vec<&ChainFailure> = results.errors().collect();
        let rate = failed.len() as f64 / results.len() as f64;
        if rate <= 0.5 || self.previous_rate >= 0.05 {
            return None;
        }
        // The stage that failed the most records is the one surging.
        let mut per_plugin: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &failed {
            *per_plugin.entry(f.plugin.as_str()).or_default() += 1;
        }
        let plugin = per_plugin.iter().max_by_key(|(_, n)| **n).map(|(p, _)| *p)?;
        let example = failed.iter().find(|f| f.plugin == plugin)?;
        let stage = self.current.stages().iter().find(|s| s.plugin().name == plugin)?;
        Some(VersionFailing {
            plugin: plugin.to_string(),
            version: stage.plugin().hash.clone(),
            key: stage.version_key(),
            reason: format!(
                "error surge: {} of {} records failed ({:.0}%; the previous version: {:.1}%), e.g. {}",
                failed.len(),
                results.len(),
                rate * 100.0,
                self.previous_rate * 100.0,
                example.error
            ),
        })
    }

    /// `results` are on their way to the sinks: they count for the error rate.
    fn record(&mut self, results: &Results<ChainFailure>) {
        let errors = results.errors().count() as f64;
        self.recent = (self.recent.0 * 0.8 + errors, self.recent.1 * 0.8 + results.len() as f64);
        self.batches = self.batches.saturating_add(1);
    }

    /// Swaps back to the previous chain after `failing`, refusing the failing version.
    fn roll_back(&mut self, failing: &VersionFailing) {
        let Some(previous) = self.previous.take() else { return };
        let bad = std::mem::replace(&mut self.current, previous);
        let old = self
            .current
            .stages()
            .iter()
            .find(|s| s.plugin().name == failing.plugin)
            .map(|s| s.plugin().short_hash().to_string());
        let old = old.unwrap_or_else(|| "-".to_string());
        let new = failing.version.get(..12).unwrap_or(&failing.version);
        self.runtime.refuse(&failing.key, &failing.reason);
        error!(
            pipeline = %self.pipeline,
            plugin = %failing.plugin,
            from = %new,
            to = %old,
            reason = %failing.reason,
            "plugin version rolled back before any of its output was delivered; this version (file and config) is refused until either changes"
        );
        telemetry().rolled_back(
            &self.pipeline,
            &failing.plugin,
            &format!("{} {new} -> {old}: {}", failing.plugin, failing.reason),
        );
        telemetry().set_plugins(&self.pipeline, &versions(&self.current));
        drop(bad);
        self.batches = PROBATION_BATCHES;
        self.recent = (0.0, 0.0);
    }
}

/// Runs `batch` through `chain`; records their source rejected skip it and fail.
fn process(chain: &mut Chain, batch: &[Record]) -> Results<ChainFailure> {
    if batch.iter().all(|r| r.rejected.is_none()) {
        return chain.process(batch);
    }
    let accepted: Vec<Record> = batch.iter().filter(|r| r.rejected.is_none()).cloned().collect();
    let (outputs, per_record) = chain.process(&accepted).into_parts();
    let mut per_record = per_record.into_iter();
    let mut records = Vec::with_capacity(batch.len());
    for r in batch {
        records.push(match &r.rejected {
            Some(reason) => Err(ChainFailure { plugin: "source".to_string(), error: reason.clone() }),
            None => per_record.next().unwrap_or(Ok(0)),
        });
    }
    Results::from_parts(outputs, records)
}

/// Reads batches, applies chain swaps between them, transforms them, and
/// hands them to the delivery stage (at most one waiting). A failing plugin
/// version is handled by the pipeline's [`OnPluginFailure`] before any of
/// the batch's results are handed on.
async fn transform_stage(
    source: Arc<dyn Source>,
    mut versions: Versions,
    mut swaps: mpsc::UnboundedReceiver<Chain>,
    cancel: CancellationToken,
    out: mpsc::Sender<Transformed>,
) -> anyhow::Result<()> {
    let pipeline = versions.pipeline.clone();
    loop {
        let mut batch = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            batch = source.next_batch() => batch?,
        };
        let read_at = Instant::now();
        while let Ok(new) = swaps.try_recv() {
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
                more = source.next_batch() => batch.extend(more?),
            }
        }
        let mut paused = false;
        let mut delay = Duration::from_secs(1);
        let results = loop {
            let results = tokio::task::block_in_place(|| process(&mut versions.current, &batch));
            let Some(failing) = versions.judge(&results) else { break results };
            match versions.policy {
                OnPluginFailure::DeadLetter => {
                    warn!(%pipeline, %failing, "plugin version failing; its records go to the dead letters (on_plugin_failure = dead_letter)");
                    break results;
                }
                OnPluginFailure::Rollback if versions.previous.is_some() => versions.roll_back(&failing),
                _ => {
                    // Pause: nothing of this batch is delivered, nothing committed.
                    let reason = failing.to_string();
                    error!(%pipeline, reason = %reason, retry_in = ?delay, "pipeline paused on a failing plugin version: drop in a new version to resume");
                    telemetry().plugin_failing(&pipeline, &reason);
                    paused = true;
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                        Some(new) = swaps.recv() => {
                            versions.replace(new);
                            while let Ok(newer) = swaps.try_recv() {
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
        if out.send(Transformed { batch, results, read_at }).await.is_err() {
            return Ok(());
        }
    }
}

/// Routes a transformed batch to the sinks and the dead-letter destination.
struct Delivery {
    spec: Pipeline,
    sinks: BTreeMap<String, Box<dyn Sink>>,
    dead_letter: Box<dyn Sink>,
}

impl Delivery {
    async fn deliver(
        &self,
        batch: &[Record],
        results: Results<ChainFailure>,
        cancel: &CancellationToken,
    ) -> Result<usize, Stopped> {
        // Returns how many records were dead-lettered.
        let pipeline = self.spec.name.clone();
        let mut routed: BTreeMap<&str, (Vec<usize>, Vec<OutputRef>)> = BTreeMap::new();
        // Dead letters, with the index of their source record.
        let mut dead: Vec<(usize, Output)> = Vec::new();
        let (outputs, per_record) = (results.outputs(), results.records());
        let mut next = 0;
        for (i, result) in per_record.iter().enumerate() {
            let n = match result {
                Ok(n) => *n,
                Err(failure) => {
                    dead.push((i, dead_letter(&pipeline, &batch[i], &failure.plugin, &failure.error)));
                    continue;
                }
            };
            let mine = outputs.range(next..next + n);
            next += n;
            if let Some(route) = mine.clone().filter_map(|o| o.route).find(|r| !self.sinks.contains_key(*r)) {
                let known: Vec<&str> = self.sinks.keys().map(String::as_str).collect();
                let error = format!("unknown route {route:?} (sinks: {})", known.join(", "));
                dead.push((i, dead_letter(&pipeline, &batch[i], "router", &error)));
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

        let writes = routed.iter().map(|(name, (owners, outputs))| {
            let sink = &self.sinks[*name];
            let pipeline = &pipeline;
            let origins: Vec<_> = owners.iter().map(|&i| &batch[i].origin).collect();
            async move {
                let rejected = retry(pipeline, name, cancel, || sink.write(outputs, &origins)).await?;
                telemetry().written(pipeline, name, outputs.len() - rejected.len());
                Ok::<_, Stopped>(
                    rejected
                        .into_iter()
                        .map(|r| (owners[r.index], format!("sink {name}: {}", r.reason)))
                        .collect::<Vec<_>>(),
                )
            }
        });
        for rejected in futures::future::try_join_all(writes).await? {
            for (i, reason) in rejected {
                dead.push((i, dead_letter(&pipeline, &batch[i], "sink", &reason)));
            }
        }

        let written = dead.len();
        if !dead.is_empty() {
            let dlq = &self.dead_letter;
            let origins: Vec<_> = dead.iter().map(|(i, _)| &batch[*i].origin).collect();
            let dead: Vec<Output> = dead.into_iter().map(|(_, out)| out).collect();
            let views: Vec<OutputRef> = dead.iter().map(Output::view).collect();
            let write_all = || async {
                let rejected = dlq.write(&views, &origins).await?;
                if rejected.is_empty() {
                    return Ok(());
                }
                // A dead letter the destination refuses for good (too large):
                // its value is cut to a head, and the headers keep the origin,
                // so the record can still be found in the source topic.
                let cut: Vec<Output> = rejected.iter().map(|r| truncated(&dead[r.index], &r.reason)).collect();
                let cut_origins: Vec<_> = rejected.iter().map(|r| origins[r.index]).collect();
                for r in &rejected {
                    error!(%pipeline, reason = %r.reason, bytes = dead[r.index].value.len(), "dead letter refused; writing it truncated");
                }
                let cut: Vec<OutputRef> = cut.iter().map(Output::view).collect();
                let refused = dlq.write(&cut, &cut_origins).await?;
                anyhow::ensure!(
                    refused.is_empty(),
                    "the dead-letter destination refused truncated records: {:?}",
                    refused
                );
                Ok(())
            };
            retry(&pipeline, "dead_letter", cancel, write_all).await?;
            telemetry().written(&pipeline, "dead_letter", written);
            debug!(%pipeline, records = written, "dead-lettered");
        }
        Ok(written)
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
                let error = format!("{error:#}");
                warn!(%pipeline, %sink, %error, retry_in = ?delay, "sink write failed; retrying");
                telemetry().sink_failed(pipeline, sink, &error);
                tokio::select! {
                    _ = cancel.cancelled() => return Err(Stopped),
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
