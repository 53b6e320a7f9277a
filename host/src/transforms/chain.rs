//! A chain of plugin instances: the outputs of one are the inputs of the next.

use crate::config::TransformSpec;
use crate::record::{Output, Record, Results};
use crate::runtime::{Plugin, PluginError, PluginInstance, Runtime};
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
    pipeline: String,
}

impl Chain {
    /// Loads and initialises every plugin of `specs`.
    pub fn new(runtime: &Runtime, specs: &[TransformSpec], pipeline: &str) -> Result<Self, PluginError> {
        let stages = specs
            .iter()
            .map(|s| {
                let plugin = Plugin::load(runtime, &s.path)?;
                PluginInstance::new(plugin, s.config.clone(), s.limits.clone(), s.grants.clone(), pipeline)
            })
            .collect::<Result<_, _>>()?;
        Ok(Chain { stages, pipeline: pipeline.to_string() })
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
    /// its final outputs, or the first failure on its way. A later stage's
    /// output without a route keeps the route its input had.
    pub fn process(&mut self, batch: &[Record]) -> Results<ChainFailure> {
        let Some((first, rest)) = self.stages.split_first_mut() else {
            let mut results = Results::with_owned_capacity(batch.len(), batch.len());
            for r in batch {
                results.push_ok([Output::from(r.clone())]);
            }
            return results;
        };
        let failure = |stage: &PluginInstance, error| ChainFailure { plugin: stage.plugin().name.clone(), error };
        let pipeline = &self.pipeline;
        let timed = |stage: &mut PluginInstance, inputs: &[Record]| {
            let started = std::time::Instant::now();
            let results = stage.transform(inputs);
            telemetry().plugin_call(pipeline, &stage.plugin().name, started.elapsed().as_secs_f64());
            results
        };
        let mut results = timed(first, batch).map_err(|e| failure(first, e));
        for stage in rest {
            // Inputs of this stage: the outputs so far, each remembering its
            // source record (their routes are kept aside).
            let (outputs, records) = results.into_parts();
            let mut routes = Vec::with_capacity(outputs.len());
            let mut inputs = Vec::with_capacity(outputs.len());
            let mut next = 0;
            for (i, record) in records.iter().enumerate() {
                if let Ok(n) = record {
                    for out in (next..next + n).filter_map(|o| outputs.to_output(o)) {
                        routes.push(out.route);
                        let origin = batch[i].origin.clone();
                        inputs.push(Record {
                            key: out.key,
                            value: out.value,
                            headers: out.headers,
                            timestamp: out.timestamp,
                            origin,
                            rejected: None,
                        });
                    }
                    next += n;
                }
            }
            // A source record's outputs are those of its outputs here, in
            // order, unless one of them failed (then they are dropped).
            let (mut new, per_input) = timed(stage, &inputs).into_parts();
            let (mut per_input, mut routes) = (per_input.into_iter(), routes.into_iter());
            let mut keep = Vec::with_capacity(new.len());
            let mut per_record = Vec::with_capacity(records.len());
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
                    let route = routes.next().flatten();
                    match per_input.next() {
                        Some(Ok(count)) => {
                            for o in keep.len()..keep.len() + count {
                                new.inherit_route(o, route.as_deref());
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
                        Err(failure(stage, error))
                    }
                });
            }
            new.retain(&keep);
            results = Results::from_parts(new, per_record);
        }
        results
    }
}
