//! A live plugin instance: one `Store` with its limits and sandbox grants.

use super::bindings::sluice::transform::{log as wit_log, types as wit};
use super::bindings::Transformer;
use super::engine::EPOCH_TICK;
use super::stderr::PluginStderr;
use super::{Fault, Plugin, PluginError};
use crate::record::{Header, Output, Record};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Resource limits of one plugin instance. The defaults are safe for any plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock CPU budget of one call (`init` or one batch), in milliseconds.
    pub cpu_ms: u64,
    /// Linear memory the instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Bytes (keys, values, headers) the outputs of one input record may total.
    pub output_bytes: usize,
    /// Outputs one input record may produce.
    pub outputs: usize,
}

impl Default for Limits {
    /// 128 MiB of memory: plugins that embed an interpreter start at 9 MiB
    /// (JavaScript) to 13 MiB (Python), and SpiderMonkey lets its heap grow
    /// past 64 MiB over batches of 1,000 records before it collects.
    fn default() -> Self {
        Limits { cpu_ms: 1_000, memory_bytes: 128 << 20, output_bytes: 16 << 20, outputs: 100_000 }
    }
}

impl Limits {
    /// Checks one record's outputs against the output caps.
    fn check_outputs(&self, outputs: &[Output]) -> Result<(), String> {
        if outputs.len() > self.outputs {
            return Err(format!("output limit: {} outputs for one record (limit {})", outputs.len(), self.outputs));
        }
        let bytes: usize = outputs
            .iter()
            .map(|o| o.value.len() + o.key.as_ref().map_or(0, Vec::len) + o.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>())
            .sum();
        if bytes > self.output_bytes {
            return Err(format!("output limit: {bytes} bytes of output for one record (limit {})", self.output_bytes));
        }
        Ok(())
    }
}

/// What the sandbox lets a plugin reach. The default grants nothing: no
/// files, no network, no environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Environment variables visible to the plugin.
    pub env: Vec<(String, String)>,
    /// Host directories the plugin may read, as (host path, guest path).
    pub read_dirs: Vec<(PathBuf, String)>,
    /// Whether the plugin may open sockets and resolve names.
    pub network: bool,
}

/// What became of one input record: its outputs, or why it failed.
pub type RecordResult = Result<Vec<Output>, String>;

