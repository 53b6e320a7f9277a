//! A chain of plugin instances: the outputs of one are the inputs of the next.

use crate::config::{Pipeline, TransformSpec};
use crate::record::{Output, Outputs, Record, RecordRef, Results};
use crate::runtime::{Plugin, PluginError, PluginInstance, Runtime};
use crate::shadow::{Place, Shadow};
use crate::telemetry::telemetry;

/// Why a source record produced nothing: which plugin failed it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFailure {
    pub plugin: String,
    pub error: String,
}

/// A plugin version of the chain found failing (see [`PluginInstance::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFailing {
    pub plugin: String,
    /// The version's SHA-256.
    pub version: String,
    /// The version with its configuration ([`crate::runtime::version_key`]).
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for VersionFailing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin {} version {} is failing: {}",
            self.plugin,
            self.version.get(..12).unwrap_or(&self.version),
            self.reason
        )
    }
}

pub struct Chain {
    stages: Vec<PluginInstance>,
    /// Each stage's shadow run, if it has one (see [`crate::shadow`]).
    shadows: Vec<Option<Shadow>>,
    pipeline: String,
}

impl Chain {
    /// Loads and initialises every plugin of `specs` (their shadows are
    /// left out: see [`Chain::live`]).
    pub fn new(runtime: &Runtime, specs: &[TransformSpec], pipeline: &str) -> Result<Self, PluginError> {
        let stages = specs
            .iter()
            .map(|s| {
                let plugin = Plugin::load(runtime, &s.path)?;
                PluginInstance::new(plugin, s.config.clone(), s.limits.clone(), s.grants.clone(), pipeline)
            })
            .collect::<Result<_, _>>()?;
        Ok(Chain { stages, shadows: Vec::new(), pipeline: pipeline.to_string() })
    }

    /// The chain of a live pipeline: [`Chain::new`], with each stage's
    /// shadow run started beside it. A candidate that cannot start is
    /// reported, never an error of the chain.
    pub fn live(runtime: &Runtime, spec: &Pipeline) -> Result<Self, PluginError> {
        let mut chain = Chain::new(runtime, &spec.transforms, &spec.name)?;
        chain.shadows = spec
            .transforms
            .iter()
            .zip(&chain.stages)
            .enumerate()
            .map(|(stage, (t, live))| {
                let place = Place { pipeline: spec.name.clone(), file: spec.file.clone(), stage };
                Shadow::start(runtime, t, live.plugin(), place)
            })
            .collect();
        Ok(chain)
    }

    /// The batch last run was delivered: the shadow runs may compare it.
    pub fn release_shadows(&mut self) {
        self.shadows.iter_mut().flatten().for_each(Shadow::release);
    }

    pub fn stages(&self) -> &[PluginInstance] {
        &self.stages
    }

    /// The first stage whose version was found failing by the last
    /// [`Chain::process`] (every stage's verdict is taken).
    pub fn take_failing(&mut self) -> Option<VersionFailing> {
        let mut first = None;
        for stage in &mut self.stages {
            if let Some(reason) = stage.take_failing() {
                let plugin = stage.plugin();
                let key = stage.version_key();
                first.get_or_insert(VersionFailing {
                    plugin: plugin.name.clone(),
                    version: plugin.hash.clone(),
                    key,
                    reason,
                });
            }
        }
        first
    }

    /// Runs `batch` through every stage. One result per source record: all
    /// its final outputs, or the first failure on its way (a record its
    /// source rejected fails as the source's, without running). A later
    /// stage's output without a route keeps the route its input had.
    pub fn process(&mut self, batch: &[Record]) -> Results<ChainFailure> {
        let rejected = |reason: &String| ChainFailure { plugin: "source".to_string(), error: reason.clone() };
        if self.stages.is_empty() {
            let mut results = Results::with_owned_capacity(batch.len(), batch.len());
            for r in batch {
                match &r.rejected {
                    Some(reason) => results.push_err(rejected(reason)),
                    None => results.push_ok([Output::from(r.clone())]),
                }
            }
            return results;
        }
        let accepted: Vec<RecordRef> = batch.iter().filter(|r| r.rejected.is_none()).map(Record::view).collect();
        let results = self.run(&accepted);
        if accepted.len() == batch.len() {
            return results;
        }
        let (outputs, per_record) = results.into_parts();
        let mut per_record = per_record.into_iter();
        let records = batch
            .iter()
            .map(|r| match &r.rejected {
                Some(reason) => Err(rejected(reason)),
                None => per_record.next().unwrap_or(Ok(0)),
            })
            .collect();
        Results::from_parts(outputs, records)
    }

