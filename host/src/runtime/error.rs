//! What can go wrong with a plugin: loading it ([`PluginError`]) and calling it ([`Fault`]).

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
    /// A `state` call was refused: past `limits.state_mib`, or misused.
    #[error("{0}")]
    State(crate::state::StateError),
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin broke the contract: {0}")]
    Contract(String),
}
