//! One pipeline's task: read a batch, run the chain, route outputs to sinks,
//! dead-letter failures, and commit the source only once every sink has it.

use crate::config::{Pipeline, SourceConfig};
use crate::record::{Header, Output, Record};
use crate::runtime::Runtime;
use crate::sinks::{self, Sink};
use crate::sources::{kafka::KafkaSource, Source};
use crate::transforms::Chain;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The pipeline was asked to stop while a batch could not be delivered: the
/// batch stays uncommitted and is read again on the next start.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the batch was delivered")]
pub struct Stopped;

pub struct PipelineTask {
    spec: Pipeline,
    source: Box<dyn Source>,
    chain: Chain,
    sinks: BTreeMap<String, Box<dyn Sink>>,
    dead_letter: Box<dyn Sink>,
}

impl PipelineTask {
    /// Creates the source, the chain (compiling and initialising each plugin) and the sinks.
    pub async fn build(runtime: &Runtime, spec: Pipeline) -> anyhow::Result<Self> {
        let chain = tokio::task::block_in_place(|| Chain::new(runtime, &spec.transforms, &spec.name))?;
        for stage in chain.stages() {
            let p = stage.plugin();
            info!(pipeline = %spec.name, plugin = %p.name, version = %p.short_hash(), cache_hit = p.cache_hit, "plugin ready");
        }
        let mut sinks = BTreeMap::new();
        for (name, config) in &spec.sinks {
            sinks.insert(name.clone(), sinks::build(config, &spec.name).await?);
        }
        let dead_letter = sinks::build(&spec.dead_letter, &spec.name).await?;
        let source: Box<dyn Source> = match &spec.source {
            SourceConfig::Kafka(k) => Box::new(KafkaSource::new(k, &spec.group(), &spec.name)?),
        };
        Ok(PipelineTask { spec, source, chain, sinks, dead_letter })
    }

    /// Runs until `cancel`; the batch in hand is finished and committed first.
    /// A chain received on `swaps` replaces the current one between two
    /// batches: every record is transformed by exactly one version.
    pub async fn run(mut self, cancel: CancellationToken, mut swaps: mpsc::UnboundedReceiver<Chain>) -> anyhow::Result<()> {
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                batch = self.source.next_batch() => batch?,
            };
            while let Ok(chain) = swaps.try_recv() {
                // The new chain is compiled, instantiated and initialised
                // already: the pause is dropping the old one.
                let started = std::time::Instant::now();
                drop(std::mem::replace(&mut self.chain, chain));
                let pause_us = started.elapsed().as_micros() as u64;
                let versions: Vec<String> =
                    self.chain.stages().iter().map(|s| format!("{}@{}", s.plugin().name, s.plugin().short_hash())).collect();
                info!(pipeline = %self.spec.name, plugins = %versions.join(" -> "), pause_us, "new plugin versions live");
            }
            if let Err(Stopped) = self.deliver(&batch, &cancel).await {
                break;
            }
            if let Err(error) = self.source.commit(&batch).await {
                // The records are in the sinks; a lost commit only means they
                // may be read again (at-least-once).
                warn!(pipeline = %self.spec.name, error = %format!("{error:#}"), "offset commit failed");
            }
        }
        self.source.flush_commits().await
    }

    async fn deliver(&mut self, batch: &[Record], cancel: &CancellationToken) -> Result<(), Stopped> {
        let pipeline = self.spec.name.clone();
        let results = tokio::task::block_in_place(|| self.chain.process(batch));
        let mut routed: BTreeMap<&str, (Vec<usize>, Vec<Output>)> = BTreeMap::new();
        let mut dead = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            let outputs = match result {
                Ok(outputs) => outputs,
                Err(failure) => {
                    dead.push(dead_letter(&pipeline, &batch[i], &failure.plugin, &failure.error));
                    continue;
                }
            };
            if let Some(route) = outputs.iter().filter_map(|o| o.route.as_deref()).find(|r| !self.sinks.contains_key(*r)) {
                let known: Vec<&str> = self.sinks.keys().map(String::as_str).collect();
                let error = format!("unknown route {route:?} (sinks: {})", known.join(", "));
                dead.push(dead_letter(&pipeline, &batch[i], "router", &error));
                continue;
            }
            for out in outputs {
                let sink = out.route.clone().unwrap_or_else(|| self.spec.default_sink.clone());
                let name = self.sinks.get_key_value(&sink).map(|(k, _)| k.as_str()).unwrap_or_default();
                let entry = routed.entry(name).or_default();
                entry.0.push(i);
                entry.1.push(out);
            }
        }

        let writes = routed.iter().map(|(name, (owners, outputs))| {
            let sink = &self.sinks[*name];
            let pipeline = &pipeline;
            async move {
                let rejected = retry(pipeline, name, cancel, || sink.write(outputs)).await?;
                Ok::<_, Stopped>(rejected.into_iter().map(|r| (owners[r.index], format!("sink {name}: {}", r.reason))).collect::<Vec<_>>())
            }
        });
        for rejected in futures::future::try_join_all(writes).await? {
            for (i, reason) in rejected {
                dead.push(dead_letter(&pipeline, &batch[i], "sink", &reason));
            }
        }

        if !dead.is_empty() {
            let written = dead.len();
            let dlq = &self.dead_letter;
            let write_all = || async {
                let rejected = dlq.write(&dead).await?;
                anyhow::ensure!(rejected.is_empty(), "the dead-letter destination refused records: {:?}", rejected);
                Ok(Vec::<sinks::Rejected>::new())
            };
            retry(&pipeline, "dead_letter", cancel, write_all).await?;
            debug!(%pipeline, records = written, "dead-lettered");
        }
        Ok(())
    }
}

/// Runs `write` until it succeeds, backing off from 100 ms to 10 s, or until `cancel`.
async fn retry<T, F, Fut>(pipeline: &str, sink: &str, cancel: &CancellationToken, mut write: F) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                warn!(%pipeline, %sink, error = %format!("{error:#}"), retry_in = ?delay, "sink write failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(Stopped),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The dead-letter record for `record`: its key, value, headers and timestamp
/// as read, plus headers naming the pipeline, the failing stage, the error
/// and the origin.
pub fn dead_letter(pipeline: &str, record: &Record, stage: &str, error: &str) -> Output {
    let mut headers = record.headers.clone();
    let mut add = |name: &str, value: String| headers.push(Header { name: name.to_string(), value: value.into_bytes() });
    add("sluice.pipeline", pipeline.to_string());
    add("sluice.plugin", stage.to_string());
    add("sluice.error", error.to_string());
    add("sluice.topic", record.origin.topic.clone());
    add("sluice.partition", record.origin.partition.to_string());
    add("sluice.offset", record.origin.offset.to_string());
    Output { key: record.key.clone(), value: record.value.clone(), headers, timestamp: record.timestamp, route: None }
}
