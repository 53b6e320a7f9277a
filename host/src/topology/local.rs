//! A chain run in-process through a pipeline's own transform step, with
//! its keyed state in memory ([`run_local`]): `sluice plugin test` of a
//! stateful plugin. Batches, state restored per partition, watermarks,
//! late records and timers (fired as the watermarks pass, and every one at
//! the end of the input) are those of `sluice run`; what is done with the
//! results is the caller's.

use super::keeper::check_state_versions;
use super::transform::{TransformStep, Transformed};
use crate::config::OnPluginFailure;
use crate::record::{Record, Results};
use crate::sources::Source;
use crate::state::memory::MemoryState;
use crate::state::{PipelineState, StateKeeper};
use crate::supervisor::{Refused, Supervisor};
use crate::transforms::{Chain, ChainFailure};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One batch as the transform step handed it on.
pub struct Ran {
    /// The source records, then the fired timers' records (offset -1).
    pub batch: Vec<Record>,
    /// How many of `batch` are source records.
    pub sources: usize,
    /// One result per record of `batch`.
    pub results: Results<ChainFailure>,
}

/// Runs `chain` over everything `source` reads, its state kept in `state`
/// (committed batch by batch, as a keeper commits it), and hands each
/// batch to `each` in order. A failing version's records fail (the
/// `dead_letter` policy: nothing is run again or paused). A state of a
/// version the chain cannot take over is refused before anything runs.
pub async fn run_local(
    name: &str,
    source: Arc<dyn Source>,
    mut chain: Chain,
    state: MemoryState,
    mut each: impl FnMut(Ran) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    check_state_versions(&chain, &state, &BTreeMap::new(), std::path::Path::new("--state-in")).await?;
    let mut pipeline_state = PipelineState::new(Arc::new(state.clone()));
    chain.attach_state(&mut pipeline_state);
    let versions = Supervisor::new(name.to_string(), chain, OnPluginFailure::DeadLetter, Refused::default());
    let (out, mut transformed) = mpsc::channel::<Transformed>(1);
    // No version is swapped in: the sender stays here, unused.
    let (_swap, swaps) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let step = tokio::spawn(
        TransformStep::new(source.clone(), versions, Some(pipeline_state), swaps, cancel.clone(), out).run(),
    );
    let mut failed = None;
    while let Some(Transformed { batch, sources, results, delta, delivered, .. }) = transformed.recv().await {
        if let Some(delivered) = delivered {
            let _ = delivered.send(());
            continue;
        }
        let handed = async {
            if let Some(delta) = &delta {
                state.commit(delta, &[], &[], &()).await?;
            }
            source.commit(&batch[..sources]).await?;
            each(Ran { batch, sources, results })
        };
        if let Err(error) = handed.await {
            cancel.cancel();
            failed = Some(error);
            break;
        }
    }
    drop(transformed);
    let stepped = step.await.map_err(|e| anyhow::anyhow!("transform step panicked: {e}"))?;
    match failed {
        Some(error) => Err(error),
        None => stepped,
    }
}
