//! Transforms: the chain of plugin instances a pipeline runs its batches through.

pub mod chain;

pub use chain::{Chain, ChainFailure, Fire, VersionFailing};