/// Per-store state: WASI context, resource table and memory limiter.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    stderr: PluginStderr,
    /// `pipeline/plugin`, for the plugin's log lines.
    label: Arc<str>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wit::Host for HostState {}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        let plugin = &*self.label;
        match level {
            wit_log::Level::Trace => trace!(plugin, "{message}"),
            wit_log::Level::Debug => debug!(plugin, "{message}"),
            wit_log::Level::Info => info!(plugin, "{message}"),
            wit_log::Level::Warn => warn!(plugin, "{message}"),
            wit_log::Level::Error => error!(plugin, "{message}"),
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did, so a
/// resulting trap is reported as the memory limit rather than a plain trap.
struct MemoryCap {
    limit: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

struct Live {
    store: Store<HostState>,
    bindings: Transformer,
}

/// A plugin instance with its configuration. After a fault the store is
/// dropped and a fresh one is instantiated (and `init`ed) for the next call.
pub struct PluginInstance {
    plugin: Arc<Plugin>,
    config: Vec<(String, String)>,
    limits: Limits,
    grants: Grants,
    label: Arc<str>,
    live: Option<Live>,
    /// How many times the instance was replaced after a fault.
    pub replacements: u64,
}

impl PluginInstance {
    /// Instantiates `plugin` and runs its `init` with `config`: an error here
    /// means the plugin cannot run with this configuration.
    pub fn new(
        plugin: Arc<Plugin>,
        config: Vec<(String, String)>,
        limits: Limits,
        grants: Grants,
        context: &str,
    ) -> Result<Self, PluginError> {
        let label: Arc<str> = format!("{context}/{}", plugin.name).into();
        let mut instance = PluginInstance { plugin, config, limits, grants, label, live: None, replacements: 0 };
        instance.live = Some(instance.instantiate()?);
        Ok(instance)
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    fn instantiate(&self) -> Result<Live, PluginError> {
        let name = || self.plugin.name.clone();
        let mut wasi = WasiCtxBuilder::new();
        let stderr = PluginStderr::default();
        wasi.stderr(stderr.clone()).envs(&self.grants.env);
        for (host, guest) in &self.grants.read_dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly).map_err(|reason| PluginError::Instantiate {
                plugin: name(),
                reason: anyhow::Error::from(reason).context(format!("cannot grant directory {}", host.display())),
            })?;
        }
        if self.grants.network {
            wasi.inherit_network().allow_tcp(true).allow_udp(true).allow_ip_name_lookup(true);
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory: MemoryCap { limit: self.limits.memory_bytes, hit: false },
            stderr,
            label: self.label.clone(),
        };
        let mut store = Store::new(self.plugin.pre.engine(), state);
        store.limiter(|state| &mut state.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = self
            .plugin
            .pre
            .instantiate(&mut store)
            .map_err(|reason| PluginError::Instantiate { plugin: name(), reason: reason.into() })?;
        match bindings.sluice_transform_transform().call_init(&mut store, &self.config) {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(PluginError::ConfigRejected { plugin: name(), message }),
            Err(error) => Err(PluginError::InitFault { plugin: name(), fault: self.classify(&store, error) }),
        }
    }

    fn deadline_ticks(&self) -> u64 {
        self.limits.cpu_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1) + 1
    }

    fn classify(&self, store: &Store<HostState>, error: wasmtime::Error) -> Fault {
        if store.data().memory.hit {
            return Fault::MemoryLimit { limit_bytes: self.limits.memory_bytes };
        }
        let trap = error.downcast_ref::<Trap>();
        if let Some(Trap::Interrupt) = trap {
            return Fault::CpuLimit { limit_ms: self.limits.cpu_ms };
        }
        // The plugin's own words, when it panicked; else the trap and where.
        if let Some(message) = store.data().stderr.panic_message() {
            return Fault::Trap(message);
        }
        match trap {
            Some(trap) => Fault::Trap(with_location(trap.to_string(), &error)),
            None => Fault::Trap(with_location(error.root_cause().to_string(), &error)),
        }
    }

    /// Transforms a batch: one result per input record, in order. A fault
    /// (trap, CPU or memory limit) fails only the records that cause it: the
    /// batch is retried record by record in fresh instances to find them.
    pub fn process(&mut self, batch: &[Record]) -> Vec<RecordResult> {
        let inputs: Vec<wit::InputRecord> = batch.iter().map(to_wit).collect();
        match self.call(&inputs) {
            Ok(results) => results,
            Err(fault) if inputs.len() == 1 => vec![Err(fault.to_string())],
            Err(fault) => {
                warn!(plugin = %self.label, %fault, records = inputs.len(), "batch faulted; retrying its records one by one");
                inputs
                    .chunks(1)
                    .map(|one| match self.call(one) {
                        Ok(mut results) => results.pop().unwrap_or_else(|| Err("plugin returned no result".into())),
                        Err(fault) => Err(fault.to_string()),
                    })
                    .collect()
            }
        }
    }

    fn call(&mut self, inputs: &[wit::InputRecord]) -> Result<Vec<RecordResult>, Fault> {
        let mut live = match self.live.take() {
            Some(live) => live,
            None => {
                self.replacements += 1;
                self.instantiate().map_err(|e| Fault::Trap(format!("cannot replace the faulted instance: {e}")))?
            }
        };
        live.store.set_epoch_deadline(self.deadline_ticks());
        live.store.data().stderr.clear();
        let results = match live.bindings.sluice_transform_transform().call_process_batch(&mut live.store, inputs) {
            Ok(results) => results,
            Err(error) => return Err(self.classify(&live.store, error)),
        };
        if results.len() != inputs.len() {
            return Err(Fault::Contract(format!("{} results for {} records", results.len(), inputs.len())));
        }
        self.live = Some(live);
        Ok(results
            .into_iter()
            .map(|r| {
                let outputs: Vec<Output> = r?.into_iter().map(from_wit).collect();
                self.limits.check_outputs(&outputs)?;
                Ok(outputs)
            })
            .collect())
    }
}

/// `reason (in plugin_function)`: the innermost frame of the plugin's own
/// code, skipping the standard library's panic and abort machinery. One line,
/// so that it fits a log field or a dead-letter header.
fn with_location(reason: String, error: &wasmtime::Error) -> String {
    let is_runtime = |name: &str| {
        name.contains('#') || ["std", "core", "alloc", "__rust", "abort", "panic", "dlmalloc", "wit_bindgen"].iter().any(|p| name.contains(p))
    };
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().filter_map(|f| f.func_name()).find(|name| !is_runtime(name)));
    match frame {
        Some(name) => format!("{reason} (in {name})"),
        None => reason,
    }
}

fn to_wit(r: &Record) -> wit::InputRecord {
    wit::InputRecord {
        key: r.key.clone(),
        value: r.value.clone(),
        headers: r.headers.iter().map(|h| wit::Header { name: h.name.clone(), value: h.value.clone() }).collect(),
        timestamp: r.timestamp,
        origin: wit::Origin { topic: r.origin.topic.clone(), partition: r.origin.partition, offset: r.origin.offset },
    }
}

fn from_wit(o: wit::OutputRecord) -> Output {
    Output {
        key: o.key,
        value: o.value,
        headers: o.headers.into_iter().map(|h| Header { name: h.name, value: h.value }).collect(),
        timestamp: o.timestamp,
        route: o.route,
    }
}
