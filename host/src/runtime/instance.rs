//! A live plugin instance: one `Store` with its limits and sandbox grants.

use super::abi;
use super::bindings::{v01, v02};
use super::loader::Pre;
use super::stderr::PluginStderr;
use super::{Fault, Plugin, PluginError};
use crate::record::{Bytes, Header, Output, Record, Results};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Resource limits of one plugin instance. The defaults are safe for any plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call (`init` or one batch), in milliseconds,
    /// whatever the plugin spends it on: running, or waiting in a host call
    /// (a sleep, a poll, a socket).
    pub cpu_ms: u64,
    /// Linear memory the instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Bytes (keys, values, headers) the outputs of one input record may total.
    pub output_bytes: usize,
    /// Outputs one input record may produce.
    pub outputs: usize,
    /// Bytes the outputs of one batch may total, ranges counted as often as
    /// they are given (the host copies each): past it, records fail.
    pub batch_output_bytes: usize,
    /// Log lines per second the plugin may write through the `log` import,
    /// on average (a token bucket); 0: no limit.
    pub log_lines_per_s: u32,
    /// Log lines the plugin may write at once, above the rate.
    pub log_burst: u32,
}

impl Default for Limits {
    /// 128 MiB of memory: plugins that embed an interpreter start at 9 MiB
    /// (JavaScript) to 13 MiB (Python), and SpiderMonkey lets its heap grow
    /// past 64 MiB over batches of 1,000 records before it collects.
    fn default() -> Self {
        Limits {
            cpu_ms: 1_000,
            memory_bytes: 128 << 20,
            output_bytes: 16 << 20,
            outputs: 100_000,
            batch_output_bytes: 256 << 20,
            log_lines_per_s: 100,
            log_burst: 1_000,
        }
    }
}

impl Limits {
    /// Bytes the host copies out of the plugin in one call at most: its
    /// memory (a 0.2 results buffer) plus the batch's outputs (0.1 results,
    /// which may point at the same guest bytes many times).
    pub fn copy_limit(&self) -> usize {
        self.memory_bytes.saturating_add(self.batch_output_bytes)
    }

    /// Checks one record's outputs against the output caps, and adds their
    /// bytes to the batch's `so_far`.
    pub(super) fn check_outputs(&self, outputs: crate::record::Iter<'_>, so_far: &mut usize) -> Result<(), String> {
        let bytes = outputs.clone().map(|o| o.bytes()).sum();
        self.check_totals(outputs.len(), bytes)?;
        self.add_to_batch(so_far, bytes)
    }

    /// Adds one record's `bytes` of output to the batch's `so_far`, unless
    /// that takes the batch over its cap.
    pub(super) fn add_to_batch(&self, so_far: &mut usize, bytes: usize) -> Result<(), String> {
        let total = so_far.saturating_add(bytes);
        if total > self.batch_output_bytes {
            return Err(format!(
                "output limit: the batch's outputs would reach {total} bytes with this record's (limit {} per batch)",
                self.batch_output_bytes
            ));
        }
        *so_far = total;
        Ok(())
    }

    /// Checks one record's `count` outputs of `bytes` in all against the output caps.
    pub(super) fn check_totals(&self, count: usize, bytes: usize) -> Result<(), String> {
        if count > self.outputs {
            return Err(format!("output limit: {count} outputs for one record (limit {})", self.outputs));
        }
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
    /// The instance's log budget (it outlives the store across replacements).
    log: Arc<Mutex<LogBucket>>,
}

/// Bytes of one plugin log line; the rest is cut.
pub const MAX_LOG_LINE: usize = 8 << 10;

/// The plugin log's token bucket: `rate` lines a second on average, `burst`
/// at once. Checked before any formatting, so a flood costs the host one
/// comparison per line. Suppressed lines are counted and summed up in one
/// line at most once a second.
pub struct LogBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    /// Suppressed lines not yet added to the metric (it is kept current after
    /// every batch; the summary line comes at most once a second).
    uncounted: u64,
    /// When the first line of the current suppression was refused.
    since: Option<Instant>,
    pipeline: String,
    plugin: String,
}

impl LogBucket {
    fn new(limits: &Limits, pipeline: &str, plugin: &str) -> Self {
        LogBucket {
            rate: f64::from(limits.log_lines_per_s),
            burst: f64::from(limits.log_burst.max(1)),
            tokens: f64::from(limits.log_burst.max(1)),
            refilled: Instant::now(),
            suppressed: 0,
            uncounted: 0,
            since: None,
            pipeline: pipeline.to_string(),
            plugin: plugin.to_string(),
        }
    }

