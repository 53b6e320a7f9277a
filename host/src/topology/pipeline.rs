//! One pipeline's task: read a batch, run the chain, route outputs to sinks,
//! dead-letter failures, and commit the source only once every sink has it.
//! The task wires its parts: [`super::transform`] (the transform step, its
//! own task), [`super::delivery`] (sinks, dead letters, retries) and
//! [`super::keeper`] (what keeps the keyed state).

use super::delivery::{Delivery, Stopped};
use super::keeper::{check_state_versions, state_for, HeldState, Keeper};
use super::transform::{TransformStep, Transformed};
use crate::config::Pipeline;
use crate::connector::Build;
use crate::runtime::Runtime;
use crate::sinks::Sink;
use crate::sources::{RunOptions, Source};
use crate::state::PipelineState;
use crate::supervisor::{shown_versions, Refused, Supervisor};
use crate::telemetry::telemetry;
use crate::transforms::Chain;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
        let cx = Build { pipeline: &spec.name, dir };
        let mut sinks = BTreeMap::new();
        for (name, config) in &spec.sinks {
            sinks.insert(name.clone(), config.connector().build(name, &cx)?);
        }
        let dead_letter = spec.dead_letter.connector().build("dead_letter", &cx)?;
        let source = spec.source.connector().build(&cx, options)?;
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
        let stage = tokio::spawn(
            TransformStep::new(source.clone(), versions, state, swaps, stage_cancel.clone(), transformed_tx).run(),
        );
        let (mut fenced, mut failed) = (None, None);
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
                Err(Stopped::Failed(error)) => {
                    stage_cancel.cancel();
                    failed = Some(error);
                    break;
                }
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
        if let Some(error) = failed {
            return Err(error.context("the batch cannot be delivered"));
        }
        stage.map_err(|e| anyhow::anyhow!("transform stage panicked: {e}"))?
    }
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
