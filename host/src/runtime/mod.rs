//! The WebAssembly plugin runtime.
//!
//! - [`engine`]: the one wasmtime [`Engine`](wasmtime::Engine) per process, its
//!   epoch ticker thread (the CPU limit's clock) and the shared linker;
//! - [`loader`]: reads a component, compiles it once and caches the machine
//!   code on disk keyed by content hash, and keeps a ready-to-instantiate
//!   `InstancePre` per plugin version ([`Plugin`]);
//! - [`instance`]: a live plugin instance, one `Store` with its limits and
//!   sandbox grants ([`PluginInstance`]), that runs batches and replaces
//!   itself after a trap;
//! - `abi`: contract 0.2's buffers: the batch encoder (its buffer kept across
//!   batches) and the checked, one-pass decoder of the plugin's results;
//! - `stderr`: the plugin's stderr, kept in memory for the fault's reason.
//!
//! Both plugin contracts are served ([`Contract`]): which one a component
//! implements is read from its exports when it is loaded.

mod abi;
pub mod engine;
pub mod instance;
pub mod loader;
mod stderr;

pub use engine::Runtime;
pub use instance::{version_key, Grants, Limits, PluginInstance, RecordResult};
pub use loader::Plugin;

/// Host bindings of both contracts the host serves.
pub(crate) mod bindings {
    /// Contract 0.1 (`wit/0.1/transform.wit`): records lifted field by field.
    pub mod v01 {
        wasmtime::component::bindgen!({
            world: "transformer",
            path: "../wit/0.1",
            imports: { default: async },
            exports: { default: async },
        });
    }
    /// Contract 0.2 (`wit/transform.wit`): a batch as one buffer each way.
    pub mod v02 {
        wasmtime::component::bindgen!({
            world: "transformer",
            path: "../wit",
            imports: { default: async },
            exports: { default: async },
        });
    }
}

/// Which contract a plugin component was built against, read from its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `sluice:transform/transform@0.1.0`: `process-batch(list<input-record>)`.
    V01,
    /// `sluice:transform/batch@0.2.0`: `process(list<u8>) -> list<u8>`.
    V02,
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Contract::V01 => "0.1",
            Contract::V02 => "0.2",
        })
    }
}

/// What can go wrong with a plugin, at the seam between runtime and pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a usable WebAssembly component: {reason:#}")]
    Compile { path: String, reason: anyhow::Error },
    #[error("plugin {plugin} cannot be instantiated: {reason:#}")]
    Instantiate { plugin: String, reason: anyhow::Error },
    #[error("plugin {plugin} rejected its config: {message}")]
    ConfigRejected { plugin: String, message: String },
    #[error("plugin {plugin} failed in init: {fault}")]
    InitFault { plugin: String, fault: Fault },
}

/// Why a call into a plugin instance did not return normally. The instance is
/// discarded after any of these.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fault {
    #[error("CPU limit exceeded ({limit_ms} ms per call)")]
    CpuLimit { limit_ms: u64 },
    #[error("memory limit exceeded ({limit_bytes} bytes)")]
    MemoryLimit { limit_bytes: usize },
    /// The plugin handed the host more data in one call (results lifted
    /// out of its memory, or one host call's arguments) than the host
    /// copies: `memory_mib` + `batch_output_mib`.
    #[error("copy limit exceeded: more than {limit_bytes} bytes copied out of the plugin in one call (memory_mib + batch_output_mib)")]
    CopyLimit { limit_bytes: usize },
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin broke the contract: {0}")]
    Contract(String),
}
