//! Loading a plugin: read, compile once (with an on-disk cache keyed by content
//! hash and engine), link, and keep the `InstancePre` for cheap instantiation.

use super::contracts::{Contract, Pre};
use super::{PluginError, Runtime};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};
use wasmtime::component::Component;

/// One version of a plugin, compiled and linked, ready to instantiate.
pub struct Plugin {
    /// The file stem, e.g. `trade_flattener`.
    pub name: String,
    pub path: PathBuf,
    /// Hex SHA-256 of the component bytes: the version's identity.
    pub hash: String,
    /// Time to compile (or to load from the cache).
    pub load_time: Duration,
    /// Whether the compiled code came from the cache.
    pub cache_hit: bool,
    /// The contract the component exports.
    pub contract: Contract,
    pub(crate) pre: Pre,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("hash", &self.short_hash()).finish()
    }
}

impl Plugin {
    /// Loads the component at `path`.
    pub fn load(runtime: &Runtime, path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read { path: shown.clone(), source })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| shown.clone());
        Self::from_bytes(runtime, &name, path, &bytes)
    }

    /// Compiles `bytes` (or loads them from the cache) and links them.
    pub fn from_bytes(runtime: &Runtime, name: &str, path: &Path, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let shown = path.display().to_string();
        let hash = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, cache_hit) = compile_cached(runtime, bytes, &hash)
            .map_err(|reason| PluginError::Compile { path: shown.clone(), reason })?;
        let load_time = started.elapsed();
        let linked = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|reason| PluginError::Compile { path: shown.clone(), reason: reason.into() })?;
        let pre = Pre::link(linked).map_err(|reason| PluginError::Compile { path: shown, reason })?;
        let contract = pre.contract();
        debug!(plugin = %name, hash = %&hash[..12], %contract, cache_hit, ?load_time, "plugin loaded");
        Ok(Arc::new(Plugin {
            name: name.to_string(),
            path: path.to_path_buf(),
            hash,
            load_time,
            cache_hit,
            contract,
            pre,
        }))
    }

    /// The first 12 hex digits of the hash, for logs and status.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

fn compile_cached(runtime: &Runtime, bytes: &[u8], hash: &str) -> anyhow::Result<(Component, bool)> {
    let Some(dir) = &runtime.cache_dir else {
        return Ok((Component::new(&runtime.engine, bytes)?, false));
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    runtime.engine.precompile_compatibility_hash().hash(&mut hasher);
    let file = dir.join(format!("{hash}-{:016x}.cwasm", hasher.finish()));
    if file.exists() {
        // SAFETY: the cache directory belongs to this user and only ever holds
        // files this function wrote (atomically, below) with this engine's
        // settings, which the file name's engine hash pins.
        match unsafe { Component::deserialize_file(&runtime.engine, &file) } {
            Ok(component) => return Ok((component, true)),
            Err(error) => warn!(file = %file.display(), error = %format!("{error:#}"), "ignoring unusable cache entry"),
        }
    }
    let compiled = runtime.engine.precompile_component(bytes)?;
    if let Err(error) = write_atomically(dir, &file, &compiled) {
        warn!(dir = %dir.display(), %error, "cannot write the plugin cache; compiling on every start");
    }
    // SAFETY: `compiled` was produced just now by this engine.
    let component = unsafe { Component::deserialize(&runtime.engine, &compiled)? };
    Ok((component, false))
}

fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(file).map(drop).map_err(|e| e.error)
}