    /// Whether one more line may be written now.
    fn admit(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        if self.tokens < 1.0 {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate).min(self.burst);
            self.refilled = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.suppressed += 1;
        self.uncounted += 1;
        self.since.get_or_insert_with(Instant::now);
        false
    }

    /// Logs how many lines were suppressed, once a second at most (or now, with `force`).
    fn summarize(&mut self, force: bool) {
        if self.uncounted > 0 {
            crate::telemetry::telemetry().plugin_logs_suppressed(&self.pipeline, &self.plugin, self.uncounted);
            self.uncounted = 0;
        }
        let Some(since) = self.since else { return };
        let elapsed = since.elapsed();
        if self.suppressed == 0 || (!force && elapsed < Duration::from_secs(1)) {
            return;
        }
        warn!(
            pipeline = %self.pipeline,
            plugin = %self.plugin,
            suppressed = self.suppressed,
            "suppressed {} log lines from {}/{} in the last {:.1} s",
            self.suppressed,
            self.pipeline,
            self.plugin,
            elapsed.as_secs_f64().max(0.1)
        );
        self.suppressed = 0;
        self.since = None;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl v01::sluice::transform::types::Host for HostState {}

/// The `log` import of one contract's bindings (the two `Level` enums are
/// distinct types with the same cases).
macro_rules! log_import {
    ($contract:ident) => {
        impl $contract::sluice::transform::log::Host for HostState {
            async fn log(&mut self, level: $contract::sluice::transform::log::Level, message: String) {
                use $contract::sluice::transform::log::Level as L;
                let level = match level {
                    L::Trace => tracing::Level::TRACE,
                    L::Debug => tracing::Level::DEBUG,
                    L::Info => tracing::Level::INFO,
                    L::Warn => tracing::Level::WARN,
                    L::Error => tracing::Level::ERROR,
                };
                self.log_line(level, message)
            }
        }
    };
}

log_import!(v01);
log_import!(v02);

impl HostState {
    /// One line from the plugin's `log` import (either contract), within its budget.
    fn log_line(&mut self, level: tracing::Level, mut message: String) {
        if !self.log.lock().is_ok_and(|mut bucket| bucket.admit()) {
            return;
        }
        if message.len() > MAX_LOG_LINE {
            let total = message.len();
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(&format!("… ({total} bytes in all)"));
        }
        let plugin = &*self.label;
        match level {
            tracing::Level::TRACE => trace!(plugin, "{message}"),
            tracing::Level::DEBUG => debug!(plugin, "{message}"),
            tracing::Level::INFO => info!(plugin, "{message}"),
            tracing::Level::WARN => warn!(plugin, "{message}"),
            _ => error!(plugin, "{message}"),
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did, so a
/// resulting trap is reported as the memory limit rather than a plain trap.
/// The limit is on the total of the instance's linear memories: a
/// component made of several core modules has one memory each.
#[derive(Default)]
struct MemoryCap {
    limit: usize,
    /// Bytes of all the instance's memories.
    total: usize,
    hit: bool,
}

impl MemoryCap {
    fn new(limit: usize) -> Self {
        MemoryCap { limit, ..MemoryCap::default() }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

struct Live {
    store: Store<HostState>,
    bindings: Bound,
}

/// An instance's exports, of the contract its component was built against.
enum Bound {
    V01(v01::Transformer),
    V02(v02::Transformer),
}

impl Bound {
    async fn init(
        &self,
        store: &mut Store<HostState>,
        config: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Bound::V01(bindings) => bindings.sluice_transform_transform().call_init(store, config).await,
            Bound::V02(bindings) => bindings.sluice_transform_batch().call_init(store, config).await,
        }
    }
}

/// `call`, cut off after `limit`: the plugin yields at every epoch tick and
/// its host calls (WASI's clocks, polls and sockets) are futures, so the
/// limit holds whatever the plugin is doing. Running over is
/// [`Trap::Interrupt`], the CPU limit's trap.
async fn within_limit<T>(
    limit: Duration,
    call: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(wasmtime::Error::from(Trap::Interrupt)),
    }
}

/// Runs a plugin call to its end on this thread, inside the Tokio runtime
/// when there is one (WASI's timers and sockets need its drivers): the
/// pipelines call plugins from a worker thread given over to blocking;
/// tests and `sluice plugin test` without a runtime get one of their own.
fn block_on<F: std::future::Future + Send>(call: F) -> F::Output
where
    F::Output: Send,
{
    use tokio::runtime::{Builder, Handle, Runtime, RuntimeFlavor};
    thread_local! {
        static OWN: Option<Runtime> = Builder::new_current_thread().enable_all().build().ok();
    }
    let own = |call: F| {
        OWN.with(|runtime| match runtime {
            Some(runtime) => runtime.block_on(call),
            // No runtime can be built (no threads or file descriptors left):
            // run without one; a plugin that sleeps or uses a socket fails.
            None => futures::executor::block_on(call),
        })
    };
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(call))
        }
        // A single-threaded runtime cannot block: the call gets a thread of its own.
        Ok(_) => std::thread::scope(|scope| match scope.spawn(|| own(call)).join() {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => own(call),
    }
}

/// The least time instantiation and `init` each get, whatever `cpu_ms` says.
pub const INIT_MIN_MS: u64 = 10_000;

/// Isolation gives up after this many records in a row fail with the same kind of fault.
pub const ISOLATION_STREAK: u32 = 3;

/// Isolating a batch's faulty records may take this many times `cpu_ms`.
pub const ISOLATION_BUDGET_CPU_MS: u64 = 10;

/// A plugin instance with its configuration. After a fault the store is
/// dropped and a fresh one is instantiated (and `init`ed) for the next call.
pub struct PluginInstance {
    plugin: Arc<Plugin>,
    config: Vec<(String, String)>,
    limits: Limits,
    grants: Grants,
    label: Arc<str>,
    live: Option<Live>,
    log: Arc<Mutex<LogBucket>>,
    /// Contract 0.2's batch buffer, kept across batches.
    encoder: abi::Encoder,
    /// The kind of fault the last records failed with, and how many in a row.
    streak: Option<(std::mem::Discriminant<Fault>, u32)>,
    /// Why this version is failing (faults on [`ISOLATION_STREAK`] records in
    /// a row, or isolation over its budget), until [`PluginInstance::take_failing`].
    failing: Option<String>,
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
        let log = Arc::new(Mutex::new(LogBucket::new(&limits, context, &plugin.name)));
        let mut instance = PluginInstance {
            plugin,
            config,
            limits,
            grants,
            label,
            live: None,
            log,
            encoder: abi::Encoder::default(),
            streak: None,
            failing: None,
            replacements: 0,
        };
        instance.live = Some(instance.instantiate()?);
        Ok(instance)
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// This instance's version as a reload sees it: the component's hash and
    /// its configuration (a version that fails is refused by this key).
    pub fn version_key(&self) -> String {
        version_key(&self.plugin.hash, &self.config)
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
            memory: MemoryCap::new(self.limits.memory_bytes),
            stderr,
            label: self.label.clone(),
            log: self.log.clone(),
        };
        let mut store = Store::new(self.plugin.pre.engine(), state);
        store.limiter(|state| &mut state.memory);
        // What the host copies out of the plugin in one call (a 0.1 result
        // lifted value by value, a 0.2 results buffer, a host call's
        // arguments) is bounded, whatever the guest's values alias.
        store.set_hostcall_fuel(self.limits.copy_limit());
        // Every epoch tick the plugin yields, so that the call's deadline
        // ([`within_limit`]) is checked however the plugin spends its time.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        let limit = self.init_limit();
        let pre = &self.plugin.pre;
        let instantiated = block_on(within_limit(limit, async {
            Ok(match pre {
                Pre::V01(pre) => Bound::V01(pre.instantiate_async(&mut store).await?),
                Pre::V02(pre) => Bound::V02(pre.instantiate_async(&mut store).await?),
            })
        }));
        // Running over here is over the init limit, not `cpu_ms`.
        let init_fault = |store: &Store<HostState>, error| match self.classify(store, error) {
            Fault::CpuLimit { .. } => Fault::CpuLimit { limit_ms: limit.as_millis() as u64 },
            fault => fault,
        };
        let bindings = instantiated.map_err(|error| match init_fault(&store, error) {
            // A start function that traps or runs over is the instance's own failure.
            fault @ (Fault::CpuLimit { .. } | Fault::MemoryLimit { .. }) => {
                PluginError::InitFault { plugin: name(), fault }
            }
            fault => PluginError::Instantiate { plugin: name(), reason: anyhow::anyhow!("{fault}") },
        })?;
        let init = block_on(within_limit(limit, bindings.init(&mut store, &self.config)));
        match init {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(PluginError::ConfigRejected { plugin: name(), message }),
            Err(error) => Err(PluginError::InitFault { plugin: name(), fault: init_fault(&store, error) }),
        }
    }

    /// How long one batch may take, host calls included.
    fn time_limit(&self) -> Duration {
        Duration::from_millis(self.limits.cpu_ms)
    }

    /// How long instantiation, and then `init`, may each take: `cpu_ms`, but
    /// at least [`INIT_MIN_MS`] (an interpreter starts up in them, and a
    /// start on a busy machine must not fail a pipeline).
    fn init_limit(&self) -> Duration {
        Duration::from_millis(self.limits.cpu_ms.max(INIT_MIN_MS))
    }

    fn classify(&self, store: &Store<HostState>, error: wasmtime::Error) -> Fault {
        if store.data().memory.hit {
            return Fault::MemoryLimit { limit_bytes: self.limits.memory_bytes };
        }
        let trap = error.downcast_ref::<Trap>();
        // wasmtime's hostcall fuel ran out (its error type is private).
        if trap.is_none() && error.chain().any(|e| e.to_string().contains("fuel allocated for hostcalls")) {
            return Fault::CopyLimit { limit_bytes: self.limits.copy_limit() };
        }
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
    ///
    /// Isolation is bounded: after [`ISOLATION_STREAK`] records in a row
    /// fail with the same kind of fault (counted across batches too), or once
    /// it has taken [`ISOLATION_BUDGET_CPU_MS`] × `cpu_ms`, the version is
    /// failing: the batch's remaining records fail without being run, and
    /// [`PluginInstance::take_failing`] says why.
    pub fn transform(&mut self, inputs: &[Record]) -> Results<String> {
        let results = match self.call(inputs) {
            Ok(results) => {
                if results.errors().count() < results.len() {
                    self.streak = None;
                }
                results
            }
            Err(fault) if inputs.len() == 1 => {
                let mut results = Results::default();
                results.push_err(fault.to_string());
                self.count_fault(&fault);
                results
            }
            Err(fault) => {
                warn!(plugin = %self.label, %fault, records = inputs.len(), "batch faulted; retrying its records one by one");
                let budget = Duration::from_millis(self.limits.cpu_ms.saturating_mul(ISOLATION_BUDGET_CPU_MS));
                let started = Instant::now();
                let mut results = Results::with_capacity(inputs.len(), inputs.len());
                for one in inputs.chunks(1) {
                    if let Some(reason) = &self.failing {
                        results.push_err(format!("not run: the plugin version is failing ({reason})"));
                        continue;
                    }
                    match self.call(one) {
                        Ok(result) => {
                            self.streak = None;
                            results.append(result);
                        }
                        Err(fault) => {
                            self.count_fault(&fault);
                            results.push_err(fault.to_string());
                        }
                    }
                    if self.failing.is_none() && started.elapsed() > budget && results.len() < inputs.len() {
                        self.failing = Some(format!(
                            "isolating faulty records took over {} ms ({ISOLATION_BUDGET_CPU_MS} × cpu_ms)",
                            budget.as_millis()
                        ));
                    }
                }
                results
            }
        };
        if let Ok(mut log) = self.log.lock() {
            log.summarize(false);
        }
        results
    }

    /// [`PluginInstance::transform`], with a vector of outputs per record
    /// (for tests and `sluice plugin test`).
    pub fn process(&mut self, inputs: &[Record]) -> Vec<RecordResult> {
        self.transform(inputs).into_records()
    }

    /// One more record failed with `fault`: the version is failing after a streak.
    fn count_fault(&mut self, fault: &Fault) {
        let kind = std::mem::discriminant(fault);
        let count = match self.streak {
            Some((k, n)) if k == kind => n + 1,
            _ => 1,
        };
        self.streak = Some((kind, count));
        if count >= ISOLATION_STREAK && self.failing.is_none() {
            self.failing = Some(format!("{fault} on {count} records in a row"));
        }
    }

    /// Why this version is failing, if it is (once; the streak starts over).
    pub fn take_failing(&mut self) -> Option<String> {
        if self.failing.is_some() {
            self.streak = None;
        }
        self.failing.take()
    }

    /// One call of the plugin on `inputs`: exactly one result per input.
    fn call(&mut self, inputs: &[Record]) -> Result<Results<String>, Fault> {
        let mut live = match self.live.take() {
            Some(live) => live,
            None => {
                self.replacements += 1;
                self.instantiate().map_err(|e| Fault::Trap(format!("cannot replace the faulted instance: {e}")))?
            }
        };
        live.store.data().stderr.clear();
        let limit = self.time_limit();
        let results = match &live.bindings {
            Bound::V01(bindings) => {
                let batch: Vec<v01::sluice::transform::types::InputRecord> = inputs.iter().map(to_wit).collect();
                let call = bindings.sluice_transform_transform().call_process_batch(&mut live.store, &batch);
                let results = match block_on(within_limit(limit, call)) {
                    Ok(results) => results,
                    Err(error) => return Err(self.classify(&live.store, error)),
                };
                if results.len() != inputs.len() {
                    return Err(Fault::Contract(format!("{} results for {} records", results.len(), inputs.len())));
                }
                let outputs = results.iter().map(|r| r.as_ref().map_or(0, Vec::len)).sum();
                let mut decoded = Results::with_owned_capacity(results.len(), outputs);
                let mut batch_bytes = 0;
                for result in results {
                    decoded.push_with(|all| {
                        let mine = all.len();
                        for out in result? {
                            all.push(from_wit(out));
                        }
                        self.limits.check_outputs(all.range(mine..all.len()), &mut batch_bytes)
                    });
                }
                decoded
            }
            Bound::V02(bindings) => {
                let batch = self.encoder.encode(inputs).map_err(Fault::Contract)?;
                // The results buffer is lifted as one copy; every output is
                // then decoded from it in one pass.
                let call = bindings.sluice_transform_batch().call_process(&mut live.store, batch);
                let results = match block_on(within_limit(limit, call)) {
                    Ok(results) => results,
                    Err(error) => return Err(self.classify(&live.store, error)),
                };
                abi::decode(&results.into(), inputs.len(), &self.limits).map_err(Fault::Contract)?
            }
        };
        self.live = Some(live);
        Ok(results)
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        if let Ok(mut log) = self.log.lock() {
            log.summarize(true);
        }
    }
}

/// A plugin version with its configuration, as one key.
pub fn version_key(hash: &str, config: &[(String, String)]) -> String {
    let config: Vec<String> = config.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{hash} {}", config.join("\u{1f}"))
}

/// `reason (in plugin_function)`: the innermost frame of the plugin's own
/// code, skipping the standard library's panic and abort machinery. One line,
/// so that it fits a log field or a dead-letter header.
fn with_location(reason: String, error: &wasmtime::Error) -> String {
    let is_runtime = |name: &str| {
        name.contains('#')
            || ["std", "core", "alloc", "__rust", "abort", "panic", "dlmalloc", "wit_bindgen"]
                .iter()
                .any(|p| name.contains(p))
    };
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().filter_map(|f| f.func_name()).find(|name| !is_runtime(name)));
    match frame {
        Some(name) => format!("{reason} (in {name})"),
        None => reason,
    }
}

use v01::sluice::transform::types as wit;

fn to_wit(r: &Record) -> wit::InputRecord {
    wit::InputRecord {
        key: r.key.as_deref().map(<[u8]>::to_vec),
        value: r.value.to_vec(),
        headers: r.headers.iter().map(|h| wit::Header { name: h.name.clone(), value: h.value.clone() }).collect(),
        timestamp: r.timestamp,
        origin: wit::Origin {
            topic: r.origin.topic.to_string(),
            partition: r.origin.partition,
            offset: r.origin.offset,
        },
    }
}

fn from_wit(o: wit::OutputRecord) -> Output {
    Output {
        key: o.key.map(Bytes::from),
        value: o.value.into(),
        headers: o.headers.into_iter().map(|h| Header { name: h.name, value: h.value }).collect(),
        timestamp: o.timestamp,
        route: o.route,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_is_on_the_total_of_all_memories() {
        let mib = 1 << 20;
        let mut cap = MemoryCap::new(64 * mib);
        // Two memories created at 16 MiB each, then grown.
        assert!(cap.memory_growing(0, 16 * mib, None).unwrap());
        assert!(cap.memory_growing(0, 16 * mib, None).unwrap());
        assert!(cap.memory_growing(16 * mib, 40 * mib, None).unwrap(), "56 MiB in all");
        assert!(!cap.hit);
        assert!(
            !cap.memory_growing(16 * mib, 32 * mib, None).unwrap(),
            "72 MiB in all: refused, though each is under 64"
        );
        assert!(cap.hit);
        assert!(cap.memory_growing(16 * mib, 24 * mib, None).unwrap(), "64 MiB in all");
    }
}
