//! A live plugin instance: one `Store` with its limits and sandbox grants.

use super::contracts::{Bound, CallError};
use super::host_state::{HostState, LogBucket};
use super::limits::{Grants, Limits};
use super::stderr::PluginStderr;
use super::{Fault, Plugin, PluginError};
use crate::record::{Output, Record, RecordRef, Results};
use crate::state::{CallState, SharedState, StageState, StateError, StateVersion};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};
use wasmtime::{Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// What became of one input record: its outputs, or why it failed.
pub type RecordResult = Result<Vec<Output>, String>;

struct Live {
    store: Store<HostState>,
    bindings: Bound,
}

/// `call`, cut off after `limit`: the plugin yields at every epoch tick and
/// its host calls (WASI's clocks, polls and sockets) are futures, so the
/// limit holds whatever the plugin is doing. Running over is
/// [`Trap::Interrupt`], the CPU limit's trap.
async fn within_limit<T, E: From<wasmtime::Error>>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(E::from(wasmtime::Error::from(Trap::Interrupt))),
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
    /// The kind of fault the last records failed with, and how many in a row.
    streak: Option<(std::mem::Discriminant<Fault>, u32)>,
    /// Why this version is failing (faults on [`ISOLATION_STREAK`] records in
    /// a row, or isolation over its budget), until [`PluginInstance::take_failing`].
    failing: Option<String>,
    /// How many times the instance was replaced after a fault.
    pub replacements: u64,
    /// The stage's keyed state, for a contract 0.3 plugin: a scratch state
    /// until a pipeline gives it the stage's ([`PluginInstance::attach_state`]).
    state: Option<SharedState>,
    /// The version of the state the plugin keeps (read once, at start).
    state_version: StateVersion,
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
            streak: None,
            failing: None,
            replacements: 0,
            state: None,
            state_version: StateVersion::default(),
        };
        if instance.plugin.contract.has_state() {
            instance.state = Some(StageState::scratch(instance.limits.state.bytes));
        }
        let mut live = instance.instantiate()?;
        if instance.plugin.contract.has_state() {
            let asked = block_on(within_limit(instance.init_limit(), live.bindings.state_version(&mut live.store)));
            instance.state_version = asked.map_err(|error| PluginError::InitFault {
                plugin: instance.plugin.name.clone(),
                fault: instance.classify(&live.store, error),
            })?;
        }
        instance.live = Some(live);
        Ok(instance)
    }

    /// The version of the state the plugin keeps, and those it migrates from.
    pub fn state_version(&self) -> &StateVersion {
        &self.state_version
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The configuration `init` was given.
    pub fn config(&self) -> &[(String, String)] {
        &self.config
    }

    /// The stage's keyed state (contract 0.3 plugins).
    pub fn state(&self) -> Option<&SharedState> {
        self.state.as_ref()
    }

    /// Gives this instance its stage's keyed state: its calls read and
    /// change it (only a contract 0.3 plugin has state calls).
    pub fn attach_state(&mut self, state: SharedState) {
        self.state = Some(state);
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
        if let Some(clock) = &self.grants.replay_clock {
            wasi.wall_clock(clock.clone())
                .monotonic_clock(clock.clone())
                .secure_random(super::limits::ReplayClock::random())
                .insecure_random(super::limits::ReplayClock::random())
                .insecure_random_seed(0);
        }
        if self.grants.network {
            wasi.inherit_network().allow_tcp(true).allow_udp(true).allow_ip_name_lookup(true);
        }
        let state =
            HostState::new(wasi.build(), self.limits.memory_bytes, stderr, self.label.clone(), self.log.clone());
        let mut store = Store::new(self.plugin.pre.engine(), state);
        store.limiter(HostState::limiter);
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
        let instantiated = block_on(within_limit(limit, pre.instantiate(&mut store)));
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
        if store.data().memory_limit_hit() {
            return Fault::MemoryLimit { limit_bytes: self.limits.memory_bytes };
        }
        if let Some(refused) = store.data().state_error() {
            return Fault::State(refused.clone());
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
        if let Some(message) = store.data().stderr().panic_message() {
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
        let views: Vec<RecordRef> = inputs.iter().map(Record::view).collect();
        self.transform_views(&views)
    }

    /// [`PluginInstance::transform`] of borrowed records: a chain's later
    /// stages read the outputs of the one before as they are.
    pub fn transform_views(&mut self, inputs: &[RecordRef<'_>]) -> Results<String> {
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
    fn call(&mut self, inputs: &[RecordRef<'_>]) -> Result<Results<String>, Fault> {
        let mut live = match self.live.take() {
            Some(live) => live,
            None => {
                self.replacements += 1;
                self.instantiate().map_err(|e| Fault::Trap(format!("cannot replace the faulted instance: {e}")))?
            }
        };
        live.store.data().stderr().clear();
        let limit = self.time_limit();
        let Live { store, bindings } = &mut live;
        let mut state = self.state.clone().map(|shared| CallState::new(shared, inputs.iter().map(|r| r.origin)));
        if let Some(state) = &mut state {
            if let Err(fault) = self.migrate(store, bindings, state) {
                // A refused or failed conversion leaves the instance sound;
                // a trap or a limit replaces it.
                if matches!(fault, Fault::State(_)) {
                    self.live = Some(live);
                }
                return Err(fault);
            }
        }
        store.data_mut().begin_call(state);
        let results = match block_on(within_limit(limit, bindings.process(store, inputs, &self.limits))) {
            Ok(results) => results,
            Err(error) => return Err(self.fault(&live.store, error)),
        };
        // The call gave results: its state changes join the batch's.
        if let Some(state) = live.store.data_mut().end_call() {
            state.keep();
        }
        self.live = Some(live);
        Ok(results)
    }
}

impl PluginInstance {
    /// The fault a call that gave no results ended with.
    fn fault(&self, store: &Store<HostState>, error: CallError) -> Fault {
        match error {
            CallError::Call(error) => self.classify(store, error),
            CallError::Contract(reason) => Fault::Contract(reason),
        }
    }

    /// Converts the state of the call's partitions kept by another version
    /// with the plugin's `migrate`, into the call's changes (so that a call
    /// that faults, or a batch run again, converts nothing). Each partition
    /// gets the init limit (a partition may hold many keys).
    fn migrate(&self, store: &mut Store<HostState>, bindings: &Bound, state: &mut CallState) -> Result<(), Fault> {
        let version = &self.state_version;
        for old in state.unmigrated(version.current) {
            let (topic, partition, from, to) =
                (old.partition.0.to_string(), old.partition.1, old.from, version.current);
            if !version.migrates_from.contains(&from) {
                return Err(Fault::State(StateError::NoMigrate { topic, partition, from, to }));
            }
            let started = Instant::now();
            let migrated = match block_on(within_limit(self.init_limit(), bindings.migrate(store, from, &old.entries)))
            {
                Ok(Ok(migrated)) => migrated,
                Ok(Err(reason)) => {
                    return Err(Fault::State(StateError::Migrate { topic, partition, from, to, reason }))
                }
                Err(error) => return Err(self.fault(store, error)),
            };
            let (keys, now) = (old.entries.len(), migrated.len());
            state.migrated(old, migrated, to).map_err(Fault::State)?;
            info!(plugin = %self.label, %topic, partition, from, to, keys, now, ms = started.elapsed().as_secs_f64() * 1e3, "state migrated");
        }
        Ok(())
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
