//! The running set of pipelines. [`Topology::apply`] moves it to a wanted
//! set: starting is applying the set from nothing; a reload applies the next
//! set. New pipelines are built (plugins compiled and initialised, sinks
//! created) before anything running is stopped, so a set that cannot be built
//! leaves the running one untouched.
//!
//! - [`pipeline`]: one pipeline's task: source → chain → sinks, dead letters, commits;
//! - [`transform`]: its transform step (read, restore state, run the chain, fire timers);
//! - [`delivery`]: its delivery (sinks, dead letters, retries, in a crash-safe order);
//! - [`keeper`]: what keeps its keyed state, and the checks a chain must pass to take it over;
//! - [`dead_letter`]: the dead-letter record;
//! - [`local`]: a chain run through the transform step with its state in memory (`sluice plugin test`).

pub mod dead_letter;
pub mod delivery;
pub mod keeper;
pub mod local;
pub mod pipeline;
pub mod transform;

use crate::config::diff::diff;
use crate::config::Pipeline;
use crate::runtime::Runtime;
use crate::sources::RunOptions;
use crate::supervisor::Refused;
use crate::transforms::Chain;
use anyhow::Context;
use keeper::{check_state_versions, HeldState};
use pipeline::PipelineTask;
use std::collections::BTreeMap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

struct Running {
    spec: Pipeline,
    cancel: CancellationToken,
    /// New chains for the task, applied between two batches.
    swap: mpsc::UnboundedSender<Chain>,
    /// The keyed state the pipeline keeps (it has a sink for it), if any.
    state: Option<HeldState>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// What [`Topology::apply`] did, for the reload log line.
#[derive(Debug, Default)]
pub struct Applied {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub swapped: Vec<String>,
    pub kept: Vec<String>,
}

pub struct Topology {
    runtime: Runtime,
    options: RunOptions,
    /// Plugin versions rolled back, refused on every later reload.
    refused: Refused,
    running: BTreeMap<String, Running>,
    /// Pipelines a state fence stopped, to start again.
    fenced: Vec<Pipeline>,
}

impl Topology {
    pub fn new(runtime: Runtime) -> Self {
        Topology::with_options(runtime, RunOptions::default())
    }

    /// A topology whose pipelines run as `options` say (`--until-eof`).
    pub fn with_options(runtime: Runtime, options: RunOptions) -> Self {
        Topology { runtime, options, refused: Refused::default(), running: BTreeMap::new(), fenced: Vec::new() }
    }

    /// Moves the running set to `wanted`. Everything new (pipelines to
    /// start, chains to swap in) is built first; on error nothing was changed.
    pub async fn apply(&mut self, wanted: Vec<Pipeline>) -> anyhow::Result<Applied> {
        let specs: BTreeMap<String, Pipeline> = self.running.iter().map(|(k, r)| (k.clone(), r.spec.clone())).collect();
        let plan = diff(&specs, &wanted);
        // A version rolled back after it failed comes back only as a different file.
        for spec in plan.swap.iter().chain(&plan.start) {
            for t in &spec.transforms {
                if let Some(reason) = self.refused.reason(&crate::runtime::version_key(&t.hash, &t.config)) {
                    anyhow::bail!(
                        "plugin {} of pipeline {} is version {} with this config, which was rolled back ({reason}): drop in a different file or config",
                        t.path.display(),
                        spec.name,
                        t.hash.get(..12).unwrap_or(&t.hash)
                    );
                }
            }
        }
        let mut chains = Vec::with_capacity(plan.swap.len());
        for spec in plan.swap {
            let chain = tokio::task::block_in_place(|| Chain::live(&self.runtime, &spec)).with_context(|| {
                format!("cannot load the new plugins of pipeline {} ({})", spec.name, spec.file.display())
            })?;
            let held = self.running.get(&spec.name).and_then(|r| r.state.as_ref());
            match (chain.stateful().next(), held) {
                (Some((index, stage)), None) => anyhow::bail!(
                    "transform {} ({}) of pipeline {} keeps state (contract 0.3), and the running pipeline has none: restart it to give it state",
                    index + 1,
                    stage.plugin().name,
                    spec.name
                ),
                (Some(_), Some(held)) => check_state_versions(&chain, &*held.store, &held.stages, &spec.file)
                    .await
                    .with_context(|| format!("cannot swap the plugins of pipeline {} ({})", spec.name, spec.file.display()))?,
                (None, _) => {}
            }
            chains.push((spec, chain));
        }
        let mut built = Vec::with_capacity(plan.start.len());
        for spec in plan.start {
            let name = spec.name.clone();
            let task = PipelineTask::build(&self.runtime, spec.clone(), &self.options, &self.refused)
                .await
                .with_context(|| format!("cannot start pipeline {name} ({})", spec.file.display()))?;
            built.push((spec, task));
        }
        let mut applied = Applied { kept: plan.keep, ..Applied::default() };
        for (spec, chain) in chains {
            let Some(running) = self.running.get_mut(&spec.name) else { continue };
            for (old, new) in running.spec.transforms.iter().zip(chain.stages()) {
                let plugin = new.plugin();
                info!(
                    pipeline = %spec.name,
                    plugin = %plugin.name,
                    old = %old.hash.get(..12).unwrap_or("-"),
                    new = %plugin.short_hash(),
                    contract = %plugin.contract,
                    load_ms = plugin.load_time.as_secs_f64() * 1e3,
                    cache_hit = plugin.cache_hit,
                    "plugin swap ready; live from the next batch"
                );
            }
            if running.swap.send(chain).is_ok() {
                running.spec = spec;
                applied.swapped.push(running.spec.name.clone());
            }
        }
        for name in plan.stop {
            self.stop(&name).await;
            applied.stopped.push(name);
        }
        for (spec, task) in built {
            let cancel = CancellationToken::new();
            let (swap, swaps) = mpsc::unbounded_channel();
            info!(pipeline = %spec.name, file = %spec.file.display(), "pipeline starting");
            let state = task.held_state();
            let handle = tokio::spawn(task.run(cancel.clone(), swaps));
            applied.started.push(spec.name.clone());
            self.running.insert(spec.name.clone(), Running { spec, cancel, swap, state, task: handle });
        }
        Ok(applied)
    }

