//! A chain of plugin instances: the outputs of one are the inputs of the next.

use crate::config::TransformSpec;
use crate::record::{Output, Record};
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
        write!(f, "plugin {} version {} is failing: {}", self.plugin, self.version.get(..12).unwrap_or(&self.version), self.reason)
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
                first.get_or_insert(VersionFailing { plugin: plugin.name.clone(), version: plugin.hash.clone(), key, reason });
            }
        }
        first
    }

    /// Runs `batch` through every stage. One result per source record: all
    /// its final outputs, or the first failure on its way. A later stage's
    /// output without a route keeps the route its input had.
    pub fn process(&mut self, batch: &[Record]) -> Vec<Result<Vec<Output>, ChainFailure>> {
        let Some((first, rest)) = self.stages.split_first_mut() else {
            return batch.iter().map(|r| Ok(vec![Output::from(r.clone())])).collect();
        };
        let failure = |stage: &PluginInstance, error| ChainFailure { plugin: stage.plugin().name.clone(), error };
        let pipeline = &self.pipeline;
        let timed = |stage: &mut PluginInstance, inputs: &[Record]| {
            let started = std::time::Instant::now();
            let results = stage.process(inputs);
            telemetry().plugin_call(pipeline, &stage.plugin().name, started.elapsed().as_secs_f64());
            results
        };
        let mut results: Vec<_> = timed(first, batch).into_iter().map(|r| r.map_err(|e| failure(first, e))).collect();
        for stage in rest {
            // Inputs of this stage: the outputs so far, each remembering its source record.
            let mut owners = Vec::new();
            let mut inputs = Vec::new();
            for (i, result) in results.iter_mut().enumerate() {
                if let Ok(outputs) = result {
                    for out in outputs.drain(..) {
                        owners.push((i, out.route));
                        let origin = batch[i].origin.clone();
                        inputs.push(Record { key: out.key, value: out.value, headers: out.headers, timestamp: out.timestamp, origin, rejected: None });
                    }
                }
            }
            for ((owner, route), result) in owners.into_iter().zip(timed(stage, &inputs)) {
                let Ok(outputs) = &mut results[owner] else { continue };
                match result {
                    Ok(new) => outputs.extend(new.into_iter().map(|mut o| {
                        o.route = o.route.or_else(|| route.clone());
                        o
                    })),
                    Err(error) => results[owner] = Err(failure(stage, error)),
                }
            }
        }
        results
    }
}