    /// Runs `inputs` through every stage (there is at least one). Each
    /// stage reads the outputs of the one before where they are, as
    /// [`RecordRef`]s with the origin of their source record.
    fn run(&mut self, inputs: &[RecordRef<'_>]) -> Results<ChainFailure> {
        let failure = |stage: &PluginInstance, error| ChainFailure { plugin: stage.plugin().name.clone(), error };
        let pipeline = &self.pipeline;
        let timed = |stage: &mut PluginInstance, inputs: &[RecordRef<'_>]| {
            let started = std::time::Instant::now();
            let results = stage.transform_views(inputs);
            telemetry().plugin_call(pipeline, &stage.plugin().name, started.elapsed().as_secs_f64());
            results
        };
        let mut shadows = self.shadows.iter_mut();
        let mut offer = |inputs: &[RecordRef<'_>], results: &Results<String>| {
            if let Some(shadow) = shadows.next().and_then(Option::as_mut) {
                shadow.offer(inputs, results);
            }
        };
        let Some((first, rest)) = self.stages.split_first_mut() else {
            return Results::default();
        };
        let first_results = timed(first, inputs);
        offer(inputs, &first_results);
        let mut results = first_results.map_err(|e| failure(first, e));
        for stage in rest {
            let prev = std::mem::take(&mut results);
            // This stage's inputs: the outputs so far, in order, each with
            // its source record's origin.
            let (new, per_input) = {
                let (outputs, records) = (prev.outputs(), prev.records());
                let mut next = Vec::with_capacity(outputs.len());
                let mut at = 0;
                for (source, record) in inputs.iter().zip(records) {
                    if let Ok(n) = record {
                        next.extend(outputs.range(at..at + n).map(|o| o.as_input(source.origin)));
                        at += n;
                    }
                }
                let results = timed(stage, &next);
                offer(&next, &results);
                results.into_parts()
            };
            results = combine(prev, new, per_input, |error| failure(stage, error));
        }
        results
    }
}

/// The results of the stages so far (`prev`), followed by one stage whose
/// inputs were `prev`'s outputs, in order: `new`, and per input its count of
/// `new` or its error. A source record's outputs are those of its outputs
/// there, in order, unless one of them failed: then they are dropped, and
/// the record fails with the first error. An output without a route takes
/// the route of its input.
fn combine(
    prev: Results<ChainFailure>,
    mut new: Outputs,
    per_input: Vec<Result<usize, String>>,
    failure: impl Fn(String) -> ChainFailure,
) -> Results<ChainFailure> {
    let (outputs, records) = prev.into_parts();
    let mut per_input = per_input.into_iter();
    let mut keep = Vec::with_capacity(new.len());
    let mut per_record = Vec::with_capacity(records.len());
    let mut input = 0;
    for record in records {
        let n = match record {
            Ok(n) => n,
            Err(e) => {
                per_record.push(Err(e));
                continue;
            }
        };
        let mut failed = None;
        let mine = keep.len();
        for _ in 0..n {
            let route = outputs.get(input).and_then(|o| o.route);
            input += 1;
            match per_input.next() {
                Some(Ok(count)) => {
                    for o in keep.len()..keep.len() + count {
                        new.inherit_route(o, route);
                    }
                    keep.resize(keep.len() + count, true);
                }
                Some(Err(error)) => {
                    failed.get_or_insert(error);
                }
                None => {
                    failed.get_or_insert_with(|| "plugin returned no result".to_string());
                }
            }
        }
        per_record.push(match failed {
            None => Ok(keep.len() - mine),
            Some(error) => {
                keep[mine..].fill(false);
                Err(failure(error))
            }
        });
    }
    new.retain(&keep);
    Results::from_parts(new, per_record)
}
