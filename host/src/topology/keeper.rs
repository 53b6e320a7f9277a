//! Keyed state in a running pipeline: what keeps it ([`Keeper`]), and the
//! checks that a chain can take over what is stored
//! ([`check_state_versions`]).

use crate::config::{Pipeline, StateSpec};
use crate::sinks::Sink;
use crate::state::{lock, PipelineState, SharedState, StateKeeper, StateStore};
use crate::transforms::Chain;
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::warn;

/// What keeps a pipeline's keyed state with the source offsets it goes to:
/// one of its sinks (an exactly-once postgres sink, in the transactions of
/// its rows), or a store of its own (`[state.postgres]`).
pub enum Keeper {
    /// The sink of that name, which keeps the state with its rows.
    Sink(String),
    /// A store of the state's own.
    Own(Box<dyn StateKeeper>),
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
                    sinks.iter().filter(|(_, sink)| sink.state_keeper().is_some()).map(|(name, _)| name).collect();
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

    /// The keeper itself: the sink's side of it, or the store of its own.
    pub fn get<'a>(&'a self, sinks: &'a BTreeMap<String, Box<dyn Sink>>) -> anyhow::Result<&'a dyn StateKeeper> {
        match self {
            Keeper::Own(keeper) => Ok(&**keeper),
            Keeper::Sink(name) => sinks.get(name).and_then(|s| s.state_keeper()).ok_or_else(|| {
                anyhow::anyhow!("sink {name} cannot keep state: it is not an exactly-once postgres sink")
            }),
        }
    }

    /// The store the state is read back from.
    pub fn store(&self, sinks: &BTreeMap<String, Box<dyn Sink>>) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(self.get(sinks)?.store())
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
pub(super) fn state_for(
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
    let taken = keeper.get(sinks).with_context(what)?;
    taken.take_on();
    let store = taken.store();
    Ok(Some((PipelineState::new(store), keeper)))
}
