//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sluice::record::{Bytes, Origin, Record};
use sluice::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use std::path::PathBuf;
use std::sync::Arc;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// A plugin built by `scripts/build-plugins.sh`, e.g. `trade_flattener`.
pub fn plugin_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let path = target.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/build-plugins.sh first (scripts/test.sh does)", path.display());
    path
}

/// A runtime with a private, empty compile cache.
pub fn fresh_runtime() -> (Runtime, tempfile::TempDir) {
    let cache = tempfile::tempdir().expect("temp dir");
    (Runtime::new(Some(cache.path().to_path_buf())).expect("runtime"), cache)
}

/// A runtime whose compile cache the tests share (target/test-plugin-cache),
/// so that each plugin is compiled once per test run, not once per test.
pub fn runtime() -> (Runtime, ()) {
    (Runtime::new(Some(test_cache_dir())).expect("runtime"), ())
}

pub fn test_cache_dir() -> PathBuf {
    root().join("target").join("test-plugin-cache")
}

pub fn load(runtime: &Runtime, name: &str) -> Arc<Plugin> {
    Plugin::load(runtime, &plugin_path(name)).expect("plugin loads")
}

/// An instance of `name` with `config` and default limits and grants.
pub fn instance(runtime: &Runtime, name: &str, config: &[(&str, &str)]) -> PluginInstance {
    instance_with(runtime, name, config, Limits::default(), Grants::default())
}

pub fn instance_with(
    runtime: &Runtime,
    name: &str,
    config: &[(&str, &str)],
    limits: Limits,
    grants: Grants,
) -> PluginInstance {
    let config = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    PluginInstance::new(load(runtime, name), config, limits, grants, "test").expect("plugin instantiates")
}

/// A record with just a value, read from partition 0 of topic `t` at `offset`.
pub fn record(value: impl AsRef<[u8]>, offset: i64) -> Record {
    Record {
        value: Bytes::copy_from_slice(value.as_ref()),
        origin: Origin { topic: "t".into(), partition: 0, offset },
        ..Record::default()
    }
}

pub mod fixture;
pub mod hostile;
pub mod services;
pub mod tls;
pub mod trades;
