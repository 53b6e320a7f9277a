//! One [`Engine`] per process, its epoch ticker and the shared component linker.

use super::contracts;
use super::host_state::HostState;
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, OptLevel};

/// How often the epoch advances: how often a running plugin yields, so that
/// its call's deadline is checked.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The plugin runtime: engine, linker and compile cache, shared by every
/// pipeline of the process. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: std::sync::Arc<Linker<HostState>>,
    /// Where compiled components are cached; `None` disables the cache.
    pub(crate) cache_dir: Option<PathBuf>,
}

impl Runtime {
    /// Builds the engine and starts its epoch ticker thread, which stops when
    /// the last clone of the engine is dropped.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        // `SLUICE_PROFILE=perfmap` names JIT-compiled plugin functions for `perf`.
        if std::env::var("SLUICE_PROFILE").is_ok_and(|v| v == "perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine =
            Engine::new(&config).map_err(anyhow::Error::from).context("cannot configure the WebAssembly engine")?;

        let mut linker = Linker::<HostState>::new(&engine);
        // Async WASI: a plugin waiting in a host call (a sleep, a poll, a
        // socket) is a future the call's deadline can cancel.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from).context("cannot link WASI")?;
        contracts::add_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link the sluice host interfaces")?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            })
            .context("cannot start the epoch ticker thread")?;

        Ok(Runtime { engine, linker: std::sync::Arc::new(linker), cache_dir })
    }

    /// The default cache directory: `$SLUICE_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/sluice`, else `$HOME/.cache/sluice`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        env("SLUICE_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("sluice")))
            .or_else(|| env("HOME").map(|d| d.join(".cache").join("sluice")))
    }
}