    /// The running pipelines' specs (file, plugins with their hashes).
    pub fn pipelines(&self) -> impl Iterator<Item = &Pipeline> {
        self.running.values().map(|r| &r.spec)
    }

    /// Stops one pipeline gracefully: its current batch finishes and commits.
    async fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            running.cancel.cancel();
            match running.task.await {
                Ok(Ok(())) => info!(pipeline = %name, "pipeline stopped"),
                Ok(Err(e)) => error!(pipeline = %name, error = %format!("{e:#}"), "pipeline failed"),
                Err(e) => error!(pipeline = %name, error = %e, "pipeline task panicked"),
            }
        }
    }

    /// Removes pipelines whose task ended on its own, logging why; returns
    /// how many failed (a pipeline whose source reached the end of its
    /// input, under `--until-eof`, finished: it did not fail). A pipeline
    /// a state fence stopped ([`crate::state::Fenced`]) did not fail: it
    /// starts again, reading its state as committed (retried on each call
    /// until it starts).
    pub async fn reap(&mut self) -> usize {
        let done: Vec<String> =
            self.running.iter().filter(|(_, r)| r.task.is_finished()).map(|(k, _)| k.clone()).collect();
        let mut failed = 0;
        for name in done {
            if let Some(r) = self.running.remove(&name) {
                match futures::FutureExt::now_or_never(r.task) {
                    Some(Ok(Ok(()))) if self.options.until_eof => {
                        info!(pipeline = %name, "pipeline finished: its input ended (--until-eof)")
                    }
                    Some(Ok(Err(e))) if e.chain().any(|c| c.is::<crate::state::Fenced>()) => {
                        info!(pipeline = %name, "pipeline starting again after a state fence");
                        self.fenced.push(r.spec);
                    }
                    Some(Ok(Err(e))) => {
                        failed += 1;
                        error!(pipeline = %name, error = %format!("{e:#}"), "pipeline failed")
                    }
                    Some(Err(e)) => {
                        failed += 1;
                        error!(pipeline = %name, error = %e, "pipeline task panicked")
                    }
                    _ => {
                        failed += 1;
                        error!(pipeline = %name, "pipeline ended")
                    }
                }
            }
        }
        if !self.fenced.is_empty() {
            let wanted: Vec<Pipeline> = self.pipelines().chain(&self.fenced).cloned().collect();
            match self.apply(wanted).await {
                Ok(_) => self.fenced.clear(),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot start again the pipelines a state fence stopped; retrying")
                }
            }
        }
        failed
    }

    /// Whether no pipeline runs (or waits to start again).
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.fenced.is_empty()
    }

    /// Stops every pipeline gracefully.
    pub async fn shutdown(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in &names {
            if let Some(r) = self.running.get(name) {
                r.cancel.cancel();
            }
        }
        for name in names {
            self.stop(&name).await;
        }
    }
}
